"""MNNMonitor: the monitoring of any training loop, plain PyTorch or ``torch.distributed``, one call per step.

::

    monitor = MNNMonitor(held_out_texts, tokenizer=tokenizer, out_dir="out", every_n_steps=100)
    monitor.step(model, 0)                              # the Diff-eRank reference, before training
    for step in range(1, max_steps + 1):
        ...                                             # forward, backward, optimizer step
        monitor.step(model, step)                       # on EVERY process: the probe is sharded
    monitor.finish(model, max_steps)
    torch.save({"mnn": monitor.state_dict(), ...}, "checkpoint.pt")  # plain values, weights_only-safe

No framework is needed: the process group, if any, is ``torch.distributed``'s, and only its rank
0 writes. :class:`~mnn_callback.adapters.accelerate_hook.MNNAccelerateHook` is this adapter with the
accelerator's trackers and main process. The work is done by a :class:`~mnn_callback.monitoring.monitor.Monitor`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.identity import DEFAULT_NAME, named_file, validate_name
from mnn_callback.monitoring.monitor import DEFAULT_SYNC_TIMEOUT, Monitor
from mnn_callback.output.figures import Dashboards
from mnn_callback.output.sinks import (
    JSONL_FILE,
    JsonlSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    check_sink_specs,
    require_package,
)
from mnn_callback.output.trackers import CometSink, MlflowSink
from mnn_callback.probing.distributed import world

__all__ = ["MNNMonitor"]


class MNNMonitor:
    """Probe the model of any training loop on a schedule and log how its representations compress.

    Args:
        data: the held-out sample (see :class:`~mnn_callback.probing.probe.Probe`).
        out_dir: where ``mnn_metrics.jsonl`` goes (and TensorBoard, under ``out_dir/runs``).
        sinks: names from ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"comet_ml"`` (the active run of
            each), ``"jsonl"``, or
            :class:`~mnn_callback.output.sinks.Sink` objects; default: ``"jsonl"`` with an ``out_dir``,
            and ``"tensorboard"`` too when it is installed.
        log_dir: the TensorBoard directory (default ``out_dir/runs``).
        every_n_steps, schedule, max_overhead, exact_every, reference, strict, dashboards, name,
            sync_timeout, alert: as for :class:`~mnn_callback.adapters.callback.MNNCallback`; with
            ``alert={"stop": True}`` the loop reads :attr:`should_stop` (True on every process alike).
        **probe_options: passed to :class:`~mnn_callback.probing.probe.Probe`.

    :meth:`step` must be called on every process of a ``torch.distributed`` group at the same
    steps (the sample is sharded, the sums all-reduced); rank 0 writes. Processes that do not
    (a skipped call, a step number that differs, ``force`` or :meth:`finish` on one only) cost
    at most one wait of ``sync_timeout`` seconds and one error naming the processes and their
    steps; then the monitor is off on every process and training goes on. After :meth:`finish`, a
    further :meth:`step` starts a new run in the same files, with a warning.
    """

    _out_dir_known_later = False  # True where the framework gives the directory once training starts

    def __init__(
        self,
        data: Any,
        *,
        out_dir: str | os.PathLike | None = None,
        sinks: Sequence[str | Sink] | None = None,
        log_dir: str | os.PathLike | None = None,
        every_n_steps: int = 100,
        schedule: str = "fixed",
        max_overhead: float | None = None,
        exact_every: int | None = None,
        tokenizer: Any = None,
        reference: Any = None,
        strict: bool = False,
        name: str | None = None,
        dashboards: Dashboards | bool = True,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        alert: Any = None,
        **probe_options: Any,
    ) -> None:
        check_sink_specs(sinks)
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
            sync_timeout=sync_timeout,
            alert=alert,
        )
        if "jsonl" in (sinks or ()) and out_dir is None and not self._out_dir_known_later:
            raise ValueError("the jsonl sink needs out_dir (where mnn_metrics.jsonl goes)")
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.sink_specs = list(sinks) if sinks is not None else None
        self.jsonl = os.path.join(self.out_dir, JSONL_FILE) if self.out_dir else None
        self._open()

    # what the monitor holds, under the names users and tests know
    probe = property(lambda self: self.monitor.probe)
    history = property(lambda self: self.monitor.history)
    reference = property(lambda self: self.monitor.reference)
    guard = property(lambda self: self.monitor.guard)
    every_n_steps = property(lambda self: self.monitor.every_n_steps)
    name = property(lambda self: self.monitor.name)
    # the collapse alarm fired with stop=True: `if monitor.should_stop: break` (alike on every process)
    should_stop = property(lambda self: self.monitor.should_stop)

    # -- what an adapter on top changes -----------------------------------------------------------

    def _is_main_process(self) -> bool:
        return world()[0] == 0

    def _sinks(self) -> list[Sink]:
        """The sinks of the run, made on the main process only (the monitor's name is known here)."""
        specs = self.sink_specs
        if specs is None:
            tensorboard = self.out_dir is not None and _installed("tensorboard")
            specs = ["jsonl"] + (["tensorboard"] if tensorboard or self.log_dir else [])
        named = self.name != DEFAULT_NAME
        sinks: list[Sink | None] = []
        for spec in specs:
            if isinstance(spec, Sink):
                sinks.append(spec)
            elif spec == "jsonl":
                sinks.extend(self._jsonl_sinks())
            elif spec == "tensorboard":
                directory = self.log_dir or os.path.join(self.out_dir or ".", "runs")
                directory = os.path.join(directory, self.name) if named else directory
                sinks.append(self.guard.call("the tensorboard sink (setup)", TensorBoardSink, directory))
            elif spec in ("wandb", "mlflow", "comet_ml"):  # the active run of each
                prefix = f"{self.name}/" if named else ""
                kind = {"wandb": WandbSink, "mlflow": MlflowSink, "comet_ml": CometSink}[spec]
                sinks.append(self.guard.call(f"the {spec} sink (setup)", kind, prefix=prefix))
        return [sink for sink in sinks if sink is not None]

    def _jsonl_sinks(self) -> list[Sink]:
        """The JSONL history, when there is a path for it (named after the monitor when not ``"mnn"``)."""
        if not self.jsonl:
            return []
        path = os.path.join(os.path.dirname(self.jsonl), named_file(os.path.basename(self.jsonl), self.name))
        sink = self.guard.call("the jsonl sink (setup)", JsonlSink, path, monitor=self.name, run=self.monitor.run_id)
        return [] if sink is None else [sink]

    def _late_sinks(self) -> list[Sink]:
        """Sinks that exist only once training started (an accelerator's trackers); none here."""
        return []

    # -- the loop's calls -------------------------------------------------------------------------

    def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.jsonl)) if self.jsonl else self.out_dir
        self.monitor.open(
            self._sinks, is_main_process=self._is_main_process(), directory=directory, name=self.requested_name
        )
        self._late_attached = False

    def is_due(self, global_step: int) -> bool:
        """True on the first call and at the scheduled steps not yet probed (the overhead budget aside)."""
        last = self.monitor.last_step
        return last is None or (self.monitor.schedule.scheduled(global_step) and global_step != last)

    def step(
        self, model: nn.Module, global_step: int, *, optimizer: Any = None, force: bool = False
    ) -> dict[str, float] | None:
        """Probe ``model`` (as the loop uses it: wrapped in DDP/FSDP is fine) when due; returns the logged values.

        Call on every process, at every step. ``force``: probe now whatever the schedule (unless
        this step was probed). Returns None when no probe ran, else the flat dict that was logged
        (only ``probe/errors`` when the probe failed and ``strict`` is off).
        """
        if not self.monitor.is_open:
            warnings.warn(
                f"{type(self).__name__}.step after finish(): a new run starts at step {global_step} (fresh history and "
                "Diff-eRank reference, in the same files); create a new one for another run",
                MNNWarning,
                stacklevel=2,
            )
            self.guard.call("reopening the monitor", self._open)
        first = self.monitor.last_step is None
        if not (first or (force and global_step != self.monitor.last_step) or self.monitor.due(global_step)):
            self.monitor.poll()  # figures finished in the background reach the sinks
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
        if not self._late_attached:
            self._late_attached = True
            self.monitor.add_sinks(self._late_sinks)
        self.monitor.take_reference(global_step)
        return self.monitor.measure(model, global_step, optimizer=optimizer, **kind).scalars()

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """History, reference and probe fingerprint: plain Python values (``torch.load(weights_only=True)`` safe)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the curves of a saved run; a different probe configuration warns and takes a new reference."""
        self.monitor.load_state_dict(state)
        if self.monitor.last_step is not None:  # comparable or not, the run goes on from that step
            self.monitor.log_resume(int(self.monitor.last_step))


def _installed(package: str) -> bool:
    try:
        require_package(package)
    except ImportError:
        return False
    return True
