"""MNNAccelerateHook: the same monitoring for a custom Accelerate training loop, one call per step.

::

    hook = MNNAccelerateHook(accelerator, held_out_texts, tokenizer=tokenizer, every_n_steps=100)
    accelerator.register_for_checkpointing(hook)      # history and reference survive save/load_state
    for step, batch in enumerate(loader):
        ...                                           # forward, backward, optimizer step
        hook.step(model, step)                        # on EVERY process: the probe is sharded

The work is done by a :class:`~mnn_callback.monitoring.monitor.Monitor`; this module connects it to the
accelerator's trackers and checkpoints.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from mnn_callback.adapters.loop import MNNMonitor
from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.identity import DEFAULT_NAME
from mnn_callback.output.sinks import JSONL_FILE, Sink, TensorBoardSink, WandbSink
from mnn_callback.output.trackers import TrackerSink
from mnn_callback.probing.distributed import world

__all__ = ["MNNAccelerateHook"]


class MNNAccelerateHook(MNNMonitor):
    """Probe the model of a custom Accelerate loop and log to every tracker of the accelerator.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the run; every tracker it was given
            (``Accelerator(log_with=["tensorboard", "wandb"], project_dir=...)``) receives the values.
        data: the held-out sample (see :class:`~mnn_callback.probing.probe.Probe`).
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
            :class:`~mnn_callback.output.figures.Dashboards`, or True/False for all or none).
        **probe_options: passed to :class:`~mnn_callback.probing.probe.Probe`.

    :meth:`step` must be called on every process at the same steps: the probe shards the
    sample across processes, runs the same number of forward passes on each (required under
    FSDP and DeepSpeed ZeRO-3) and all-reduces its sums, so the values do not depend on the
    number of processes. Only the main process writes. After :meth:`finish`, a further
    :meth:`step` starts a new run (fresh history and Diff-eRank reference, the sinks reopened),
    with a warning. Everything but the trackers and the main process is :class:`MNNMonitor`'s.
    """

    def __init__(
        self,
        accelerator: Any,
        data: Any,
        *,
        jsonl: str | os.PathLike | bool | None = None,
        **options: Any,
    ) -> None:
        self.accelerator = accelerator
        if jsonl is None and getattr(accelerator, "project_dir", None):
            jsonl = os.path.join(accelerator.project_dir, JSONL_FILE)
        self._jsonl_option = os.fspath(jsonl) if jsonl else None
        super().__init__(data, **options)

    def _is_main_process(self) -> bool:
        """The accelerator's main process, if it is also rank 0 of the process group the probe shards over."""
        rank, world_size = world()
        processes = getattr(self.accelerator, "num_processes", world_size)
        if processes != world_size and rank == 0:
            warnings.warn(
                f"the accelerator runs {processes} process(es) but torch.distributed has {world_size}: each process "
                "trains on its own (e.g. `accelerate launch --multi_gpu` on a machine without GPUs: set "
                "ACCELERATE_USE_CPU=true); the probe shards over the process group, process 0 alone writes",
                MNNWarning,
                stacklevel=4,
            )
        return bool(self.accelerator.is_main_process) and rank == 0

    def _sinks(self) -> list[Sink]:
        return self._jsonl_sinks()  # the trackers come later (_late_sinks): they exist once init_trackers ran

    def _open(self) -> None:
        self.jsonl = self._jsonl_option
        super()._open()

    def _late_sinks(self) -> list[Sink]:
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
