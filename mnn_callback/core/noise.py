"""The noise reference of MNN: its expected value for i.i.d. isotropic Gaussian hidden states of the same shape.

With unit rows, MNN of an ``n x d`` matrix is capped at ``(min(n, d) / n)^1/2``. Random directions
sit near that cap only when ``n >= d``; with fewer tokens than dimensions (``n < d``, where most LLM
probes live) only the ``n`` largest of ``d`` column norms count, and noise sits far below it
(0.34 of the cap at 64 x 768, 0.15 at 64 x 4096). So the noise value peaks at ``n = d`` and falls
on both sides of it. The ratio ``MNN / E[MNN of noise with the same n and d]`` says how a measured
value compares with random directions at its shape (1.0: indistinguishable); which way a
collapse moves it depends on the regime (see the README, "Reading the curves").

Where ``E[MNN of noise]`` comes from, by shape:

- ``d = 1``: exactly ``1 / sqrt(n)`` (every centred, normalised row is +-1).
- ``2 <= d <= 16384`` and ``n <= 16384``: a table measured by seeded Monte Carlo
  (``data/mnn_noise.json``, rebuilt by ``benchmarks/noise_table.py``): per hidden size ``d`` of a
  grid, the ratio ``r`` of the expectation to the cap at token counts that include ``n = d``
  (MNN's kink). Between grid points ``r`` is interpolated linearly in ``log n`` at a fixed
  ``log(n / d)`` (never across the kink), then linearly in ``log d``.
- Beyond the table (larger ``d`` or ``n``): the independent-columns model. Row norms concentrate
  there, so a column's norm is ``(n / (d (n - 1)))^1/2 chi_{n-1}``, independently per column, and

      E[MNN] = (n / (d (n - 1)))^1/2 / n * E[sum of the min(n, d) largest of d i.i.d. chi_{n-1}]

  computed by quadrature (``E[sum of the k largest] = int_0^inf E[min(k, Binomial(d, S(t)))] dt``,
  ``S`` the chi survival function); for ``n >= d`` it is ``(d / n)^1/2 E[chi_{n-1}] / (n - 1)^1/2``.
  Within 0.25% of Monte Carlo at every shape tested (``tests/test_noise.py``); a row beyond the
  table is computed once per hidden size and cached.
- ``n = 1``: undefined (the centred row is zero): NaN.

Lookups cost one gather per batch: the curve for a hidden size is built once and cached.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TABLE_FILE", "expected_noise_mnn", "monte_carlo_mnn", "noise_table", "row_lengths"]

TABLE_FILE = Path(__file__).resolve().parent.parent / "data" / "mnn_noise.json"
SMALL = 16  # every n up to this many tokens is a grid point of every row


def cap(n: float, d: float) -> float:
    """The largest MNN of an n x d matrix with unit rows: (min(n, d) / n)^1/2."""
    return math.sqrt(min(n, d) / n)


def row_lengths(d: int, largest: int, steps_per_octave: int = 4) -> list[int]:
    """The token counts of a row at hidden size d: 2 .. SMALL, then steps of 2^(1/4) around n = d, up to ``largest``."""
    values = set(range(2, SMALL + 1)) | {largest, d}
    j = math.ceil(steps_per_octave * math.log2(2 / d))
    while d * 2 ** (j / steps_per_octave) <= largest:
        values.add(max(2, round(d * 2 ** (j / steps_per_octave))))
        j += 1
    return sorted(value for value in values if 2 <= value <= largest)


def monte_carlo_mnn(n: int, d: int, draws: int, seed: int = 0, chunk_elements: int = 2**24) -> tuple[float, float]:
    """Mean and standard error of MNN over ``draws`` i.i.d. N(0, 1) matrices of shape (n, d) (float64 sums).

    Draws come from a private generator with ``seed`` (the global RNG is not touched), in chunks of
    about ``chunk_elements`` numbers.
    """
    generator = torch.Generator().manual_seed(seed)
    values = []
    per_chunk = max(1, chunk_elements // (n * d))
    for start in range(0, draws, per_chunk):
        batch = torch.randn(min(per_chunk, draws - start), n, d, generator=generator)
        values.append(_mnn_of_full_matrices(batch).double())
    samples = torch.cat(values)
    spread = samples.std().item() if draws > 1 else math.nan
    return samples.mean().item(), spread / math.sqrt(draws)


def _mnn_of_full_matrices(batch: Tensor) -> Tensor:
    """MNN of each (n, d) matrix of ``batch`` without padding (the metric's formula; this module sits below it)."""
    n, d = batch.shape[-2:]
    centred = batch - batch.mean(dim=-2, keepdim=True)
    rows = centred / centred.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(batch.dtype).tiny)
    return rows.norm(dim=-2).topk(min(n, d), dim=-1).values.sum(dim=-1) / n


@functools.cache
def noise_table() -> dict[int, tuple[tuple[int, ...], tuple[float, ...]]]:
    """``{d: (n values, r values)}`` of the shipped table, r = E[MNN of noise] / cap(n, d)."""
    with open(TABLE_FILE, encoding="utf-8") as handle:
        table = json.load(handle)
    return {int(d): (tuple(row["n"]), tuple(row["r"])) for d, row in table["rows"].items()}


