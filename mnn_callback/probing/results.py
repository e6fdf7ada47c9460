"""ProbeResult: the data-set metrics of one probe, their flat keys, and their JSON form."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mnn_callback.core import schema
from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.regime import regime
from mnn_callback.core.uncertainty import paired_standard_error

__all__ = ["DashboardImage", "Measurement", "ProbeResult"]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass
class ProbeResult:
    """Data-set metrics of one probe run.

    ``per_layer[name][j]`` is metric ``name`` (see :mod:`mnn_callback.core.schema`) at hidden-state
    index ``layers[j]``: means over sequences (``mnn``, ``nuclear_norm``, ``matrix_entropy``,
    ``entropy_nats``, ``renyi2_entropy``) and the values derived from them (``erank`` =
    exp(mean entropy in nats), ``mnn_ratio``); ``standard_errors[name][j]`` the standard error of
    each mean over sequences. A probe with ``method="cheap"`` has no spectral metrics. ``loss`` is
    the token-weighted mean next-token NLL in nats (None when the model has no language-model head).
    """

    layers: list[int]
    per_layer: dict[str, list[float]]
    loss: float | None
    sequences: int
    tokens: int
    nan_sequences: int
    seconds: float
    fingerprint: str
    num_hidden_states: int
    config: dict[str, Any] = field(default_factory=dict)
    standard_errors: dict[str, list[float]] = field(default_factory=dict)
    hidden_size: int | None = None
    token_range: tuple[int, float, int] | None = None  # (min, mean, max) tokens per sequence the metrics use
    # with Probe.run(per_sequence=True): per metric, per layer, each sequence's value (the sample's order)
    per_sequence: dict[str, list[list[float]]] | None = None

    @property
    def final_layer(self) -> int:
        return self.num_hidden_states - 1

    @property
    def perplexity(self) -> float | None:
        """``exp(loss)``; inf when that overflows, NaN for a NaN loss."""
        if self.loss is None:
            return None
        return math.exp(self.loss) if not self.loss > 700 else math.inf

    @property
    def regime(self) -> str | None:
        """The tokens per sequence against the hidden size (:func:`~mnn_callback.core.regime.regime`; None: unknown)."""
        if self.hidden_size is None or self.token_range is None:
            return None
        return regime(int(self.token_range[0]), int(self.token_range[2]), int(self.hidden_size))

    def probe_values(self) -> dict[str, float]:
        """The probe-level fields of :data:`~mnn_callback.core.schema.PROBE_FIELDS` this result knows."""
        values: dict[str, float] = {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "nan_sequences": self.nan_sequences,
            "seconds": float(self.seconds),
        }
        if self.loss is not None:
            values["loss"] = float(self.loss)
            values["perplexity"] = float(self.perplexity)
        if self.token_range is not None:
            values["min_tokens"], values["mean_tokens"], values["max_tokens"] = self.token_range
        return values

    @property
    def metrics(self) -> dict[str, float]:
        """Flat ``{key: float}``: ``mnn/layer_{i}`` and the like per layer, their standard errors
        (``mnn_se/layer_{i}``), the headline keys of the final hidden state (``mnn/last``), then
        ``probe/...``."""
        return schema.flatten(self.layers, self.per_layer, self.standard_errors, self.probe_values(), self.final_layer)

    def differences(self, reference: ProbeResult) -> dict[str, list[float]]:
        """Per metric with a ``difference_of`` (Diff-eRank): reference minus now, per layer (NaN where the
        reference lacks the layer or the metric)."""
        index = {layer: position for position, layer in enumerate(reference.layers)}
        out: dict[str, list[float]] = {}
        for position, layer in enumerate(self.layers):
            current = {name: values[position] for name, values in self.per_layer.items()}
            ref = None
            if layer in index:
                ref = {name: values[index[layer]] for name, values in reference.per_layer.items()}
            for name, value in schema.differences(current, ref).items():
                out.setdefault(name, [math.nan] * len(self.layers))[position] = value
        return out

    def layer(self, position: int) -> dict[str, float]:
        """Every value of the layer at ``position`` of :attr:`layers`, by metric name."""
        return {name: values[position] for name, values in self.per_layer.items()}

    def pairs_with(self, reference: ProbeResult) -> bool:
        """Whether comparisons with ``reference`` get paired standard errors: the same sample
        (equal fingerprints), and both results kept each sequence's values."""
        return self.fingerprint == reference.fingerprint and bool(self.per_sequence) and bool(reference.per_sequence)

    def difference_errors(self, reference: ProbeResult, *, warn: bool = True) -> dict[str, list[float]]:
        """Standard errors of :meth:`differences`, per layer.

        Paired when both results kept each sequence's values (``per_sequence``: :meth:`Probe.run
        <mnn_callback.probing.probe.Probe.run>` by default, the monitor always) of the same sample:
        from the per-sequence differences, delta method for eRank. Else those of two independent
        means, ``sqrt(SE_now^2 + SE_ref^2)``: on the same sample (equal fingerprints) they are too
        wide whenever the sequences keep their order, and an
        :class:`~mnn_callback.core.errors.MNNWarning` says which side lacks the per-sequence values
        (``warn=False``: not, for a caller that said so once already).
        """
        if warn:
            self._warn_if_unpaired(reference)
        index = {layer: position for position, layer in enumerate(reference.layers)}
        out: dict[str, list[float]] = {}
        for name in self.differences(reference):
            errors = [math.nan] * len(self.layers)
            for position, layer in enumerate(self.layers):
                if layer in index:
                    errors[position] = self._comparison_error(reference, name, position, index[layer])
            out[name] = errors
        return out

    def _warn_if_unpaired(self, reference: ProbeResult) -> None:
        """One warning when both results measured the same sample but a side kept no per-sequence values."""
        if self.fingerprint != reference.fingerprint:
            return
        missing = [
            side for side, result in (("this result", self), ("the reference", reference)) if not result.per_sequence
        ]
        if missing:
            warnings.warn(
                f"both results measured the same sample (fingerprint {self.fingerprint}), but {' and '.join(missing)} "
                "kept no per-sequence values: the standard errors of the differences are those of two independent "
                "means, wider than the paired ones; run the probe with per_sequence=True (the default) on both",
                MNNWarning,
                stacklevel=3,
            )

    def _comparison_error(self, reference: ProbeResult, name: str, position: int, reference_position: int) -> float:
        metric = schema.compared(name)[0]
        now = schema.linearisation(metric, self.layer(position))
        then = schema.linearisation(metric, reference.layer(reference_position))
        if now is None or then is None:
            return math.nan
        field_name, slope = now
        paired = self.fingerprint == reference.fingerprint and field_name in (self.per_sequence or {})
        paired = paired and field_name in (reference.per_sequence or {})
        if paired:
            current = self.per_sequence[field_name][position]
            before = reference.per_sequence[field_name][reference_position]
            if len(current) == len(before):
                return paired_standard_error(current, before, slope, then[1])
        now_error = self.standard_errors.get(field_name, [math.nan] * len(self.layers))[position]
        then_error = reference.standard_errors.get(field_name, [math.nan] * len(reference.layers))[reference_position]
        return math.hypot(slope * now_error, then[1] * then_error)

    def diff_erank(self, reference: ProbeResult) -> dict[str, float]:
        """``diff_erank/layer_{i}`` = eRank of ``reference`` minus eRank of this result, for shared layers.

        Positive when this model's representation is more compressed than the reference's.
        """
        values = self.differences(reference).get("diff_erank")
        if values is None:
            return {}
        return {
            schema.layer_key("diff_erank", layer): value
            for layer, value in zip(self.layers, values, strict=True)
            if layer in reference.layers
        }

    def finite_layers(self) -> list[int]:
        """The hidden states with finite values (eRank's; MNN's in a cheap probe): those a reference can serve."""
        values = self.per_layer.get("erank", self.per_layer.get("mnn", []))
        return [layer for layer, value in zip(self.layers, values, strict=True) if math.isfinite(value)]

    def with_layers_from(self, other: ProbeResult, layers: list[int]) -> ProbeResult:
        """This result with ``other``'s values (means, standard errors, each sequence's) at hidden states ``layers``.

        For a reference whose ``layers`` were not finite when it was measured; the probe-level
        fields (loss, tokens, ...) stay this result's. ``ValueError`` when ``other`` lacks a layer.
        """
        missing = [layer for layer in layers if layer not in other.layers]
        if missing:
            raise ValueError(f"expected a result holding hidden states {layers}, got one without {missing}")
        merged = ProbeResult.from_dict(self.to_dict())
        source = {layer: position for position, layer in enumerate(other.layers)}
        for position, layer in enumerate(merged.layers):
            if layer not in layers:
                continue
            for own, theirs in ((merged.per_layer, other.per_layer), (merged.standard_errors, other.standard_errors)):
                for name, values in own.items():
                    values[position] = theirs[name][source[layer]] if name in theirs else math.nan
            for name, values in (merged.per_sequence or {}).items():
                theirs = (other.per_sequence or {}).get(name)
                values[position] = list(theirs[source[layer]]) if theirs else [math.nan] * len(values[position])
        return merged

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite floats become None); inverse of :meth:`from_dict`."""

        def plain(table: Mapping[str, list[float]]) -> dict[str, list[float | None]]:
            return {name: [_finite_or_none(v) for v in values] for name, values in table.items()}

        return {
            "layers": list(self.layers),
            "per_layer": plain(self.per_layer),
            "standard_errors": plain(self.standard_errors),
            "loss": _finite_or_none(self.loss),
            "has_loss": self.loss is not None,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "nan_sequences": self.nan_sequences,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
            "num_hidden_states": self.num_hidden_states,
            "hidden_size": self.hidden_size,
            "token_range": None if self.token_range is None else list(self.token_range),
            "per_sequence": None
            if self.per_sequence is None
            else {
                name: [[_finite_or_none(v) for v in layer] for layer in layers]
                for name, layers in self.per_sequence.items()
            },
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        """The result a :meth:`to_dict` describes; ``KeyError``/``TypeError``/``ValueError`` when malformed."""
        layers = [int(layer) for layer in data["layers"]]
        means = {name: [_number(v) for v in values] for name, values in data["per_layer"].items()}
        if any(len(values) != len(layers) for values in means.values()):
            raise ValueError(f"per_layer lists must have one value per layer ({len(layers)})")
        columns = [schema.derive_layer({name: values[i] for name, values in means.items()}) for i in range(len(layers))]
        names = list(columns[0]) if columns else list(means)
        errors = {name: [_number(v) for v in values] for name, values in (data.get("standard_errors") or {}).items()}
        has_loss = data.get("has_loss", data.get("loss") is not None)
        return cls(
            layers=layers,
            per_layer={name: [column[name] for column in columns] for name in names},
            loss=_number(data.get("loss")) if has_loss else None,
            sequences=int(data["sequences"]),
            tokens=int(data["tokens"]),
            nan_sequences=int(data["nan_sequences"]),
            seconds=float(data["seconds"]),
            fingerprint=str(data["fingerprint"]),
            num_hidden_states=int(data.get("num_hidden_states") or max(layers) + 1),
            config=dict(data.get("config") or {}),
            standard_errors=derived_errors(columns, errors),
            hidden_size=data.get("hidden_size"),
            token_range=None if data.get("token_range") is None else tuple(data["token_range"]),
            per_sequence=None
            if data.get("per_sequence") is None
            else {
                name: [[_number(v) for v in layer] for layer in layers_]
                for name, layers_ in data["per_sequence"].items()
            },
        )

    @classmethod
    def load(cls, source: ProbeResult | Mapping[str, Any] | str | os.PathLike) -> ProbeResult:
        """A result from itself, its :meth:`to_dict`, or a JSON file holding one.

        The JSON may also be a checkpoint's ``mnn_metrics.json``: its ``reference`` entry is used.
        """
        if isinstance(source, ProbeResult):
            return source
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8") as handle:
                source = json.load(handle)
        if isinstance(source, Mapping):
            return cls.from_dict(source.get("reference", source))
        raise TypeError(
            "expected a model, a ProbeResult, its to_dict(), or the path of a JSON file holding one; "
            f"got {type(source).__name__}"
        )


def derived_errors(columns: list[dict[str, float]], errors: dict[str, list[float]]) -> dict[str, list[float]]:
    """``errors`` (per metric, per layer) with the delta-method standard errors of the derived metrics."""
    layers = [
        schema.derive_errors(column, {name: values[i] for name, values in errors.items()})
        for i, column in enumerate(columns)
    ]
    return {name: [layer[name] for layer in layers] for name in (layers[0] if layers else errors)}


@dataclass
class Measurement:
    """What the monitor hands to the sinks for one probe: the result in context.

    ``result`` is None when the probe failed (then only the ``monitor`` fields are known);
    ``differences`` holds the metrics measured against the Diff-eRank reference, per layer, and
    ``difference_errors`` their standard errors; ``monitor`` the monitor's own fields (``errors``,
    ``time_share``, ...).
    """

    step: int
    epoch: float | None
    result: ProbeResult | None
    differences: dict[str, list[float]] = field(default_factory=dict)
    monitor: dict[str, float] = field(default_factory=dict)
    difference_errors: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def against(
        cls,
        step: int,
        epoch: float | None,
        result: ProbeResult,
        reference: ProbeResult | None,
        monitor: dict[str, float] | None = None,
        *,
        warn: bool = True,
    ) -> Measurement:
        """The measurement of ``result``, compared with ``reference`` (none: no comparison metrics);
        ``warn``: as :meth:`ProbeResult.difference_errors`."""
        if reference is None:
            return cls(step, epoch, result, monitor=monitor or {})
        errors = result.difference_errors(reference, warn=warn)
        return cls(step, epoch, result, result.differences(reference), monitor or {}, errors)

    @property
    def layers(self) -> list[int]:
        return [] if self.result is None else list(self.result.layers)

    def layer_values(self) -> dict[str, list[float]]:
        """Every per-layer metric with a key of its own (means, derived values, differences), by name."""
        if self.result is None:
            return {}
        values = {**self.result.per_layer, **self.differences}
        return {row.name: values[row.name] for row in schema.LAYER_METRICS if row.logged and row.name in values}

    def probe_values(self) -> dict[str, float]:
        """The probe-level fields: the result's and the monitor's."""
        return {**({} if self.result is None else self.result.probe_values()), **self.monitor}

    def scalars(self) -> dict[str, float]:
        """Flat ``{key: float}`` of everything (the JSONL line, the Trainer's log entry)."""
        if self.result is None:
            return schema.flatten([], {}, {}, self.probe_values(), None)
        return schema.flatten(
            self.result.layers,
            self.layer_values(),
            {**self.result.standard_errors, **self.difference_errors},
            self.probe_values(),
            self.result.final_layer,
        )


@dataclass(frozen=True)
class DashboardImage:
    """A rendered dashboard figure: PNG bytes, the tag it is logged under, the step it belongs to."""

    tag: str
    png: bytes
    step: int
