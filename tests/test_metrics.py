"""The metric core against an independent float64 reference, closed forms, invariances and NaN rules."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import DEVICES, make_hidden
from reference import reference_metrics

from mnn_callback import MNNWarning
from mnn_callback.core import metrics
from mnn_callback.core.metrics import (
    compute_metrics,
    effective_rank,
    matrix_entropy,
    matrix_nuclear_norm,
    nuclear_norm,
)

KEYS = ("mnn", "nuclear_norm", "matrix_entropy", "entropy_nats", "erank", "renyi2_entropy")


def tolerance(key: str, kind: str, input_dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
    if compute_dtype == torch.float64:
        return 1e-9
    if key == "nuclear_norm" and kind == "rank_deficient" and input_dtype != torch.float32:
        # Rounding a rank-3 matrix to 16 bits adds tiny singular values that float32 cannot
        # resolve through the Gram matrix (it squares them); see docs/numerics.md.
        return 2e-2
    if key == "nuclear_norm" and kind == "anisotropic":
        return 1e-3  # singular values under ~1e-3 sigma_max are below float32's Gram resolution
    return 2e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 64), (96, 24), (40, 40)], ids=["L<d", "L>d", "L=d"])
@pytest.mark.parametrize("kind", ["random", "rank_deficient", "anisotropic"])
def test_matches_float64_reference(kind, shape, input_dtype, compute_dtype, device):
    hidden = make_hidden(kind, 3, *shape).to(input_dtype)
    got = compute_metrics(hidden.to(device), dtype=compute_dtype)
    for key in KEYS:
        assert got[key].shape == (3,)
        assert got[key].dtype == compute_dtype
        assert got[key].device.type == device
    for b in range(3):
        expected = reference_metrics(hidden[b].double().numpy())
        for key in KEYS:
            rtol = tolerance(key, kind, input_dtype, compute_dtype)
            assert got[key][b].item() == pytest.approx(expected[key], rel=rtol, abs=1e-7), (key, b)


@pytest.mark.parametrize("device", DEVICES)
def test_single_metric_functions_equal_compute_metrics(device):
    hidden = make_hidden("anisotropic", 2, 20, 12).to(device)
    mask = torch.ones(2, 20, device=device)
    mask[1, 15:] = 0
    everything = compute_metrics(hidden, mask)
    torch.testing.assert_close(matrix_nuclear_norm(hidden, mask), everything["mnn"])
    torch.testing.assert_close(nuclear_norm(hidden, mask), everything["nuclear_norm"])
    torch.testing.assert_close(matrix_entropy(hidden, mask), everything["matrix_entropy"])
    torch.testing.assert_close(matrix_entropy(hidden, mask, normalized=False), everything["entropy_nats"])
    torch.testing.assert_close(effective_rank(hidden, mask), everything["erank"])


def test_two_dimensional_input_gives_zero_dimensional_output():
    hidden = make_hidden("random", 1, 10, 6)[0]
    out = compute_metrics(hidden)
    assert all(value.shape == () for value in out.values())
    batched = compute_metrics(hidden[None])
    for key in KEYS:
        assert out[key].item() == pytest.approx(batched[key][0].item(), rel=1e-6)
    assert matrix_nuclear_norm(hidden, torch.ones(10)).shape == ()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(side, device):
    lengths = [7, 19, 2, 12]
    width, d = max(lengths), 16
    sequences = [make_hidden("anisotropic", 1, n, d, seed=n)[0] for n in lengths]
    padded = torch.full((len(lengths), width, d), math.nan)  # garbage in padding must not leak
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, (n, seq) in enumerate(zip(lengths, sequences, strict=True)):
        rows = slice(0, n) if side == "right" else slice(width - n, width)
        padded[b, rows] = seq
        mask[b, rows] = 1
    batched = compute_metrics(padded.to(device), mask.to(device))
    for b, seq in enumerate(sequences):
        alone = compute_metrics(seq.to(device))
        for key in KEYS:
            assert batched[key][b].item() == pytest.approx(alone[key].item(), rel=1e-5, abs=1e-7), (key, b)


def test_invariant_to_token_order_and_global_scale():
    hidden = make_hidden("anisotropic", 2, 30, 20).double()
    base = compute_metrics(hidden, dtype=torch.float64)
    permuted = compute_metrics(hidden[:, torch.randperm(30)], dtype=torch.float64)
    for factor in (2.0**-20, 3.0, 2.0**30):
        scaled = compute_metrics(hidden * factor, dtype=torch.float64)
        for key in KEYS:
            torch.testing.assert_close(scaled[key], base[key], rtol=1e-9, atol=1e-12)
    for key in KEYS:
        torch.testing.assert_close(permuted[key], base[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 30), (40, 10)])
def test_rotation_of_hidden_space_keeps_spectral_metrics(shape):
    hidden = make_hidden("anisotropic", 2, *shape, seed=3).double()
    q, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64))
    base = compute_metrics(hidden, dtype=torch.float64)
    rotated = compute_metrics(hidden @ q, dtype=torch.float64)
    for key in ("nuclear_norm", "matrix_entropy", "entropy_nats", "erank", "renyi2_entropy"):
        torch.testing.assert_close(rotated[key], base[key], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(rotated["mnn"], base["mnn"])  # MNN depends on the basis, as it should


def test_the_same_data_in_another_basis_moves_mnn_tenfold():
    """README, Reading the curves: rank-4 data, n = 512, d = 768, in the coordinate basis and rotated."""
    g = torch.Generator().manual_seed(0)
    n, d = 512, 768
    axis_aligned = torch.zeros(n, d, dtype=torch.float64)
    axis_aligned[:, :4] = torch.randn(n, 4, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sparse = compute_metrics(axis_aligned, dtype=torch.float64)
    dense = compute_metrics(axis_aligned @ rotation, dtype=torch.float64)
    assert sparse["mnn"].item() == pytest.approx(0.088, abs=0.002)  # at most 2 / sqrt(n): four columns
    assert dense["mnn"].item() == pytest.approx(0.914, abs=0.01)
    for key in ("nuclear_norm", "matrix_entropy", "erank", "renyi2_entropy"):
        assert dense[key].item() == pytest.approx(sparse[key].item(), rel=1e-9), key
    assert sparse["erank"].item() < 4.0 + 1e-9  # four directions, whatever the basis


def test_one_huge_first_token_fakes_compression_and_masking_it_restores_the_values():
    """README, Reading the curves: an attention-sink-like first token (skip_first_tokens=1 masks it)."""
    x = torch.randn(256, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spiky = x.clone()
    spiky[0, :4] = 1000 * x.norm(dim=1).mean()
    without_first = torch.ones(256)
    without_first[0] = 0
    base, faked = compute_metrics(x, dtype=torch.float64), compute_metrics(spiky, dtype=torch.float64)
    restored = compute_metrics(spiky, without_first, dtype=torch.float64)
    assert (base["erank"].item(), faked["erank"].item()) == (pytest.approx(216, abs=1), pytest.approx(1.18, abs=0.01))
    assert faked["matrix_entropy"].item() == pytest.approx(0.025, abs=0.002)
    assert (base["mnn"].item(), faked["mnn"].item()) == (pytest.approx(0.605, abs=0.002), pytest.approx(0.2, abs=0.002))
    expected = compute_metrics(x[1:], dtype=torch.float64)
    for key in ("erank", "matrix_entropy", "mnn", "nuclear_norm"):
        assert restored[key].item() == pytest.approx(expected[key].item(), rel=1e-9), key


def test_rank_one_after_centring_has_zero_entropy():
    n, d = 25, 8
    direction = torch.randn(d, dtype=torch.float64)
    t = torch.randn(n, 1, dtype=torch.float64)
    hidden = torch.randn(d, dtype=torch.float64) + t * direction
    out = compute_metrics(hidden, dtype=torch.float64)
    assert out["matrix_entropy"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["erank"].item() == pytest.approx(1.0, abs=1e-12)
    # Z = s * v^T with signs s: one singular value sqrt(n); column norms sqrt(n) * |v_j|
    unit = (direction / direction.norm()).abs().sort(descending=True).values
    assert out["nuclear_norm"].item() == pytest.approx(1 / math.sqrt(n), rel=1e-12)
    assert out["mnn"].item() == pytest.approx(unit[: min(n, d)].sum().item() / math.sqrt(n), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonal_columns_make_mnn_exact(dtype):
    # Rows +-e_i (e_i repeated k_i times each way): centred, unit rows, Z^T Z = diag(2 k_i).
    d = 6
    multiplicity = [1, 2, 3, 1, 4, 2]
    rows = []
    for i, k in enumerate(multiplicity):
        e = torch.zeros(d)
        e[i] = 5.0
        rows += [e] * k + [-e] * k
    hidden = torch.stack(rows)[torch.randperm(len(rows))]
    n = hidden.shape[0]
    out = compute_metrics(hidden, top_d=d, dtype=dtype)
    expected = sum(math.sqrt(2 * k) for k in multiplicity) / n
    assert out["mnn"].item() == pytest.approx(expected, rel=1e-6)
    assert out["nuclear_norm"].item() == pytest.approx(expected, rel=1e-6)


def test_isotropic_input_has_full_entropy():
    d = 16
    eye = torch.eye(d, dtype=torch.float64)
    out = compute_metrics(torch.cat([eye, -eye]), dtype=torch.float64)
    assert out["matrix_entropy"].item() == pytest.approx(1.0, rel=1e-12)
    assert out["erank"].item() == pytest.approx(d, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_tokens_are_fully_collapsed(dtype):
    hidden = torch.randn(7).repeat(9, 1) * 123.0
    out = compute_metrics(hidden, dtype=dtype)
    assert out["mnn"].item() == 0.0
    assert out["nuclear_norm"].item() == 0.0
    assert out["matrix_entropy"].item() == 0.0
    assert out["erank"].item() == 1.0


@pytest.mark.parametrize("shape", [(2, 3), (5, 64), (64, 5), (33, 33), (200, 16)])
@pytest.mark.parametrize("kind", ["random", "rank_deficient", "anisotropic"])
def test_bounds(kind, shape):
    n, d = shape
    out = compute_metrics(make_hidden(kind, 4, n, d, seed=n * d))
    assert ((out["mnn"] >= 0) & (out["mnn"] <= 1 + 1e-6)).all()
    assert ((out["nuclear_norm"] >= 0) & (out["nuclear_norm"] <= 1 + 1e-6)).all()
    assert ((out["matrix_entropy"] >= 0) & (out["matrix_entropy"] <= 1 + 1e-6)).all()
    assert ((out["erank"] >= 1 - 1e-6) & (out["erank"] <= min(n, d) + 1e-4)).all()
    # MNN approximates the nuclear norm from below or above, but both live on the same scale
    assert torch.isfinite(out["mnn"] / out["nuclear_norm"]).all()


def test_nan_rules():
    hidden = make_hidden("random", 6, 8, 5)
    mask = torch.ones(6, 8)
    mask[0, 1:] = 0  # one valid token
    mask[1] = 0  # all padding
    hidden[2, 3, 1] = math.nan  # NaN in a valid token
    hidden[3, 4, 0] = math.inf  # Inf in a valid token
    mask[4, 6:] = 0
    hidden[4, 7, 2] = math.nan  # NaN in padding only: fine
    out = compute_metrics(hidden, mask)
    for key in KEYS:
        assert torch.isnan(out[key][:4]).all(), key
        assert torch.isfinite(out[key][4:]).all(), key
    assert torch.isnan(compute_metrics(torch.randn(1, 4))["mnn"])
    assert torch.isnan(compute_metrics(torch.randn(0, 4))["erank"])


def test_input_is_not_modified_and_no_graph_is_built():
    hidden = make_hidden("random", 2, 6, 4).requires_grad_()
    before = hidden.detach().clone()
    out = compute_metrics(hidden)
    assert torch.equal(hidden.detach(), before)
    assert all(value.grad_fn is None and not value.requires_grad for value in out.values())


def test_top_d():
    hidden = make_hidden("random", 1, 10, 6)[0].double()
    expected = reference_metrics(hidden.numpy(), top_d=2)["mnn"]
    assert matrix_nuclear_norm(hidden, top_d=2, dtype=torch.float64).item() == pytest.approx(expected, rel=1e-12)
    assert matrix_nuclear_norm(hidden, top_d=100).item() == pytest.approx(
        matrix_nuclear_norm(hidden, top_d=6).item(), rel=1e-7
    )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: compute_metrics([[1.0, 2.0]]), TypeError, "torch.Tensor"),
        (lambda: compute_metrics(torch.ones(3, 4, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: compute_metrics(torch.ones(4)), ValueError, "shape"),
        (lambda: compute_metrics(torch.ones(2, 3, 4), torch.ones(2, 4)), ValueError, "attention_mask"),
        (lambda: compute_metrics(torch.ones(3, 4), dtype=torch.float16), ValueError, "dtype"),
        (lambda: compute_metrics(torch.ones(3, 4), top_d=0), ValueError, "top_d"),
        (lambda: matrix_nuclear_norm(torch.ones(3, 4), top_d=1.5), ValueError, "top_d"),
    ],
)
def test_bad_input_gives_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_eigensolver_failure_is_retried(monkeypatch):
    hidden = make_hidden("anisotropic", 3, 12, 8)
    expected = compute_metrics(hidden)
    real = torch.linalg.eigvalsh
    calls = {"n": 0}

    def fail_once(matrix):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigvalsh", fail_once)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a successful retry is silent
        got = compute_metrics(hidden)
    assert calls["n"] == 2
    for key in KEYS:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_eigensolver_that_keeps_failing_gives_nan_and_a_warning(monkeypatch):
    def always_fail(matrix):
        raise torch.linalg.LinAlgError("simulated: failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", always_fail)
    with pytest.warns(MNNWarning, match="eigensolver failed on 2 of 2"):
        out = compute_metrics(make_hidden("random", 2, 5, 4))
    assert torch.isfinite(out["mnn"]).all()  # needs no eigensolve
    for key in ("nuclear_norm", "matrix_entropy", "entropy_nats", "erank"):
        assert torch.isnan(out[key]).all()


def test_gram_chunking_does_not_change_results():
    hidden = make_hidden("anisotropic", 5, 24, 16)
    normalized = metrics._normalize(*metrics._as_batch(hidden, None, torch.float32)[:2], torch.float32)
    whole = metrics._spectra(normalized.z, "exact")
    chunked = metrics._spectra(normalized.z, "exact", memory_share=0.0, min_chunk_elements=0)  # 1 per chunk
    for key, value in whole.items():
        torch.testing.assert_close(chunked[key], value)


def test_metrics_module_imports_no_transformers():
    code = "import sys, mnn_callback.core.metrics; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
