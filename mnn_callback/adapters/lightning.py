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
from mnn_callback.output.sinks import JSONL_FILE

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
        out_dir: where the files go; default: each fit's trainer ``log_dir`` (else ``default_root_dir``).
        **options: as for :class:`~mnn_callback.adapters.loop.MNNMonitor` (``every_n_steps``, ``schedule``,
            ``sinks``, ``name``, ``sync_timeout``, probe options, ...).

    Each ``fit`` is a run of its own (a fresh history and Diff-eRank reference, in that fit's
    directory); ``fit(ckpt_path=...)`` continues the checkpoint's history and reference from the
    restored ``global_step``. Several callbacks in one Trainer are named ``mnn``, ``mnn-2``, ...
    (in their order in ``callbacks``), each with its own files and checkpoint entry.
    """

    _out_dir_known_later = True  # the trainer's log_dir, at setup

    def __init__(
        self, data: Any, *, module: str | None = None, out_dir: str | os.PathLike | None = None, **options: Any
    ):
        self.module_name = module
        self._trainer: Any = None
        self._given_out_dir = None if out_dir is None else os.fspath(out_dir)
        self._model_missing = False  # this fit's LightningModule has no `module`: off for the fit, warned once
        MNNMonitor.__init__(self, data, out_dir=out_dir, **options)

    @property
    def state_key(self) -> str:
        """The checkpoint entry: the monitor's name once a fit claimed it (the same at every resume);
        unique per callback before that (Lightning checks the keys when the Trainer is made)."""
        if self._trainer is None:
            return self._generate_state_key(name=self.requested_name, callback=id(self))
        return self._generate_state_key(name=self.name)

    def _open(self) -> None:
        if self._trainer is not None:  # the files' place and the main process are known once fitting starts
            MNNMonitor._open(self)

    def _is_main_process(self) -> bool:
        return bool(self._trainer.is_global_zero)

    def _model(self, pl_module: nn.Module) -> nn.Module | None:
        """The model to probe; None (after one warning, or an error when strict) when ``module`` names none."""
        if self._model_missing:
            return None
        if self.module_name is None:
            return pl_module
        model = getattr(pl_module, self.module_name, None)
        if isinstance(model, nn.Module):
            return model
        self._model_missing = True
        children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
        found = "no attribute" if model is None else f"a {type(model).__name__}, not a module,"
        self.guard.report(
            "finding the model to probe",
            AttributeError(
                f"module={self.module_name!r}: the {type(pl_module).__name__} has {found} of that name (its "
                f"modules: {children}); the monitor is off for this fit"
            ),
        )
        return None

    # -- Lightning events -------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """A new run for each fit, before Lightning restores a checkpoint into it (``load_state_dict``)."""
        if stage != "fit":
            return
        self._trainer = trainer
        self._model_missing = False
        self.out_dir = self._given_out_dir or trainer.log_dir or trainer.default_root_dir
        self.jsonl = os.path.join(self.out_dir, JSONL_FILE)
        self._open()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's history and reference; the ``resume`` event follows at the restored step (on train start)."""
        self.monitor.load_state_dict(state)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """The first probe, at the restored ``global_step`` (Lightning restored the loops by now)."""
        step = int(trainer.global_step)
        resumed = step > 0
        if resumed:
            self.monitor.log_resume(step)
        model = self._model(pl_module)
        # like the Trainer callback: a resumed run keeps its schedule, and probes now only for a new reference
        if model is not None and not (resumed and self.reference is not None):
            self.step(model, step, force=True)
        if self.monitor.overhead.clock_start is None:
            self.monitor.start_clock(step)
        if self.should_stop:  # the first probe's alert, or a resumed run the alarm stopped
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        model = self._model(pl_module)
        if model is not None:
            self.step(model, trainer.global_step)  # a step probed already (accumulation): nothing
        if self.should_stop:  # the collapse alarm fired with stop=True (alike on every process)
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        model = self._model(pl_module)
        if model is None:
            self.monitor.close()
        else:
            self.finish(model, trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A fit that failed: the sinks are closed (what was logged is kept) and the name is free again."""
        self.monitor.close()
