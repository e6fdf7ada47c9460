"""Figures of probe results: dynamics over steps, layer x step heatmaps, model families, MNN vs nuclear norm.

Works on a *long table*: one dict per (model, step, layer) with the metric values, as written
to ``metrics.csv`` by ``mnn-callback evaluate`` (:func:`load_table` also reads the callback's
``mnn_metrics.jsonl``). matplotlib is imported lazily with the Agg backend, and every figure
is closed after saving, so plotting in a long run does not grow memory.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from mnn_callback.files import read_jsonl

__all__ = [
    "METRIC_LABELS",
    "layer_profile_figure",
    "load_table",
    "plot_all",
    "plot_approximation",
    "plot_dynamics",
    "plot_family",
    "plot_heatmaps",
    "run_of",
    "save_figure",
    "table_from_history",
]

METRIC_LABELS = {
    "mnn": "MNN (lower = more compressed)",
    "matrix_entropy": "Matrix Entropy H / ln d",
    "erank": "effective rank",
    "nuclear_norm": "exact nuclear norm / n",
    "renyi2_entropy": "Rényi-2 entropy / ln d",
    "diff_erank": "Diff-eRank (reference - current)",
    "loss": "probe loss (nats / token)",
    "perplexity": "probe perplexity",
}
NUMERIC = ("step", "params", "layer", *METRIC_LABELS, "sequences", "nan_sequences")
_LAYER_KEY = re.compile(r"^(mnn|nuclear_norm|matrix_entropy|erank|diff_erank|renyi2_entropy)/layer_(\d+)$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "figure.dpi": 110})
    return plt


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def table_from_history(history: Iterable[dict[str, Any]], model: str = "run") -> list[dict[str, Any]]:
    """Long table from per-step records holding ``mnn/layer_{i}``-style keys (the callback's history)."""
    rows = []
    for record in history:
        if "step" not in record or "event" in record:
            continue
        per_layer: dict[int, dict[str, Any]] = defaultdict(dict)
        for key, value in record.items():
            match = _LAYER_KEY.match(key)
            if match:
                per_layer[int(match.group(2))][match.group(1)] = _number(value)
        for layer, values in sorted(per_layer.items()):
            rows.append(
                {
                    "model": model,
                    "step": _number(record["step"]),
                    "params": None,
                    "layer": layer,
                    **values,
                    "loss": _number(record.get("probe/loss")),
                    "perplexity": _number(record.get("probe/perplexity")),
                }
            )
    return rows


def load_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``metrics.csv`` (long format) or of a JSONL history (callback or ``evaluate`` output)."""
    path = os.fspath(path)
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        table = []
        for row in rows:
            if row.get("error"):
                continue
            table.append({key: (_number(value) if key in NUMERIC else value) for key, value in row.items()})
        return table
    records = read_jsonl(path)
    if records and "rows" in records[-1]:  # metrics.jsonl of `mnn-callback evaluate`
        return [row for record in records if not record.get("error") for row in record.get("rows", [])]
    return table_from_history(records, model=os.path.basename(os.path.dirname(os.path.abspath(path))) or "run")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_of(model: str) -> str:
    """The run a model belongs to: the directory of a ``checkpoint-N``, else the model itself."""
    stripped = model.rstrip("/")
    if re.fullmatch(r"checkpoint-\d+", os.path.basename(stripped)):
        return os.path.dirname(stripped) or stripped
    return model


def _models(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["model"] for row in rows))


def _runs(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(run_of(row["model"]) for row in rows))


def _layers_to_show(layers: Sequence[int], limit: int = 6) -> list[int]:
    """At most ``limit`` layers, evenly spread, always with the first and the last."""
    layers = sorted(set(layers))
    if len(layers) <= limit:
        return layers
    picks = {layers[round(i * (len(layers) - 1) / (limit - 1))] for i in range(limit)}
    return sorted(picks)


def save_figure(figure: Any, path: str) -> str:
    """Save ``figure`` as a PNG at ``path`` (directories created) and close it; returns the path."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not figure.get_constrained_layout() and figure.subplotpars.left == plt.rcParams["figure.subplot.left"]:
        figure.tight_layout()  # unless the figure has its own margins
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_dynamics(rows: Sequence[dict[str, Any]], path: str, layers: Sequence[int] | None = None) -> str | None:
    """MNN and Matrix Entropy against the training step, side by side; None without a run of 2+ steps.

    Checkpoints of one run directory form one series; several runs show their last layer each.
    """
    rows = [row for row in rows if _finite(row.get("step"))]
    steps_per_run = defaultdict(set)
    for row in rows:
        steps_per_run[run_of(row["model"])].add(row["step"])
    if max((len(steps) for steps in steps_per_run.values()), default=0) < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    models = _runs(rows)
    for axis, metric in zip(axes, ("mnn", "matrix_entropy"), strict=True):
        for model in models:
            model_rows = [row for row in rows if run_of(row["model"]) == model and _finite(row.get(metric))]
            available = sorted({row["layer"] for row in model_rows})
            shown = [available[-1]] if len(models) > 1 and available else (layers or _layers_to_show(available))
            colors = plt.cm.viridis([i / max(1, len(shown) - 1) for i in range(len(shown))])
            for layer, color in zip(shown, colors, strict=True):
                points = sorted((row["step"], row[metric]) for row in model_rows if row["layer"] == layer)
                label = f"{model} (layer {int(layer)})" if len(models) > 1 else f"layer {int(layer)}"
                axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", color=color, label=label)
        axis.set_xlabel("training step")
        axis.set_ylabel(METRIC_LABELS[metric])
        axis.set_title(f"{METRIC_LABELS[metric].split(' (')[0]} during training")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=9)
    return save_figure(figure, path)


