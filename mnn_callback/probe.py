"""The probe: a fixed held-out sample through the current model, per-layer metrics in one pass.

:class:`Probe` fixes its sample once, at construction; :meth:`Probe.run` sends it through a
model in micro-batches and turns each chosen hidden state into data-set metrics as soon as
that layer's activations exist (forward hooks), so the extra memory stays near one layer's
activations for one micro-batch. Training is left untouched: module flags, gradient
checkpointing and RNG states are restored, no autograd graph is built, hooks are always
removed. Under ``torch.distributed`` the sample is sharded and the sums are all-reduced, so
every process gets the single-process result.

Works with Hugging Face transformers models (decoder-only and encoders) and any module whose
``forward(input_ids=..., attention_mask=..., output_hidden_states=True)`` returns
``hidden_states``; transformers itself is not imported here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mnn_callback.metrics import (
    METHODS,
    MetricAccumulator,
    MNNWarning,
    PendingMetrics,
    all_reduce_sum,
    compute_metrics,
    finish_metrics,
    prepare_metrics,
)

__all__ = ["Probe", "ProbeResult", "preserved_training_state"]

PER_LAYER_KEYS = ("mnn", "nuclear_norm", "matrix_entropy", "erank", "renyi2_entropy")


# ---------------------------------------------------------------------------------------------
# The fixed sample
# ---------------------------------------------------------------------------------------------


def _read_text_paragraphs(path: str) -> list[str]:
    """Paragraphs of a text file: blocks separated by blank lines, stripped, empty ones skipped."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _read_jsonl(path: str, text_column: str) -> list[str | list[int]]:
    """Records of a JSONL file: an object with ``input_ids`` or ``text_column``, or a bare string."""
    records: list[str | list[int]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if isinstance(record, str):
                records.append(record)
            elif isinstance(record, dict) and "input_ids" in record:
                records.append(list(record["input_ids"]))
            elif isinstance(record, dict) and isinstance(record.get(text_column), str):
                records.append(record[text_column])
            else:
                raise ValueError(
                    f"{path}, line {number}: expected a string or an object with 'input_ids' or {text_column!r}"
                )
    return records


def _rows_of_ids(input_ids: Any, attention_mask: Any = None) -> list[list[int]]:
    """Rows of a 2-D id tensor or nested list, keeping the tokens the mask marks valid, in order."""
    ids = torch.as_tensor(input_ids)
    if ids.ndim != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be a 2-D integer tensor, got shape {tuple(ids.shape)} and {ids.dtype}")
    if attention_mask is None:
        return ids.tolist()
    mask = torch.as_tensor(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return [row[keep].tolist() for row, keep in zip(ids, mask.bool(), strict=True)]


def _candidates(data: Any, text_column: str) -> Sequence[str | list[int]]:
    """Turn any supported ``data`` into an indexable sequence of texts or token-id lists."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"probe data file not found: {path}")
        if path.endswith(".txt"):
            return _read_text_paragraphs(path)
        if path.endswith(".jsonl"):
            return _read_jsonl(path, text_column)
        raise ValueError(f"probe data file must end in .txt or .jsonl, got {path}")
    if isinstance(data, Tensor):
        return _rows_of_ids(data)
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise ValueError("probe data given as a mapping must have 'input_ids' (and optionally 'attention_mask')")
        return _rows_of_ids(data["input_ids"], data.get("attention_mask"))
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        if "input_ids" in column_names:
            return data["input_ids"]
        if text_column in column_names:
            return data[text_column]
        raise ValueError(f"the dataset has neither 'input_ids' nor a {text_column!r} column: {column_names}")
    if isinstance(data, Sequence):
        return data
    raise TypeError(
        "probe data must be a list of strings or of token-id lists, a 2-D tensor of input ids, a mapping with "
        f"'input_ids', a datasets.Dataset, or a path to a .txt or .jsonl file; got {type(data).__name__}"
    )


def _encoder(tokenizer: Any) -> Callable[[str | Sequence[int]], list[int]]:
    def encode(item: str | Sequence[int]) -> list[int]:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("the probe data holds text: pass tokenizer= to turn it into token ids")
            return list(tokenizer(item, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
        if isinstance(item, Tensor):
            item = item.tolist()
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in item):
            raise ValueError("each sequence of the probe data must be a string or a list of integer token ids")
        return list(item)

    return encode


def _fixed_sample(
    data: Any, tokenizer: Any, text_column: str, max_samples: int, max_length: int, seed: int
) -> tuple[list[list[int]], int]:
    """A seeded choice of ``max_samples`` sequences of at least 2 tokens, truncated; and how many were cut.

    Candidates are visited in a seeded random order (a private RNG: the global ones are not
    touched) and encoded one by one until enough are found, so a large data set is not
    tokenised whole. The chosen sequences keep their order in ``data``.
    """
    candidates = _candidates(data, text_column)
    if len(candidates) == 0:
        raise ValueError("the probe data is empty")
    encode = _encoder(tokenizer)
    order = list(range(len(candidates)))
    random.Random(seed).shuffle(order)
    chosen: list[tuple[int, list[int]]] = []
    for index in order:
        ids = encode(candidates[index])
        if len(ids) >= 2:
            chosen.append((index, ids))
            if len(chosen) == max_samples:
                break
    if not chosen:
        raise ValueError(
            f"none of the {len(candidates)} probe sequences has at least 2 tokens after tokenisation; "
            "the metrics need at least 2 tokens per sequence"
        )
    chosen.sort()
    truncated = sum(len(ids) > max_length for _, ids in chosen)
    return [ids[:max_length] for _, ids in chosen], truncated


# ---------------------------------------------------------------------------------------------
# Leaving training untouched
# ---------------------------------------------------------------------------------------------


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])


@contextlib.contextmanager
def preserved_training_state(model: nn.Module, optimizer: Any = None) -> Iterator[None]:
    """Put ``model`` in eval mode without gradient checkpointing; restore everything on exit.

    Restores each module's own ``training`` flag (a frozen submodule kept in eval stays so),
    each ``gradient_checkpointing`` attribute, and the torch (CPU and CUDA), Python and NumPy
    RNG states; mirrors ``optimizer.eval()`` / ``optimizer.train()`` for optimizers that have
    them (schedule-free ones). Runs its restore in ``finally``: an exception or a
    KeyboardInterrupt leaves the model as it was.
    """
    modules = list(model.modules())
    flags = [module.training for module in modules]
    checkpointing = [
        (module, module.gradient_checkpointing)
        for module in modules
        if isinstance(getattr(module, "gradient_checkpointing", None), bool)
    ]
    rng = _rng_states()
    switch_optimizer = (
        model.training and callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    )
    try:
        for module, _ in checkpointing:
            module.gradient_checkpointing = False
        if switch_optimizer:
            optimizer.eval()
        model.eval()
        yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.training = flag
        for module, value in checkpointing:
            module.gradient_checkpointing = value
        if switch_optimizer:
            optimizer.train()
        _restore_rng_states(rng)


# ---------------------------------------------------------------------------------------------
# Finding the modules that emit each hidden state
# ---------------------------------------------------------------------------------------------


def _first_tensor(output: Any) -> Tensor | None:
    """The hidden-state tensor of a module's output: the tensor, or the first one of a tuple/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _inspectable(model: nn.Module) -> nn.Module:
    """The module whose class and config describe ``model``, looking through DDP/FSDP and compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@dataclass(frozen=True)
class _Emitters:
    """Which module emits each hidden state (None: only available through ``output_hidden_states``)."""

    num_hidden_states: int
    modules: tuple[str | None, ...]


def _accepted_kwargs(model: nn.Module, wanted: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``wanted`` that ``model.forward`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return wanted
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return wanted
    return {key: value for key, value in wanted.items() if key in parameters}


def _hidden_states_of(output: Any, model: nn.Module) -> tuple[Tensor, ...]:
    hidden_states = getattr(output, "hidden_states", None)
    if hidden_states is None and isinstance(output, Mapping):
        hidden_states = output.get("hidden_states")
    if not hidden_states:
        raise TypeError(
            f"{type(_inspectable(model)).__name__} did not return hidden states: the probe needs a model whose "
            "forward(input_ids=..., attention_mask=..., output_hidden_states=True) returns `hidden_states` "
            "(any Hugging Face transformers model does)"
        )
    return tuple(hidden_states)


def _calibrate(model: nn.Module, forward_kwargs: dict[str, Any]) -> _Emitters:
    """Match each hidden state to the module that outputs it, with one forward on a short input.

    Records every module's output (hooks on all modules) and compares it exactly with
    ``hidden_states[i]``. Among matching modules called exactly once, takes the deepest (it
    returns a plain tensor), and among equally deep ones the last called.
    """
    records: dict[str, tuple[int, Tensor]] = {}
    calls: dict[str, int] = {}
    handles = []

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            tensor = _first_tensor(output)
            if tensor is not None:
                records[name] = (len(calls), tensor.detach().clone())

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        output = model(**forward_kwargs, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden_states = _hidden_states_of(output, model)
    modules: list[str | None] = []
    for hidden in hidden_states:
        matches = [
            (name.count("."), order, name)
            for name, (order, tensor) in records.items()
            if calls[name] == 1 and tensor.shape == hidden.shape and torch.equal(tensor, hidden)
        ]
        modules.append(max(matches)[2] if matches else None)
    return _Emitters(num_hidden_states=len(hidden_states), modules=tuple(modules))


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class ProbeResult:
    """Data-set metrics of one probe run.

    ``per_layer[key][j]`` is the value of metric ``key`` (``mnn``, ``nuclear_norm``,
    ``matrix_entropy``, ``entropy_nats``, ``erank``) at hidden-state index ``layers[j]``:
    MNN, nuclear norm and normalised entropy are means over sequences, eRank is
    ``exp(mean entropy in nats)``. ``loss`` is the token-weighted mean next-token NLL in nats
    (None when the model has no language-model head).
    """

    layers: list[int]
    per_layer: dict[str, list[float]]
    loss: float | None
    sequences: int
    tokens: int
    nan_sequences: int
    seconds: float
    fingerprint: str
    num_hidden_states: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> float | None:
        """``exp(loss)``; inf when that overflows."""
        if self.loss is None:
            return None
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def metrics(self) -> dict[str, float]:
        """Flat ``{key: float}``: ``mnn/layer_{i}`` and the like per layer, ``mnn_ratio/layer_{i}``
        (MNN / nuclear norm), ``mnn/last`` and ``matrix_entropy/last`` (the final hidden state),
        then ``probe/...``."""
        out: dict[str, float] = {}
        for key in PER_LAYER_KEYS:
            for layer, value in zip(self.layers, self.per_layer[key], strict=True):
                out[f"{key}/layer_{layer}"] = float(value)
        for layer, mnn, nuclear in zip(self.layers, self.per_layer["mnn"], self.per_layer["nuclear_norm"], strict=True):
            out[f"mnn_ratio/layer_{layer}"] = mnn / nuclear if nuclear > 0 else math.nan
        final = self.num_hidden_states - 1
        if final in self.layers:  # the headline pair: the final hidden state, as the MNN paper reports
            out["mnn/last"] = out[f"mnn/layer_{final}"]
            out["matrix_entropy/last"] = out[f"matrix_entropy/layer_{final}"]
        if self.loss is not None:
            out["probe/loss"] = float(self.loss)
            out["probe/perplexity"] = float(self.perplexity)
        out["probe/sequences"] = float(self.sequences)
        out["probe/tokens"] = float(self.tokens)
        out["probe/nan_sequences"] = float(self.nan_sequences)
        out["probe/seconds"] = float(self.seconds)
        return out

    def diff_erank(self, reference: ProbeResult) -> dict[str, float]:
        """``diff_erank/layer_{i}`` = eRank of ``reference`` minus eRank of this result, for shared layers.

        Positive when this model's representation is more compressed than the reference's.
        """
        reference_erank = dict(zip(reference.layers, reference.per_layer["erank"], strict=True))
        return {
            f"diff_erank/layer_{layer}": float(reference_erank[layer] - erank)
            for layer, erank in zip(self.layers, self.per_layer["erank"], strict=True)
            if layer in reference_erank
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite floats become None); inverse of :meth:`from_dict`."""
        return {
            "layers": list(self.layers),
            "per_layer": {key: [_finite_or_none(v) for v in values] for key, values in self.per_layer.items()},
            "loss": None if self.loss is None else _finite_or_none(self.loss),
            "has_loss": self.loss is not None,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "nan_sequences": self.nan_sequences,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
            "num_hidden_states": self.num_hidden_states,
            "config": dict(self.config),
        }

    @classmethod
    def load(cls, source: ProbeResult | Mapping[str, Any] | str | os.PathLike) -> ProbeResult:
        """A result from itself, its :meth:`to_dict`, or a JSON file holding one.

        The JSON may also be a checkpoint's ``mnn_metrics.json``: its ``reference`` entry is used.
        """
        if isinstance(source, ProbeResult):
            return source
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8") as handle:
                source = json.load(handle)
        if isinstance(source, Mapping):
            return cls.from_dict(source.get("reference", source))
        raise TypeError(
            "expected a model, a ProbeResult, its to_dict(), or the path of a JSON file holding one; "
            f"got {type(source).__name__}"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        def number(value: float | None) -> float:
            return math.nan if value is None else float(value)

        has_loss = data.get("has_loss", data.get("loss") is not None)
        return cls(
            layers=[int(layer) for layer in data["layers"]],
            per_layer={key: [number(v) for v in values] for key, values in data["per_layer"].items()},
            loss=number(data.get("loss")) if has_loss else None,
            sequences=int(data["sequences"]),
            tokens=int(data["tokens"]),
            nan_sequences=int(data["nan_sequences"]),
            seconds=float(data["seconds"]),
            fingerprint=str(data["fingerprint"]),
            num_hidden_states=int(data.get("num_hidden_states", max(data["layers"]) + 1)),
            config=dict(data.get("config", {})),
        )


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------

LayerSpec = str | int | Sequence[int]


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


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Probe:
    """A fixed held-out sample and the per-layer compression metrics of a model on it.

    Args:
        data: the held-out sample: a list of strings (with ``tokenizer``); a list of token-id
            lists; a 2-D LongTensor of input ids, or a mapping with ``input_ids`` and
            optionally ``attention_mask``; a ``datasets.Dataset`` with ``input_ids`` or a text
            column; or a path to a ``.txt`` file (one sample per paragraph: blocks of lines
            separated by blank lines) or a ``.jsonl`` file (per line an object with
            ``input_ids`` or ``text_column``, or a string).
        tokenizer: turns text into ids (``tokenizer(text)["input_ids"]``); needed for text.
        max_samples: how many sequences to keep (a seeded choice, fixed at construction).
        max_length: tokens per sequence; longer ones are truncated (one warning with the count).
        batch_size: sequences per forward pass.
        layers: ``"all"``, ``"last"``, or indices into the model's hidden states (0 = the
            embedding output; the last one is after the final norm, like HF's
            ``hidden_states[-1]``); negative indices count from the end.
        seed: seed of the choice of sequences.
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
        self.sequences, truncated = _fixed_sample(data, tokenizer, text_column, max_samples, max_length, seed)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(self.sequences)} probe sequences were longer than max_length={max_length} "
                "tokens and were truncated",
                MNNWarning,
                stacklevel=2,
            )
        self.fingerprint = self._fingerprint()
        self._emitters: weakref.WeakKeyDictionary[nn.Module, _Emitters] = weakref.WeakKeyDictionary()

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.sequences)

    def _fingerprint(self) -> str:
        content = json.dumps(
            {"sequences": self.sequences, "layers": self.layers, "dtype": str(self.dtype), "method": self.method},
            separators=(",", ":"),
        )
        return hashlib.sha256(content.encode()).hexdigest()[:16]

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
        name = type(_inspectable(model)).__name__
        return name.endswith(("ForCausalLM", "LMHeadModel"))

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
        start = time.perf_counter()
        forward_model = getattr(model, "_orig_mod", model)  # eager module of a torch.compile wrapper
        if not isinstance(forward_model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        rank, world_size = _world()
        if distributed is False:
            rank, world_size = 0, 1
        device = _model_device(forward_model)
        with preserved_training_state(forward_model, optimizer), torch.no_grad():
            kwargs = _accepted_kwargs(_inspectable(forward_model), {"use_cache": False, "return_dict": True})
            emitters = self._emitters.get(forward_model)
            if emitters is None:
                sample_ids, sample_mask = self._tensors([0], device)
                emitters = _calibrate(
                    forward_model, {"input_ids": sample_ids[:, :16], "attention_mask": sample_mask[:, :16], **kwargs}
                )
                self._emitters[forward_model] = emitters
            layers = self.resolve_layers(emitters.num_hidden_states)
            use_hooks = streaming and all(emitters.modules[layer] is not None for layer in layers)
            wants_loss = self._wants_loss(forward_model)
            accumulator = MetricAccumulator(num_groups=len(layers), device=device)
            defer = self.defer_spectra if self.defer_spectra is not None else device.type == "cuda"
            pending = _PendingSpectra(accumulator) if defer and self.method == "exact" else None
            # loss sum (nats), loss tokens, sequences, tokens, sequences with a NaN metric in any layer
            totals = torch.zeros(5, dtype=torch.float64, device=device)
            for indices in self._micro_batches(rank, world_size):
                real = indices is not None
                input_ids, attention_mask = self._tensors(indices if real else [0], device)
                per_layer, (loss_sum, loss_tokens) = self._forward(
                    forward_model, emitters, layers, use_hooks, wants_loss, input_ids, attention_mask, kwargs, pending
                )
                if not real:
                    if pending is not None:
                        pending.discard_last()
                    continue  # a dummy pass keeps the processes in step; its results are not counted
                if pending is None:
                    nan_sequences = _accumulate(accumulator, per_layer)
                else:
                    pending.add_batch(per_layer)
                    nan_sequences = torch.zeros((), dtype=torch.float64, device=device)
                totals += torch.stack(
                    [
                        loss_sum.to(device, torch.float64),
                        loss_tokens.to(device, torch.float64),
                        torch.tensor(float(len(indices)), dtype=torch.float64, device=device),
                        attention_mask.sum().to(torch.float64),
                        nan_sequences,
                    ]
                )
            if pending is not None:
                pending.flush()
                totals[4] += pending.nan_sequences
            if world_size > 1:
                combined = all_reduce_sum(torch.cat([accumulator.state.flatten(), totals]))
                accumulator.state = combined[: accumulator.state.numel()].reshape(accumulator.state.shape)
                totals = combined[accumulator.state.numel() :]
            aggregated = accumulator.compute()
            flat = torch.cat([*aggregated.values(), totals]).tolist()  # the probe's one host synchronisation
            groups = len(layers)
            values = {key: flat[i * groups : (i + 1) * groups] for i, key in enumerate(aggregated)}
            loss_sum, loss_tokens, sequences, tokens, nan_sequences = flat[len(aggregated) * groups :]
        if nan_sequences:
            warnings.warn(
                "some probe sequences have non-finite hidden states (a diverging run?); their metrics are NaN "
                "and probe/nan_sequences counts them",
                MNNWarning,
                stacklevel=2,
            )
        return ProbeResult(
            layers=layers,
            per_layer={key: values[key] for key in (*MetricAccumulator.FIELDS, "erank")},
            loss=(loss_sum / loss_tokens if loss_tokens > 0 else math.nan) if wants_loss else None,
            sequences=int(sequences),
            tokens=int(tokens),
            nan_sequences=int(nan_sequences),
            seconds=time.perf_counter() - start,
            fingerprint=self.fingerprint,
            num_hidden_states=emitters.num_hidden_states,
            config=self.config,
        )

    def _forward(
        self,
        model: nn.Module,
        emitters: _Emitters,
        layers: list[int],
        use_hooks: bool,
        wants_loss: bool,
        input_ids: Tensor,
        attention_mask: Tensor,
        kwargs: dict[str, Any],
        pending: _PendingSpectra | None,
    ) -> tuple[list[Any], tuple[Tensor, Tensor]]:
        """One micro-batch: per-layer results (aligned with ``layers``: metric dicts, or pending
        Gram matrices when ``pending``) and (loss sum, loss tokens)."""
        per_layer: list[Any] = [None] * len(layers)

        def measure(group: int, hidden: Tensor) -> None:
            if pending is not None:
                per_layer[group] = pending.prepare(hidden, attention_mask, self.dtype)
            else:
                per_layer[group] = compute_metrics(hidden, attention_mask, dtype=self.dtype, method=self.method)

        call_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if wants_loss:
            call_kwargs["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        handles = []
        try:
            if use_hooks:
                modules = dict(model.named_modules())
                for group, layer in enumerate(layers):
                    hook = functools.partial(_hook_adapter, measure, group)
                    handles.append(modules[emitters.modules[layer]].register_forward_hook(hook))
                output = model(**call_kwargs, output_hidden_states=False)
            else:
                output = model(**call_kwargs, output_hidden_states=True)
                hidden_states = _hidden_states_of(output, model)
                for group, layer in enumerate(layers):
                    measure(group, hidden_states[layer])
        finally:
            for handle in handles:
                handle.remove()
        if any(values is None for values in per_layer):
            raise RuntimeError("a hooked layer did not run during the forward pass; rerun with streaming=False")
        loss_sum = loss_tokens = torch.zeros((), dtype=torch.float64)
        loss = getattr(output, "loss", None) if wants_loss else None
        if loss is not None:
            loss_tokens = (attention_mask.sum(dim=1) - 1).clamp(min=0).sum().to(torch.float64)
            loss_sum = loss.detach().to(torch.float64) * loss_tokens
        elif wants_loss:
            loss_sum = torch.tensor(math.nan, dtype=torch.float64)
        return per_layer, (loss_sum, loss_tokens)


def _hook_adapter(measure: Callable[[int, Tensor], None], group: int, _module: nn.Module, _inputs: Any, output: Any):
    """A forward hook: hand the module's hidden-state output to ``measure`` (the output is left as it is)."""
    measure(group, _first_tensor(output))


def _accumulate(accumulator: MetricAccumulator, per_layer: list[dict[str, Tensor]]) -> Tensor:
    """Add one micro-batch's per-layer metrics; return how many sequences have a NaN metric in any layer."""
    for group, values in enumerate(per_layer):
        accumulator.update(values, group=group)
    nan_any = torch.stack([values[key].isnan() for values in per_layer for key in MetricAccumulator.FIELDS])
    return nan_any.any(dim=0).sum().to(torch.float64)


class _PendingSpectra:
    """Gram matrices of a probe waiting for one batched eigensolve, flushed early above a memory budget."""

    BUDGET_BYTES = 1 << 30

    def __init__(self, accumulator: MetricAccumulator) -> None:
        self.accumulator = accumulator
        self.batches: list[list[PendingMetrics]] = []
        self.nbytes = 0
        self.nan_sequences = torch.zeros((), dtype=torch.float64, device=accumulator.state.device)

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
            self.nan_sequences = self.nan_sequences + _accumulate(self.accumulator, solved[start : start + layers])
        self.batches, self.nbytes = [], 0
