"""Data-set aggregation of per-sequence metrics: sums that add up across micro-batches and processes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_FIELDS", "MetricAccumulator"]

DEFAULT_FIELDS = ("mnn", "nuclear_norm", "matrix_entropy", "entropy_nats", "renyi2_entropy")


class MetricAccumulator:
    """Per group (a layer, say) and field: the sum, sum of squares and count of the finite values.

    One float64 tensor holds everything, plus the number of sequences and of sequences with any
    NaN field, so summing the states of shards (micro-batches, processes) gives exactly the
    single-pass result. :meth:`compute` gives, per field, the mean over sequences (NaN ignored)
    and its standard error ``s / sqrt(N)`` (``s`` the sample standard deviation, NaN for N < 2).

    Example:
        >>> import torch
        >>> acc = MetricAccumulator(num_groups=1, fields=("mnn",))
        >>> acc.update({"mnn": torch.tensor([0.2, 0.4, 0.6])}, group=0)  # which sequences have a NaN
        tensor([False, False, False])
        >>> values = acc.compute()
        >>> round(values["mnn"][0].item(), 6), round(values["mnn_se"][0].item(), 6), values["sequences"].tolist()
        (0.4, 0.11547, [3.0])
    """

    def __init__(
        self,
        num_groups: int = 1,
        device: torch.device | str | None = None,
        fields: Sequence[str] = DEFAULT_FIELDS,
    ) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        if not fields:
            raise ValueError("fields must name at least one metric")
        self.fields = tuple(fields)
        # columns: sums, sums of squares, counts (each one per field), sequences, nan_sequences
        self.state = torch.zeros(num_groups, 3 * len(self.fields) + 2, dtype=torch.float64, device=device)

    @property
    def num_groups(self) -> int:
        return self.state.shape[0]

    def update(self, metrics: Mapping[str, Tensor], group: int = 0) -> Tensor:
        """Add a batch of per-sequence metrics (each ``(B,)`` or 0-d) to ``group``.

        Returns a ``(B,)`` bool tensor: which sequences have a NaN in some field.
        """
        missing = [name for name in self.fields if name not in metrics]
        if missing:
            raise KeyError(
                f"expected the fields {list(self.fields)} (the output of compute_metrics), missing {missing}"
            )
        values = torch.stack([metrics[name].detach().reshape(-1).to(torch.float64) for name in self.fields])
        if values.device != self.state.device:
            self.state = self.state.to(values.device)
        finite = torch.isfinite(values)
        kept = torch.where(finite, values, 0.0)
        count = len(self.fields)
        row = self.state[group]
        row[:count] += kept.sum(dim=-1)
        row[count : 2 * count] += kept.square().sum(dim=-1)
        row[2 * count : 3 * count] += finite.sum(dim=-1)
        row[-2] += values.shape[-1]
        has_nan = (~finite).any(dim=0)
        row[-1] += has_nan.sum()
        return has_nan

    def compute(self) -> dict[str, Tensor]:
        """Per group, float64 tensors of shape ``(num_groups,)``.

        Keys: each field (the mean), ``{field}_se`` (its standard error), ``sequences`` and
        ``nan_sequences``. A mean over no finite value is NaN.
        """
        count = len(self.fields)
        sums = self.state[:, :count]
        squares = self.state[:, count : 2 * count]
        counts = self.state[:, 2 * count : 3 * count]
        means = sums / counts.where(counts > 0, math.nan)
        # sample variance from the sums; clamped: round-off can make a zero variance slightly negative
        variance = ((squares - counts * means.square()) / (counts - 1).where(counts > 1, math.nan)).clamp(min=0.0)
        errors = (variance / counts).sqrt()
        out: dict[str, Tensor] = {}
        for index, name in enumerate(self.fields):
            out[name] = means[:, index]
            out[f"{name}_se"] = errors[:, index]
        out["sequences"] = self.state[:, -2].clone()
        out["nan_sequences"] = self.state[:, -1].clone()
        return out