def _grid(rows: Sequence[dict[str, Any]], metric: str) -> tuple[list[float], list[int], list[list[float]]]:
    steps = sorted({row["step"] for row in rows})
    layers = sorted({int(row["layer"]) for row in rows})
    values = {(row["step"], int(row["layer"])): row.get(metric) for row in rows}
    grid = [
        [values.get((step, layer)) if _finite(values.get((step, layer))) else math.nan for step in steps]
        for layer in layers
    ]
    return steps, layers, grid


def heatmap_figure(rows: Sequence[dict[str, Any]], metric: str, title: str | None = None) -> Any:
    """A layer x step heatmap of ``metric`` (rows of one model)."""
    plt = _pyplot()
    steps, layers, grid = _grid(rows, metric)
    figure, axis = plt.subplots(figsize=(max(6.0, min(14.0, 0.35 * len(steps) + 4)), max(3.5, 0.3 * len(layers) + 2)))
    image = axis.imshow(grid, aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
    tick_every = max(1, len(steps) // 10)
    axis.set_xticks(range(0, len(steps), tick_every))
    axis.set_xticklabels([f"{steps[i]:g}" for i in range(0, len(steps), tick_every)], rotation=45)
    axis.set_yticks(range(len(layers)))
    axis.set_yticklabels([str(layer) for layer in layers])
    axis.set_xlabel("training step")
    axis.set_ylabel("hidden-state index (0 = embeddings)")
    axis.set_title(title or f"{METRIC_LABELS.get(metric, metric)}: layer x step")
    figure.colorbar(image, ax=axis, label=METRIC_LABELS.get(metric, metric))
    return figure


def plot_heatmaps(
    rows: Sequence[dict[str, Any]], out_dir: str, metrics: Sequence[str] = ("mnn", "matrix_entropy")
) -> list[str]:
    """One layer x step heatmap per metric and run with at least two steps."""
    paths = []
    models = _runs(rows)
    for model in models:
        model_rows = [row for row in rows if run_of(row["model"]) == model and _finite(row.get("step"))]
        if len({row["step"] for row in model_rows}) < 2:
            continue
        suffix = "" if len(models) == 1 else "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
        for metric in metrics:
            figure = heatmap_figure(model_rows, metric, f"{METRIC_LABELS[metric].split(' (')[0]} by layer and step")
            paths.append(save_figure(figure, os.path.join(out_dir, f"heatmap_{metric}{suffix}.png")))
    return paths


def plot_family(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """Each metric of the final hidden state against parameter count (log axis); None without a family."""
    final: dict[str, dict[str, Any]] = {}
    for model in _models(rows):
        model_rows = [row for row in rows if row["model"] == model and _finite(row.get("params"))]
        if not model_rows:
            continue
        last_step = max((row["step"] for row in model_rows if _finite(row.get("step"))), default=None)
        at_step = [row for row in model_rows if last_step is None or row.get("step") == last_step]
        final[model] = max(at_step, key=lambda row: row["layer"])
    if len({row["params"] for row in final.values()}) < 2:
        return None
    plt = _pyplot()
    metrics = [m for m in ("mnn", "matrix_entropy", "erank", "loss") if any(_finite(r.get(m)) for r in final.values())]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4))
    points = sorted(final.items(), key=lambda item: item[1]["params"])
    for axis, metric in zip(axes if len(metrics) > 1 else [axes], metrics, strict=True):
        xs = [row["params"] for _, row in points]
        axis.plot(xs, [row.get(metric) for _, row in points], marker="o")
        for model, row in points:
            axis.annotate(os.path.basename(run_of(model).rstrip("/")), (row["params"], row.get(metric)), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(METRIC_LABELS[metric])
        axis.set_title(METRIC_LABELS[metric].split(" (")[0] + " vs model size")
        axis.grid(alpha=0.3, which="both")
    return save_figure(figure, path)


def plot_approximation(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """MNN against the exact nuclear norm it approximates, per layer, with the line y = x."""
    rows = [row for row in rows if _finite(row.get("mnn")) and _finite(row.get("nuclear_norm"))]
    if not rows:
        return None
    plt = _pyplot()
    figure, (scatter, ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = sorted({int(row["layer"]) for row in rows})
    colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for layer, color in zip(layers, colors, strict=True):
        layer_rows = [row for row in rows if int(row["layer"]) == layer]
        scatter.scatter(
            [r["nuclear_norm"] for r in layer_rows],
            [r["mnn"] for r in layer_rows],
            s=12,
            color=color,
            label=f"layer {layer}",
        )
    low = min(min(r["mnn"] for r in rows), min(r["nuclear_norm"] for r in rows))
    high = max(max(r["mnn"] for r in rows), max(r["nuclear_norm"] for r in rows))
    scatter.plot([low, high], [low, high], color="grey", linestyle="--", label="MNN = nuclear norm")
    scatter.set_xlabel("exact nuclear norm of Z / n")
    scatter.set_ylabel("MNN")
    scatter.set_title("MNN vs the nuclear norm it approximates")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8, ncol=2)
    ratios = [[r["mnn"] / r["nuclear_norm"] for r in rows if int(r["layer"]) == layer] for layer in layers]
    ratio.boxplot(ratios, positions=layers)
    ratio.axhline(1.0, color="grey", linestyle="--")
    ratio.set_xlabel("hidden-state index")
    ratio.set_ylabel("MNN / nuclear norm")
    ratio.set_title("approximation ratio per layer (over all steps and models)")
    ratio.grid(alpha=0.3)
    return save_figure(figure, path)


def layer_profile_figure(history: Sequence[dict[str, Any]], metrics: Sequence[str] = ("mnn", "matrix_entropy")) -> Any:
    """Metric against layer index at the latest step, over a few earlier steps in fading colour."""
    plt = _pyplot()
    table = table_from_history(history[-5:])
    steps = sorted({row["step"] for row in table})
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4))
    for axis, metric in zip(axes if len(metrics) > 1 else [axes], metrics, strict=True):
        for rank, step in enumerate(steps):
            points = sorted((row["layer"], row.get(metric)) for row in table if row["step"] == step)
            latest = rank == len(steps) - 1
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o" if latest else ".",
                color="C3" if latest else "C0",
                alpha=1.0 if latest else 0.25 + 0.5 * rank / max(1, len(steps) - 1),
                linewidth=2.2 if latest else 1.0,
                label=f"step {step:g}" + (" (now)" if latest else ""),
            )
        axis.set_xlabel("hidden-state index (0 = embeddings)")
        axis.set_ylabel(METRIC_LABELS.get(metric, metric))
        axis.set_title(f"{METRIC_LABELS.get(metric, metric).split(' (')[0]} by layer")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    # fixed margins: tight_layout would draw the figure once more just to measure it
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.91, wspace=0.28)
    return figure


def plot_all(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """Every figure the rows allow, as PNGs in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [
        plot_dynamics(rows, os.path.join(out_dir, "dynamics.png")),
        *plot_heatmaps(rows, out_dir),
        plot_family(rows, os.path.join(out_dir, "family.png")),
        plot_approximation(rows, os.path.join(out_dir, "approximation.png")),
    ]
    return [path for path in paths if path]
