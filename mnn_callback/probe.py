"""The probe: a fixed held-out sample through the current model, per-layer metrics in one pass.

:class:`Probe` fixes its sample once, at construction (:mod:`mnn_callback.sample`);
:meth:`Probe.run` sends it through a model in micro-batches and turns each chosen hidden state
into data-set metrics as soon as that layer's activations exist (forward hooks), so the extra
memory stays near one layer's activations for one micro-batch. Training is left untouched
(:mod:`mnn_callback.training_state`). Under ``torch.distributed`` the sample is sharded and the
sums are all-reduced, so every process gets the single-process result.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mnn_callback import schema
from mnn_callback.accumulator import MetricAccumulator
from mnn_callback.distributed import all_reduce, world
from mnn_callback.emitters import (
    Emitters,
    accepted_kwargs,
    calibrate,
    first_tensor,
    hidden_states_of,
    inspectable,
    model_device,
)
from mnn_callback.errors import MNNWarning
from mnn_callback.metrics import METHODS, PendingMetrics, compute_metrics, finish_metrics, prepare_metrics
from mnn_callback.results import ProbeResult
from mnn_callback.sample import fingerprint, fixed_sample, load_tokenizer
from mnn_callback.training_state import preserved_training_state

__all__ = ["Probe", "ProbeResult", "preserved_training_state"]

LayerSpec = str | int | Sequence[int]
_TOTALS = ("loss_sum", "loss_tokens", "sequences", "tokens", "nan_sequences")


def _validate_layers(layers: LayerSpec) -> str | tuple[int, ...]:
    if isinstance(layers, str):
        if layers not in ("all", "last"):
            raise ValueError(f"layers must be 'all', 'last' or a list of hidden-state indices, got {layers!r}")
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        return (layers,)
    if isinstance(layers, Sequence) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return tuple(layers)
    raise ValueError(f"layers must be 'all', 'last' or a non-empty list of hidden-state indices, got {layers!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Probe:
    """A fixed held-out sample and the per-layer compression metrics of a model on it.

    Args:
        data: the held-out sample: a list of strings (with ``tokenizer``); a list of token-id
            lists; a 2-D LongTensor of input ids, or a mapping with ``input_ids`` and
            optionally ``attention_mask``; a ``datasets.Dataset`` with ``input_ids`` or a text
            column; or a path to a ``.txt`` file (one sample per paragraph: blocks of lines
            separated by blank lines) or a ``.jsonl`` file (per line an object with
            ``input_ids`` or ``text_column``, or a string).
        tokenizer: turns text into ids (``tokenizer(text)["input_ids"]``), or the directory (or
            hub id) of one; needed for text.
        max_samples: how many sequences to keep (a seeded choice, fixed at construction).
        max_length: tokens per sequence; longer ones are truncated (one warning with the count).
        batch_size: sequences per forward pass.
        layers: ``"all"``, ``"last"``, or indices into the model's hidden states (0 = the
            embedding output; the last one is after the final norm, like HF's
            ``hidden_states[-1]``); negative indices count from the end.
        seed: seed of the choice of sequences (an int).
        text_column: the text field of a dataset or JSONL record.
        dtype: compute dtype of the metrics, ``torch.float32`` or ``torch.float64``.
        compute_loss: compute the sample's next-token loss; None (default) does so for causal
            language models (class names ending in ``ForCausalLM`` or ``LMHeadModel``).
        method: ``"exact"`` spectra (eigendecomposition) or ``"fast"`` (matmul only, for GPUs;
            see :func:`~mnn_callback.metrics.compute_metrics`).
        defer_spectra: exact method only: keep the Gram matrices of every layer and micro-batch
            and solve them in ONE batched eigensolve at the end of the probe (one host
            synchronisation; flushed early above 1 GiB of Grams). Default: on CUDA. Off, each
            layer is solved as soon as it exists, which bounds the memory to about one layer.

    Sequences shorter than 2 tokens are dropped; if none remain, ``ValueError``.
    """

    def __init__(
        self,
        data: Any,
        *,
        tokenizer: Any = None,
        max_samples: int = 64,
        max_length: int = 512,
        batch_size: int = 8,
        layers: LayerSpec = "all",
        seed: int = 0,
        text_column: str = "text",
        dtype: torch.dtype = torch.float32,
        compute_loss: bool | None = None,
        method: str = "exact",
        defer_spectra: bool | None = None,
    ) -> None:
        self.max_samples = _positive_int("max_samples", max_samples)
        self.max_length = _positive_int("max_length", max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (the metrics need 2 tokens), got {max_length}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.layers = _validate_layers(layers)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.dtype = dtype
        self.method = method
        self.defer_spectra = defer_spectra
        self.seed = seed
        self.compute_loss = compute_loss
        chosen = fixed_sample(
            data,
            tokenizer=load_tokenizer(tokenizer),
            text_column=text_column,
            max_samples=self.max_samples,
            max_length=self.max_length,
            seed=seed,
        )
        self.sequences, self.sources = chosen.sequences, chosen.sources
        if chosen.truncated:
            warnings.warn(
                f"{chosen.truncated} of {len(self.sequences)} probe sequences were longer than "
                f"max_length={max_length} tokens and were truncated",
                MNNWarning,
                stacklevel=2,
            )
        self.fingerprint = fingerprint(self.sequences, layers=self.layers, dtype=str(dtype), method=method)
        self._emitters: weakref.WeakKeyDictionary[nn.Module, Emitters] = weakref.WeakKeyDictionary()

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.sequences)

    @property
    def config(self) -> dict[str, Any]:
        """What fixes the measurement (JSON-serialisable); equal fingerprints mean comparable curves."""
        return {
            "max_samples": self.max_samples,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "method": self.method,
            "sequences": len(self.sequences),
            "tokens": self.num_tokens,
            "fingerprint": self.fingerprint,
        }

    def resolve_layers(self, num_hidden_states: int) -> list[int]:
        """The chosen hidden-state indices for a model with ``num_hidden_states`` of them, sorted, unique."""
        if self.layers == "all":
            return list(range(num_hidden_states))
        if self.layers == "last":
            return [num_hidden_states - 1]
        resolved = set()
        for index in self.layers:
            if not -num_hidden_states <= index < num_hidden_states:
                raise ValueError(
                    f"layer index {index} is out of range: this model has {num_hidden_states} hidden states "
                    f"(0 = embeddings .. {num_hidden_states - 1} = final), negative indices from -{num_hidden_states}"
                )
            resolved.add(index % num_hidden_states)
        return sorted(resolved)

    def _micro_batches(self, rank: int, world_size: int) -> list[list[int] | None]:
        """Sequence indices of this rank's micro-batches; None marks a dummy pass on an uneven split.

        Sequences are sorted by length (less padding) and dealt out round-robin by micro-batch,
        so every rank runs the same number of forward passes.
        """
        order = sorted(range(len(self.sequences)), key=lambda i: (-len(self.sequences[i]), i))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        steps = math.ceil(len(batches) / world_size)
        mine: list[list[int] | None] = list(batches[rank::world_size])
        return mine + [None] * (steps - len(mine))

    def _tensors(self, indices: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """Right-padded input ids and attention mask (right padding keeps position ids and labels simple)."""
        width = max(len(self.sequences[i]) for i in indices)
        input_ids = torch.zeros(len(indices), width, dtype=torch.long)
        attention_mask = torch.zeros(len(indices), width, dtype=torch.long)
        for row, index in enumerate(indices):
            ids = self.sequences[index]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids.to(device), attention_mask.to(device)

    def _wants_loss(self, model: nn.Module) -> bool:
        if self.compute_loss is not None:
            return self.compute_loss
        return type(inspectable(model)).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def _emitters_of(self, model: nn.Module, device: torch.device, kwargs: dict[str, Any]) -> Emitters:
        """Which module emits each hidden state: one short calibration forward per model, then cached."""
        emitters = self._emitters.get(model)
        if emitters is None:
            ids, mask = self._tensors([0], device)
            emitters = calibrate(model, {"input_ids": ids[:, :16], "attention_mask": mask[:, :16], **kwargs})
            self._emitters[model] = emitters
        return emitters

    def run(
        self,
        model: nn.Module,
        *,
        optimizer: Any = None,
        distributed: bool | None = None,
        streaming: bool = True,
    ) -> ProbeResult:
        """Send the sample through ``model`` and return its per-layer metrics.

        Args:
            model: the model as training uses it (possibly DDP/FSDP-wrapped: the forward goes
                through the object given; a ``torch.compile`` wrapper is looked through so the
                probe's shapes do not recompile the training graph).
            optimizer: the training optimizer, if it has ``eval()``/``train()`` (schedule-free).
            distributed: shard the sample across ``torch.distributed`` processes and all-reduce;
                default: when a process group with more than one process is initialised. Every
                process must then call ``run``.
            streaming: compute each layer's metrics from a forward hook as soon as it exists
                (bounded memory); False collects ``output_hidden_states`` per micro-batch.
        """
        started = time.perf_counter()
        forward_model = getattr(model, "_orig_mod", model)  # eager module of a torch.compile wrapper
        if not isinstance(forward_model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        rank, world_size = (0, 1) if distributed is False else world()
        device = model_device(forward_model)
        with preserved_training_state(forward_model, optimizer), torch.no_grad():
            kwargs = accepted_kwargs(inspectable(forward_model), {"use_cache": False, "return_dict": True})
            emitters = self._emitters_of(forward_model, device, kwargs)
            state = _RunState(self, forward_model, emitters, device, streaming, kwargs)
            for indices in self._micro_batches(rank, world_size):
                state.forward(indices)
            totals = state.totals()
            if world_size > 1:
                totals = all_reduce(totals)
            flat = totals.tolist()  # the probe's one host synchronisation
        return state.result(flat, time.perf_counter() - started)


class _RunState:
    """One :meth:`Probe.run`: the plan (layers, hooks, loss), the sums so far, and the result."""

    def __init__(
        self,
        probe: Probe,
        model: nn.Module,
        emitters: Emitters,
        device: torch.device,
        streaming: bool,
        kwargs: dict[str, Any],
    ) -> None:
        self.probe, self.model, self.emitters, self.device, self.kwargs = probe, model, emitters, device, kwargs
        self.layers = probe.resolve_layers(emitters.num_hidden_states)
        self.use_hooks = streaming and all(emitters.modules[layer] is not None for layer in self.layers)
        self.wants_loss = probe._wants_loss(model)
        self.fields = schema.averaged_fields(spectral=True)
        self.accumulator = MetricAccumulator(num_groups=len(self.layers), device=device, fields=self.fields)
        defer = probe.defer_spectra if probe.defer_spectra is not None else device.type == "cuda"
        self.pending = _PendingSpectra(self) if defer and probe.method == "exact" else None
        self.sums = torch.zeros(len(_TOTALS), dtype=torch.float64, device=device)
        self.nan_rows: list[Tensor] = []  # per micro-batch: which sequences have a NaN metric in some layer

    def forward(self, indices: list[int] | None) -> None:
        """One micro-batch (None: a dummy pass that keeps the processes in step, not counted)."""
        real = indices is not None
        input_ids, attention_mask = self.probe._tensors(indices if real else [0], self.device)
        per_layer, loss_sum, loss_tokens = self._forward(input_ids, attention_mask)
        if not real:
            if self.pending is not None:
                self.pending.discard_last()
            return
        if self.pending is None:
            self.nan_rows.append(self.accumulate(per_layer))
        else:
            self.pending.add_batch(per_layer)
        self.sums += torch.stack(
            [
                loss_sum.to(self.device, torch.float64),
                loss_tokens.to(self.device, torch.float64),
                torch.tensor(float(len(indices)), dtype=torch.float64, device=self.device),
                attention_mask.sum().to(torch.float64),
                torch.zeros((), dtype=torch.float64, device=self.device),
            ]
        )

    def accumulate(self, per_layer: list[dict[str, Tensor]]) -> Tensor:
        """Add one micro-batch's per-layer metrics; which of its sequences have a NaN metric in some layer."""
        has_nan = None
        for group, values in enumerate(per_layer):
            row = self.accumulator.update(values, group=group)
            has_nan = row if has_nan is None else has_nan | row
        return has_nan

    def measure(self, attention_mask: Tensor, hidden: Tensor) -> Any:
        if self.pending is not None:
            return self.pending.prepare(hidden, attention_mask, self.probe.dtype)
        return compute_metrics(hidden, attention_mask, dtype=self.probe.dtype, method=self.probe.method)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[list[Any], Tensor, Tensor]:
        """Per-layer results (metric dicts, or pending Gram matrices) of one micro-batch, loss sum and tokens."""
        per_layer: list[Any] = [None] * len(self.layers)
        measure = functools.partial(self.measure, attention_mask)
        call_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **self.kwargs}
        if self.wants_loss:
            call_kwargs["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        handles = []
        try:
            if self.use_hooks:
                modules = dict(self.model.named_modules())
                for group, layer in enumerate(self.layers):
                    hook = functools.partial(_hook_adapter, measure, per_layer, group)
                    handles.append(modules[self.emitters.modules[layer]].register_forward_hook(hook))
                output = self.model(**call_kwargs, output_hidden_states=False)
            else:
                output = self.model(**call_kwargs, output_hidden_states=True)
                hidden_states = hidden_states_of(output, self.model)
                for group, layer in enumerate(self.layers):
                    per_layer[group] = measure(hidden_states[layer])
        finally:
            for handle in handles:
                handle.remove()
        if any(values is None for values in per_layer):
            raise RuntimeError("a hooked layer did not run during the forward pass; rerun with streaming=False")
        loss_sum = loss_tokens = torch.zeros((), dtype=torch.float64)
        loss = getattr(output, "loss", None) if self.wants_loss else None
        if loss is not None:
            loss_tokens = (attention_mask.sum(dim=1) - 1).clamp(min=0).sum().to(torch.float64)
            loss_sum = loss.detach().to(torch.float64) * loss_tokens
        elif self.wants_loss:
            loss_sum = torch.tensor(math.nan, dtype=torch.float64)
        return per_layer, loss_sum, loss_tokens

    def totals(self) -> Tensor:
        """The accumulator's state and the probe totals in one float64 vector (what is all-reduced)."""
        if self.pending is not None:
            self.pending.flush()
        if self.nan_rows:
            self.sums[_TOTALS.index("nan_sequences")] = torch.cat(self.nan_rows).sum().to(torch.float64)
        return torch.cat([self.accumulator.state.flatten(), self.sums])

    def result(self, flat: list[float], seconds: float) -> ProbeResult:
        size = self.accumulator.state.numel()
        self.accumulator.state = torch.tensor(flat[:size], dtype=torch.float64).reshape(self.accumulator.state.shape)
        totals = dict(zip(_TOTALS, flat[size:], strict=True))
        if totals["nan_sequences"]:
            warnings.warn(
                "some probe sequences have non-finite hidden states (a diverging run?); their metrics are NaN "
                "and probe/nan_sequences counts them",
                MNNWarning,
                stacklevel=3,
            )
        aggregated = {key: value.tolist() for key, value in self.accumulator.compute().items()}
        columns = [
            schema.derive_layer({name: aggregated[name][group] for name in self.fields})
            for group in range(len(self.layers))
        ]
        loss = totals["loss_sum"] / totals["loss_tokens"] if totals["loss_tokens"] > 0 else math.nan
        return ProbeResult(
            layers=self.layers,
            per_layer={name: [column[name] for column in columns] for name in columns[0]},
            standard_errors={name: aggregated[f"{name}_se"] for name in self.fields},
            loss=loss if self.wants_loss else None,
            sequences=int(totals["sequences"]),
            tokens=int(totals["tokens"]),
            nan_sequences=int(totals["nan_sequences"]),
            seconds=seconds,
            fingerprint=self.probe.fingerprint,
            num_hidden_states=self.emitters.num_hidden_states,
            config=self.probe.config,
            hidden_size=self.emitters.hidden_size,
        )


def _hook_adapter(
    measure: Callable[[Tensor], Any], per_layer: list[Any], group: int, _module: nn.Module, _inputs: Any, output: Any
) -> None:
    """A forward hook: measure the module's hidden-state output (which is left as it is)."""
    per_layer[group] = measure(first_tensor(output))


class _PendingSpectra:
    """Gram matrices of a probe waiting for one batched eigensolve, flushed early above a memory budget."""

    BUDGET_BYTES = 1 << 30

    def __init__(self, run: _RunState) -> None:
        self.run = run
        self.batches: list[list[PendingMetrics]] = []
        self.nbytes = 0

    def prepare(self, hidden: Tensor, attention_mask: Tensor, dtype: torch.dtype) -> PendingMetrics:
        item = prepare_metrics(hidden, attention_mask, dtype=dtype)
        self.nbytes += item.nbytes
        return item

    def add_batch(self, per_layer: list[PendingMetrics]) -> None:
        self.batches.append(per_layer)
        if self.nbytes > self.BUDGET_BYTES:
            self.flush()

    def discard_last(self) -> None:
        """Forget a dummy pass's Grams (prepared, but never added): recount the bytes held."""
        self.nbytes = sum(item.nbytes for batch in self.batches for item in batch)

    def flush(self) -> None:
        if not self.batches:
            return
        layers = len(self.batches[0])
        solved = finish_metrics([item for batch in self.batches for item in batch])
        for start in range(0, len(solved), layers):
            self.run.nan_rows.append(self.run.accumulate(solved[start : start + layers]))
        self.batches, self.nbytes = [], 0
