"""The collapse alarm: a hidden state's Matrix Entropy (or eRank) fell, beyond noise and a minimum effect.

After each exact probe, per probed hidden state, the fall since a baseline probe (the previous
exact probe by default, or the Diff-eRank reference) is compared with its paired standard error
(the same sequences in both probes) and with the baseline's value:

    fall = baseline - now,    fires when  fall > k * SE(fall)  and  fall > min_drop * baseline

on any hidden state. It fires once per episode: again only after a probe at which no hidden state
meets the condition. MNN never triggers it: its direction depends on the regime (n against d) and
on the basis, so a fall of MNN is no sign of collapse by itself.

Every process decides alike without a collective of its own: the probe's values are all-reduced,
so every process holds the same results; only the main process announces (:func:`announce`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mnn_callback.core import schema
from mnn_callback.core.errors import MNNWarning
from mnn_callback.output.sinks import SinkSet
from mnn_callback.probing.results import ProbeResult

__all__ = ["BASELINES", "DEFAULT_MIN_DROP", "Alarm", "Alert", "CollapseAlert", "CollapseWarning", "announce"]

# the metric, and its comparison row of the schema with the sign that makes a fall positive
_COMPARISONS = {"matrix_entropy": ("matrix_entropy_change", -1.0), "erank": ("diff_erank", 1.0)}
# shares of the baseline; chosen above the falls of healthy tiny runs seen in the tests (12% of Matrix
# Entropy between two probes 2 steps apart at lr 1e-2), not yet calibrated on a false-alarm benchmark
DEFAULT_MIN_DROP = {"matrix_entropy": 0.25, "erank": 0.5}
BASELINES = ("window", "reference")


class CollapseWarning(MNNWarning):
    """The collapse alarm fired: a warning under ``strict=True`` too (``stop=True`` stops training)."""


def _number(name: str, value: Any, low: float, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= low or not math.isfinite(value):
        wanted = f"an integer >= {low:g}" if integer else f"a finite number >= {low:g}"
        raise ValueError(f"expected {name} to be {wanted}, got {value!r}")


@dataclass(frozen=True)
class CollapseAlert:
    """When the collapse alarm fires, and what it does (``alert=`` of the adapters).

    Args:
        metric: ``"matrix_entropy"`` or ``"erank"`` (never MNN: its direction is regime- and basis-dependent).
        k: the fall must exceed ``k`` paired standard errors.
        min_drop: and this share of the baseline's value (0.25: 25%); default 0.25 for Matrix
            Entropy, 0.5 for eRank (exp of the entropy: its relative falls are larger).
        baseline: ``"window"``: the exact probe ``window`` exact probes back; ``"reference"``: the
            Diff-eRank reference (the first probe, or ``reference=``: e.g. a fine-tune's base model).
        window: how many exact probes back the window's baseline is.
        warmup: the alarm arms at this training step: probes before it are ignored, the first one at
            or after it is the first baseline. Default: the monitor's ``every_n_steps`` (a model trained
            from scratch compresses fastest early, and a log schedule probes that phase densely: that
            fall is no collapse); 0 checks from the first probe on (e.g. a fine-tune).
        stop: also stop training when it fires.

    >>> CollapseAlert.of(True)
    CollapseAlert(metric='matrix_entropy', k=3.0, min_drop=0.25, baseline='window', window=1, warmup=None, stop=False)
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
        if self.metric not in _COMPARISONS:
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
        _number("k", self.k, 0)
        object.__setattr__(self, "k", float(self.k))
        if self.min_drop is None:
            object.__setattr__(self, "min_drop", DEFAULT_MIN_DROP[self.metric])
        _number("min_drop", self.min_drop, 0)
        if not self.min_drop < 1:
            raise ValueError(
                f"expected min_drop to be a share of the baseline below 1 (e.g. 0.1), got {self.min_drop!r}"
            )
        _number("window", self.window, 1, integer=True)
        if self.warmup is not None:
            _number("warmup", self.warmup, 0, integer=True)
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

    def config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Alert:
    """One firing: at ``step``, the hidden states ``layers`` fell since the baseline (``since``: its
    step; None: the reference), by ``falls`` with paired standard errors ``errors``, from ``before`` to ``now``."""

    step: int
    metric: str
    since: int | None
    layers: list[int]
    before: list[float]
    now: list[float]
    falls: list[float]
    errors: list[float]
    rule: CollapseAlert = field(repr=False)

    @property
    def title(self) -> str:
        return f"mnn_callback: {schema.title(self.metric)} collapse at step {self.step}"

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
        stopping = "; training stops (stop=True)" if self.rule.stop else ""
        return (
            f"mnn_callback: collapse alarm at step {self.step}: {name} fell since {since} at hidden state"
            f"{'s' if len(self.layers) > 1 else ''} {', '.join(map(str, self.layers))} ({'; '.join(parts)}), "
            f"more than {self.rule.k:g} paired standard errors and {self.rule.min_drop:.0%}{stopping}"
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
            "k": self.rule.k,
            "min_drop": self.rule.min_drop,
            "stop": self.rule.stop,
        }


