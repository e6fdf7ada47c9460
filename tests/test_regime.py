"""MNN's response to collapse: raised below 0.6 d, undetermined in the band below d, lowered above; Matrix Entropy's
always falls (issue 28's table reproduced, issue 34's band swept)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mnn_callback.core.metrics import compute_metrics
from mnn_callback.core.regime import BAND, FEWER_TOKENS, MIXED, MORE_TOKENS, regime, regime_note

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
def test_mnn_by_rank_reproduces_the_table_on_each_side_of_the_band(n, d):
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


def vs_noise(n: int, d: int, rank: int, draws: int = 16) -> float:
    return compute_metrics(random_basis(n, d, rank, draws=draws, seed=n))["mnn_vs_noise"].mean().item()


@pytest.mark.parametrize("fraction", [0.25, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0, 1.5])
def test_the_labels_follow_the_measured_direction_of_a_random_basis_collapse_through_the_band(fraction):
    """Below the band every rank raises MNN, at or above d every rank lowers it, and in the band ranks disagree."""
    d = 64
    n = round(fraction * d)
    label = regime(n, n, d)
    directions = {rank: vs_noise(n, d, rank) > 1.0 for rank in (1, 4, 16)}
    if label == FEWER_TOKENS:
        assert fraction < 0.6 and all(directions.values())
    elif label == MORE_TOKENS:
        assert fraction >= 1.0 and not any(directions.values())
    else:
        assert label == BAND and 0.6 <= fraction < 1.0
    if 0.75 <= fraction <= 0.85:  # inside the band one collapse raises MNN and another lowers it
        assert not directions[1] and directions[16]


@pytest.mark.parametrize("d", [128, 256])
def test_a_collapse_onto_coordinate_axes_or_an_outlier_lowers_mnn_far_below_the_band(d):
    """Not random-basis: 4 coordinate axes, or rank 4 plus one outlier coordinate, score below noise from n = 32 on."""
    generator = torch.Generator().manual_seed(1)
    for n in (32, 64, 128, d, 2 * d):
        axes = torch.zeros(8, n, d)
        axes[..., :4] = torch.randn(8, n, 4, generator=generator)
        outlier = random_basis(n, d, 4, draws=8, seed=n)
        outlier[..., 0] += 20 * torch.randn(8, n, generator=generator)
        for hidden in (axes, outlier):
            values = compute_metrics(hidden)
            gaussian = compute_metrics(torch.randn(8, n, d, generator=generator))
            assert values["mnn_vs_noise"].mean() < 1.0, n
            assert values["matrix_entropy"].mean() < gaussian["matrix_entropy"].mean()  # the collapse signal


def test_regime_names_and_notes():
    assert regime(8, 64, 768) == FEWER_TOKENS and regime(768, 900, 768) == MORE_TOKENS
    assert regime(500, 700, 768) == BAND and regime(700, 800, 768) == MIXED and regime(64, 500, 768) == MIXED
    assert "RAISES" in regime_note(FEWER_TOKENS) and "lowers" in regime_note(MORE_TOKENS)
    assert "not determined" in regime_note(BAND)
    assert all("coordinate axes" in regime_note(name) for name in (FEWER_TOKENS, BAND, MIXED))
    with pytest.raises(ValueError, match="expected a hidden size d >= 1, got 0"):
        regime(1, 2, 0)
    with pytest.raises(ValueError, match="expected fewest <= most tokens"):
        regime(5, 2, 8)
    with pytest.raises(ValueError, match="expected a regime"):
        regime_note("n = d")
