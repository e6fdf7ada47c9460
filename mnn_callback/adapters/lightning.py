"""MNNLightningCallback: the monitor in a PyTorch Lightning run, as ``Trainer(callbacks=[...])``.

::

    trainer = lightning.Trainer(callbacks=[MNNLightningCallback(held_out_ids, every_n_steps=100, module="model")])

A thin translation of Lightning's events to :class:`~mnn_callback.adapters.loop.MNNMonitor`: the probe at
the start of fitting (the Diff-eRank reference), after each optimizer step on the schedule, and
at the end; the history and reference go into Lightning's checkpoints (``state_dict``). Every
process probes its shard under Lightning's DDP strategy; the global-zero process writes, into the
trainer's ``log_dir`` (``mnn_metrics.jsonl``, and TensorBoard under ``runs``).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from mnn_callback.adapters.loop import MNNMonitor

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the other package
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("MNNLightningCallback needs lightning: pip install 'mnn-callback[lightning]'") from None

__all__ = ["MNNLightningCallback"]


class MNNLightningCallback(MNNMonitor, Callback):
    """Probe the model of a Lightning run on a schedule and log how its representations compress.

    Args:
        data: the held-out sample (see :class:`~mnn_callback.probing.probe.Probe`).
        module: the attribute of the LightningModule that holds the model to probe (e.g.
            ``"model"`` for a Hugging Face model kept as ``self.model``); default: the
            LightningModule itself (then ``modules=``/``forward=`` name its hidden states).
        out_dir: where the files go; default: the trainer's ``log_dir`` (else ``default_root_dir``).
        **options: as for :class:`~mnn_callback.adapters.loop.MNNMonitor` (``every_n_steps``, ``schedule``,
            ``sinks``, ``name``, probe options, ...).
    """

    def __init__(
        self, data: Any, *, module: str | None = None, out_dir: str | os.PathLike | None = None, **options: Any
    ):
        self.module_name = module
        self._trainer: Any = None
        MNNMonitor.__init__(self, data, out_dir=out_dir, **options)

    def _open(self) -> None:
        if self._trainer is not None:  # the files' place and the main process are known once fitting starts
            MNNMonitor._open(self)

    def _is_main_process(self) -> bool:
        return bool(self._trainer.is_global_zero)

    def _model(self, pl_module: nn.Module) -> nn.Module:
        return pl_module if self.module_name is None else getattr(pl_module, self.module_name)

    # -- Lightning events -------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        if self.out_dir is None:
            self.out_dir = trainer.log_dir or trainer.default_root_dir
        self.jsonl = os.path.join(self.out_dir, "mnn_metrics.jsonl")
        history = self.monitor.state_dict() if self.monitor.last_step is not None else None  # a checkpoint's
        self._open()
        if history is not None:
            self.load_state_dict(history)
        self.step(self._model(pl_module), trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step(self._model(pl_module), trainer.global_step)  # a step probed already (accumulation): nothing

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.finish(self._model(pl_module), trainer.global_step)
