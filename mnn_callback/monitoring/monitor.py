"""The monitor: when to probe, one measurement, the Diff-eRank reference, the history, what it costs.

:class:`MNNCallback` (Trainer) and :class:`MNNAccelerateHook` (custom loops) are thin adapters
around one :class:`Monitor`: they translate their framework's events into :meth:`Monitor.due`,
:meth:`Monitor.measure` and :meth:`Monitor.close`, and persist :meth:`Monitor.state_dict`.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.guard import Guard
from mnn_callback.core.identity import DEFAULT_NAME, claim_name, release_name
from mnn_callback.core.regime import MORE_TOKENS, regime_line
from mnn_callback.monitoring.alarm import Alarm, CollapseAlert, require_spectra
from mnn_callback.monitoring.reference import check_reference_sample, kept_reference
from mnn_callback.monitoring.saved_state import read_saved_state
from mnn_callback.monitoring.schedule import OVERHEAD_WARNING_SHARE, Overhead, Schedule
from mnn_callback.output.figures import DashboardFeed, Dashboards
from mnn_callback.output.sinks import Sink, SinkSet
from mnn_callback.probing.distributed import StepAgreement, all_reduce, differing_across_processes
from mnn_callback.probing.probe import Probe
from mnn_callback.probing.results import Measurement, ProbeResult

__all__ = ["DEFAULT_SYNC_TIMEOUT", "OVERHEAD_WARNING_SHARE", "Monitor"]

DEFAULT_SYNC_TIMEOUT = 300.0  # seconds a process waits at a probe for the others before the monitor turns off
# settings that fix the sample: when they differ across processes, process 0's sample is used
# (the fingerprint check); every other setting must be equal everywhere, or the collectives part ways
_SAMPLE_SETTINGS = ("fingerprint", "sequences", "tokens", "seed", "max_samples")
logger = logging.getLogger("mnn_callback")


class Monitor:
    """Probes a model on a schedule, keeps the history and the Diff-eRank reference, feeds the sinks.

    Args:
        probe: the fixed sample and how to measure it.
        every_n_steps: a scheduled probe when ``step % every_n_steps == 0``.
        schedule: ``"fixed"``, or ``"log"``: also steps 1, 2, 4, ... below ``every_n_steps``.
        max_overhead: skip scheduled probes that would take the monitor's share of the training
            wall time above this (e.g. 0.01); the reference and final probes always run.
        exact_every: every K-th probe (and the first and the final) with the probe's spectra, the
            others with ``method="cheap"`` (MNN, Rényi-2, loss).
        reference: the Diff-eRank reference: a model (probed once, at :meth:`take_reference`), a
            :class:`ProbeResult`, or a JSON file holding one. Default: the first measurement.
        strict: raise errors instead of turning them into warnings.
        dashboards: the pictures drawn besides the scalars (:class:`Dashboards`, or True/False).
        sync_timeout: under ``torch.distributed``, how many seconds a process waits at a probe for
            the others to reach it (keep it below the process group's own timeout).
        alert: the collapse alarm (a :class:`~mnn_callback.monitoring.alarm.CollapseAlert`, a dict of its fields, True).

    Every process runs :meth:`due` and :meth:`measure` at the same steps (the probe's work sharded,
    the budget decided together); only the main process (``is_main_process`` in :meth:`open`) has
    sinks. Before each probe's first collective the processes agree that they are at the same probe
    (:class:`~mnn_callback.probing.distributed.StepAgreement`), at the first one on their settings
    too: a difference costs one error, and the monitor is off on every process.

    Each :meth:`open` starts a run: a fresh history, schedule state and (unless one was given)
    Diff-eRank reference; :meth:`load_state_dict` then continues a saved one.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        every_n_steps: int = 100,
        schedule: str = "fixed",
        max_overhead: float | None = None,
        exact_every: int | None = None,
        reference: Any = None,
        strict: bool = False,
        dashboards: Dashboards | bool = True,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
        alert: Any = None,
    ) -> None:
        self.probe = probe
        self.alert = CollapseAlert.of(alert)
        require_spectra(self.alert, probe.method, exact_every)
        self.sync_timeout = sync_timeout
        self.agreement: StepAgreement | None = None  # each run's, made when it opens (or at its first probe)
        self.schedule = Schedule(every_n_steps, schedule, exact_every)
        self.overhead = Overhead(max_overhead)
        self.guard = Guard(strict)
        self.dashboards = Dashboards.of(dashboards)
        self.feed = DashboardFeed(self.dashboards, self.guard)
        self._reference_model = reference if isinstance(reference, nn.Module) else None
        self._reference_given = reference is not None  # kept from run to run; the first probe's is not
        self.reference: ProbeResult | None = None
        if reference is not None and self._reference_model is None:
            self.reference = ProbeResult.load(reference)
            check_reference_sample(self.reference, self.probe.fingerprint)
        self.adapter_settings: dict[str, Any] = {}  # the adapter's own settings every process must share
        self.name = DEFAULT_NAME
        self.is_main_process = True
        self.is_open = False
        self._directory: str | None = None
        self.sinks = SinkSet([], self.guard)
        self._start_run()

    def _start_run(self) -> None:
        """Forget the previous run: history, schedule state, budget, errors, and a reference it measured."""
        self.run_id = uuid.uuid4().hex[:12]  # names this run's JSONL lines and checkpoints (os.urandom: no RNG)
        self.continued_run: str | None = None  # the run whose saved state this one continues
        self.history: list[dict[str, Any]] = []
        self.last_step: int | None = None
        if not self._reference_given:
            self.reference = None
        self.overhead = Overhead(self.overhead.max_share)
        self.guard.reset()
        self._probes_run = 0  # measurements so far: which ones are exact (exact_every)
        self._probes_succeeded = 0
        self.alarm = Alarm(self.alert, self.every_n_steps) if self.alert is not None else None
        self._first_cost = 0.0  # the first probe's cost: the budget's estimate before any scheduled probe
        self.feed = DashboardFeed(self.dashboards, self.guard)
        self.disabled: str | None = None  # why the monitor is off on every process in this run, if it is
        self._settings_agreed = False
        self.agreement = None

    @property
    def every_n_steps(self) -> int:
        return self.schedule.every_n_steps

    # -- setup ------------------------------------------------------------------------------------

    @classmethod
    def of_data(
        cls, data: Any, *, tokenizer: Any, strict: bool, probe_options: Mapping[str, Any], **options: Any
    ) -> Monitor:
        """The probe of ``data`` and its monitor, as the adapters build them (with ``strict``, a
        truncated sample is an error too); ``options`` go to :class:`Monitor`."""
        with Guard(strict).warnings_as_errors():
            probe = Probe(data, tokenizer=tokenizer, **probe_options)
            return cls(probe, strict=strict, **options)

    @property
    def config(self) -> dict[str, Any]:
        schedule = {"every_n_steps": self.every_n_steps, "schedule": self.schedule.kind}
        optional = {"exact_every": self.schedule.exact_every, "max_overhead": self.overhead.max_share}
        schedule.update({key: value for key, value in optional.items() if value is not None})
        if self.alarm is not None:
            schedule["alert"] = {**self.alert.config(), "warmup": self.alarm.warmup}  # its default resolved
        return {**self.probe.config, **schedule, "monitor": self.name}

    def open(
        self,
        make_sinks: Callable[[], Sequence[Sink]],
        *,
        is_main_process: bool,
        directory: str | None = None,
        name: str | None = None,
    ) -> None:
        """Start a run and its logging. Only the main process writes: ``make_sinks`` is called there only.

        ``directory``: where the run's files go; the monitor claims a name there (``name``, default
        ``"mnn"``, else with a number) that no other open monitor of that directory holds, until
        :meth:`close`. ``make_sinks`` can read it as :attr:`name`.
        """
        if self.is_open:
            self.close()
        self._start_run()
        self._directory = directory
        self.name = claim_name(directory, self, name)
        self.agreement = StepAgreement(self.sync_timeout, self.name)
        self.is_open = True
        self.is_main_process = is_main_process
        self.guard.quiet = not is_main_process
        self.sinks = SinkSet(self._made(make_sinks), self.guard)
        self.sinks.log_config(self.config)

    def add_sinks(self, make_sinks: Callable[[], Sequence[Sink]]) -> None:
        """More sinks, e.g. trackers that exist only once training started (main process only)."""
        self.sinks.sinks.extend(self._made(make_sinks))

    def _made(self, make_sinks: Callable[[], Sequence[Sink]]) -> list[Sink]:
        if not self.is_main_process:
            return []
        return list(self.guard.call("setting up the sinks", make_sinks) or [])

    def take_reference(self, step: int = 0) -> None:
        """Probe the reference model, if one was given and no reference is known yet (every process, at ``step``)."""
        needed = self._reference_model is not None and self.reference is None
        if needed and self._at_the_same_probe(f"step {step} (the reference model's probe)") and self._agreed():
            method = self.schedule.method(0, self.probe.method)
            self.reference = self.guard.call(
                "probing the reference model", self._run_probe, self._reference_model, None, method
            )
        self._reference_model = None  # do not keep a second model alive

    def settings(self) -> dict[str, Any]:
        """What every process must share: the configuration but for what fixes the sample, and the adapter's."""
        config = {key: value for key, value in self.config.items() if key not in _SAMPLE_SETTINGS}
        return {**config, **self.adapter_settings}

    def _at_the_same_probe(self, what: str) -> bool:
        """Whether every process is at this probe (``what``: its step and kind); False, after one error, if not.

        Called by every process before a probe's first collective; a disagreement turns the
        monitor off on every process (:class:`~mnn_callback.probing.distributed.StepAgreement`).
        """
        if self.disabled:
            return False
        if self.agreement is None:
            self.agreement = StepAgreement(self.sync_timeout, self.name)
        try:
            self.agreement.agree(what)
        except Exception as error:  # ProcessesDisagree, or a key-value store that went away: off either way
            self.disabled = str(error)
            self.guard.report("agreeing on the probe across processes", error)
            return False
        return True

    def _agreed(self) -> bool:
        """Whether the processes agree on the settings (compared at the first call; every process calls this)."""
        self.guard.call("comparing the monitor's settings across processes", self._agree_on_settings)
        return not self.disabled

    def _agree_on_settings(self) -> None:
        """Compare :meth:`settings` across processes, once (every process, at the first probe).

        A difference turns the monitor off on every process (they all see the same settings) and
        raises, before any collective of the probe could part ways.
        """
        if self._settings_agreed:
            return
        self._settings_agreed = True
        differences = differing_across_processes(self.settings())
        if differences:
            self.disabled = f"the monitor's settings differ across processes ({differences})"
            raise ValueError(
                f"{self.disabled}: every process must be given the same settings, or the processes would wait for "
                "each other at different steps; the monitor is off for this run on every process"
            )

    def _run_probe(self, model: nn.Module, optimizer: Any, method: str) -> ProbeResult:
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
        # each sequence's values: the paired standard errors of the changes since the reference
        return self.probe.run(model, optimizer=optimizer, method=method, per_sequence=True)

    def start_clock(self, step: int | None = None) -> None:
        """Start timing the training wall time the probes' share is measured against (at training ``step``)."""
        self.overhead.start(step)

    # -- the schedule -----------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether a scheduled probe falls on ``step``, was not run yet, and fits the overhead budget.

        With ``max_overhead`` every process decides together (one all-reduce, at scheduled steps
        only): a probe skipped anywhere is skipped everywhere, and counted in ``probe/skipped``.
        """
        if self.disabled or not self.schedule.scheduled(step) or step == self.last_step:
            return False
        if self.overhead.max_share is None:
            return True
        if not self._at_the_same_probe(f"step {step} (the overhead budget)"):
            return False
        skip = torch.tensor([float(self.overhead.would_exceed(self._first_cost))], dtype=torch.float64)
        if all_reduce(skip, op="max").item() > 0:
            self.overhead.skipped += 1
            return False
        return True

    # -- one measurement --------------------------------------------------------------------------

    def measure(
        self,
        model: nn.Module,
        step: int,
        *,
        epoch: float | None = None,
        optimizer: Any = None,
        scheduled: bool = False,
        final: bool = False,
    ) -> Measurement:
        """Probe ``model`` at ``step`` on every process, keep and log the result (main process).

        ``scheduled`` probes count towards ``probe/time_share``; the reference, final and
        evaluation probes do not. ``final``: the last probe of the run (exact, with heatmaps). A
        failed probe gives a measurement without result (only ``probe/errors``) and a warning,
        unless ``strict``.
        """
        started = time.perf_counter()
        self.last_step = step
        method = self.schedule.method(self._probes_run, self.probe.method, final=final)
        # no collective unless every process is at this probe and the settings agree
        if not (self._at_the_same_probe(f"step {step} ({method} probe)") and self._agreed()):
            return Measurement(step, epoch, None, monitor={"errors": float(self.guard.errors)})
        self._probes_run += 1
        result = self.guard.call("the probe", self._run_probe, model, optimizer, method)
        monitor: dict[str, float] = {"errors": float(self.guard.errors)}
        if self.overhead.max_share is not None:
            monitor["skipped"] = float(self.overhead.skipped)
        if result is None:
            measurement = Measurement(step, epoch, None, monitor=monitor)
        else:
            self._keep_reference(result, step)
            if self.alarm is not None:  # decided alike on every process (all-reduced values); the main one announces
                main = self.sinks if self.is_main_process else None
                self.guard.call("the collapse alarm", self.alarm.observe, result, self.reference, step, main, self.name)
            if scheduled:
                self.overhead.add(time.perf_counter() - started, probe=True, step=step)
                monitor["time_share"] = self.overhead.share
                self._warn_overhead()
            measurement = Measurement.against(step, epoch, result, self.reference, monitor, warn=False)
            self.history.append({"step": step, "epoch": epoch, **measurement.scalars()})
            if self._probes_succeeded == 0 and self.is_main_process:
                self._announce_regime(result, step)
            self._probes_succeeded += 1
        if self.is_main_process:
            publishing = time.perf_counter()
            self.sinks.log_measurement(measurement)
            if result is not None:
                self.guard.call(
                    "drawing the dashboard figures",
                    self.feed.after_measurement,
                    self.sinks,
                    measurement,
                    self.history[-1],
                    final=final,
                )
            if scheduled:
                self.overhead.add(time.perf_counter() - publishing)
        if self.overhead.clock_start is None:
            self._first_cost = time.perf_counter() - started
            self.start_clock(step)
        return measurement

    def _keep_reference(self, result: ProbeResult, step: int) -> None:
        """``result`` is the reference when there is none, and stands in for the reference's non-finite layers."""
        self.reference, change = kept_reference(self.reference, result, step)
        if change and self.is_main_process:
            warnings.warn(change, MNNWarning, stacklevel=4)

    def _announce_regime(self, result: ProbeResult, step: int) -> None:
        """Where n lies against d: a ``regime`` event, and an INFO line wherever MNN can rise with collapse."""
        if result.regime is None:
            return
        self.log_event(
            "regime", step, regime=result.regime, tokens=list(result.token_range), hidden_size=result.hidden_size
        )
        if result.regime != MORE_TOKENS:
            low, _, high = result.token_range
            logger.info(regime_line(result.regime, int(low), int(high), int(result.hidden_size)))

    def _warn_overhead(self) -> None:
        """Once, on the main process, when after a few scheduled probes the cadence projects a share above 5%."""
        message = self.overhead.cadence_warning_due(self.every_n_steps) if self.is_main_process else None
        if message:
            warnings.warn(message, MNNWarning, stacklevel=5)

    @property
    def should_stop(self) -> bool:
        """Whether the collapse alarm fired with ``stop=True`` in this run: the adapters stop training."""
        return self.alarm is not None and self.alarm.stop_requested

    def poll(self) -> None:
        """Hand finished dashboard figures to the sinks (call at step boundaries; cheap)."""
        if self.is_main_process:
            started = time.perf_counter()
            self.feed.poll(self.sinks)
            self.overhead.add(time.perf_counter() - started)

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self.sinks.log_event(event, step, **fields)

    def log_resume(self, step: int) -> None:
        """The ``resume`` event: the run goes on from ``step``, continuing the run its saved state came from."""
        self.log_event("resume", step, **({"continues": self.continued_run} if self.continued_run else {}))

    def close(self) -> None:
        """The last pictures, one info line with the monitor's share of the run, then the sinks are closed.

        A run in which no probe succeeded says so in a warning. The monitor can be opened again for
        another run.
        """
        if not self.is_open:
            return
        self.is_open = False
        release_name(self._directory, self.name)
        if self.is_main_process:
            self.guard.call("drawing the dashboard figures", self.feed.finish, self.sinks)
            if self._probes_run and not self._probes_succeeded:
                warnings.warn(
                    f"mnn_callback: no probe succeeded in this run ({self._probes_run} tried, "
                    f"{self.guard.errors} errors; the first warning of each kind says why): nothing was measured",
                    MNNWarning,
                    stacklevel=3,
                )
            cost = self.overhead
            if cost.probes:
                logger.info(cost.summary())
                self.sinks.log_event(
                    "overhead", self.last_step or 0, share=cost.share, probes=cost.probes, skipped=cost.skipped
                )
        self.sinks.close()

    # -- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """History, reference and probe fingerprint: plain Python values (JSON, ``torch.load(weights_only=True)``)."""
        return {
            "fingerprint": self.probe.fingerprint,
            "history": [dict(entry) for entry in self.history],
            "reference": None if self.reference is None else self.reference.to_dict(),
            "last_step": self.last_step,
            "run": self.run_id,
            **({"alarm": self.alarm.state_dict()} if self.alarm is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Continue the curves of a saved run; False (and a warning, a new reference) when they cannot continue.

        That is when the probe configuration differs, or when the saved state is unreadable (hand
        edited, or from another version): then the history restarts as far as it is unreadable.
        """
        saved = read_saved_state(state)
        self.continued_run = saved.run
        self.history, self.last_step = saved.history, saved.last_step
        self.feed.seed(saved.history)
        problem = saved.problem
        if problem is None and saved.fingerprint != self.probe.fingerprint:
            problem = "resumed from a run with a different probe configuration (sample, layers or max_length)"
        if problem is not None:
            self._forget(problem)
            return False
        if saved.reference is not None and self._reference_model is None:
            self.reference = saved.reference
        if self.alarm is not None and isinstance(state, Mapping):
            self.alarm.load_state_dict(state.get("alarm"))
        return True

    def _forget(self, why: str) -> None:
        message = (
            f"{why}: the curves before and after are not comparable; a new Diff-eRank reference is taken next probe"
        )
        warnings.warn(message, MNNWarning, stacklevel=4)
        if self._reference_model is None:
            self.reference = None
