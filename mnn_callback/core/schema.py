"""The metric schema: every logged quantity is declared once, here.

The fields the probe accumulates, the flat keys of the sinks and of the JSONL history, the
dashboard charts, the plots' labels and the CSV columns are all derived from the two tables
below. Adding a metric means computing it per sequence in :mod:`mnn_callback.core.metrics` and
adding a row to :data:`LAYER_METRICS`; nothing else.

Flat keys: ``{name}/layer_{i}`` per hidden state ``i``, ``{name}_se/layer_{i}`` for standard
errors, ``{name}/last`` for the headline metrics of the final hidden state, ``probe/{field}`` for
the probe as a whole. This module is the only one that builds or reads those strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CSV_COLUMNS",
    "IDENTITY_COLUMNS",
    "LAYER_METRICS",
    "PROBE_FIELDS",
    "LayerMetric",
    "ProbeField",
    "averaged_fields",
    "derive_layer",
    "flatten",
    "headline_key",
    "label",
    "layer_key",
    "long_rows",
    "metric",
    "number",
    "probe_key",
    "se_key",
    "title",
]


@dataclass(frozen=True)
class LayerMetric:
    """One value per probed hidden state.

    ``averaged``: the mean over sequences of the per-sequence value of the same name returned by
    :func:`~mnn_callback.core.metrics.compute_metrics`, logged with its standard error. Otherwise the
    value comes from ``derive`` (the layer's other values), or compares a metric between the
    reference (the Diff-eRank reference, the first probe by default) and now: ``difference_of``
    is reference minus now, ``change_of`` now minus reference.

    Standard errors: of the mean over sequences for an averaged metric; by the delta method for a
    derived metric that is a smooth function of one averaged mean (``linear_in``: that field, and
    the derivative with respect to it, from the layer's values); paired, from the per-sequence
    values of both probes, for a comparison (the sample is the same sequences).
    """

    name: str
    title: str  # chart titles: "{title} by layer"
    label: str  # axis labels
    description: str
    spectral: bool = False  # needs the spectrum: left out of method="cheap" probes
    averaged: bool = True
    derive: Callable[[Mapping[str, float]], float] | None = None
    difference_of: str | None = None
    change_of: str | None = None
    linear_in: tuple[str, Callable[[Mapping[str, float]], float]] | None = None
    logged: bool = True  # False: an ingredient of another metric, not a key of its own
    headline: bool = False  # also logged as {name}/last: the final hidden state, the layer the MNN paper reports


@dataclass(frozen=True)
class ProbeField:
    """One value per probe (``probe/{name}``)."""

    name: str
    label: str
    description: str
    csv: bool = True


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


LAYER_METRICS: tuple[LayerMetric, ...] = (
    LayerMetric(
        "mnn",
        "MNN",
        "MNN",
        "Matrix Nuclear-Norm: (1/n) x the min(n, d) largest column norms of Z; set mostly by n and d, and "
        "basis-dependent (see mnn_vs_noise)",
        headline=True,
    ),
    LayerMetric(
        "mnn_vs_noise",
        "MNN / noise floor",
        "MNN / E[MNN of noise]",
        "MNN divided by its expectation for i.i.d. Gaussian hidden states of the same n and d (1: random directions)",
        headline=True,
    ),
    LayerMetric(
        "nuclear_norm",
        "exact nuclear norm",
        "exact nuclear norm / n",
        "exact nuclear norm of the same Z, on MNN's scale",
        spectral=True,
    ),
    LayerMetric(
        "matrix_entropy",
        "Matrix Entropy",
        "Matrix Entropy H / ln d",
        "Shannon entropy of the normalised spectrum of Z^T Z, divided by ln d (lower: fewer directions)",
        spectral=True,
        headline=True,
    ),
    LayerMetric("entropy_nats", "Matrix Entropy (nats)", "H (nats)", "H in nats", spectral=True, logged=False),
    LayerMetric(
        "erank",
        "eRank",
        "effective rank",
        "data-set eRank exp(mean H)",
        spectral=True,
        averaged=False,
        derive=lambda values: math.exp(values["entropy_nats"]),
        linear_in=("entropy_nats", lambda values: values["erank"]),  # d exp(m) / dm = exp(m)
    ),
    LayerMetric(
        "diff_erank",
        "Diff-eRank",
        "Diff-eRank (reference - current)",
        "eRank of the reference minus eRank now (positive: more compressed than the reference)",
        spectral=True,
        averaged=False,
        difference_of="erank",
    ),
    LayerMetric(
        "mnn_change",
        "MNN change since the reference",
        "MNN now - reference",
        "MNN now minus MNN at the reference, with the paired standard error of that change",
        averaged=False,
        change_of="mnn",
        headline=True,
    ),
    LayerMetric(
        "mnn_vs_noise_change",
        "MNN / noise floor, change since the reference",
        "MNN / E[MNN of noise], now - reference",
        "mnn_vs_noise now minus at the reference, with the paired standard error of that change",
        averaged=False,
        change_of="mnn_vs_noise",
    ),
    LayerMetric(
        "matrix_entropy_change",
        "Matrix Entropy change since the reference",
        "Matrix Entropy now - reference",
        "Matrix Entropy now minus at the reference, with the paired standard error of that change",
        spectral=True,
        averaged=False,
        change_of="matrix_entropy",
        headline=True,
    ),
    LayerMetric(
        "renyi2_entropy",
        "Rényi-2 entropy",
        "Rényi-2 entropy / ln d",
        "order-2 spectral entropy, exact and nearly free; not the Shannon entropy",
    ),
    LayerMetric(
        "mnn_ratio",
        "MNN / exact nuclear norm (approximation ratio)",
        "MNN / exact nuclear norm",
        "MNN divided by the exact nuclear norm: how good the approximation is, layer by layer",
        spectral=True,
        averaged=False,
        derive=lambda values: _ratio(values["mnn"], values["nuclear_norm"]),
    ),
)

PROBE_FIELDS: tuple[ProbeField, ...] = (
    ProbeField("loss", "probe loss (nats / token)", "token-weighted next-token NLL on the sample (causal LMs)"),
    ProbeField("perplexity", "probe perplexity", "exp of the probe loss"),
    ProbeField("sequences", "sequences", "sequences in the sample"),
    ProbeField("tokens", "tokens", "valid tokens in the sample"),
    ProbeField("nan_sequences", "NaN sequences", "sequences whose metrics are NaN in some layer"),
    ProbeField("min_tokens", "fewest tokens", "tokens of the shortest sequence, as the metrics count them (n)"),
    ProbeField("mean_tokens", "mean tokens", "mean tokens per sequence the metrics use"),
    ProbeField("max_tokens", "most tokens", "tokens of the longest sequence the metrics use"),
    ProbeField("seconds", "probe seconds", "wall time of the probe", csv=False),
    ProbeField("time_share", "probe time share", "share of the training wall time spent in probes", csv=False),
    ProbeField("errors", "monitor errors", "probes or sinks that failed so far", csv=False),
    ProbeField("skipped", "skipped probes", "scheduled probes skipped to stay under max_overhead", csv=False),
)

IDENTITY_COLUMNS = ("model", "revision", "base", "step", "params", "hidden_size", "layer")  # base: a PEFT adapter's

_BY_NAME = {row.name: row for row in (*LAYER_METRICS, *PROBE_FIELDS)}
_LAYER_KEY = re.compile(r"^(?P<name>\w+?)(?P<se>_se)?/layer_(?P<layer>\d+)$")


def metric(name: str) -> LayerMetric | ProbeField:
    """The schema row of ``name`` (``KeyError`` for an unknown one)."""
    return _BY_NAME[name]


def title(name: str) -> str:
    """Chart title of a layer metric (its name for anything else)."""
    row = _BY_NAME.get(name)
    return row.title if isinstance(row, LayerMetric) else name


def label(name: str) -> str:
    """Axis label of a metric or probe field (a standard error ``{name}_se`` gets its metric's label)."""
    base = name.removesuffix("_se")
    if base not in _BY_NAME:
        return name
    return _BY_NAME[base].label + (" (standard error)" if name.endswith("_se") else "")


def layer_key(name: str, layer: int) -> str:
    return f"{name}/layer_{layer}"


def se_key(name: str, layer: int) -> str:
    return f"{name}_se/layer_{layer}"


def headline_key(name: str) -> str:
    return f"{name}/last"


def probe_key(name: str) -> str:
    return f"probe/{name}"


def logged_layer_metrics(spectral: bool = True) -> tuple[LayerMetric, ...]:
    """The layer metrics that have keys of their own; without the spectral ones for cheap probes."""
    return tuple(row for row in LAYER_METRICS if row.logged and (spectral or not row.spectral))


def averaged_fields(spectral: bool = True) -> tuple[str, ...]:
    """Names of the per-sequence values the probe averages (the accumulator's fields)."""
    return tuple(row.name for row in LAYER_METRICS if row.averaged and (spectral or not row.spectral))


def derive_layer(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` (one layer's means) with every derived metric whose ingredients are present."""
    out = dict(values)
    for row in LAYER_METRICS:
        if row.derive is not None:
            try:
                out[row.name] = float(row.derive(out))
            except KeyError:  # an ingredient is absent (a cheap probe)
                continue
            except (OverflowError, ValueError):
                out[row.name] = math.nan
    return out


def derive_errors(values: Mapping[str, float], errors: Mapping[str, float]) -> dict[str, float]:
    """``errors`` (one layer's standard errors) with the delta-method ones of the ``linear_in`` metrics."""
    out = dict(errors)
    for row in LAYER_METRICS:
        if row.linear_in is not None and row.name in values and row.linear_in[0] in errors:
            field, slope = row.linear_in
            try:
                out[row.name] = abs(float(slope(values))) * errors[field]
            except (KeyError, OverflowError, ValueError):
                out[row.name] = math.nan
    return out


def compared(name: str) -> tuple[str, float] | None:
    """``(metric, sign)`` of a comparison row: the metric it compares and +1 (now - reference) or -1."""
    row = _BY_NAME.get(name)
    if not isinstance(row, LayerMetric):
        return None
    if row.change_of:
        return row.change_of, 1.0
    if row.difference_of:
        return row.difference_of, -1.0
    return None


def linearisation(name: str, values: Mapping[str, float]) -> tuple[str, float] | None:
    """The averaged field whose mean ``name`` is a smooth function of, and the derivative (1 for itself)."""
    row = _BY_NAME.get(name)
    if isinstance(row, LayerMetric) and row.averaged:
        return name, 1.0
    if isinstance(row, LayerMetric) and row.linear_in is not None:
        try:
            return row.linear_in[0], float(row.linear_in[1](values))
        except (KeyError, OverflowError, ValueError):
            return None
    return None


def differences(current: Mapping[str, float], reference: Mapping[str, float] | None) -> dict[str, float]:
    """The comparison metrics of one layer: ``difference_of`` reference minus now, ``change_of`` now minus it."""
    if reference is None:
        return {}
    out = {}
    for row in LAYER_METRICS:
        compared_row = compared(row.name)
        if compared_row is None:
            continue
        name, sign = compared_row
        if name in current and name in reference:
            out[row.name] = float(sign * (current[name] - reference[name]))
    return out


def flatten(
    layers: Sequence[int],
    per_layer: Mapping[str, Sequence[float]],
    standard_errors: Mapping[str, Sequence[float]],
    probe: Mapping[str, float],
    final_layer: int | None,
) -> dict[str, float]:
    """Flat ``{key: float}`` of one probe: per-layer values and standard errors, headline keys, probe fields."""
    out: dict[str, float] = {}
    for row in LAYER_METRICS:
        if not row.logged or row.name not in per_layer:
            continue
        for layer, value in zip(layers, per_layer[row.name], strict=True):
            out[layer_key(row.name, layer)] = float(value)
    for name, values in standard_errors.items():
        if metric(name).logged:
            for layer, value in zip(layers, values, strict=True):
                out[se_key(name, layer)] = float(value)
    if final_layer is not None and final_layer in layers:
        for row in LAYER_METRICS:
            if row.headline and layer_key(row.name, final_layer) in out:
                out[headline_key(row.name)] = out[layer_key(row.name, final_layer)]
    for field in PROBE_FIELDS:
        if field.name in probe and probe[field.name] is not None:
            out[probe_key(field.name)] = float(probe[field.name])
    return out


def number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def long_rows(record: Mapping[str, Any], identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-layer rows (CSV form) of one flat record (a history entry or a JSONL line).

    Each row holds ``identity`` (model, step, ...), ``layer``, every layer metric and standard
    error of that layer, and the probe fields. Records without layer keys give no rows.
    """
    per_layer: dict[int, dict[str, float | None]] = {}
    for key, value in record.items():
        match = _LAYER_KEY.match(key)
        if match and match["name"] in _BY_NAME:
            column = match["name"] + (match["se"] or "")
            per_layer.setdefault(int(match["layer"]), {})[column] = number(value)
    probe = {field.name: number(record.get(probe_key(field.name))) for field in PROBE_FIELDS}
    return [{**identity, "layer": layer, **values, **probe} for layer, values in sorted(per_layer.items())]


def has_standard_error(row: LayerMetric) -> bool:
    return row.averaged or row.linear_in is not None or compared(row.name) is not None


def result_columns() -> tuple[str, ...]:
    """Metric columns of the long table: logged layer metrics, their standard errors, probe fields."""
    values = [row.name for row in LAYER_METRICS if row.logged]
    errors = [f"{row.name}_se" for row in LAYER_METRICS if row.logged and has_standard_error(row)]
    probe = [field.name for field in PROBE_FIELDS if field.csv]
    return (*values, *errors, *probe)


CSV_COLUMNS: tuple[str, ...] = (*IDENTITY_COLUMNS, *result_columns(), "error")


def numeric_columns() -> frozenset[str]:
    """Columns of the long table that hold numbers (the rest are names)."""
    return frozenset(column for column in CSV_COLUMNS if column not in ("model", "revision", "base", "error"))


def rows_by(rows: Iterable[Mapping[str, Any]], column: str) -> dict[Any, list[Mapping[str, Any]]]:
    """Rows grouped by the value of ``column``, in first-seen order."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get(column), []).append(row)
    return groups
