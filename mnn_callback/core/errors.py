"""The package's warning and error classes (no imports: every module may use them)."""

from __future__ import annotations

__all__ = ["CollapseWarning", "MNNWarning", "ProbeFailedError", "UsageError"]


class MNNWarning(UserWarning):
    """A problem the monitor survived (NaN sequences, a failed eigensolve, an unwritable sink).

    Strict mode (``strict=True`` in the callback and hook) turns these into errors.
    """


class CollapseWarning(UserWarning):
    """The collapse alarm fired: the monitor's finding, not a problem it survived, so no
    :class:`MNNWarning` (strict mode leaves it a warning; ``stop=True`` stops training)."""


class ProbeFailedError(RuntimeError):
    """The probe failed on another process; every process skips the probe together."""


class UsageError(ValueError):
    """Bad input to post hoc evaluation or the command line (exit code 2), said in one line."""
