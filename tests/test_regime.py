"""MNN's response to collapse changes sign at n = d; Matrix Entropy's does not (issue 28's table, reproduced)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mnn_callback.core.metrics import compute_metrics
from mnn_callback.core.regime import FEWER_TOKENS, MIXED, MORE_TOKENS, regime, regime_note

RANKS = (1, 4, 16, 64, None)  # None: full-rank Gaussian


def random_basis(n: int, d: int, rank: int | None, draws: int = 3, seed: int = 0) -> torch.Tensor:
    """``draws`` matrices of n tokens in d dimensions spanning a random rank-``rank`` subspace."""
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(draws, n, d, generator=generator)
    basis = torch.linalg.qr(torch.randn(draws, d, rank, generator=generator)).Q
    return torch.randn(draws, n, rank, generator=generator) @ basis.transpose(1, 2)


def by_rank(n: int, d: int) -> dict[str, list[float]]:
    values = [compute_metrics(random_basis(n, d, rank)) for rank in RANKS]
    return {name: [v[name].mean().item() for v in values] for name in ("mnn", "mnn_vs_noise", "matrix_entropy")}


# MNN by rank 1, 4, 16, 64 and Gaussian, from the review (random-basis data, centred, unit rows)
TABLE = {
    (64, 768): [0.620, 0.473, 0.396, 0.355, 0.332],
    (256, 768): [0.863, 0.766, 0.686, 0.640, 0.605],
    (2048, 768): [0.489, 0.577, 0.602, 0.610, 0.612],
}


@pytest.mark.parametrize(("n", "d"), list(TABLE))
def test_mnn_by_rank_reproduces_the_table_and_its_direction_flips_at_n_equals_d(n, d):
    values = by_rank(n, d)
    assert values["mnn"] == pytest.approx(TABLE[(n, d)], abs=0.01)
    steps = [later - earlier for earlier, later in itertools.pairwise(values["mnn"])]
    if n < d:
        assert all(step < 0 for step in steps)  # fewer directions: HIGHER MNN
        assert values["mnn_vs_noise"][0] > 1.0  # and a ratio above 1
    else:
        assert all(step > 0 for step in steps)  # fewer directions: lower MNN
        assert values["mnn_vs_noise"][0] < 1.0
    entropy = values["matrix_entropy"]
    assert all(later > earlier for earlier, later in itertools.pairwise(entropy))  # falls with collapse on both sides
    assert values["mnn_vs_noise"][-1] == pytest.approx(1.0, abs=0.02)  # Gaussian data: the noise reference


def test_mnn_vs_noise_of_collapsed_data_on_each_side():
    """Rank-4 data scores 1.27 at 64 x 256 and 0.96 at 512 x 64 (the review's numbers); rank 1 has a closed form."""
    fewer = [compute_metrics(random_basis(64, 256, rank, draws=50))["mnn_vs_noise"].mean().item() for rank in (1, 4)]
    more = [compute_metrics(random_basis(512, 64, rank, draws=50))["mnn_vs_noise"].mean().item() for rank in (1, 4)]
    assert fewer[0] > fewer[1] > 1.0 and more[0] < more[1] < 1.0
    assert fewer[1] == pytest.approx(1.27, abs=0.03) and more[1] == pytest.approx(0.96, abs=0.03)
    assert fewer[0] == pytest.approx(1.50, abs=0.03)


@pytest.mark.parametrize(("n", "d"), [(64, 256), (512, 64)])
def test_rank_one_data_has_the_closed_form_mnn(n, d):
    """Rows +-u once centred and normalised: column norms sqrt(n) |u_j|, MNN = top min(n, d) |u_j| / sqrt(n)."""
    hidden = random_basis(n, d, 1, draws=4, seed=9)
    direction = hidden[:, 0, :] / hidden[:, 0, :].norm(dim=-1, keepdim=True)
    expected = direction.abs().topk(min(n, d), dim=-1).values.sum(dim=-1) / n**0.5
    assert torch.allclose(compute_metrics(hidden)["mnn"].double(), expected.double(), rtol=1e-4)


def test_regime_names_and_notes():
    assert regime(8, 64, 768) == FEWER_TOKENS and regime(768, 900, 768) == MORE_TOKENS
    assert regime(700, 800, 768) == MIXED
    assert "RISES" in regime_note(FEWER_TOKENS) and "falls" in regime_note(MORE_TOKENS)
    with pytest.raises(ValueError, match="expected a hidden size d >= 1, got 0"):
        regime(1, 2, 0)
    with pytest.raises(ValueError, match="expected fewest <= most tokens"):
        regime(5, 2, 8)
    with pytest.raises(ValueError, match="expected a regime"):
        regime_note("n = d")
