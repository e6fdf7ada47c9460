"""Measure the MNN noise floor table that ships with the package (``mnn_callback/data/mnn_noise.json``).

For each hidden size d of the grid and each token count n of its row, the expected MNN of i.i.d.
N(0, 1) hidden states (n x d) by seeded Monte Carlo, stored as r = E[MNN] / (min(n, d) / n)^1/2.
Draws per point: as many as needed for a standard error of at most 0.05% of the mean (at least 4,
at most 20000). The grid: every integer up to 16, then steps of 2^(1/4) up to 16384; each row holds
n = d (the kink of MNN) and every integer n up to 16.

Usage: ``python benchmarks/noise_table.py [--out mnn_callback/data/mnn_noise.json] [--quick]``
(about an hour on 2 CPU cores; ``--quick``: a coarse grid up to 256, for the smoke test).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser

from mnn_callback.core.noise import SMALL, TABLE_FILE, cap, monte_carlo_mnn, row_lengths

TARGET_RELATIVE_SE = 5e-4


def grid(largest: int, steps_per_octave: int = 4) -> list[int]:
    values = set(range(2, SMALL + 1))
    k = 1
    while round(SMALL * 2 ** (k / steps_per_octave)) <= largest:
        values.add(round(SMALL * 2 ** (k / steps_per_octave)))
        k += 1
    return sorted(values)


def measure(n: int, d: int, seed: int) -> tuple[float, int]:
    """r at (n, d) with a relative standard error of at most TARGET_RELATIVE_SE (or 20000 draws)."""
    pilot = 4 if n * d > 4_000_000 else 32
    mean, error = monte_carlo_mnn(n, d, pilot, seed=seed)
    relative = error / mean if mean > 0 else 0.0
    needed = min(20000, max(pilot, math.ceil(pilot * (relative / TARGET_RELATIVE_SE) ** 2)))
    if needed > pilot:
        mean, error = monte_carlo_mnn(n, d, needed, seed=seed)
    return mean / cap(n, d), needed


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0], device=False)
    parser.add_argument("--out", default=str(TABLE_FILE))
    parser.add_argument("--largest", type=int, default=16384)
    args = parser.parse_args()
    largest = 256 if args.quick else args.largest
    started = time.perf_counter()
    rows = {}
    for index, d in enumerate(grid(largest)):
        lengths = row_lengths(d, largest)
        ratios = [measure(n, d, seed=1000 * index + position) for position, n in enumerate(lengths)]
        rows[str(d)] = {"n": lengths, "r": [round(r, 7) for r, _ in ratios], "draws": [k for _, k in ratios]}
        print(f"d = {d}: {len(lengths)} points, {time.perf_counter() - started:.0f} s", flush=True)
    table = {
        "what": "r = E[MNN of i.i.d. N(0,1) hidden states, n x d] / (min(n, d) / n)^1/2, by seeded Monte Carlo",
        "target_relative_standard_error": TARGET_RELATIVE_SE,
        "rows": rows,
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(table, handle, separators=(",", ":"))
    points = sum(len(row["n"]) for row in rows.values())
    print(f"wrote {args.out}: {points} points in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {"points": sum(len(row["n"]) for row in rows.values()), "seconds": time.perf_counter() - started},
                handle,
            )


if __name__ == "__main__":
    main()