def falls(result: ProbeResult, baseline: ProbeResult, metric: str) -> tuple[list[float], list[float], list[float]]:
    """Per hidden state of ``result``: the fall of ``metric`` since ``baseline``, its paired standard error,
    and the baseline's value (NaN where the baseline lacks the hidden state or the metric)."""
    name, sign = _COMPARISONS[metric]
    nan = [math.nan] * len(result.layers)
    fall = [sign * value for value in result.differences(baseline).get(name, nan)]
    error = result.difference_errors(baseline).get(name, nan)
    index = {layer: position for position, layer in enumerate(baseline.layers)}
    values = baseline.per_layer.get(metric)
    before = [values[index[layer]] if values and layer in index else math.nan for layer in result.layers]
    return fall, error, before


class Alarm:
    """The alarm's state in one run: the baselines it needs (the last ``window`` exact probes, not the
    history), whether an episode is on, and whether it asked training to stop."""

    def __init__(self, rule: CollapseAlert, every_n_steps: int) -> None:
        self.rule = rule
        self.warmup = every_n_steps if rule.warmup is None else rule.warmup
        self.trail: deque[tuple[int, ProbeResult]] = deque(maxlen=rule.window)
        self.in_episode = False
        self.stop_requested = False
        self.alerts: list[Alert] = []

    def check(self, result: ProbeResult, reference: ProbeResult | None, step: int) -> Alert | None:
        """The alert of the probe at ``step``, if it starts an episode; None otherwise (and for cheap probes)."""
        metric = self.rule.metric
        if metric not in result.per_layer or step < self.warmup:
            return None
        if not any(math.isfinite(value) for value in result.per_layer[metric]):
            return None  # a probe without a finite value is no baseline (nor compared: its falls are NaN)
        since, baseline = (
            (None, reference) if self.rule.baseline == "reference" else (self.trail[0] if self.trail else (None, None))
        )
        self.trail.append((step, result))
        if baseline is None:
            return None
        fall, error, before = falls(result, baseline, metric)
        now = result.per_layer[metric]
        fired = [
            position
            for position in range(len(result.layers))
            if fall[position] > self.rule.k * error[position] and fall[position] > self.rule.min_drop * before[position]
        ]
        if not fired:
            self.in_episode = False
            return None
        if self.in_episode:
            return None
        self.in_episode = True
        self.stop_requested = self.stop_requested or self.rule.stop
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
        )
        self.alerts.append(alert)
        return alert

    def observe(self, result: ProbeResult, reference: ProbeResult | None, step: int, sinks: SinkSet | None) -> None:
        """:meth:`check` on every process; ``sinks`` (the main process's) hear of an alert."""
        alert = self.check(result, reference, step)
        if alert is not None and sinks is not None:
            announce(alert, sinks, strict=sinks.guard.strict)

    def state_dict(self) -> dict[str, Any]:
        """The episode and the window's baselines: plain values (JSON, ``torch.load(weights_only=True)``)."""
        return {
            "in_episode": self.in_episode,
            "trail": [[step, result.to_dict()] for step, result in self.trail],
            "alerts": len(self.alerts),
        }

    def load_state_dict(self, state: Any) -> None:
        """Continue a saved episode and window; an unreadable state (another version, hand edited) starts afresh."""
        if state is None:
            return
        try:
            trail = [(int(step), ProbeResult.from_dict(result)) for step, result in state["trail"]]
            in_episode = bool(state["in_episode"])
        except (KeyError, TypeError, ValueError) as error:
            warnings.warn(
                f"the saved state of the collapse alarm is unreadable ({type(error).__name__}: {error}); "
                "its window starts afresh",
                MNNWarning,
                stacklevel=4,
            )
            return
        self.trail.clear()
        self.trail.extend(trail[-self.rule.window :])
        self.in_episode = in_episode


def announce(alert: Alert, sinks: SinkSet, *, strict: bool = False) -> None:
    """The main process's announcement: every sink's ``log_alert``, then one :class:`CollapseWarning`.

    The sinks first: a warnings filter that turns warnings into errors loses no ``alert`` event.
    Under ``strict`` it stays a warning: the alarm is the monitor's finding, not its failure.
    """
    sinks.log_alert(alert.title, alert.message(), alert.step, **alert.fields())
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("default", CollapseWarning)
        warnings.warn(alert.message(), CollapseWarning, stacklevel=5)
