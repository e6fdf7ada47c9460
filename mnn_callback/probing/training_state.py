"""Leaving training untouched: eval mode and no gradient checkpointing during a probe, everything restored."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["preserved_training_state"]

_MISSING = object()


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    return states


def _eager_stance() -> contextlib.AbstractContextManager[Any]:
    """Every ``torch.compile``d function (a wrapper, an in-place ``module.compile()``, a compiled
    block) runs its original Python code, touching no cache and no guard (torch >= 2.6)."""
    compiler = getattr(torch, "compiler", None)
    set_stance = getattr(compiler, "set_stance", None)
    return set_stance("force_eager") if callable(set_stance) else contextlib.nullcontext()


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
    each ``gradient_checkpointing`` attribute exactly as it was (an attribute that came from the
    class is not left behind on the instance: a ``torch.compile`` guard would see it), and the
    torch (CPU and CUDA), Python and NumPy RNG states; mirrors ``optimizer.eval()`` /
    ``optimizer.train()`` for optimizers that have them (schedule-free ones). Runs its restore in
    ``finally``: an exception or a KeyboardInterrupt leaves the model as it was. Inside, compiled
    code runs eagerly (``torch.compiler.set_stance("force_eager")``): the probe's eval-mode,
    no-grad calls of other shapes would otherwise compile graphs of their own through an in-place
    ``model.compile()`` and turn the training graph's shapes dynamic, which changes its kernels.
    """
    modules = list(model.modules())
    flags = [module.training for module in modules]
    checkpointing = [
        (module, module.__dict__.get("gradient_checkpointing", _MISSING))
        for module in modules
        if isinstance(getattr(module, "gradient_checkpointing", None), bool)
    ]
    rng = _rng_states()
    switch_optimizer = (
        model.training and callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    )
    try:
        for module, _ in checkpointing:
            if module.gradient_checkpointing:
                module.gradient_checkpointing = False
        if switch_optimizer:
            optimizer.eval()
        model.eval()
        with _eager_stance():
            yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.training = flag
        for module, value in checkpointing:
            if value is _MISSING:
                module.__dict__.pop("gradient_checkpointing", None)
            else:
                module.__dict__["gradient_checkpointing"] = value
        if switch_optimizer:
            optimizer.train()
        _restore_rng_states(rng)
