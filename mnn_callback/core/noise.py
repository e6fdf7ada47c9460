"""The noise floor of MNN: its expected value for i.i.d. isotropic Gaussian hidden states of the same shape.

MNN of an ``n x d`` matrix of random directions is far from 0: with unit rows it is capped at
``(min(n, d) / n)^1/2`` and random Gaussian hidden states sit close to that cap. The ratio
``MNN / E[MNN of noise with the same n and d]`` says how a measured value compares with random
directions at its shape (1.0: indistinguishable).

``E[MNN of noise]`` comes from a table measured by seeded Monte Carlo (``data/mnn_noise.json``,
rebuilt by ``benchmarks/noise_table.py``): per hidden size ``d`` of a grid, the ratio ``r`` of the
expectation to the cap at a grid of token counts ``n`` that includes ``n = d``, where MNN has a
kink. Between grid points ``r`` is interpolated linearly in ``log n`` at a fixed ``log(n / d)``
(so never across the kink), then linearly in ``log d``; below 16 tokens every integer ``n`` is in
the table. Lookups cost one gather per batch: the curve for a hidden size is built once and cached.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TABLE_FILE", "expected_noise_mnn", "monte_carlo_mnn", "noise_table"]

TABLE_FILE = Path(__file__).resolve().parent.parent / "data" / "mnn_noise.json"
SMALL = 16  # every n up to this many tokens is a grid point of every row


def cap(n: float, d: float) -> float:
    """The largest MNN of an n x d matrix with unit rows: (min(n, d) / n)^1/2."""
    return math.sqrt(min(n, d) / n)


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


def _row_curve(d_row: int, d: int, lengths: Tensor) -> Tensor:
    """log r of row ``d_row`` at each n of ``lengths``, read at the same n/d as (n, d) (the same n below SMALL)."""
    ns, rs = noise_table()[d_row]
    grid = torch.tensor(ns, dtype=torch.float64).log()
    values = torch.tensor(rs, dtype=torch.float64).log()
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
    if d <= rows[0] or d >= rows[-1]:
        log_r = _row_curve(min(max(d, rows[0]), rows[-1]), d, lengths)
    else:
        upper = next(row for row in rows if row >= d)
        lower = max(row for row in rows if row <= d)
        log_r = _row_curve(lower, d, lengths)
        if upper != lower:
            weight = (math.log(d) - math.log(lower)) / (math.log(upper) - math.log(lower))
            log_r = (1 - weight) * log_r + weight * _row_curve(upper, d, lengths)
    caps = (lengths.clamp(max=d) / lengths).sqrt()
    return torch.cat([torch.full((2,), math.nan, dtype=torch.float64), log_r.exp() * caps])


def expected_noise_mnn(lengths: Tensor, d: int, longest: int | None = None) -> Tensor:
    """E[MNN] of i.i.d. Gaussian hidden states with ``lengths`` tokens (a tensor of counts) and hidden size ``d``.

    Same device as ``lengths``, float64; NaN for fewer than 2 tokens. ``longest``: an upper bound
    of the lengths known without reading the tensor (a padded width: no host synchronisation).
    Measured for n and d from 2 to 8192 (within 1% of a 1000-draw Monte Carlo,
    ``tests/test_noise.py``); the table reaches 16384, beyond it the largest n is used.

    Example:
        >>> import torch
        >>> round(expected_noise_mnn(torch.tensor([2]), 2).item(), 2)  # two random directions in the plane
        0.9
    """
    if d < 1:
        raise ValueError(f"expected a hidden size d >= 1, got {d}")
    if longest is None:
        longest = int(lengths.max().item()) if lengths.numel() else 2
    size = 1 << max(1, math.ceil(math.log2(longest + 1)))  # few cache entries: powers of two
    curve = _curve(int(d), size).to(lengths.device)
    return curve[lengths.long().clamp(0, size)]
