"""Models for post hoc evaluation: what to evaluate (directories, hub ids, modules) and loading them safely.

Local files only for local paths; no remote code unless asked; transformers prefers safetensors
and loads ``.bin`` weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mnn_callback.core.errors import UsageError

__all__ = [
    "DEVICE_MAPS",
    "Placement",
    "Target",
    "adapter_base",
    "discover",
    "find_tokenizer",
    "hub_revisions",
    "is_causal",
    "load_model",
    "looks_local",
    "parse_max_memory",
    "step_of_revision",
    "untrained_model",
]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_STEP = re.compile(r"step(\d+)")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: a local directory, a hub id (at a revision) or a module, and its step if known."""

    name: str
    path: str  # directory or hub id; for a module, its name
    step: int | None
    local: bool
    module: nn.Module | None = None
    revision: str | None = None  # a hub branch, tag or commit (None: the default branch)

    @property
    def key(self) -> str:
        """What identifies the model's weights: its directory or hub id, with the revision."""
        return f"{self.path}@{self.revision}" if self.revision else self.path

    @property
    def options(self) -> dict[str, Any]:
        """``from_pretrained`` options that find this model: local files only, or the hub at its revision."""
        return {"local_files_only": self.local, **({"revision": self.revision} if self.revision else {})}


def step_of_revision(revision: str) -> int | None:
    """The training step a revision's name says (``step3000`` -> 3000), if it says one."""
    match = _STEP.search(revision)
    return int(match.group(1)) if match else None


def hub_revisions(repo: str, pattern: str) -> list[str]:
    """The branches of hub repository ``repo`` matching the glob ``pattern``, by the step their names say.

    Needs network access: offline (``HF_HUB_OFFLINE``) it is a ``UsageError`` saying to name them.
    """
    from huggingface_hub import constants, list_repo_refs

    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"listing the revisions of {repo} ({pattern!r}) needs network access and HF_HUB_OFFLINE is set: "
            "name them, e.g. --revisions step0,step1000"
        )
    try:
        branches = [branch.name for branch in list_repo_refs(repo).branches]
    except Exception as error:
        raise UsageError(f"cannot list the revisions of {repo}: {type(error).__name__}: {error}") from None
    chosen = [name for name in branches if fnmatch.fnmatchcase(name, pattern)]
    if not chosen:
        raise UsageError(f"no branch of {repo} matches {pattern!r} (branches: {', '.join(sorted(branches)[:20])})")
    return sorted(
        chosen, key=lambda name: (step_of_revision(name) if step_of_revision(name) is not None else math.inf, name)
    )