def _expected_largest_chi_sum(degrees: int, count: int, k: int, points: int = 800) -> float:
    """E[sum of the k largest of ``count`` i.i.d. chi variables with ``degrees`` degrees of freedom] (float64)."""
    half_degrees = torch.tensor(degrees / 2, dtype=torch.float64)

    def survival(t: Tensor) -> Tensor:
        return torch.special.gammaincc(half_degrees, t.square() / 2)

    upper = math.sqrt(degrees) + 10.0
    while count * survival(torch.tensor(upper, dtype=torch.float64)).item() > 1e-16:
        upper *= 1.3
    t = torch.linspace(0, upper, points, dtype=torch.float64)
    p = survival(t).clamp(1e-300, 1 - 1e-16)[:, None]
    m = torch.arange(k, dtype=torch.float64)
    log_choose = math.lgamma(count + 1) - torch.lgamma(m + 1) - torch.lgamma(count - m + 1)
    expected_min = []
    for start in range(0, points, 64):  # E[min(k, B)] = k - sum_{m<k} (k - m) P(B = m), in chunks of t
        chunk = p[start : start + 64]
        log_pmf = log_choose + m * chunk.log() + (count - m) * torch.log1p(-chunk)
        expected_min.append(k - ((k - m) * log_pmf.exp()).sum(dim=-1))
    return torch.trapezoid(torch.cat(expected_min), t).item()


def _model_ratio(n: int, d: int) -> float:
    """r = E[MNN of noise] / cap(n, d) under the independent-columns model (n >= 2)."""
    if n >= d:  # all d columns count: E[chi_{n-1}] / (n - 1)^1/2
        return math.sqrt(2 / (n - 1)) * math.exp(math.lgamma(n / 2) - math.lgamma((n - 1) / 2))
    scale = math.sqrt(n / (d * (n - 1)))
    return scale * _expected_largest_chi_sum(n - 1, d, n) / n  # cap = 1 for n < d


def _row(d: int, largest: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The row of hidden size d: the table's, or beyond it the model's up to min(largest, d) tokens."""
    table = noise_table()
    if d in table:
        return table[d]
    lengths = row_lengths(d, max(2, min(largest, d)))
    return tuple(lengths), tuple(_model_ratio(n, d) for n in lengths)


def _row_curve(d_row: int, d: int, lengths: Tensor, largest: int) -> Tensor:
    """log r of row ``d_row`` at each n of ``lengths``, read at the same n/d as (n, d) (the same n below SMALL)."""
    ns, rs = _row(d_row, largest)
    grid = torch.tensor(ns, dtype=torch.float64).log()
    values = torch.tensor(rs, dtype=torch.float64).log()
    if len(ns) == 1:
        return values.expand(len(lengths))
    small = lengths <= SMALL
    target = torch.where(small, lengths.log(), lengths.log() + math.log(d_row / d)).clamp(grid[0], grid[-1])
    right = torch.searchsorted(grid, target).clamp(1, len(grid) - 1)
    left = right - 1
    weight = (target - grid[left]) / (grid[right] - grid[left])
    return values[left] + weight * (values[right] - values[left])


@functools.cache
def _curve(d: int, longest: int) -> Tensor:
    """E[MNN of noise] for n = 0 .. longest tokens at hidden size d (float64, CPU); NaN below 2 tokens."""
    rows = sorted(noise_table())
    lengths = torch.arange(2, max(longest, 2) + 1, dtype=torch.float64)
    if d == 1:
        log_r = torch.zeros_like(lengths)  # MNN = 1 / sqrt(n) = cap for any input without a zero row
    elif d > rows[-1] or d in rows:
        log_r = _row_curve(d, d, lengths, longest)
    else:
        upper = next(row for row in rows if row >= d)
        lower = max(row for row in rows if row <= d)
        weight = (math.log(d) - math.log(lower)) / (math.log(upper) - math.log(lower))
        log_r = (1 - weight) * _row_curve(lower, d, lengths, longest) + weight * _row_curve(upper, d, lengths, longest)
    if d > 1:  # beyond a row's last n (there n > d): the model's closed form
        last_row_length = max(noise_table()[rows[-1]][0]) if d <= rows[-1] else d
        beyond = lengths > last_row_length
        log_r[beyond] = torch.tensor(
            [math.log(_model_ratio(int(n), d)) for n in lengths[beyond].tolist()], dtype=torch.float64
        )
    caps = (lengths.clamp(max=d) / lengths).sqrt()
    return torch.cat([torch.full((2,), math.nan, dtype=torch.float64), log_r.exp() * caps])


def expected_noise_mnn(lengths: Tensor, d: int, longest: int | None = None) -> Tensor:
    """E[MNN] of i.i.d. Gaussian hidden states with ``lengths`` tokens (a tensor of counts) and hidden size ``d``.

    Same device as ``lengths``, float64; NaN for fewer than 2 tokens (undefined). ``longest``: an
    upper bound of the lengths known without reading the tensor (a padded width: no host
    synchronisation). Every shape is covered (module docstring): within 1% of a fresh Monte Carlo
    inside the table, 0.25% beyond it (``tests/test_noise.py``).

    Example:
        >>> import torch
        >>> round(expected_noise_mnn(torch.tensor([2]), 2).item(), 2)  # two random directions in the plane
        0.9
        >>> expected_noise_mnn(torch.tensor([4]), 1).item()  # d = 1: exactly 1 / sqrt(n)
        0.5
    """
    if d < 1:
        raise ValueError(f"expected a hidden size d >= 1, got {d}")
    if longest is None:
        longest = int(lengths.max().item()) if lengths.numel() else 2
    size = 1 << max(1, math.ceil(math.log2(longest + 1)))  # few cache entries: powers of two
    curve = _curve(int(d), size).to(lengths.device)
    return curve[lengths.long().clamp(0, size)]
