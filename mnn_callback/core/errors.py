"""The package's warning and error classes (no imports: every module may use them)."""

from __future__ import annotations

__all__ = ["MNNWarning", "ProbeFailedError", "UsageError"]


class MNNWarning(UserWarning):
    """A problem the monitor survived (NaN sequences, a failed eigensolve, an unwritable sink).

    Strict mode (``strict=True`` in the callback and hook) turns these into errors.
    """


class ProbeFailedError(RuntimeError):
    """The probe failed on another process; every process skips the probe together."""


class UsageError(ValueError):
    """Bad input to post hoc evaluation or the command line (exit code 2), said in one line."""
