"""The Diff-eRank reference: which probe each hidden state's comparisons are measured against."""

from __future__ import annotations

import warnings

from mnn_callback.core.errors import MNNWarning
from mnn_callback.probing.results import ProbeResult

__all__ = ["check_reference_sample", "kept_reference"]


def check_reference_sample(reference: ProbeResult, fingerprint: str) -> None:
    """Warn when ``reference`` was measured on another sample or layer set than the probe's ``fingerprint``,
    or without the per-sequence values paired errors need."""
    if reference.fingerprint != fingerprint:
        warnings.warn(
            "the Diff-eRank reference was measured on another probe sample or layer set "
            f"(fingerprint {reference.fingerprint}, this probe {fingerprint}); "
            "its eRanks are not directly comparable",
            MNNWarning,
            stacklevel=5,
        )
    elif not reference.per_sequence:
        warnings.warn(
            "the Diff-eRank reference kept no per-sequence values (measured with per_sequence=False): the standard "
            "errors of every change against it (and the collapse alarm's with baseline='reference') are those of "
            "two independent means, wider than the paired ones; measure it with per_sequence=True (the default)",
            MNNWarning,
            stacklevel=5,
        )


def kept_reference(reference: ProbeResult | None, result: ProbeResult, step: int) -> tuple[ProbeResult, str | None]:
    """The reference once ``result`` (the probe at ``step``) is known, and what changed (None: nothing).

    No reference yet: ``result``. A hidden state of ``reference`` without finite values (non-finite
    hidden states when it was measured) takes ``result``'s where those are finite; a cheap probe
    (no spectrum) never stands in for an exact one.
    """
    if reference is None:
        return result, None
    if "erank" in reference.per_layer and "erank" not in result.per_layer:
        return reference, None
    finite_now, finite_then = set(result.finite_layers()), set(reference.finite_layers())
    replaced = [layer for layer in reference.layers if layer not in finite_then and layer in finite_now]
    if not replaced:
        return reference, None
    if len(replaced) == len(reference.layers):
        which, reference = "every hidden state", result
    else:
        which, reference = (
            "hidden states " + ", ".join(map(str, replaced)),
            reference.with_layers_from(result, replaced),
        )
    return reference, (
        f"the Diff-eRank reference has no finite values at {which} (non-finite hidden states or a failed eigensolve "
        f"when it was measured); the probe at step {step} is their reference from now on"
    )
