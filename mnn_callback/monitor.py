"""The monitor: when to probe, one measurement, the Diff-eRank reference, the history, what it costs.

:class:`MNNCallback` (Trainer) and :class:`MNNAccelerateHook` (custom loops) are thin adapters
around one :class:`Monitor`: they translate their framework's events into :meth:`Monitor.due`,
:meth:`Monitor.measure` and :meth:`Monitor.close`, and persist :meth:`Monitor.state_dict`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from mnn_callback.errors import MNNWarning
from mnn_callback.figures import Dashboards, render_dashboard
from mnn_callback.guard import Guard
from mnn_callback.probe import Probe
from mnn_callback.results import Measurement, ProbeResult
from mnn_callback.sinks import Sink, SinkSet
from mnn_callback.tables import history_rows

__all__ = ["OVERHEAD_WARNING_SHARE", "Monitor"]

OVERHEAD_WARNING_SHARE = 0.05


def check_every_n_steps(every_n_steps: Any) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
    return every_n_steps


class Monitor:
    """Probes a model on a schedule, keeps the history and the Diff-eRank reference, feeds the sinks.

    Args:
        probe: the fixed sample and how to measure it.
        every_n_steps: a scheduled probe when ``step % every_n_steps == 0``.
        reference: the Diff-eRank reference: a model (probed once, at :meth:`take_reference`), a
            :class:`ProbeResult`, or a JSON file holding one. Default: the first measurement.
        strict: raise errors instead of turning them into warnings.
        dashboards: the pictures drawn besides the scalars (:class:`Dashboards`, or True/False).

    Every process runs :meth:`measure` at the same steps (the probe's work is sharded); only the
    main process (``is_main_process`` in :meth:`open`) has sinks.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        every_n_steps: int = 100,
        reference: Any = None,
        strict: bool = False,
        dashboards: Dashboards | bool = True,
    ) -> None:
        self.probe = probe
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.guard = Guard(strict)
        self.dashboards = Dashboards.of(dashboards)
        self._reference_model = reference if isinstance(reference, nn.Module) else None
        self.reference: ProbeResult | None = None
        if reference is not None and self._reference_model is None:
            self.reference = ProbeResult.load(reference)
            self._check_reference_sample(self.reference)
        self.history: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self.is_main_process = True
        self.sinks = SinkSet([], self.guard)
        self._layout_logged = False
        self._probes_drawn = 0
        self._clock_start: float | None = None
        self._scheduled_seconds = 0.0
        self._scheduled_probes = 0
        self._warned_overhead = False
        self.publish_seconds = 0.0  # training-thread time spent logging and drawing, over the run

    # -- setup ------------------------------------------------------------------------------------

    def _check_reference_sample(self, reference: ProbeResult) -> None:
        if reference.fingerprint != self.probe.fingerprint:
            warnings.warn(
                "the Diff-eRank reference was measured on another probe sample or layer set "
                f"(fingerprint {reference.fingerprint}, this probe {self.probe.fingerprint}); "
                "its eRanks are not directly comparable",
                MNNWarning,
                stacklevel=4,
            )

    @property
    def config(self) -> dict[str, Any]:
        return {**self.probe.config, "every_n_steps": self.every_n_steps}

    def open(self, make_sinks: Callable[[], Sequence[Sink]], *, is_main_process: bool) -> None:
        """Start logging. Only the main process writes: ``make_sinks`` is called there and nowhere else."""
        self.is_main_process = is_main_process
        self.guard.quiet = not is_main_process
        self.sinks = SinkSet(self._made(make_sinks), self.guard)
        self._layout_logged = False
        self.sinks.log_config(self.config)

    def add_sinks(self, make_sinks: Callable[[], Sequence[Sink]]) -> None:
        """More sinks, e.g. trackers that exist only once training started (main process only)."""
        self.sinks.sinks.extend(self._made(make_sinks))

    def _made(self, make_sinks: Callable[[], Sequence[Sink]]) -> list[Sink]:
        if not self.is_main_process:
            return []
        return list(self.guard.call("setting up the sinks", make_sinks) or [])

    def take_reference(self) -> None:
        """Probe the reference model, if one was given and no reference is known yet (every process)."""
        if self._reference_model is not None and self.reference is None:
            self.reference = self.guard.call("probing the reference model", self._run_probe, self._reference_model)
        self._reference_model = None  # do not keep a second model alive

    def _run_probe(self, model: nn.Module, optimizer: Any = None) -> ProbeResult:
        """The probe, after making sure every process measures the same sample (the first time)."""
        fingerprints = self.probe.agree_across_processes()
        if fingerprints:
            message = (
                f"the probe samples differ across processes (fingerprints {', '.join(fingerprints)}: other data, "
                f"or a seed that differs per process); every process now uses process 0's sample "
                f"({self.probe.fingerprint})"
            )
            if self.guard.strict:
                raise ValueError(message)  # on every process alike: they all saw the same fingerprints
            if self.is_main_process:
                warnings.warn(message, MNNWarning, stacklevel=4)
        return self.probe.run(model, optimizer=optimizer)

    def start_clock(self) -> None:
        """Start timing the training wall time the probes' share is measured against."""
        self._clock_start = time.perf_counter()
        self._scheduled_seconds = 0.0
        self._scheduled_probes = 0

    # -- the schedule -----------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether a scheduled probe falls on ``step`` (and this step was not probed yet)."""
        return step % self.every_n_steps == 0 and step != self.last_step

    # -- one measurement --------------------------------------------------------------------------

    def measure(
        self,
        model: nn.Module,
        step: int,
        *,
        epoch: float | None = None,
        optimizer: Any = None,
        scheduled: bool = False,
    ) -> Measurement:
        """Probe ``model`` at ``step`` on every process, keep and log the result (main process).

        ``scheduled`` probes count towards ``probe/time_share``; the step-0 reference, the final
        and evaluation probes do not. A failed probe gives a measurement without result (only
        ``probe/errors``) and a warning, unless ``strict``.
        """
        started = time.perf_counter()
        self.last_step = step
        result = self.guard.call("the probe", self._run_probe, model, optimizer)
        monitor: dict[str, float] = {"errors": float(self.guard.errors)}
        if result is None:
            measurement = Measurement(step, epoch, None, monitor=monitor)
        else:
            self._keep_reference(result, step)
            if scheduled:
                monitor["time_share"] = self._account(time.perf_counter() - started)
            measurement = Measurement(step, epoch, result, result.differences(self.reference), monitor)
            self.history.append({"step": step, "epoch": epoch, **measurement.scalars()})
        if self.is_main_process:
            publishing = time.perf_counter()
            self._publish(measurement)
            publishing = time.perf_counter() - publishing
            self.publish_seconds += publishing
            if scheduled:
                self._scheduled_seconds += publishing
        if self._clock_start is None:
            self.start_clock()
        return measurement

    def _keep_reference(self, result: ProbeResult, step: int) -> None:
        """``result`` becomes the reference when there is none, or when the reference has no finite eRank."""
        if self.reference is None:
            self.reference = result
        elif not _finite_erank(self.reference) and _finite_erank(result):
            self.reference = result
            if self.is_main_process:
                warnings.warn(
                    f"the Diff-eRank reference has no finite eRank (non-finite hidden states when it was measured); "
                    f"the probe at step {step} is the reference from now on",
                    MNNWarning,
                    stacklevel=4,
                )

    def _publish(self, measurement: Measurement) -> None:
        """Scalars to every sink, then (once) the layout and the dashboard pictures."""
        self.sinks.log_measurement(measurement)
        if measurement.result is None or not self.sinks.shows_images:
            return  # nothing to draw for: no figure is built
        if self.dashboards.layout and not self._layout_logged:
            self._layout_logged = True
            self.sinks.log_layout(measurement.layers)
        self._probes_drawn += 1
        every = self.dashboards.heatmap_every
        heatmaps = bool(every) and self._probes_drawn % every == 0
        if not (self.dashboards.layer_profile or heatmaps):
            return
        rows = history_rows(self.history)
        images = self.guard.call(
            "drawing the dashboard figures",
            render_dashboard,
            rows,
            measurement.step,
            layer_profile=self.dashboards.layer_profile,
            heatmaps=heatmaps,
        )
        self.sinks.log_images(images or [])
        if heatmaps:
            self.sinks.log_series(rows, measurement.step)

    def _account(self, seconds: float) -> float:
        """Add a scheduled probe's cost; the probes' share of the wall time so far (warned about once above 5%)."""
        if self._clock_start is None:
            self.start_clock()
        self._scheduled_seconds += seconds
        self._scheduled_probes += 1
        share = self._scheduled_seconds / max(time.perf_counter() - self._clock_start, 1e-9)
        if self.is_main_process and share > OVERHEAD_WARNING_SHARE and self._scheduled_probes >= 2:
            self._warn_overhead(share)
        return share

    def _warn_overhead(self, share: float) -> None:
        if self._warned_overhead:
            return
        self._warned_overhead = True
        suggestion = math.ceil(self.every_n_steps * share / OVERHEAD_WARNING_SHARE * 2)
        warnings.warn(
            f"mnn_callback probes and their logging took {share:.1%} of the training wall time so far "
            f"({self._scheduled_seconds:.2f} s in {self._scheduled_probes} probes); "
            f"consider every_n_steps={suggestion} or a smaller sample (max_samples, max_length)",
            MNNWarning,
            stacklevel=5,
        )

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self.sinks.log_event(event, step, **fields)

    def close(self) -> None:
        """Close the sinks (main process); the monitor can be opened again for another run."""
        self.sinks.close()

    # -- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """History, reference and probe fingerprint: plain Python values (JSON, ``torch.load(weights_only=True)``)."""
        return {
            "fingerprint": self.probe.fingerprint,
            "history": [dict(entry) for entry in self.history],
            "reference": None if self.reference is None else self.reference.to_dict(),
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Continue the curves of a saved run; False (and a warning, a new reference) when they cannot continue.

        That is when the probe configuration differs, or when the saved state is unreadable (hand
        edited, or from another version): then the history restarts as far as it is unreadable.
        """
        try:
            history = [dict(entry) for entry in state.get("history") or []]
            last_step = state.get("last_step")
            if not all(isinstance(entry.get("step"), int) for entry in history) or not isinstance(
                last_step, (int, type(None))
            ):
                raise ValueError("the history needs integer steps")
        except (AttributeError, TypeError, ValueError) as error:
            self.history, self.last_step = [], None
            self._forget(f"the saved MNN history is unreadable ({type(error).__name__}: {error})")
            return False
        self.history, self.last_step = history, last_step
        try:
            reference = None if state.get("reference") is None else ProbeResult.from_dict(state["reference"])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            self._forget(f"the saved Diff-eRank reference is unreadable ({type(error).__name__}: {error})")
            return False
        if state.get("fingerprint") != self.probe.fingerprint:
            self._forget("resumed from a run with a different probe configuration (sample, layers or max_length)")
            return False
        if reference is not None and self._reference_model is None:
            self.reference = reference
        return True

    def _forget(self, why: str) -> None:
        warnings.warn(
            f"{why}: the curves before and after are not comparable; a new Diff-eRank reference is taken at the "
            "next probe",
            MNNWarning,
            stacklevel=4,
        )
        if self._reference_model is None:
            self.reference = None


def _finite_erank(result: ProbeResult) -> bool:
    return any(math.isfinite(value) for value in result.per_layer.get("erank", []))
