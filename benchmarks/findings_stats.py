"""Small statistics for the findings report: ranks, Spearman, paired bootstrap intervals, permutation tests."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    array = np.asarray(values, dtype=float)
    order = array.argsort(kind="mergesort")
    ranked = np.empty(len(array))
    ranked[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks); NaN for fewer than 3 finite pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def permutation_p(x: Sequence[float], y: Sequence[float], permutations: int = 20000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's correlation: exact (all orders of y) up to 8 points.

    With n points the smallest possible value is 2 / n! (exact test): 0.083 for 4 points, so four
    points can never reach p < 0.05.
    """
    observed = abs(spearman(x, y))
    if not math.isfinite(observed):
        return math.nan
    if len(y) <= 8:
        orders = list(itertools.permutations(y))
    else:
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(np.asarray(y)) for _ in range(permutations)]
    extreme = sum(abs(spearman(x, list(order))) >= observed - 1e-12 for order in orders)
    return extreme / len(orders)


def smallest_permutation_p(points: int) -> float:
    """The smallest two-sided p-value an exact permutation test of ``points`` points can give."""
    return 2 / math.factorial(points)


def _clean_pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def bootstrap_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) over the same sequences, and its 95% paired-bootstrap interval (percentile)."""
    a, b = _clean_pairs(a, b)
    differences = a - b
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(differences), size=(RESAMPLES, len(differences)))
    means = differences[samples].mean(axis=1)
    return float(differences.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_mean(a: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """mean(a) and its 95% bootstrap interval."""
    values = np.asarray(a, dtype=float)
    return bootstrap_difference(values, np.zeros_like(values), seed=seed)


def interval(estimate: float, low: float, high: float, digits: int = 4) -> str:
    return f"{estimate:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def sign_of(low: float, high: float) -> int:
    """+1 when the interval lies above 0, -1 below, 0 when it contains 0 (undetermined)."""
    return 1 if low > 0 else -1 if high < 0 else 0


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:+.{digits}f}"
    return f"{statistics.mean(values):+.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean over seeds (the unit of replication) and its 95% t-interval (scipy.stats.t); NaN bounds for one seed."""
    from scipy import stats

    values = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def seeds_permutation_p(pairs: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float:
    """Two-sided exact permutation p-value of the mean Spearman correlation over independent seeds.

    Each seed's y is permuted on its own (the seeds are independent replications); the null
    distribution of the mean correlation is enumerated exactly (all orders of every seed, up to 8
    points each and 10^6 combinations). Three seeds at rho = -1 with 4 points: 2 / 24^3 = 1.4e-4.
    """
    observed = abs(statistics.mean(spearman(x, y) for x, y in pairs))
    per_seed = [np.array([spearman(x, list(order)) for order in itertools.permutations(y)]) for x, y in pairs]
    if math.prod(len(values) for values in per_seed) > 10**6:
        raise ValueError("too many combinations for an exact test")
    means = np.zeros(1)
    for values in per_seed:
        means = (means[:, None] + values[None, :]).reshape(-1)
    means /= len(per_seed)
    return float(np.mean(np.abs(means) >= observed - 1e-12))


def bootstrap_spearman(x: Sequence[float], y: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Spearman's correlation over resampled pairs (scipy.stats.bootstrap)."""
    from scipy import stats

    result = stats.bootstrap(
        (np.asarray(x, dtype=float), np.asarray(y, dtype=float)),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=RESAMPLES,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def cluster_bootstrap_spearman(
    x: Sequence[float], y: Sequence[float], clusters: Sequence[object], seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of Spearman's correlation, resampling whole clusters (scipy.stats.bootstrap).

    Responses to one prompt are not independent of each other; the prompts are. Each resample draws
    the clusters (prompts) with replacement and keeps every pair of each drawn cluster, so the
    interval's unit of replication is the cluster, not the pair.
    """
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = list(dict.fromkeys(clusters))
    members = [np.flatnonzero([c == label for c in clusters]) for label in labels]
    if len(members) < 2:
        raise ValueError(f"expected at least 2 clusters, got {len(members)}")

    def statistic(chosen: np.ndarray) -> float:
        rows = np.concatenate([members[int(index)] for index in chosen])
        return stats.spearmanr(x[rows], y[rows]).statistic

    result = stats.bootstrap(
        (np.arange(len(members)),),
        statistic,
        vectorized=False,
        n_resamples=RESAMPLES,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (family-wise error control).

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m): adjusted p_(i) =
    max over j <= i of min(1, (m - j + 1) p_(j)).
    """
    values = np.asarray(p_values, dtype=float)
    if values.ndim != 1 or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"expected p-values in [0, 1], got {list(p_values)}")
    order = np.argsort(values, kind="mergesort")
    m = len(values)
    scaled = np.minimum(1.0, (m - np.arange(m)) * values[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()
