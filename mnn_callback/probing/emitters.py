"""What the probe needs to know about a model: which module emits each hidden state, and its limits.

Works with Hugging Face transformers models (decoder-only and encoders) and any module whose
``forward(input_ids=..., attention_mask=..., output_hidden_states=True)`` returns
``hidden_states``; transformers itself is not imported here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Emitters",
    "accepted_kwargs",
    "calibrate",
    "first_tensor",
    "hidden_states_of",
    "inspectable",
    "model_device",
    "named_emitters",
    "position_limit",
    "vocabulary_size",
]


def first_tensor(output: Any) -> Tensor | None:
    """The hidden-state tensor of a module's output: the tensor, or the first one of a tuple/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def inspectable(model: nn.Module) -> nn.Module:
    """The module whose class and config describe ``model``, looking through DDP/FSDP and compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: for a model dispatched over devices (``hf_device_map``, weights
    possibly offloaded to the CPU or disk), the first accelerator it uses, else the CPU."""
    device_map = getattr(inspectable(model), "hf_device_map", None)
    if isinstance(device_map, Mapping) and device_map:
        accelerators = [place for place in device_map.values() if str(place) not in ("cpu", "disk", "meta")]
        if not accelerators:
            return torch.device("cpu")
        place = accelerators[0]
        return torch.device("cuda", place) if isinstance(place, int) else torch.device(place)
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def accepted_kwargs(model: nn.Module, wanted: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``wanted`` that ``model.forward`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return wanted
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return wanted
    return {key: value for key, value in wanted.items() if key in parameters}


def hidden_states_of(output: Any, model: nn.Module, *, forward_given: bool = False) -> tuple[Tensor, ...]:
    """The output's ``hidden_states``; a ``TypeError`` saying what to do when it has none
    (``forward_given``: the output came from the user's ``forward=``, without ``modules=``)."""
    hidden_states = getattr(output, "hidden_states", None)
    if hidden_states is None and isinstance(output, Mapping):
        hidden_states = output.get("hidden_states")
    if not hidden_states and forward_given:
        raise TypeError(
            f"the output of forward= for {type(inspectable(model)).__name__} holds no hidden_states: without "
            "modules=, forward= must return an output with hidden_states (call the model with "
            "output_hidden_states=True, e.g. forward=lambda model, ids, mask: model.get_encoder()(input_ids=ids, "
            "attention_mask=mask, output_hidden_states=True)), or pass modules=[...] naming the modules whose "
            "outputs are the hidden states"
        )
    if not hidden_states:
        raise TypeError(
            f"{type(inspectable(model)).__name__} did not return hidden states: the probe needs a model whose "
            "forward(input_ids=..., attention_mask=..., output_hidden_states=True) returns `hidden_states` "
            "(any Hugging Face transformers model does), or modules=[...] naming the modules whose outputs are the "
            "hidden states (e.g. modules=['transformer.h.*']) and, if the model is not called as model(input_ids), "
            "forward=lambda model, input_ids, attention_mask: ..."
        )
    return tuple(hidden_states)


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model can embed (``max_position_embeddings`` / ``n_positions``), if it says."""
    config = getattr(inspectable(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "block_size"):
        limit = _positive(getattr(config, name, None))
        if limit is not None:
            return limit
    return None


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (the largest valid token id plus one), if the model has one."""
    inner = inspectable(model)
    getter = getattr(inner, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    if _positive(rows) is not None:
        return rows
    return _positive(getattr(getattr(inner, "config", None), "vocab_size", None))


@dataclass(frozen=True)
class Emitters:
    """Which module emits each hidden state (None: only available through ``output_hidden_states``)."""

    num_hidden_states: int
    modules: tuple[str | None, ...]
    hidden_size: int


def calibrate(model: nn.Module, run: Callable[[], Any], *, forward_given: bool = False) -> Emitters:
    """Match each hidden state to the module that outputs it, with one forward on a short input
    (``run()``, returning an output with ``hidden_states``; ``forward_given``: ``run`` is the
    user's ``forward=``, for the error when it has none).

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
            tensor = first_tensor(output)
            if tensor is not None:
                records[name] = (len(calls), tensor.detach().clone())

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        output = run()
    finally:
        for handle in handles:
            handle.remove()
    hidden_states = hidden_states_of(output, model, forward_given=forward_given)
    modules: list[str | None] = []
    for hidden in hidden_states:
        matches = [
            (name.count("."), order, name)
            for name, (order, tensor) in records.items()
            if calls[name] == 1
            and tensor.shape == hidden.shape
            and tensor.device == hidden.device
            and torch.equal(tensor, hidden)
        ]
        modules.append(max(matches)[2] if matches else None)
    return Emitters(len(hidden_states), tuple(modules), int(hidden_states[-1].shape[-1]))


def _pattern(pattern: str) -> re.Pattern[str]:
    """A module-name pattern: ``*`` stands for one part of a dotted name (``transformer.h.*``: the blocks)."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]*") + "$")


def named_emitters(model: nn.Module, patterns: Sequence[str], run: Callable[[], Any]) -> Emitters:
    """The modules whose outputs are the hidden states, named by ``patterns`` in their order (each
    pattern's matches in the model's module order); ``run()`` makes one short forward, which must
    call each of them exactly once, with a tensor output (its last dimension is the width).
    """
    inner = inspectable(model)  # names as the user's model has them, not a DDP/FSDP wrapper's
    outer = next((f"{name}." if name else "" for name, module in model.named_modules() if module is inner), "")
    names = [name for name, _ in inner.named_modules() if name]
    chosen: list[str] = []
    for pattern in patterns:
        matches = [name for name in names if _pattern(pattern).match(name) and name not in chosen]
        if not matches:
            shown = ", ".join(name for name in names if name.count(".") <= 2)[:300]
            raise ValueError(f"no module of {type(inner).__name__} matches {pattern!r} (its modules: {shown}, ...)")
        chosen += matches
    chosen = [outer + name for name in chosen]
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    widths: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            tensor = first_tensor(output)
            if tensor is not None and tensor.dim() == 3:
                widths[name] = int(tensor.shape[-1])

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in chosen]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    wrong = [f"{name} ({calls.get(name, 0)} calls)" for name in chosen if calls.get(name) != 1 or name not in widths]
    if wrong:
        raise ValueError(
            "each module named in modules= must run once per forward and output (batch, tokens, width): "
            + ", ".join(wrong)
        )
    return Emitters(len(chosen), tuple(chosen), widths[chosen[-1]])
