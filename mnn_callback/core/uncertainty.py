"""Standard errors of comparisons on a fixed sample: changes since a reference, Diff-eRank.

The probe's sample is fixed, so two probes (two steps, a model and its reference) measure the same
sequences: their difference is a paired comparison. Its standard error comes from the per-sequence
differences, and is much smaller than the two per-mean standard errors combined whenever the
sequences keep their order (long ones stay long, hard ones hard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["paired_standard_error"]


def paired_standard_error(
    current: Sequence[float],
    reference: Sequence[float],
    current_weight: float = 1.0,
    reference_weight: float = 1.0,
) -> float:
    """Standard error of ``mean(current_weight * c_i - reference_weight * r_i)`` over the paired sequences.

    ``current`` and ``reference``: each sequence's value in the two probes of one sample (the same
    order); pairs with a non-finite value are left out. With unit weights it is the standard error
    of the change of a mean; with ``exp(mean H)`` weights, the delta-method standard error of a
    difference of eRanks (Diff-eRank). NaN with fewer than 2 pairs.

        SE = s(w_c c_i - w_r r_i) / sqrt(N)

    Example:
        Three sequences whose values spread widely (each mean's own SE: s / sqrt(3) = 0.577), then changed:

        >>> round(paired_standard_error([1.1, 2.1, 3.1], [1.0, 2.0, 3.0]), 6)  # +0.1 on every sequence
        0.0
        >>> round(paired_standard_error([1.1, 2.0, 2.9], [1.0, 2.0, 3.0]), 6)  # +0.1, 0, -0.1: s = 0.1
        0.057735
    """
    if len(current) != len(reference):
        raise ValueError(f"expected the same sequences in both probes, got {len(current)} and {len(reference)} values")
    values = current_weight * torch.tensor(current, dtype=torch.float64)
    values = values - reference_weight * torch.tensor(reference, dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if len(values) < 2:
        return math.nan
    return (values.std() / math.sqrt(len(values))).item()
