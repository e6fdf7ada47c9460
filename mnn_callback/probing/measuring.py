"""One probe run: forward passes with per-layer hooks, metrics streamed into sums, the result.

:class:`RunState` holds what one :meth:`~mnn_callback.probing.probe.Probe.run` needs: the plan (layers,
hooks, loss), the accumulated sums, the Gram matrices waiting for one batched eigensolve, and
the failure protocol that keeps processes in step.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mnn_callback.core import schema
from mnn_callback.core.accumulator import MetricAccumulator
from mnn_callback.core.errors import MNNWarning, ProbeFailedError
from mnn_callback.core.metrics import PendingMetrics, compute_metrics, finish_metrics, prepare_metrics
from mnn_callback.probing.distributed import all_gather_object, all_reduce
from mnn_callback.probing.emitters import Emitters, first_tensor, hidden_states_of
from mnn_callback.probing.parts import NO_LOGITS, logits_of, next_token_loss
from mnn_callback.probing.results import ProbeResult, derived_errors

__all__ = ["RunState", "raise_if_failed_anywhere"]

_TOTALS = ("loss_sum", "loss_tokens", "sequences", "tokens", "nan_sequences", "invalid_sequences", "unsolved_sequences")
_COUNTED = _TOTALS[-3:]  # per-sequence masks, counted in totals(): any NaN, NaN MNN (bad input), NaN spectrum only


def raise_if_failed_anywhere(failure: Exception | None) -> None:
    """Every process learns whether the probe failed on any process, before the sums are all-reduced.

    One all-reduced flag; on a failure, every process raises: the failed one its own error, the
    others :class:`ProbeFailedError` naming it. So no process waits in a collective that another
    skipped.
    """
    failed = all_reduce(torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64))
    if failed.item() == 0:
        return
    messages = all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    where = "; ".join(f"process {rank}: {message}" for rank, message in enumerate(messages) if message)
    raise ProbeFailedError(f"the probe failed on another process ({where})")


class RunState:
    """One :meth:`Probe.run`: the plan (layers, hooks, loss), the sums so far, and the result."""

    def __init__(
        self,
        probe: Any,  # the mnn_callback.probing.probe.Probe being run
        model: nn.Module,
        emitters: Emitters,
        device: torch.device,
        streaming: bool,
        kwargs: dict[str, Any],
        per_sequence: bool = False,
        method: str = "exact",
        limit: int | None = None,
        *,
        part: str | None = None,
    ) -> None:
        self.probe, self.model, self.emitters, self.device, self.kwargs = probe, model, emitters, device, kwargs
        self.part = part  # which part of the model is probed (``"encoder"`` of an encoder-decoder), None: all of it
        self.method = method
        self.limit = limit  # this model's position limit: each sequence is cut to it
        self.layers = probe.resolve_layers(emitters.num_hidden_states)
        self.use_hooks = streaming and all(emitters.modules[layer] is not None for layer in self.layers)
        self.wants_loss = probe._wants_loss(model)
        self.fields = schema.averaged_fields(spectral=method != "cheap")
        self.accumulator = MetricAccumulator(num_groups=len(self.layers), device=device, fields=self.fields)
        defer = probe.defer_spectra if probe.defer_spectra is not None else device.type == "cuda"
        defer = defer and not _spread_over_devices(model)  # one batched eigensolve needs one device
        self.pending = _PendingSpectra(self) if defer and method == "exact" else None
        self.sums = torch.zeros(len(_TOTALS), dtype=torch.float64, device=device)
        # per micro-batch, one mask per _COUNTED total: which sequences have a NaN metric in some layer; a NaN
        # MNN (non-finite hidden states, under 2 tokens); a NaN spectral metric with a finite MNN (a failed solve)
        self.nan_rows: dict[str, list[Tensor]] = {name: [] for name in _COUNTED}
        # per field, layer and sequence of the sample: each process fills its own sequences, zeros elsewhere,
        # so the all-reduced sum holds every sequence's values
        shape = (len(self.fields), len(self.layers), len(probe.sequences)) if per_sequence else (0,)
        self.sequence_values = torch.zeros(shape, dtype=torch.float64, device=device)

    def run(self, batches: list[list[int] | None], *, keep_in_step: bool) -> tuple[Tensor | None, Exception | None]:
        """Every micro-batch, then the totals; or None and the first error.

        ``keep_in_step``: after an error, the remaining micro-batches become dummy passes, so the
        number of forward passes stays equal on every process, which FSDP and ZeRO-3 need (their
        forward gathers parameters from all processes).
        """
        failure = None
        for indices in batches:
            try:
                self.forward(indices if failure is None else None)
            except Exception as error:
                failure = failure or error
                if not keep_in_step:
                    break
        if failure is not None:
            return None, failure
        try:
            return self.totals(), None
        except Exception as error:
            return None, error

    def _metric_mask(self, attention_mask: Tensor, indices: list[int]) -> Tensor:
        """The tokens the metrics use: right padding, so each row's first ``start`` positions are its context."""
        starts = torch.tensor([self.probe.starts[index] for index in indices], device=attention_mask.device)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return attention_mask * (positions[None, :] >= starts[:, None])

    def forward(self, indices: list[int] | None) -> None:
        """One micro-batch (None: a dummy pass that keeps the processes in step, not counted)."""
        real = indices is not None
        indices = indices if real else [0]
        input_ids, attention_mask = self.probe._tensors(indices, self.device, self.limit)
        per_layer, loss_sum, loss_tokens = self._forward(input_ids, attention_mask, indices)
        if not real:
            if self.pending is not None:
                self.pending.discard_last()
            return
        if self.pending is None:
            self.accumulate(per_layer, indices)
        else:
            self.pending.add_batch(per_layer, indices)
        self.sums += torch.stack(
            [
                loss_sum.to(self.device, torch.float64),
                loss_tokens.to(self.device, torch.float64),
                torch.tensor(float(len(indices)), dtype=torch.float64, device=self.device),
                attention_mask.sum().to(torch.float64),
                *torch.zeros(len(_COUNTED), dtype=torch.float64, device=self.device),
            ]
        )

    def accumulate(self, per_layer: list[dict[str, Tensor]], indices: list[int]) -> None:
        """Add one micro-batch's per-layer metrics, and its sequences' masks of NaN metrics (``nan_rows``)."""
        masks = None
        for group, values in enumerate(per_layer):
            values = {name: value.to(self.device) for name, value in values.items()}  # a dispatched model's layers
            has_nan = self.accumulator.update(values, group=group)
            invalid = torch.isnan(values["mnn"])  # MNN needs no solve: NaN only for an input without a value
            row = torch.stack([has_nan, invalid, has_nan & ~invalid])
            masks = row if masks is None else masks | row
            if self.sequence_values.numel():
                where = torch.tensor(indices, device=self.device)
                for field, name in enumerate(self.fields):
                    self.sequence_values[field, group, where] = values[name].to(torch.float64)
        for name, mask in zip(_COUNTED, masks, strict=True):
            self.nan_rows[name].append(mask)

    def measure(self, attention_mask: Tensor, hidden: Tensor) -> Any:
        attention_mask = attention_mask.to(hidden.device)  # computed where the hidden state lives
        if self.pending is not None:
            return self.pending.prepare(hidden, attention_mask, self.probe.dtype)
        return compute_metrics(hidden, attention_mask, dtype=self.probe.dtype, method=self.method)

    def _forward(
        self, input_ids: Tensor, attention_mask: Tensor, indices: list[int]
    ) -> tuple[list[Any], Tensor, Tensor]:
        """Per-layer results (metric dicts, or pending Gram matrices) of one micro-batch, loss sum and tokens."""
        per_layer: list[Any] = [None] * len(self.layers)
        measure = functools.partial(self.measure, self._metric_mask(attention_mask, indices))
        call_kwargs = dict(self.kwargs)
        if self.wants_loss and not self.probe.custom:  # a Hugging Face model's own loss
            call_kwargs["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        handles = []
        try:
            if self.use_hooks:
                modules = dict(self.model.named_modules())
                for group, layer in enumerate(self.layers):
                    hook = functools.partial(_hook_adapter, measure, per_layer, group)
                    handles.append(modules[self.emitters.modules[layer]].register_forward_hook(hook))
                output = self.probe.call(
                    self.model, input_ids, attention_mask, {**call_kwargs, "output_hidden_states": False}
                )
            else:
                output = self.probe.call(
                    self.model, input_ids, attention_mask, {**call_kwargs, "output_hidden_states": True}
                )
                forward_given = self.probe.forward is not None and self.probe.modules is None
                hidden_states = hidden_states_of(output, self.model, forward_given=forward_given)
                for group, layer in enumerate(self.layers):
                    per_layer[group] = measure(hidden_states[layer])
        finally:
            for handle in handles:
                handle.remove()
        if any(values is None for values in per_layer):
            raise RuntimeError("a hooked layer did not run during the forward pass; rerun with streaming=False")
        if not self.wants_loss:
            return per_layer, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        return (per_layer, *self._loss(output, input_ids, attention_mask))

    def _loss(self, output: Any, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The micro-batch's summed next-token loss and its tokens: a Hugging Face model's own ``loss``
        (the probe passed ``labels``; a mean over the shifted tokens), else from the output's logits
        (:func:`~mnn_callback.probing.parts.next_token_loss`, in the probe's dtype)."""
        loss = None if self.probe.custom else getattr(output, "loss", None)
        if loss is not None:
            loss_tokens = (attention_mask.sum(dim=1) - 1).clamp(min=0).sum().to(torch.float64)
            return loss.detach().to(torch.float64) * loss_tokens, loss_tokens
        logits = logits_of(output)
        if logits is None:
            raise TypeError(
                f"the probe loss needs the logits: {type(self.model).__name__}'s output has no loss and no logits "
                f"({NO_LOGITS}); return them from forward= (e.g. forward=lambda model, ids, mask: model(ids)[0]), "
                "or set compute_loss=False"
            )
        return next_token_loss(logits, input_ids, attention_mask, self.probe.dtype)

    def totals(self) -> Tensor:
        """The accumulator's state and the probe totals in one float64 vector (what is all-reduced)."""
        if self.pending is not None:
            self.pending.flush()
        for name, rows in self.nan_rows.items():
            if rows:
                self.sums[_TOTALS.index(name)] = torch.cat(rows).sum().to(torch.float64)
        return torch.cat([self.accumulator.state.flatten(), self.sums, self.sequence_values.flatten()])

    def result(self, flat: list[float], seconds: float) -> ProbeResult:
        size = self.accumulator.state.numel()
        self.accumulator.state = torch.tensor(flat[:size], dtype=torch.float64).reshape(self.accumulator.state.shape)
        totals = dict(zip(_TOTALS, flat[size : size + len(_TOTALS)], strict=True))
        sequences = torch.tensor(flat[size + len(_TOTALS) :], dtype=torch.float64).reshape(self.sequence_values.shape)
        _warn_nan_sequences(totals, self.method)
        aggregated = {key: value.tolist() for key, value in self.accumulator.compute().items()}
        columns = [
            schema.derive_layer({name: aggregated[name][group] for name in self.fields})
            for group in range(len(self.layers))
        ]
        loss = totals["loss_sum"] / totals["loss_tokens"] if totals["loss_tokens"] > 0 else math.nan
        measured = [
            len(ids[: self.limit]) - start for ids, start in zip(self.probe.sequences, self.probe.starts, strict=True)
        ]
        return ProbeResult(
            layers=self.layers,
            per_layer={name: [column[name] for column in columns] for name in columns[0]},
            standard_errors=derived_errors(columns, {name: aggregated[f"{name}_se"] for name in self.fields}),
            loss=loss if self.wants_loss else None,
            sequences=int(totals["sequences"]),
            tokens=int(totals["tokens"]),
            nan_sequences=int(totals["nan_sequences"]),
            seconds=seconds,
            fingerprint=self.probe.fingerprint,
            num_hidden_states=self.emitters.num_hidden_states,
            config={**self.probe.config, "method": self.method, **({"probed": self.part} if self.part else {})},
            hidden_size=self.emitters.hidden_size,
            token_range=(min(measured), sum(measured) / len(measured), max(measured)),
            per_sequence={name: sequences[field].tolist() for field, name in enumerate(self.fields)}
            if sequences.numel()
            else None,
        )


def _warn_nan_sequences(totals: dict[str, float], method: str) -> None:
    """Say why probe sequences have NaN metrics: bad hidden states (NaN MNN), or a spectrum that failed."""
    if totals["invalid_sequences"]:
        warnings.warn(
            f"{totals['invalid_sequences']:.0f} probe sequences have non-finite hidden states (a diverging run?) "
            "or fewer than 2 measured tokens; their metrics are NaN and probe/nan_sequences counts them",
            MNNWarning,
            stacklevel=4,
        )
    if totals["unsolved_sequences"]:
        how = "the eigensolver failed, also in float64 on the CPU" if method == "exact" else "a non-finite estimate"
        warnings.warn(
            f"the spectral metrics of {totals['unsolved_sequences']:.0f} probe sequences could not be computed "
            f"({how}; their hidden states are finite): they are NaN and probe/nan_sequences counts them",
            MNNWarning,
            stacklevel=4,
        )


def _spread_over_devices(model: nn.Module) -> bool:
    """Whether ``model`` was dispatched over several devices (Accelerate's big-model inference)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return len({str(place) for place in device_map.values() if str(place) not in ("disk", "meta")}) > 1


def _hook_adapter(
    measure: Callable[[Tensor], Any], per_layer: list[Any], group: int, _module: nn.Module, _inputs: Any, output: Any
) -> None:
    """A forward hook: measure the module's hidden-state output (which is left as it is)."""
    per_layer[group] = measure(first_tensor(output))


class _PendingSpectra:
    """Gram matrices of a probe waiting for one batched eigensolve, flushed early above a memory budget."""

    BUDGET_BYTES = 1 << 30

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.batches: list[tuple[list[PendingMetrics], list[int]]] = []  # (per layer, sequence indices)
        self.nbytes = 0

    def prepare(self, hidden: Tensor, attention_mask: Tensor, dtype: torch.dtype) -> PendingMetrics:
        item = prepare_metrics(hidden, attention_mask, dtype=dtype)
        self.nbytes += item.nbytes
        return item

    def add_batch(self, per_layer: list[PendingMetrics], indices: list[int]) -> None:
        self.batches.append((per_layer, indices))
        if self.nbytes > self.BUDGET_BYTES:
            self.flush()

    def discard_last(self) -> None:
        """Forget a dummy pass's Grams (prepared, but never added): recount the bytes held."""
        self.nbytes = sum(item.nbytes for batch, _ in self.batches for item in batch)

    def flush(self) -> None:
        if not self.batches:
            return
        layers = len(self.batches[0][0])
        solved = finish_metrics([item for batch, _ in self.batches for item in batch])
        for position, (_, indices) in enumerate(self.batches):
            self.run.accumulate(solved[position * layers : (position + 1) * layers], indices)
        self.batches, self.nbytes = [], 0
