"""Fault isolation: the monitor's errors become warnings, never exceptions in the training loop."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from mnn_callback.core.errors import MNNWarning

T = TypeVar("T")

__all__ = ["Guard"]


class Guard:
    """Runs monitoring work so that it cannot crash training, unless ``strict``.

    Non-strict: an ``Exception`` raised by the work is counted in :attr:`errors` and reported
    as one :class:`MNNWarning` per kind (what failed, exception type); the call returns None.
    ``KeyboardInterrupt`` and ``SystemExit`` always propagate.
    Strict: exceptions propagate, and every :class:`MNNWarning` raised inside becomes an error.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.quiet = False  # count without warning (processes other than the main one: it warns for all)
        self.errors = 0
        self._reported: set[tuple[str, str]] = set()

    def reset(self) -> None:
        """A new run: no errors counted, every kind reported again."""
        self.errors = 0
        self._reported.clear()

    @contextlib.contextmanager
    def warnings_as_errors(self) -> Iterator[None]:
        """Inside the block, :class:`MNNWarning` raises when ``strict``; does nothing otherwise."""
        if not self.strict:
            yield
            return
        with warnings.catch_warnings():
            warnings.simplefilter("error", MNNWarning)
            yield

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None after a reported failure; ``what`` names the work in messages."""
        if self.strict:
            with self.warnings_as_errors():
                return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.report(what, error)
            return None

    def report(self, what: str, error: BaseException) -> None:
        """Count ``error`` and warn about it once per (what, exception type); raise it when strict."""
        if self.strict:
            raise error
        self.errors += 1
        kind = (what, type(error).__name__)
        if self.quiet or kind in self._reported:
            return
        self._reported.add(kind)
        warnings.warn(
            f"mnn_callback: {what} failed ({type(error).__name__}: {error}); training continues. Further "
            "failures of this kind are counted in probe/errors and not reported again (strict=True raises instead).",
            MNNWarning,
            stacklevel=3,
        )