def _hub_targets(path: str, revisions: Sequence[str] | None) -> list[Target]:
    """``org/name``, ``org/name@revision``, or ``org/name`` at each of ``revisions`` (names or one glob)."""
    repo, at, revision = path.partition("@")
    if at and not revision:
        raise UsageError(f"{path} names no revision after '@' (e.g. {repo}@step1000)")
    if looks_local(repo) or not _HUB_ID.match(repo):
        raise UsageError(f"no model or checkpoint found at {path} (a local path: not looked up on the hub)")
    if at:
        names = [revision]
    elif revisions and len(revisions) == 1 and any(char in revisions[0] for char in "*?["):
        names = hub_revisions(repo, revisions[0])
    else:
        names = list(revisions or [None])
    return [
        Target(f"{repo}@{name}" if name else repo, repo, step_of_revision(name) if name else None, False, None, name)
        for name in names
    ]


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _is_adapter_dir(path: str) -> bool:
    """A PEFT adapter (LoRA, ...) saved on its own: ``adapter_config.json`` and its weights, no ``config.json``."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not _is_model_dir(path)


def _loadable(path: str) -> bool:
    return _is_model_dir(path) or _is_adapter_dir(path)


def adapter_base(target: Target) -> Target | None:
    """The base model of an adapter directory (its ``adapter_config.json``'s ``base_model_name_or_path``):
    a local directory, or a hub id (from the cache when offline); None when ``target`` is no adapter."""
    if not (target.local and target.module is None and _is_adapter_dir(target.path)):
        return None
    try:
        with open(os.path.join(target.path, ADAPTER_CONFIG), encoding="utf-8") as handle:
            base = json.load(handle)["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{target.path}: unreadable {ADAPTER_CONFIG} ({type(error).__name__}: {error})") from None
    if not isinstance(base, str) or not base:
        raise UsageError(f"{target.path}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    local = os.path.isdir(base)
    return Target(base, os.path.abspath(base) if local else base, target.step, local)


def _step_of(path: str) -> int | None:
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as handle:
                return int(json.load(handle)["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _directory_targets(path: str, checkpoints: bool = True) -> list[Target]:
    """A run directory's ``checkpoint-*`` (in step order), else the model directory itself.

    ``checkpoints=False``: a run directory stands for its final model (the model saved at its root,
    else its last checkpoint).
    """
    found = [
        os.path.join(path, name)
        for name in os.listdir(path)
        if _CHECKPOINT.match(name) and _loadable(os.path.join(path, name))
    ]
    ordered = sorted(found, key=lambda p: (_step_of(p) or -1, p))
    if ordered and checkpoints:  # a final model saved beside them is normally the last checkpoint again
        return [Target(checkpoint, os.path.abspath(checkpoint), _step_of(checkpoint), True) for checkpoint in ordered]
    if _loadable(path):
        return [Target(path, os.path.abspath(path), _step_of(path), True)]
    if ordered:  # the final model, and none at the root: the last checkpoint
        return [Target(ordered[-1], os.path.abspath(ordered[-1]), _step_of(ordered[-1]), True)]
    shown = ", ".join(sorted(os.listdir(path))[:12]) or "nothing"
    raise UsageError(
        f"{path} holds neither a model (config.json), a PEFT adapter ({ADAPTER_CONFIG}) nor checkpoint-* directories "
        f"with one (it holds: {shown})"
    )


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local path rather than a hub id ``org/name``.

    ``./``, ``../``, ``/``, ``~``, a Windows separator, more than one ``/``, or a first part that
    exists here (``runs/typo`` when ``runs/`` exists): such a path that does not exist is a
    typo, never a hub lookup.
    """
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.exists(parent)


def _module_name(model: nn.Module, index: int) -> str:
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or f"model {index}")


def discover(
    models: Sequence[str | os.PathLike | nn.Module], revisions: Sequence[str] | None = None, *, checkpoints: bool = True
) -> list[Target]:
    """Models to evaluate: model directories, run directories holding ``checkpoint-*`` (in step order;
    ``checkpoints=False``: their final model), hub ids (``org/name@revision``, or ``org/name`` at each
    of ``revisions``), and modules."""
    targets: list[Target] = []
    module_names = [_module_name(model, index) for index, model in enumerate(models) if isinstance(model, nn.Module)]
    for index, model in enumerate(models):
        if isinstance(model, nn.Module):
            # in-memory weights have no file to identify them: the position in the list does
            name = _module_name(model, index)
            name = f"{name} #{index}" if module_names.count(name) > 1 else name
            targets.append(Target(name, f"<module {index}: {name}>", None, True, module=model))
            continue
        path = os.fspath(model)
        if os.path.isdir(path):
            targets.extend(_directory_targets(path, checkpoints))
        elif os.path.exists(path):
            raise UsageError(f"{path} is not a directory (expected a model or run directory)")
        else:
            targets.extend(_hub_targets(path, revisions))  # hub ids: downloaded by transformers (or its cache)
    if not targets:
        raise UsageError("no checkpoints or models found")
    return targets


def _load_tokenizer(source: str, options: dict[str, Any], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **options)


def find_tokenizer(target: Target, tokenizer: Any, trust_remote_code: bool) -> Any:
    """``tokenizer`` (an object, or a directory or id to load), else the model's own, else one saved
    in its run directory, else (an adapter) its base model's; None if none is found."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        source = os.fspath(tokenizer)
        return _load_tokenizer(source, {"local_files_only": os.path.isdir(source)}, trust_remote_code)
    if target.module is not None:
        return None
    candidates = [target.path] + ([os.path.dirname(target.path)] if target.local else [])
    for candidate in candidates:
        if target.local and not os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            continue
        try:
            return _load_tokenizer(candidate, target.options, trust_remote_code)
        except (OSError, ValueError):
            continue
    base = adapter_base(target)
    return None if base is None else find_tokenizer(base, None, trust_remote_code)


def model_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """The dtype to load weights in: ``auto`` keeps the checkpoint's on CUDA, float32 on the CPU."""
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_causal(config: Any) -> bool:
    """Whether a model config names a causal language model (which can generate, and has a loss)."""
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in (config.architectures or []))


