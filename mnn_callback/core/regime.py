"""Where a probe lies against the hidden size, and what a move of MNN does and does not mean there.

With unit rows only the ``min(n, d)`` largest column norms of an ``n x d`` matrix count. For a
collapse onto a few *random* directions (random-basis data of rank r) that has two sides and a
band between them (``benchmarks/regime.py``, table in docs/benchmarks.md):

- ``n < 0.6 d``: the collapse concentrates mass in fewer columns and the n largest column norms
  grow: MNN rises (``mnn_vs_noise`` above 1) for every rank measured (1 to 64, d = 64 to 768);
- ``0.6 d <= n < d``: the band. Rank 1 crosses ``mnn_vs_noise = 1`` near 0.7-0.75 d, rank 4 near
  0.85-0.9 d, ranks 16 and 64 just below d: one collapse raises MNN, another lowers it, so its
  direction is not determined there;
- ``n >= d``: every column counts, and every collapse measured lowers MNN.

A collapse onto a few coordinate axes, or one dominated by an outlier coordinate, lowers MNN far
below the band too, from a few tens of tokens on (4 axes, or rank 4 plus one coordinate 20x the
rest: below noise from n = 32 at d = 128 and 256; only shorter sequences rise): MNN depends on the
basis. Matrix Entropy and eRank fall with every collapse, in every regime: they are the collapse
signals.
"""

from __future__ import annotations

__all__ = [
    "BAND",
    "BAND_LOWER_EDGE",
    "FEWER_TOKENS",
    "MIXED",
    "MORE_TOKENS",
    "regime",
    "regime_line",
    "regime_note",
]

# below this share of d, a random-basis collapse of every rank measured raises MNN (rank 1, the
# earliest to turn, is still at mnn_vs_noise 1.09-1.12 at 0.6 d and crosses 1 above 0.7 d)
BAND_LOWER_EDGE = 0.6

FEWER_TOKENS = "n < 0.6d"
BAND = "0.6d <= n < d"
MORE_TOKENS = "n >= d"
MIXED = "mixed"

_BASIS_CAVEAT = (
    "a collapse onto a few coordinate axes or outlier coordinates lowers MNN from a few tens of tokens on; "
    "Matrix Entropy / eRank fall with every collapse and are the collapse signals"
)


def _region(tokens: int, hidden_size: int) -> str:
    if tokens >= hidden_size:
        return MORE_TOKENS
    if tokens < BAND_LOWER_EDGE * hidden_size:
        return FEWER_TOKENS
    return BAND


def regime(fewest_tokens: int, most_tokens: int, hidden_size: int) -> str:
    """The region of n (tokens per sequence) against d: below the band, in it, at or above d, or ``"mixed"``.

    The band is ``0.6 d <= n < d`` (:data:`BAND_LOWER_EDGE`); ``"mixed"``: the sequences lie in
    more than one region.

    Example:
        >>> regime(64, 400, 768), regime(500, 700, 768), regime(1024, 4096, 768), regime(512, 1024, 768)
        ('n < 0.6d', '0.6d <= n < d', 'n >= d', 'mixed')
    """
    if hidden_size < 1:
        raise ValueError(f"expected a hidden size d >= 1, got {hidden_size}")
    if fewest_tokens > most_tokens:
        raise ValueError(f"expected fewest <= most tokens, got {fewest_tokens} > {most_tokens}")
    low, high = _region(fewest_tokens, hidden_size), _region(most_tokens, hidden_size)
    return low if low == high else MIXED


def regime_note(name: str) -> str:
    """What a move of MNN means in regime ``name``, in one sentence (and what it does not)."""
    if name == FEWER_TOKENS:
        return (
            "with fewer than 0.6 d tokens per sequence, a collapse onto a few random directions RAISES MNN "
            f"(mnn_vs_noise above 1), but {_BASIS_CAVEAT}"
        )
    if name == BAND:
        return (
            "between 0.6 d and d tokens per sequence MNN's direction under a collapse is not determined (it depends "
            f"on the collapse's rank); {_BASIS_CAVEAT}"
        )
    if name == MORE_TOKENS:
        return (
            "with at least as many tokens per sequence as dimensions, a collapse onto fewer directions lowers MNN "
            "(mnn_vs_noise below 1), as it lowers Matrix Entropy / eRank"
        )
    if name == MIXED:
        return (
            f"the sequences lie in more than one of the regions {FEWER_TOKENS}, {BAND} and {MORE_TOKENS}, where "
            "MNN responds differently to a collapse: its mean mixes those responses; use pack=True (equal lengths); "
            f"{_BASIS_CAVEAT}"
        )
    expected = ", ".join(repr(label) for label in (FEWER_TOKENS, BAND, MORE_TOKENS, MIXED))
    raise ValueError(f"expected a regime {expected}, got {name!r}")


def regime_line(name: str, fewest_tokens: int, most_tokens: int, hidden_size: int) -> str:
    """One line for a log: the regime, the probe's tokens per sequence and hidden size, and what MNN means there."""
    tokens = f"{fewest_tokens}" if fewest_tokens == most_tokens else f"{fewest_tokens} to {most_tokens}"
    return f"MNN regime {name}: {tokens} tokens per sequence, hidden size d = {hidden_size}; {regime_note(name)}"
