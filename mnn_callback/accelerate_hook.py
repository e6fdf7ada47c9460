"""MNNAccelerateHook: the same monitoring for a custom Accelerate training loop, one call per step.

::

    hook = MNNAccelerateHook(accelerator, held_out_texts, tokenizer=tokenizer, every_n_steps=100)
    accelerator.register_for_checkpointing(hook)      # history and reference survive save/load_state
    for step, batch in enumerate(loader):
        ...                                           # forward, backward, optimizer step
        hook.step(model, step)                        # on EVERY process: the probe is sharded

The work is done by a :class:`~mnn_callback.monitor.Monitor`; this module connects it to the
accelerator's trackers and checkpoints.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from mnn_callback.errors import MNNWarning
from mnn_callback.figures import Dashboards
from mnn_callback.identity import DEFAULT_NAME, named_file, validate_name
from mnn_callback.monitor import Monitor
from mnn_callback.sinks import JSONL_FILE, JsonlSink, Sink, TensorBoardSink, TrackerSink, WandbSink

__all__ = ["MNNAccelerateHook"]


class MNNAccelerateHook:
    """Probe the model of a custom Accelerate loop and log to every tracker of the accelerator.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the run; every tracker it was given
            (``Accelerator(log_with=["tensorboard", "wandb"], project_dir=...)``) receives the values.
        data: the held-out sample (see :class:`~mnn_callback.probe.Probe`).
        every_n_steps: probe when ``global_step % every_n_steps == 0``, and on the first call.
        schedule: ``"fixed"`` (default), or ``"log"``: also at steps 1, 2, 4, 8, ... below it.
        max_overhead: skip scheduled probes that would take the monitor's share of the wall time
            between calls above this (e.g. ``0.01``); the first and the final probe always run.
        exact_every: every K-th probe (and the first and the last) with the full spectra, the
            others with ``method="cheap"``.
        tokenizer: turns text data into ids (or the directory of one).
        reference: Diff-eRank reference: a model, a :class:`ProbeResult`, or a JSON file holding
            one; default: the first probe.
        strict: raise errors instead of turning them into warnings.
        jsonl: path of a JSONL history file; default ``<project_dir>/mnn_metrics.jsonl`` when
            the accelerator has a ``project_dir``, else none. ``False`` turns it off.
        name: this monitor's name, written into every record. Default ``"mnn"``; a second hook
            writing to the same directory gets ``"mnn-2"``, and so on. Any other than ``"mnn"``
            has its own JSONL file (``mnn_metrics.<name>.jsonl``), TensorBoard run
            (``<logging dir>/<name>``) and tracker keys (``<name>/mnn/layer_0``, ...).
        dashboards: pictures drawn into the accelerator's TensorBoard and W&B trackers (a
            :class:`~mnn_callback.figures.Dashboards`, or True/False for all or none).
        **probe_options: passed to :class:`~mnn_callback.probe.Probe`.

    :meth:`step` must be called on every process at the same steps: the probe shards the
    sample across processes, runs the same number of forward passes on each (required under
    FSDP and DeepSpeed ZeRO-3) and all-reduces its sums, so the values do not depend on the
    number of processes. Only the main process writes. After :meth:`finish`, a further
    :meth:`step` starts a new run (fresh history and Diff-eRank reference, the sinks reopened),
    with a warning.
    """

    def __init__(
        self,
        accelerator: Any,
        data: Any,
        *,
        every_n_steps: int = 100,
        schedule: str = "fixed",
        max_overhead: float | None = None,
        exact_every: int | None = None,
        tokenizer: Any = None,
        reference: Any = None,
        strict: bool = False,
        jsonl: str | os.PathLike | bool | None = None,
        name: str | None = None,
        dashboards: Dashboards | bool = True,
        **probe_options: Any,
    ) -> None:
        self.accelerator = accelerator
        self.requested_name = validate_name(name)
        self.monitor = Monitor.of_data(
            data,
            tokenizer=tokenizer,
            strict=strict,
            probe_options=probe_options,
            every_n_steps=every_n_steps,
            schedule=schedule,
            max_overhead=max_overhead,
            exact_every=exact_every,
            reference=reference,
            dashboards=dashboards,
        )
        if jsonl is None and getattr(accelerator, "project_dir", None):
            jsonl = os.path.join(accelerator.project_dir, JSONL_FILE)
        self.jsonl = os.fspath(jsonl) if jsonl else None
        self._open()

    def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.jsonl)) if self.jsonl else None
        self.monitor.open(
            self._jsonl_sinks,
            is_main_process=self.accelerator.is_main_process,
            directory=directory,
            name=self.requested_name,
        )
        self._trackers_attached = False

    # what the monitor holds, under the names users and tests know
    probe = property(lambda self: self.monitor.probe)
    history = property(lambda self: self.monitor.history)
    reference = property(lambda self: self.monitor.reference)
    guard = property(lambda self: self.monitor.guard)
    every_n_steps = property(lambda self: self.monitor.every_n_steps)
    name = property(lambda self: self.monitor.name)

    def _jsonl_sinks(self) -> list[Sink]:
        if not self.jsonl:
            return []
        path = os.path.join(os.path.dirname(self.jsonl), named_file(os.path.basename(self.jsonl), self.name))
        sink = self.guard.call("the jsonl sink (setup)", JsonlSink, path, monitor=self.name)
        return [] if sink is None else [sink]

    def _tracker_sinks(self) -> list[Sink]:
        """One sink per tracker of the accelerator: TensorBoard's writer and the W&B run directly, others by tracker.

        A hook named other than ``"mnn"`` writes its own TensorBoard run below the tracker's and
        prefixes its keys elsewhere.
        """
        named = self.name != DEFAULT_NAME
        prefix = f"{self.name}/" if named else ""
        sinks: list[Sink] = []
        for tracker in getattr(self.accelerator, "trackers", []):
            if tracker.name == "tensorboard":
                writer = tracker.tracker
                if named:
                    sinks.append(TensorBoardSink(os.path.join(writer.log_dir, self.name)))
                else:
                    sinks.append(TensorBoardSink(writer=writer))
            elif tracker.name == "wandb":
                sinks.append(WandbSink(run=tracker.tracker, prefix=prefix))
            else:
                sinks.append(TrackerSink(tracker, prefix=prefix))
        return sinks

    def is_due(self, global_step: int) -> bool:
        """True on the first call and at the scheduled steps not yet probed (the overhead budget aside)."""
        last = self.monitor.last_step
        return last is None or (self.monitor.schedule.scheduled(global_step) and global_step != last)

    def step(
        self, model: nn.Module, global_step: int, *, optimizer: Any = None, force: bool = False
    ) -> dict[str, float] | None:
        """Probe ``model`` (the prepared one, as the loop uses it) when due; returns the logged values.

        Call on every process, at every step. ``force``: probe now whatever the schedule (unless
        this step was probed). Returns None when no probe ran, else the flat dict that was logged
        (only ``probe/errors`` when the probe failed and ``strict`` is off).
        """
        if not self.monitor.is_open:
            warnings.warn(
                f"MNNAccelerateHook.step after finish(): a new run starts at step {global_step} (fresh history and "
                "Diff-eRank reference, in the same files); create a new hook for another run",
                MNNWarning,
                stacklevel=2,
            )
            self.guard.call("reopening the monitor", self._open)
        first = self.monitor.last_step is None
        if not (first or (force and global_step != self.monitor.last_step) or self.monitor.due(global_step)):
            self.monitor.poll()  # figures finished in the background reach the trackers
            return None
        return self._measure(model, global_step, optimizer, scheduled=not first and not force)

    def finish(self, model: nn.Module, global_step: int, *, optimizer: Any = None) -> dict[str, float] | None:
        """Probe the final state (unless this step was probed), draw the last figures, close the sinks.

        Call on every process after the loop; returns the final probe's values (None if already probed).
        """
        values = None
        try:
            if self.monitor.is_open and global_step != self.monitor.last_step:
                values = self._measure(model, global_step, optimizer, final=True)
        finally:
            self.monitor.close()
        return values

    def _measure(self, model: nn.Module, global_step: int, optimizer: Any, **kind: bool) -> dict[str, float]:
        if not self._trackers_attached:  # trackers exist once accelerator.init_trackers ran
            self._trackers_attached = True
            self.monitor.add_sinks(self._tracker_sinks)
        self.monitor.take_reference()
        return self.monitor.measure(model, global_step, optimizer=optimizer, **kind).scalars()

    # -- accelerator.register_for_checkpointing ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """History, reference and probe fingerprint: plain Python values (``torch.load(weights_only=True)`` safe)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the curves of a saved run; a different probe configuration warns and takes a new reference."""
        if self.monitor.load_state_dict(state) and self.monitor.last_step is not None:
            self.monitor.log_event("resume", int(self.monitor.last_step))
