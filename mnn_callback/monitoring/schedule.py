"""When to probe, and how much it costs: the schedule, the spectral tier of each probe, the overhead budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OVERHEAD_WARNING_PROBES", "OVERHEAD_WARNING_SHARE", "SCHEDULES", "Overhead", "Schedule"]

OVERHEAD_WARNING_SHARE = 0.05  # without max_overhead, a share above this is warned about, once
OVERHEAD_WARNING_PROBES = 5  # after this many scheduled probes: enough to estimate the share

SCHEDULES = ("fixed", "log")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass
class Schedule:
    """Which steps get a probe, and which probes are exact.

    ``fixed``: every multiple of ``every_n_steps`` (step 0 included). ``log``: also steps 1, 2,
    4, 8, ... below ``every_n_steps`` (dense early, where training moves fastest, as published
    pretraining series are). ``exact_every=K``: the first and every K-th probe after it (and the
    final one) use the probe's spectra, the others the cheap tier (MNN, Rényi-2, loss).
    """

    every_n_steps: int = 100
    kind: str = "fixed"
    exact_every: int | None = None

    def __post_init__(self) -> None:
        _positive_int("every_n_steps", self.every_n_steps)
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.exact_every is not None:
            _positive_int("exact_every", self.exact_every)

    def scheduled(self, step: int) -> bool:
        if step % self.every_n_steps == 0:
            return True
        return self.kind == "log" and 0 < step < self.every_n_steps and step & (step - 1) == 0

    def method(self, index: int, configured: str, *, final: bool = False) -> str:
        """The spectra of the ``index``-th probe (0 = the first): ``configured`` or ``"cheap"``."""
        if self.exact_every is None:
            return configured
        if final or index % self.exact_every == 0:
            return "exact" if configured == "cheap" else configured
        return "cheap"


@dataclass
class Overhead:
    """The monitor's cost on the training thread, against the training wall time since :meth:`start`.

    Only scheduled probes count (the reference and the final probe always run, outside any
    budget). With ``max_share``, :meth:`would_exceed` says whether one more probe would take the
    share above it. ``clock``: seconds from any origin (``time.perf_counter``).
    """

    max_share: float | None = None
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    clock_start: float | None = None
    seconds: float = 0.0
    probes: int = 0
    skipped: int = 0
    largest_cost: float = 0.0
    start_step: int | None = None
    last_step: int | None = None
    warned: bool = False  # the cadence warning was given

    def __post_init__(self) -> None:
        if self.max_share is not None and not (isinstance(self.max_share, (int, float)) and 0 < self.max_share < 1):
            raise ValueError(f"max_overhead must be a share between 0 and 1 (e.g. 0.01), got {self.max_share!r}")

    def start(self, step: int | None = None) -> None:
        """Start the clock (at training ``step``, so that the time of a training step can be estimated)."""
        self.clock_start, self.seconds, self.probes, self.skipped = self.clock(), 0.0, 0, 0
        self.start_step = self.last_step = step

    @property
    def elapsed(self) -> float:
        return 0.0 if self.clock_start is None else self.clock() - self.clock_start

    def add(self, seconds: float, *, probe: bool = False, step: int | None = None) -> None:
        """Count ``seconds`` of the monitor's training-thread time (``probe``: a whole scheduled probe at ``step``)."""
        if self.clock_start is None:
            self.start()
        self.seconds += seconds
        if probe:
            self.probes += 1
            self.largest_cost = max(self.largest_cost, seconds)
        if step is not None:
            self.last_step = step

    @property
    def share(self) -> float:
        return self.seconds / max(self.elapsed, 1e-9)

    def would_exceed(self, first_cost: float = 0.0) -> bool:
        """Whether a probe now would take the share above ``max_share``.

        Its cost is estimated cautiously: the largest cost seen so far, the first probe's included
        (it also calibrates, so it is rarely cheaper than the next).
        """
        if self.max_share is None:
            return False
        cost = max(self.largest_cost, first_cost)
        return (self.seconds + cost) / max(self.elapsed + cost, 1e-9) > self.max_share

    @property
    def probe_seconds(self) -> float:
        """The monitor's mean cost per scheduled probe (its logging and figure hand-overs included)."""
        return self.seconds / max(self.probes, 1)

    @property
    def step_seconds(self) -> float | None:
        """Training wall time per step, without the monitor's; None before a step was timed."""
        if self.start_step is None or self.last_step is None or self.last_step <= self.start_step:
            return None
        training = self.elapsed - self.seconds
        return training / (self.last_step - self.start_step) if training > 0 else None

    def projected_share(self, every_n_steps: int) -> float | None:
        """The share a long run reaches with a probe every ``every_n_steps`` steps, by the costs measured so far.

        cost / (cost + every_n_steps x step time): unlike :attr:`share`, it does not count the dense
        early probes of a log schedule as if they went on all run long.
        """
        step_seconds = self.step_seconds
        if step_seconds is None or not self.probes:
            return None
        cost = self.probe_seconds
        return cost / max(cost + every_n_steps * step_seconds, 1e-12)

    def suggestion(self, target: float) -> int | None:
        """The smallest ``every_n_steps`` whose projected share is at most ``target``, by the measured costs."""
        step_seconds = self.step_seconds
        if step_seconds is None:
            return None
        return max(1, math.ceil(self.probe_seconds * (1 - target) / (target * step_seconds)))

    def cadence_warning(self, every_n_steps: int, target: float) -> str:
        """The warning for a cadence that projects a share above ``target``: what it costs and what keeps it under."""
        cost, projected = self.probe_seconds, self.projected_share(every_n_steps) or math.nan
        return (
            f"mnn_callback: a probe and its logging cost {cost:.3f} s, {cost / self.step_seconds:.1f} training steps' "
            f"worth; at every_n_steps={every_n_steps} that is {projected:.1%} of the training wall time "
            f"(so far: {self.share:.1%}); every_n_steps={self.suggestion(target)} keeps it "
            f"at {target:.0%} by these numbers; or set max_overhead={target} "
            f"(skips probes to stay under it) or method='cheap' (no spectra)"
        )

    def cadence_warning_due(self, every_n_steps: int) -> str | None:
        """The cadence warning, once, when after enough scheduled probes the projected share is too high.

        Only without ``max_share`` (a budget already keeps the share down).
        """
        if self.warned or self.max_share is not None or self.probes < OVERHEAD_WARNING_PROBES:
            return None
        projected = self.projected_share(every_n_steps)
        if projected is None or projected <= OVERHEAD_WARNING_SHARE:
            return None
        self.warned = True
        return self.cadence_warning(every_n_steps, OVERHEAD_WARNING_SHARE)

    def summary(self) -> str:
        """One line: the scheduled probes' share of the training wall time, how many, how long, how many skipped."""
        skipped = (
            f"; {self.skipped} skipped to stay under max_overhead={self.max_share}"
            if self.max_share is not None
            else ""
        )
        return (
            f"scheduled probes took {self.share:.2%} of the training wall time "
            f"({self.probes} probes, {self.seconds:.1f} s{skipped})"
        )
