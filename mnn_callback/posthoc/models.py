"""Models for post hoc evaluation: what to evaluate (directories, hub ids, modules) and loading them safely.

Local files only for local paths; no remote code unless asked; transformers prefers safetensors
and loads ``.bin`` weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from mnn_callback.core.errors import UsageError
from mnn_callback.posthoc.placement import Placement

__all__ = [
    "Target",
    "adapter_base",
    "discover",
    "find_tokenizer",
    "hub_revisions",
    "is_causal",
    "load_model",
    "looks_local",
    "step_of_revision",
    "untrained_model",
]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_STEP = re.compile(r"step(\d+)")
logger = logging.getLogger("mnn_callback")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: a local directory, a hub id (at a revision) or a module, and its step if known."""

    name: str
    path: str  # directory or hub id; for a module, its name
    step: int | None
    local: bool
    module: nn.Module | None = None
    revision: str | None = None  # a hub branch, tag or commit (None: the default branch)
    base: Target | None = None  # a PEFT adapter's base model, found when the adapter is discovered

    @property
    def base_key(self) -> str | None:
        """What identifies a PEFT adapter's base model, down the chain of adapters to the model that is not one:
        ``/abs/lora1 <- /abs/base`` for an adapter on the adapter lora1 (None for any other model)."""
        return None if self.base is None else self.base.chain_key

    @property
    def chain_key(self) -> str:
        """What identifies the weights loaded: the key, and for an adapter the keys of its bases (``<-``)."""
        return self.key if self.base is None else f"{self.key} <- {self.base_key}"

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