@dataclass(frozen=True)
class Placement:
    """Where a loaded model goes: one ``device``, or (``device_map``) split over the available
    devices by Accelerate's big-model inference, within ``max_memory`` per device, the rest
    offloaded to the CPU and to ``offload_folder`` on disk."""

    device: torch.device
    dtype: torch.dtype | str
    device_map: str | None = None  # "auto", "balanced", "balanced_low_0" or "sequential"
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None

    @classmethod
    def of(
        cls,
        device: str,
        dtype: str,
        device_map: str | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | None = None,
    ) -> Placement:
        """From the options of ``evaluate``/``rank``: ``device`` ``"auto"`` is CUDA when available (this
        process's GPU under ``torchrun``: ``LOCAL_RANK``), ``dtype`` ``"auto"`` as :func:`model_dtype`."""
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise UsageError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
        if max_memory is not None and device_map is None:
            raise UsageError("max_memory needs device_map (e.g. device_map='auto')")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        place = torch.device(device)
        if place.type == "cuda" and place.index is None:
            place = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return cls(place, model_dtype(dtype, place), device_map, max_memory, offload_folder)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=60GiB"`` as Accelerate's ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}``).

    >>> parse_max_memory("0=20GiB,cpu=60GiB")
    {0: '20GiB', 'cpu': '60GiB'}
    """
    if not text:
        return None
    memory: dict[int | str, str] = {}
    for part in text.split(","):
        device, equals, amount = part.strip().partition("=")
        if not equals or not amount or not (device.isdigit() or device in ("cpu", "mps", "disk")):
            raise UsageError(f"--max-memory takes DEVICE=AMOUNT pairs such as 0=20GiB,cpu=60GiB; got {part!r}")
        memory[int(device) if device.isdigit() else device] = amount
    return memory


def load_model(target: Target, *, placement: Placement, trust_remote_code: bool) -> nn.Module:
    """A model for probing: the causal-LM class when the config names one (for the loss), else the base model."""
    if target.module is not None:
        return target.module
    base = adapter_base(target)
    if base is not None:  # the base model with the adapter merged into its weights
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError(f"{target.name} is a PEFT adapter: loading it needs peft (pip install peft)") from None
        model = load_model(base, placement=placement, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(model, target.path).merge_and_unload().eval()
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    options = {**target.options, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(target.path, **options)
    model_class = AutoModelForCausalLM if is_causal(config) else AutoModel
    dtype_option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    options[dtype_option] = placement.dtype
    if placement.device_map is not None:
        dispatch = {"device_map": placement.device_map, "max_memory": placement.max_memory}
        model = model_class.from_pretrained(
            target.path, config=config, **dispatch, offload_folder=placement.offload_folder, **options
        )
        return model.eval()
    model = model_class.from_pretrained(target.path, config=config, **options)
    return model.to(placement.device).eval()


def model_config(target: Target, trust_remote_code: bool) -> Any:
    """The model's configuration (transformers ``PretrainedConfig``; an adapter's: its base model's)."""
    if target.module is not None:
        return getattr(target.module, "config", None)
    base = adapter_base(target)
    if base is not None:
        return model_config(base, trust_remote_code)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(target.path, trust_remote_code=trust_remote_code, **target.options)


def untrained_model(target: Target, *, placement: Placement, seed: int, trust_remote_code: bool) -> nn.Module:
    """A randomly initialised model from ``target``'s config with a fixed seed (the Diff-eRank paper's reference).

    Built in CPU memory, then moved to the device or dispatched like the trained models. The
    global torch RNG is restored afterwards.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    config = model_config(target, trust_remote_code)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model_class = AutoModelForCausalLM if is_causal(config) else AutoModel
        model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.set_rng_state(generator_state)
    if placement.device_map is None:
        return model.to(placement.device).eval()
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=placement.max_memory)
    return dispatch_model(model, device_map, offload_dir=placement.offload_folder).eval()
