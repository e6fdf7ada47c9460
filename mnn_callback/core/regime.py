"""Which side of n = d a probe is on, and what a move of MNN means there.

With unit rows only the ``min(n, d)`` largest column norms of an ``n x d`` matrix count. With
fewer tokens than dimensions (``n < d``, where LLM probes live) a representation that collapses
onto fewer directions concentrates its mass in fewer columns, and the ``n`` largest column norms
*grow*: MNN rises, and ``mnn_vs_noise`` goes above 1. With ``n >= d`` every column counts and the
same collapse lowers MNN. Matrix Entropy (and eRank) falls with collapse on both sides.
(``benchmarks/regime.py`` measures this on random-basis data of each rank.)
"""

from __future__ import annotations

__all__ = ["FEWER_TOKENS", "MIXED", "MORE_TOKENS", "regime", "regime_line", "regime_note"]

FEWER_TOKENS = "n < d"
MORE_TOKENS = "n >= d"
MIXED = "mixed"


def regime(fewest_tokens: int, most_tokens: int, hidden_size: int) -> str:
    """``"n < d"``, ``"n >= d"``, or ``"mixed"`` (some sequences on each side) for tokens per sequence vs d.

    Example:
        >>> regime(64, 512, 768), regime(1024, 4096, 768), regime(512, 1024, 768)
        ('n < d', 'n >= d', 'mixed')
    """
    if hidden_size < 1:
        raise ValueError(f"expected a hidden size d >= 1, got {hidden_size}")
    if fewest_tokens > most_tokens:
        raise ValueError(f"expected fewest <= most tokens, got {fewest_tokens} > {most_tokens}")
    if most_tokens < hidden_size:
        return FEWER_TOKENS
    if fewest_tokens >= hidden_size:
        return MORE_TOKENS
    return MIXED


def regime_note(name: str) -> str:
    """What a rise of MNN means in regime ``name``, in one sentence."""
    if name == FEWER_TOKENS:
        return (
            "with fewer tokens per sequence than dimensions, MNN RISES as the representation collapses onto fewer "
            "directions (mnn_vs_noise above 1); read how compressed it is from Matrix Entropy / eRank, which fall"
        )
    if name == MORE_TOKENS:
        return (
            "with at least as many tokens per sequence as dimensions, MNN falls as the representation collapses "
            "onto fewer directions (mnn_vs_noise below 1), as Matrix Entropy / eRank do"
        )
    if name == MIXED:
        return (
            "the sequences lie on both sides of n = d, where MNN's response to a collapse changes sign: its mean "
            "mixes opposite responses; use pack=True (equal lengths) or read Matrix Entropy / eRank"
        )
    raise ValueError(f"expected a regime {FEWER_TOKENS!r}, {MORE_TOKENS!r} or {MIXED!r}, got {name!r}")


def regime_line(name: str, fewest_tokens: int, most_tokens: int, hidden_size: int) -> str:
    """One line for a log: the regime, the probe's tokens per sequence and hidden size, and what MNN means there."""
    tokens = f"{fewest_tokens}" if fewest_tokens == most_tokens else f"{fewest_tokens} to {most_tokens}"
    return f"MNN regime {name}: {tokens} tokens per sequence, hidden size d = {hidden_size}; {regime_note(name)}"
