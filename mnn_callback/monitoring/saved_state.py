"""A monitor's saved state read back: what a checkpoint holds, checked before a run continues from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mnn_callback.probing.results import ProbeResult

__all__ = ["SavedState", "read_saved_state"]


@dataclass
class SavedState:
    """The parts of a saved state that could be read; ``problem`` says why the curves cannot continue."""

    history: list[dict[str, Any]]
    last_step: int | None
    reference: ProbeResult | None
    fingerprint: Any
    run: str | None  # the id of the run that saved it
    problem: str | None = None


def read_saved_state(state: Any) -> SavedState:
    """A :meth:`Monitor.state_dict <mnn_callback.monitoring.monitor.Monitor.state_dict>` read back, as far as it
    is readable (hand edited, or from another version): an unreadable history is empty, an unreadable
    reference None, each with its ``problem``.

    >>> read_saved_state({"history": [{"step": "x"}]}).problem
    'the saved MNN history is unreadable (ValueError: the history needs integer steps)'
    """
    get = getattr(state, "get", lambda key: None)
    run = get("run")
    saved = SavedState([], None, None, get("fingerprint"), run if isinstance(run, str) else None)
    try:
        history = [dict(entry) for entry in get("history") or []]
        last_step = get("last_step")
        if not all(isinstance(entry.get("step"), int) for entry in history) or not isinstance(
            last_step, (int, type(None))
        ):
            raise ValueError("the history needs integer steps")
    except (AttributeError, TypeError, ValueError) as error:
        saved.problem = f"the saved MNN history is unreadable ({type(error).__name__}: {error})"
        return saved
    saved.history, saved.last_step = history, last_step
    try:
        saved.reference = None if get("reference") is None else ProbeResult.from_dict(get("reference"))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        saved.problem = f"the saved Diff-eRank reference is unreadable ({type(error).__name__}: {error})"
    return saved
