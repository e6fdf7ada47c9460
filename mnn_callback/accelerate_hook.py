"""MNNAccelerateHook: the same monitoring for a custom Accelerate training loop, one call per step.

::

    hook = MNNAccelerateHook(accelerator, held_out_texts, tokenizer=tokenizer, every_n_steps=100)
    accelerator.register_for_checkpointing(hook)      # history and reference survive save/load_state
    for step, batch in enumerate(loader):
        ...                                           # forward, backward, optimizer step
        hook.step(model, step)                        # on EVERY process: the probe is sharded
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from mnn_callback.guard import Guard
from mnn_callback.metrics import MNNWarning
from mnn_callback.probe import Probe, ProbeResult
from mnn_callback.sinks import JSONL_FILE, Dashboards, JsonlSink, Sink, SinkSet, TensorBoardSink, WandbSink

__all__ = ["MNNAccelerateHook"]


class MNNAccelerateHook:
    """Probe the model of a custom Accelerate loop and log through ``accelerator.log``.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the run; every tracker it was given
            (``Accelerator(log_with=["tensorboard", "wandb"], project_dir=...)``) receives the values.
        data: the held-out sample (see :class:`~mnn_callback.probe.Probe`).
        every_n_steps: probe when ``global_step % every_n_steps == 0``, and on the first call.
        tokenizer: turns text data into ids.
        reference: Diff-eRank reference: a model, a :class:`ProbeResult`, or a JSON file holding
            one; default: the first probe.
        strict: raise errors instead of turning them into warnings.
        jsonl: path of a JSONL history file; default ``<project_dir>/mnn_metrics.jsonl`` when
            the accelerator has a ``project_dir``, else none. ``False`` turns it off.
        dashboards: pictures drawn into the accelerator's TensorBoard and W&B trackers (a
            :class:`~mnn_callback.sinks.Dashboards`, or True/False for all or none).
        **probe_options: passed to :class:`~mnn_callback.probe.Probe`.

    :meth:`step` must be called on every process at the same steps: the probe shards the
    sample across processes, runs the same number of forward passes on each (required under
    FSDP and DeepSpeed ZeRO-3) and all-reduces its sums, so the values do not depend on the
    number of processes. Only the main process writes.
    """

    def __init__(
        self,
        accelerator: Any,
        data: Any,
        *,
        every_n_steps: int = 100,
        tokenizer: Any = None,
        reference: Any = None,
        strict: bool = False,
        jsonl: str | os.PathLike | bool | None = None,
        dashboards: Dashboards | bool = True,
        **probe_options: Any,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.accelerator = accelerator
        self.guard = Guard(strict)
        with self.guard.warnings_as_errors():  # strict: a truncated sample is an error too
            self.probe = Probe(data, tokenizer=tokenizer, **probe_options)
        self.every_n_steps = every_n_steps
        self._reference_model = reference if isinstance(reference, nn.Module) else None
        self.reference: ProbeResult | None = None
        if reference is not None and self._reference_model is None:
            self.reference = ProbeResult.load(reference)
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None
        if jsonl is None and getattr(accelerator, "project_dir", None):
            jsonl = os.path.join(accelerator.project_dir, JSONL_FILE)
        sinks = []
        if jsonl and accelerator.is_main_process:
            sink = self.guard.call("the jsonl sink (setup)", JsonlSink, jsonl)
            sinks = [] if sink is None else [sink]
        if isinstance(dashboards, bool):
            dashboards = Dashboards() if dashboards else Dashboards.off()
        self.sinks = SinkSet(sinks, self.guard, dashboards)
        self.sinks.log_config({**self.probe.config, "every_n_steps": every_n_steps})
        self._trackers_attached = False

    def is_due(self, global_step: int) -> bool:
        """True on the first call and then every ``every_n_steps`` steps (once per step)."""
        if self._last_step is None:
            return True
        return global_step % self.every_n_steps == 0 and global_step != self._last_step

    def step(self, model: nn.Module, global_step: int, *, optimizer: Any = None) -> dict[str, float] | None:
        """Probe ``model`` (the prepared one, as the loop uses it) when due; returns the logged values.

        Call on every process. Returns None when no probe is due, else the dict that was
        logged (only ``probe/errors`` when the probe failed and ``strict`` is off).
        """
        if not self.is_due(global_step):
            return None
        self._last_step = global_step
        if self._reference_model is not None and self.reference is None:
            self.reference = self.guard.call("probing the reference model", self.probe.run, self._reference_model)
            self._reference_model = None
        result = self.guard.call("the probe", self.probe.run, model, optimizer=optimizer)
        if result is None:
            metrics = {"probe/errors": float(self.guard.errors)}
        else:
            if self.reference is None:
                self.reference = result
            metrics = {**result.metrics, **result.diff_erank(self.reference), "probe/errors": float(self.guard.errors)}
            self.history.append({"step": global_step, **metrics})
        if self.accelerator.is_main_process:
            self.guard.call("accelerator.log", self.accelerator.log, dict(metrics), step=global_step)
            if not self._trackers_attached:
                self._trackers_attached = True
                self.sinks.sinks += self.guard.call("attaching the trackers", self._tracker_sinks) or []
            if result is None:
                self.sinks.log_metrics(metrics, global_step)
            else:
                self.sinks.log_probe(metrics, global_step, self.history)
        return metrics

    def _tracker_sinks(self) -> list[Sink]:
        """Dashboard-only sinks on the accelerator's own TensorBoard writer and W&B run (scalars go via log)."""
        sinks: list[Sink] = []
        for tracker in getattr(self.accelerator, "trackers", []):
            if tracker.name == "tensorboard":
                sinks.append(TensorBoardSink(writer=tracker.tracker, scalars=False))
            elif tracker.name == "wandb":
                sinks.append(WandbSink(run=tracker.tracker, scalars=False, step_metric=None))
        return sinks

    # -- accelerator.register_for_checkpointing ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """History, reference and probe fingerprint: plain Python values (``torch.load(weights_only=True)`` safe)."""
        return {
            "fingerprint": self.probe.fingerprint,
            "history": [dict(entry) for entry in self.history],
            "reference": None if self.reference is None else self.reference.to_dict(),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the curves of a saved run; a different probe configuration warns and takes a new reference."""
        self.history = [dict(entry) for entry in state.get("history", [])]
        self._last_step = state.get("last_step")
        if state.get("fingerprint") != self.probe.fingerprint:
            warnings.warn(
                "loaded MNN state from a run with a different probe configuration (sample, layers or "
                "max_length): the curves before and after are not comparable; a new Diff-eRank reference "
                "is taken at the next probe",
                MNNWarning,
                stacklevel=2,
            )
            if self._reference_model is None:
                self.reference = None
            return
        if state.get("reference") is not None and self._reference_model is None:
            self.reference = ProbeResult.from_dict(state["reference"])
        if self.accelerator.is_main_process and self._last_step is not None:
            self.sinks.log_event("resume", int(self._last_step))
