"""The noise floor of MNN: the shipped table against fresh Monte Carlo, and random hidden states at ratio 1."""

from __future__ import annotations

import math

import pytest
import torch

from mnn_callback.core.metrics import compute_metrics, matrix_nuclear_norm
from mnn_callback.core.noise import _mnn_of_full_matrices, expected_noise_mnn, monte_carlo_mnn, noise_table

# grid points, points between grid points on both axes, both sides of n = d, the corners of 2..8192
SHAPES = [
    (2, 2), (3, 5), (7, 100), (17, 13), (50, 40), (300, 301), (301, 300), (123, 4567), (1000, 3000),
    (5000, 700), (600, 600), (2, 8192), (8192, 2), (8192, 8192),
]  # fmt: skip


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_the_table_is_within_one_percent_of_a_fresh_monte_carlo(n, d):
    """1000 draws (fewer for the largest shapes, where a few draws already pin the mean to 0.1%)."""
    draws = min(1000, max(4, math.ceil(4e7 / (n * d))))
    mean, error = monte_carlo_mnn(n, d, draws, seed=12345)  # other draws than the table's
    assert error / mean < 0.004  # the Monte Carlo itself is precise enough to judge 1% (at 2.5 standard errors)
    table = expected_noise_mnn(torch.tensor([n]), d).item()
    assert table == pytest.approx(mean, rel=0.01), (n, d, table, mean)


# beyond the table (d or n above 16384: the independent-columns model) and the closed forms
BEYOND = [(64, 20000, 200), (7, 20000, 400), (16, 32768, 300), (2, 20000, 600), (20000, 64, 20), (3, 40000, 300)]


@pytest.mark.parametrize(("n", "d", "draws"), BEYOND)
def test_beyond_the_table_the_model_is_within_one_percent_of_a_fresh_monte_carlo(n, d, draws):
    mean, error = monte_carlo_mnn(n, d, draws, seed=2026)
    assert error / mean < 0.003
    expected = expected_noise_mnn(torch.tensor([n]), d).item()
    assert expected == pytest.approx(mean, rel=0.01), (n, d, expected, mean)


@pytest.mark.parametrize("n", [2, 3, 17, 1000])
def test_one_dimension_is_exact_and_one_token_undefined(n):
    mean, _ = monte_carlo_mnn(n, 1, 20, seed=1)
    assert expected_noise_mnn(torch.tensor([n]), 1).item() == pytest.approx(1 / math.sqrt(n), rel=1e-12)
    assert mean == pytest.approx(1 / math.sqrt(n), rel=1e-6)  # every draw: a centred row normalised to +-1
    assert math.isnan(expected_noise_mnn(torch.tensor([1]), 1).item())


def test_the_model_continues_the_table_at_its_edge():
    """Just inside and just beyond the largest hidden size of the table agree (no jump at the edge)."""
    lengths = torch.tensor([2, 16, 100, 1000, 8000])
    inside = expected_noise_mnn(lengths, 16384)
    beyond = expected_noise_mnn(lengths, 16385)
    assert torch.allclose(inside, beyond, rtol=0.005)


def test_random_gaussian_hidden_states_sit_at_ratio_one():
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(400, 200, 64, generator=generator)
    lengths = torch.randint(10, 201, (400,), generator=generator)
    mask = (torch.arange(200)[None, :] < lengths[:, None]).long()
    ratio = compute_metrics(hidden, mask)["mnn_vs_noise"].double()
    standard_error = ratio.std().item() / math.sqrt(len(ratio))
    assert abs(ratio.mean().item() - 1.0) < 3 * standard_error  # 1 within its standard error (3 s.e.)


def test_the_table_covers_its_grid_and_the_lookup_handles_the_edges():
    table = noise_table()
    assert min(table) == 2 and max(table) == 16384
    for d, (lengths, _) in table.items():
        assert d in lengths or d > max(lengths)  # every row has n = d, where MNN has its kink
        assert set(range(2, 17)) <= set(lengths)
    values = expected_noise_mnn(torch.tensor([0, 1, 2, 20000]), 50)
    assert math.isnan(values[0]) and math.isnan(values[1])  # fewer than 2 tokens
    assert 0 < values[3].item() <= math.sqrt(50 / 20000)  # beyond the table's n: the model, below the cap
    assert compute_metrics(torch.randn(5, 8), top_d=2)["mnn_vs_noise"].isnan()  # defined for the default D only


def test_the_monte_carlo_draws_use_the_metric_itself():
    batch = torch.randn(6, 37, 20, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_mnn_of_full_matrices(batch), matrix_nuclear_norm(batch), rtol=1e-6, atol=0)