def _adapter_config(adapter: str) -> dict[str, Any]:
    try:
        with open(os.path.join(adapter, ADAPTER_CONFIG), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise UsageError(f"{adapter}: unreadable {ADAPTER_CONFIG} ({type(error).__name__}: {error})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{adapter}: expected a JSON object in {ADAPTER_CONFIG}, got {type(config).__name__}")
    return config


def _ancestors(path: str) -> list[str]:
    """``path`` and each directory above it, nearest first."""
    found = [path]
    while os.path.dirname(found[-1]) != found[-1]:
        found.append(os.path.dirname(found[-1]))
    return found


def _base_places(adapter: str, base: str) -> list[str]:
    """Where a base path may be: from the adapter's directory and each one above it, nearest first (PEFT saves
    the path it was given, relative to where training ran), the same from where a link to the adapter points,
    then from the current directory."""
    starts = [*_ancestors(os.path.abspath(adapter)), *_ancestors(os.path.realpath(adapter)), os.getcwd()]
    places: dict[str, str] = {}  # one per place on disk, the nearest name of it
    for start in starts:
        place = os.path.normpath(os.path.join(start, base))
        places.setdefault(os.path.realpath(place), place)
    return list(places.values())


def _not_a_base(place: str) -> str:
    """Why ``place``, which exists, is not a model to merge an adapter into."""
    if not os.path.isdir(place):
        return f"{place} is a file, not a model directory"
    checkpoints = sorted(
        (name for name in os.listdir(place) if _CHECKPOINT.match(name)), key=lambda name: int(name.split("-")[1])
    )
    if checkpoints:
        shown = ", ".join(checkpoints[:3]) + (f", ... ({len(checkpoints)} in all)" if len(checkpoints) > 3 else "")
        return (
            f"{place} is a run directory ({shown}), not a model: point base_model_name_or_path at the checkpoint "
            f"meant, e.g. {os.path.join(place, checkpoints[-1])}"
        )
    return f"{place} holds neither a model (config.json) nor a PEFT adapter"


def _missing_base(adapter: str, base: str, places: list[str]) -> str:
    """Why the local base path ``base`` of ``adapter`` is not a model at any of ``places``."""
    directories = [place for place in places if os.path.isdir(place)]  # what a bare name means, before a file
    existing = directories or [place for place in places if os.path.exists(place)]
    if existing:
        return _not_a_base(existing[0])
    if os.path.isabs(base):
        return "no such directory"
    return f"no such directory from {adapter}, the directories above it or the current directory"


def _hub_base(cannot: str, base: str, revision: Any) -> Target:
    """The hub model ``base`` (at ``revision``), if transformers finds its config: online, or in the cache."""
    from huggingface_hub import constants
    from transformers.utils import cached_file

    revision = revision if isinstance(revision, str) and revision else None
    try:
        cached_file(base, "config.json", revision=revision)
    except OSError as error:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE else str(error)
        raise UsageError(f"{cannot}: {why.splitlines()[0]}") from None
    return Target(base, base, None, False, revision=revision)


def adapter_base(adapter: str, _built_on_it: tuple[str, ...] = ()) -> Target:
    """The base model of the PEFT adapter directory ``adapter``: its ``adapter_config.json``'s
    ``base_model_name_or_path``, a local directory or a hub id (at the config's ``revision``).

    A relative path is looked for from the adapter's directory and those above it (for a link to
    the adapter, also from where it points), then from the current directory. ``UsageError``
    naming the adapter and its base when the base is in two places, is the adapter itself, or
    cannot be found; a local-looking path, or a name that is a directory at one of those places
    (a run directory holding only checkpoints), is never looked up on the hub.
    """
    config = _adapter_config(adapter)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UsageError(f"{adapter}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    cannot = f"PEFT adapter {adapter}: its base model {base!r} cannot be loaded"
    stack = (*_built_on_it, os.path.realpath(adapter))  # this adapter and those built on it
    places = _base_places(adapter, base)
    found = [place for place in places if _loadable(place)]
    # not the adapter itself when another is found: "." saved by a run inside its base model's directory
    others = [place for place in found if os.path.realpath(place) not in stack]
    if len(others) > 1:
        raise UsageError(
            f"PEFT adapter {adapter}: its base model {base!r} is two different models, {others[0]} and {others[1]}: "
            f"write the one meant into its {ADAPTER_CONFIG} (base_model_name_or_path)"
        )
    if others:
        target = Target(others[0], others[0], None, True)
        return replace(target, base=adapter_base(others[0], stack)) if _is_adapter_dir(others[0]) else target
    if found:
        what = "the adapter itself" if os.path.realpath(found[0]) == stack[-1] else "an adapter built on this one"
        raise UsageError(f"{cannot}: {found[0]} is {what}; expected the model it was trained on")
    parents = [os.path.dirname(place) for place in places] if os.path.dirname(base) else []
    # a name that is a directory at one of the places is that directory, never a hub id (``rundir``)
    local = os.path.isabs(base) or looks_local(base) or not _HUB_ID.match(base)
    if local or any(map(os.path.isdir, parents + places)):
        raise UsageError(f"{cannot}: {_missing_base(adapter, base, places)} (a local path: not looked up on the hub)")
    return _hub_base(cannot, base, config.get("revision"))


def _local_target(path: str) -> Target:
    """A model or adapter directory (an adapter with its base model)."""
    target = Target(path, os.path.abspath(path), _step_of(path), True)
    return replace(target, base=adapter_base(path)) if _is_adapter_dir(path) else target


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
        return [_local_target(checkpoint) for checkpoint in ordered]
    if _loadable(path):
        return [_local_target(path)]
    if ordered:  # the final model, and none at the root: the last checkpoint
        return [_local_target(ordered[-1])]
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
    _log_bases(targets)
    return targets


def _log_bases(targets: Sequence[Target]) -> None:
    """One INFO line per base model of PEFT adapters: the base they are merged into."""
    adapters: dict[str, list[str]] = {}
    for target in targets:
        if target.base_key is not None:
            adapters.setdefault(target.base_key, []).append(target.name)
    for base, names in adapters.items():
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        logger.info("PEFT adapter %s%s: base model %s", names[0], more, base)


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
    return None if target.base is None else find_tokenizer(target.base, None, trust_remote_code)


def is_causal(config: Any) -> bool:
    """Whether a model config names a causal language model (which can generate, and has a loss)."""
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in (config.architectures or []))


def _model_class(config: Any) -> Any:
    """The transformers auto class a config is loaded with: ``AutoModelForCausalLM`` for a causal LM (the
    loss), ``AutoModelForSeq2SeqLM`` for an encoder-decoder that has one (a PEFT ``SEQ_2_SEQ_LM`` adapter
    needs its generation methods; the probe runs its encoder), else ``AutoModel``."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if is_causal(config):
        return AutoModelForCausalLM
    if getattr(config, "is_encoder_decoder", False) and type(config) in AutoModelForSeq2SeqLM._model_mapping:
        return AutoModelForSeq2SeqLM
    return AutoModel


def load_model(target: Target, *, placement: Placement, trust_remote_code: bool) -> nn.Module:
    """A model for probing, of the class :func:`_model_class` chooses for its config."""
    if target.module is not None:
        return target.module
    if target.base is not None:  # the base model with the adapter merged into its weights
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError(f"{target.name} is a PEFT adapter: loading it needs peft (pip install peft)") from None
        model = load_model(target.base, placement=placement, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(model, target.path).merge_and_unload().eval()
    import transformers
    from transformers import AutoConfig

    options = {**target.options, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(target.path, **options)
    model_class = _model_class(config)
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
    if target.base is not None:
        return model_config(target.base, trust_remote_code)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(target.path, trust_remote_code=trust_remote_code, **target.options)


def untrained_model(target: Target, *, placement: Placement, seed: int, trust_remote_code: bool) -> nn.Module:
    """A randomly initialised model from ``target``'s config with a fixed seed (the Diff-eRank paper's reference).

    Built in CPU memory, then moved to the device or dispatched like the trained models. The
    global torch RNG is restored afterwards.
    """
    config = model_config(target, trust_remote_code)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.set_rng_state(generator_state)
    if placement.device_map is None:
        return model.to(placement.device).eval()
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=placement.max_memory)
    return dispatch_model(model, device_map, offload_dir=placement.offload_folder).eval()
