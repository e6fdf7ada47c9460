"""The collapse alarm: a hidden state's Matrix Entropy (or eRank) fell, beyond noise and a minimum effect.

After each exact probe, per probed hidden state, the fall since a baseline probe (the previous
exact probe by default, or the Diff-eRank reference) is compared with its paired standard error
(the same sequences in both probes) and with the baseline's value:

    fall = baseline - now,    fires when  fall > k * SE(fall)  and  fall > min_drop * baseline

on any hidden state. It fires once per episode: again only after a probe at which no hidden state
meets the condition; by default (``warmup=None``) the run starts in one, so the early compression of
a model trained from scratch is never announced. MNN never triggers it: its direction depends on the
regime (n against d) and on the basis, so a fall of MNN is no sign of collapse by itself.

Every process decides alike without a collective of its own: the probe's values are all-reduced,
so every process holds the same results; only the main process announces (:func:`announce`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mnn_callback.core import schema
from mnn_callback.core.errors import CollapseWarning, MNNWarning
from mnn_callback.core.identity import DEFAULT_NAME
from mnn_callback.output.sinks import SinkSet
from mnn_callback.probing.results import ProbeResult

__all__ = [
    "BASELINES",
    "DEFAULT_MIN_DROP",
    "Alarm",
    "Alert",
    "CollapseAlert",
    "CollapseWarning",
    "announce",
    "require_spectra",
]

# the metric, its comparison row of the schema (the fall's standard error), and the per-sequence field it is
# paired on (eRank: the entropy in nats, by the delta method)
_COMPARISONS = {"matrix_entropy": ("matrix_entropy_change", "matrix_entropy"), "erank": ("diff_erank", "entropy_nats")}
# shares of the baseline (benchmarks/alarm.py: the demo recipe, 3 seeds x 600 steps probed every 10): the
# largest healthy falls after the early compression were 5.2% (Matrix Entropy) and 13.5% (eRank); every
# induced collapse (lr x30 / x100, pruned final-norm gains, sudden or slow) was caught in 3 of 3 seeds
DEFAULT_MIN_DROP = {"matrix_entropy": 0.15, "erank": 0.3}
BASELINES = ("window", "reference")
logger = logging.getLogger("mnn_callback")


def _number(name: str, value: Any, low: float, *, integer: bool = False) -> int | float:
    """``value`` as an int or a float (numpy's too), or a ValueError saying what was expected."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= low or not math.isfinite(value):
        wanted = f"an integer >= {low:g}" if integer else f"a finite number >= {low:g}"
        raise ValueError(f"expected {name} to be {wanted}, got {value!r}")
    return int(value) if integer else float(value)


def require_spectra(rule: CollapseAlert | None, method: str, exact_every: int | None = None) -> None:
    """Refuse an alarm on probes without spectra (``method="cheap"`` without ``exact_every``: no Matrix
    Entropy, no eRank)."""
    if rule is not None and method == "cheap" and exact_every is None:
        raise ValueError(
            "expected a probe with spectra for the collapse alarm (it watches Matrix Entropy or eRank), got "
            "method='cheap'; exact_every=K keeps most probes cheap and the alarm on the exact ones"
        )


@dataclass(frozen=True)
class CollapseAlert:
    """When the collapse alarm fires, and what it does (``alert=`` of the adapters).

    Args:
        metric: ``"matrix_entropy"`` or ``"erank"`` (never MNN: its direction is regime- and basis-dependent).
        k: the fall must exceed ``k`` paired standard errors.
        min_drop: and this share of the baseline's value (0.15: 15%); None (default): 0.15 for
            Matrix Entropy, 0.3 for eRank (exp of the entropy: its relative falls are larger);
            :attr:`drop` is the share in force.
        baseline: ``"window"``: the exact probe ``window`` exact probes back (until ``window`` armed
            probes were taken, the first armed one); ``"reference"``: the Diff-eRank reference (the
            first probe, or ``reference=``: e.g. a fine-tune's base model).
        window: how many exact probes back the window's baseline is.
        warmup: the alarm arms at this training step: probes before it are ignored, the first one at
            or after it is the first baseline. None (default): at ``every_n_steps``, in an episode:
            the first fall is announced only after a probe without one (a model trained from scratch
            compresses fastest early, for a length in steps no setting knows, and that fall is no
            collapse); a number arms there with no episode on (0: from the first probe, e.g. a
            fine-tune). With ``exact_every`` the first exact probe at or after ``warmup`` is the
            first baseline: an earlier exact one (step 0) would measure the early compression.
        stop: also stop training when it fires.

    >>> CollapseAlert.of(True)
    CollapseAlert(metric='matrix_entropy', k=3.0, min_drop=None, baseline='window', window=1, warmup=None, stop=False)
    >>> CollapseAlert(metric="erank").drop
    0.3
    >>> CollapseAlert(metric="mnn")
    Traceback (most recent call last):
    ...
    ValueError: expected metric to be 'matrix_entropy' or 'erank', got 'mnn' (MNN never triggers the collapse alarm: \
its direction depends on the regime and the basis)
    """

    metric: str = "matrix_entropy"
    k: float = 3.0
    min_drop: float | None = None
    baseline: str = "window"
    window: int = 1
    warmup: int | None = None
    stop: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or self.metric not in _COMPARISONS:
            raise ValueError(
                f"expected metric to be 'matrix_entropy' or 'erank', got {self.metric!r}"
                + (
                    " (MNN never triggers the collapse alarm: its direction depends on the regime and the basis)"
                    if isinstance(self.metric, str) and self.metric.startswith("mnn")
                    else ""
                )
            )
        if self.baseline not in BASELINES:
            raise ValueError(f"expected baseline to be 'window' or 'reference', got {self.baseline!r}")
        object.__setattr__(self, "k", _number("k", self.k, 0))
        if self.min_drop is not None:
            object.__setattr__(self, "min_drop", _number("min_drop", self.min_drop, 0))
            if not self.min_drop < 1:
                raise ValueError(
                    f"expected min_drop to be a share of the baseline below 1 (e.g. 0.1), got {self.min_drop!r}"
                )
        object.__setattr__(self, "window", _number("window", self.window, 1, integer=True))
        if self.warmup is not None:
            object.__setattr__(self, "warmup", _number("warmup", self.warmup, 0, integer=True))
        if not isinstance(self.stop, bool):
            raise ValueError(f"expected stop to be True or False, got {self.stop!r}")

    @classmethod
    def of(cls, value: Any) -> CollapseAlert | None:
        """``alert=``: None or False (off), True (the defaults), a :class:`CollapseAlert`, or a dict of its fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):  # a dict, or a config system's mapping (Hydra's DictConfig)
            fields = {option.name for option in dataclasses.fields(cls)}
            unknown = sorted(map(str, set(value) - fields))
            if unknown:
                raise ValueError(f"expected alert keys among {', '.join(sorted(fields))}, got {', '.join(unknown)}")
            return cls(**{str(key): item for key, item in value.items()})
        raise ValueError(f"expected alert to be True, False, None, a CollapseAlert or a dict, got {value!r}")

    @property
    def drop(self) -> float:
        """The share of the baseline a fall must exceed: ``min_drop``, or the metric's default."""
        return DEFAULT_MIN_DROP[self.metric] if self.min_drop is None else self.min_drop

    def config(self) -> dict[str, Any]:
        return {**asdict(self), "min_drop": self.drop}


@dataclass(frozen=True)
class Alert:
    """One firing: at ``step``, the hidden states ``layers`` fell since the baseline (``since``: its
    step; None: the reference), by ``falls`` with standard errors ``errors`` (paired, from the same
    sequences' differences, unless ``unpaired`` says why not), from ``before`` to ``now``;
    ``monitor``: the monitor's name (shown when it is not the default: several monitors in one run)."""

    step: int
    metric: str
    since: int | None
    layers: list[int]
    before: list[float]
    now: list[float]
    falls: list[float]
    errors: list[float]
    rule: CollapseAlert = field(repr=False)
    unpaired: str | None = None
    monitor: str | None = None

    @property
    def source(self) -> str:
        """``mnn_callback``, or ``mnn_callback[name]`` for a monitor with a name of its own."""
        return "mnn_callback" if self.monitor in (None, DEFAULT_NAME) else f"mnn_callback[{self.monitor}]"

    @property
    def title(self) -> str:
        """Step first: W&B keeps 63 characters of a title and holds back a repeated one for a minute."""
        return f"step {self.step}: {schema.title(self.metric)} collapse ({self.source})"

    def message(self) -> str:
        """One line: where, when, how large, against what, and what happens now."""
        name = schema.title(self.metric)
        since = "the reference" if self.since is None else f"step {self.since}"
        parts = [
            f"layer {layer}: {then:.4g} -> {now:.4g}, a fall of {fall:.3g} ± {error:.2g} (SE), {fall / then:.0%}"
            for layer, then, now, fall, error in zip(
                self.layers, self.before, self.now, self.falls, self.errors, strict=True
            )
        ]
        stopping = "; stop=True asks training to stop" if self.rule.stop else ""
        errors = "paired standard errors" if self.unpaired is None else f"standard errors (unpaired: {self.unpaired})"
        return (
            f"{self.source}: collapse alarm at step {self.step}: {name} fell since {since} at hidden "
            f"state{'s' if len(self.layers) > 1 else ''} {', '.join(map(str, self.layers))} ({'; '.join(parts)}), "
            f"more than {self.rule.k:g} {errors} and {self.rule.drop:.0%}{stopping}"
        )

    def fields(self) -> dict[str, Any]:
        """The ``alert`` event's fields (JSONL and the other sinks' events)."""
        return {
            "metric": self.metric,
            "since": self.since if self.since is not None else "reference",
            "layers": list(self.layers),
            "before": list(self.before),
            "now": list(self.now),
            "fall": list(self.falls),
            "se": list(self.errors),
            "paired": self.unpaired is None,
            "k": self.rule.k,
            "min_drop": self.rule.drop,
            "stop": self.rule.stop,
        }


def unpaired_because(result: ProbeResult, baseline: ProbeResult) -> str | None:
    """Why the standard errors of ``result`` against ``baseline`` are not paired; None when they are."""
    if result.fingerprint != baseline.fingerprint:
        return "the baseline was measured on another sample"
    if not result.pairs_with(baseline):
        return "a probe kept no per-sequence values"
    return None


def falls(result: ProbeResult, baseline: ProbeResult, metric: str) -> tuple[list[float], list[float], list[float]]:
    """Per hidden state of ``result``: the fall of ``metric`` since ``baseline`` (baseline's value minus
    the current one), its standard error (paired when :meth:`ProbeResult.pairs_with`), and the
    baseline's value (NaN where the baseline lacks the hidden state or the metric)."""
    index = {layer: position for position, layer in enumerate(baseline.layers)}
    values = baseline.per_layer.get(metric)
    before = [values[index[layer]] if values and layer in index else math.nan for layer in result.layers]
    fall = [then - now for then, now in zip(before, result.per_layer[metric], strict=True)]
    error = result.difference_errors(baseline, warn=False).get(_COMPARISONS[metric][0], [math.nan] * len(fall))
    return fall, error, before


def _kept(result: ProbeResult, metric: str) -> ProbeResult:
    """``result`` as a baseline: without the per-sequence values the alarm's pairing does not use (they
    are most of a result, and the alarm's window travels in every checkpoint)."""
    paired_on = _COMPARISONS[metric][1]
    if not result.per_sequence:
        return result
    return dataclasses.replace(
        result, per_sequence={name: rows for name, rows in result.per_sequence.items() if name == paired_on}
    )


class Alarm:
    """The alarm's state in one run: the baselines it needs (the last ``window`` exact probes, not the
    history), whether an episode is on, and whether it asked training to stop."""

    def __init__(self, rule: CollapseAlert, every_n_steps: int) -> None:
        self.rule = rule
        self.warmup = every_n_steps if rule.warmup is None else rule.warmup
        self.trail: deque[tuple[int, ProbeResult]] = deque(maxlen=rule.window)
        self.in_episode = rule.warmup is None  # by default the early compression is one episode, never announced
        self.stopped_at: int | None = None  # the step of the alert that asked training to stop (stop=True)
        self.alerts: list[Alert] = []

    @property
    def stop_requested(self) -> bool:
        return self.stopped_at is not None and self.rule.stop

    def check(
        self, result: ProbeResult, reference: ProbeResult | None, step: int, monitor: str | None = None
    ) -> Alert | None:
        """The alert of the probe at ``step``, if it starts an episode; None otherwise (and for cheap probes).
        ``monitor``: the name the alert carries (several monitors in one run)."""
        metric = self.rule.metric
        if metric not in result.per_layer or step < self.warmup:
            return None
        if not any(math.isfinite(value) for value in result.per_layer[metric]):
            return None  # a probe without a finite value is no baseline (nor compared: its falls are NaN)
        since, baseline = (
            (None, reference) if self.rule.baseline == "reference" else (self.trail[0] if self.trail else (None, None))
        )
        self.trail.append((step, _kept(result, metric)))
        if baseline is None:
            return None
        fall, error, before = falls(result, baseline, metric)
        now = result.per_layer[metric]
        fired = [
            position
            for position in range(len(result.layers))
            if fall[position] > self.rule.k * error[position] and fall[position] > self.rule.drop * before[position]
        ]
        if not fired:
            self.in_episode = False
            return None
        if self.in_episode:
            return None
        self.in_episode = True
        if self.rule.stop and self.stopped_at is None:
            self.stopped_at = step
        pick = lambda values: [float(values[position]) for position in fired]  # noqa: E731
        alert = Alert(
            step,
            metric,
            since,
            [result.layers[p] for p in fired],
            pick(before),
            pick(now),
            pick(fall),
            pick(error),
            self.rule,
            unpaired_because(result, baseline),
            monitor,
        )
        self.alerts.append(alert)
        return alert

    def observe(
        self,
        result: ProbeResult,
        reference: ProbeResult | None,
        step: int,
        sinks: SinkSet | None,
        monitor: str | None = None,
    ) -> None:
        """:meth:`check` on every process; ``sinks`` (the main process's) hear of an alert."""
        alert = self.check(result, reference, step, monitor)
        if alert is not None and sinks is not None:
            announce(alert, sinks)

    def state_dict(self) -> dict[str, Any]:
        """The episode and the window's baselines: plain values (JSON, ``torch.load(weights_only=True)``)."""
        trail = [[step, result.to_dict()] for step, result in self.trail]
        return {"in_episode": self.in_episode, "trail": trail, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Any) -> None:
        """Continue a saved episode and window, and a stop the alarm asked for (a run resumed after the
        alarm stopped it stops again while ``stop=True``); an unreadable state (another version, hand
        edited) starts afresh."""
        if state is None:
            return
        try:
            trail = [(int(step), ProbeResult.from_dict(result)) for step, result in state["trail"]]
            in_episode = bool(state["in_episode"])
            stopped_at = state.get("stopped_at")
            stopped_at = None if stopped_at is None else int(stopped_at)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            warnings.warn(
                f"the saved state of the collapse alarm is unreadable ({type(error).__name__}: {error}); "
                "its window starts afresh",
                MNNWarning,
                stacklevel=4,
            )
            return
        self.trail.clear()
        self.trail.extend(trail[-self.rule.window :])
        self.in_episode, self.stopped_at = in_episode, stopped_at
        if self.stop_requested:
            warnings.warn(
                f"the collapse alarm stopped this run at step {stopped_at} (stop=True): the resumed run stops "
                "again at once; to train on, resume with alert={'stop': False} (or alert=None)",
                MNNWarning,
                stacklevel=4,
            )


def announce(alert: Alert, sinks: SinkSet) -> None:
    """The main process's announcement: every sink's ``log_alert``, then one :class:`CollapseWarning`.

    The sinks first: a warnings filter that turns warnings into errors loses no ``alert`` event. A
    filter that makes :class:`CollapseWarning` an error stops nothing (only the main process would
    raise, and every process must reach the next probe): the error is logged, ``stop=True`` stops.
    """
    sinks.log_alert(alert.title, alert.message(), alert.step, **alert.fields())
    try:
        warnings.warn(alert.message(), CollapseWarning, stacklevel=5)
    except CollapseWarning:
        logger.error("%s (a warnings filter made CollapseWarning an error; stop=True stops training)", alert.message())
