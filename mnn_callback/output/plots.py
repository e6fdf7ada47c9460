"""Figures of probe results: dynamics over steps, layer x step heatmaps, model families, MNN vs nuclear norm.

Every function takes rows of the long table (:mod:`mnn_callback.output.tables`) and builds
``matplotlib.figure.Figure`` objects directly: no ``pyplot``, no backend switch, no change to
``rcParams``, so plotting inside training or a notebook leaves the user's matplotlib as it was.
Axis labels come from :mod:`mnn_callback.core.schema`.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mnn_callback.core import schema

__all__ = [
    "heatmap_figure",
    "layer_profile_figure",
    "new_figure",
    "plot_all",
    "plot_approximation",
    "plot_dynamics",
    "plot_family",
    "plot_heatmaps",
    "png_bytes",
    "run_of",
    "save_figure",
]

DPI = 110


def new_figure(width: float, height: float) -> Any:
    """A figure not registered with pyplot (garbage-collected like any object)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["viridis"](i / max(1, count - 1)) for i in range(count)]


def save_figure(figure: Any, path: str) -> str:
    """Save ``figure`` as a PNG at ``path`` (directories created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def png_bytes(figure: Any, dpi: float = DPI) -> bytes:
    """The figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def model_labels(models: Sequence[str]) -> dict[str, str]:
    """Short names that still tell the models apart: the shortest path suffix, at least two parts when
    there are (``run/checkpoint-400``), long enough that no two models share it.

    >>> model_labels(["/a/run/final", "/b/run/final"])
    {'/a/run/final': 'a/run/final', '/b/run/final': 'b/run/final'}
    """
    split = {model: [part for part in str(model).replace("\\", "/").split("/") if part] for model in models}
    longest = max((len(parts) for parts in split.values()), default=1)
    for size in range(2, longest + 1):
        labels = {model: "/".join(parts[-size:]) or model for model, parts in split.items()}
        if len(set(labels.values())) == len(split):
            return labels
    return {model: "/".join(parts) or model for model, parts in split.items()}


def run_of(model: str) -> str:
    """The run a model belongs to: the directory of a ``checkpoint-N``, else the model itself."""
    stripped = model.rstrip("/")
    if re.fullmatch(r"checkpoint-\d+", os.path.basename(stripped)):
        return os.path.dirname(stripped) or stripped
    return model


# A dashboard card: TensorBoard fits images into a box of about 460 x 210 px (aspect 2.2); at this size
# 1 pt of text shows as about 1.1 px there, so 8.5 pt and up stay readable.
COMPACT_SIZE = (5.7, 2.6)


def _compact_text(figure: Any) -> None:
    """Text sized for a dashboard card (a :data:`COMPACT_SIZE` figure shown about 460 px wide)."""
    for axis in figure.axes:
        axis.title.set_fontsize(10)
        axis.xaxis.label.set_fontsize(9)
        axis.yaxis.label.set_fontsize(9)
        axis.tick_params(labelsize=8.5)


def _error(row: dict[str, Any], metric: str) -> float:
    """The standard error of ``metric`` in ``row`` (0 when there is none: no bar)."""
    value = row.get(f"{metric}_se")
    return value if _finite(value) else 0.0


def _runs(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(run_of(row["model"]) for row in rows))


def _layers_to_show(layers: Sequence[int], limit: int = 6) -> list[int]:
    """At most ``limit`` layers, evenly spread, always with the first and the last."""
    layers = sorted(set(layers))
    if len(layers) <= limit:
        return layers
    return sorted({layers[round(i * (len(layers) - 1) / (limit - 1))] for i in range(limit)})


def plot_dynamics(rows: Sequence[dict[str, Any]], path: str, layers: Sequence[int] | None = None) -> str | None:
    """MNN and Matrix Entropy against the training step; None without a run of 2+ steps.

    Checkpoints of one run directory form one series; several runs show their last layer each.
    When the rows hold the changes since the reference (a monitor's history), a second row of
    panels shows them with their paired standard errors: the error bar for comparing steps of one
    run on its fixed sample (the per-mean standard errors answer another question, so the values
    themselves are drawn without bars).
    """
    rows = [row for row in rows if _finite(row.get("step"))]
    steps_per_run = defaultdict(set)
    for row in rows:
        steps_per_run[run_of(row["model"])].add(row["step"])
    if max((len(steps) for steps in steps_per_run.values()), default=0) < 2:
        return None
    changes = any(_finite(row.get("mnn_change")) for row in rows)
    figure = new_figure(12, 8.5 if changes else 4.5)
    axes = figure.subplots(2 if changes else 1, 2, squeeze=False)
    for axis, metric in zip(axes[0], ("mnn", "matrix_entropy"), strict=True):
        _dynamics_panel(axis, rows, metric, layers, bars=not changes)
        axis.set_title(f"{schema.title(metric)} during training")
    if changes:
        for axis, metric in zip(axes[1], ("mnn_change", "matrix_entropy_change"), strict=True):
            _dynamics_panel(axis, rows, metric, layers, bars=True)
            axis.axhline(0.0, color="0.5", linewidth=0.8)
            axis.set_title(f"{schema.title(metric)} (± 1 paired standard error)")
    figure.tight_layout()
    return save_figure(figure, path)


def _dynamics_panel(axis: Any, rows: Sequence[dict[str, Any]], metric: str, layers: Sequence[int] | None, bars: bool):
    runs = _runs(rows)
    for run in runs:
        run_rows = [row for row in rows if run_of(row["model"]) == run and _finite(row.get(metric))]
        available = sorted({row["layer"] for row in run_rows})
        shown = [available[-1]] if len(runs) > 1 and available else (layers or _layers_to_show(available))
        for layer, color in zip(shown, _colors(len(shown)), strict=True):
            points = sorted(
                (row["step"], row[metric], _error(row, metric) if bars else 0.0)
                for row in run_rows
                if row["layer"] == layer
            )
            if not points:
                continue
            label = f"{run} (layer {int(layer)})" if len(runs) > 1 else f"layer {int(layer)}"
            steps, values, errors = zip(*points, strict=True)
            axis.errorbar(steps, values, yerr=errors, marker=".", color=color, label=label, capsize=2)
    axis.set_xlabel("training step")
    axis.set_ylabel(schema.label(metric))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)


def _grid(rows: Sequence[dict[str, Any]], metric: str) -> tuple[list[float], list[int], list[list[float]]]:
    steps = sorted({row["step"] for row in rows})
    layers = sorted({int(row["layer"]) for row in rows})
    values = {(row["step"], int(row["layer"])): row.get(metric) for row in rows}
    grid = [
        [values.get((step, layer)) if _finite(values.get((step, layer))) else math.nan for step in steps]
        for layer in layers
    ]
    return steps, layers, grid


def heatmap_figure(rows: Sequence[dict[str, Any]], metric: str, title: str | None = None, compact: bool = False) -> Any:
    """A layer x step heatmap of ``metric`` (rows of one model); ``compact``: sized for a dashboard card."""
    steps, layers, grid = _grid(rows, metric)
    if compact:
        figure = new_figure(*COMPACT_SIZE)
    else:
        figure = new_figure(max(6.0, min(14.0, 0.35 * len(steps) + 4)), max(3.5, 0.3 * len(layers) + 2))
    axis = figure.subplots()
    image = axis.imshow(grid, aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
    tick_every = max(1, math.ceil(len(steps) / (7 if compact else 10)))
    axis.set_xticks(range(0, len(steps), tick_every))
    axis.set_xticklabels([f"{steps[i]:g}" for i in range(0, len(steps), tick_every)], rotation=0 if compact else 45)
    axis.set_yticks(range(len(layers)))
    axis.set_yticklabels([str(layer) for layer in layers])
    axis.set_xlabel("training step")
    axis.set_ylabel("hidden-state index (0 = embeddings)")
    axis.set_title(title or f"{schema.title(metric)} by layer and step")
    colorbar = figure.colorbar(image, ax=axis, label=schema.label(metric))
    if compact:
        axis.set_ylabel("hidden state")
        _compact_text(figure)
        colorbar.ax.tick_params(labelsize=8.5)
        colorbar.ax.yaxis.label.set_fontsize(9)
    figure.tight_layout()
    return figure


def plot_heatmaps(
    rows: Sequence[dict[str, Any]], out_dir: str, metrics: Sequence[str] = ("mnn", "matrix_entropy")
) -> list[str]:
    """One layer x step heatmap per metric and run with at least two steps."""
    paths = []
    runs = _runs(rows)
    for run in runs:
        run_rows = [row for row in rows if run_of(row["model"]) == run and _finite(row.get("step"))]
        if len({row["step"] for row in run_rows}) < 2:
            continue
        suffix = "" if len(runs) == 1 else "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", run)
        for metric in metrics:
            if any(_finite(row.get(metric)) for row in run_rows):
                figure = heatmap_figure(run_rows, metric)
                paths.append(save_figure(figure, os.path.join(out_dir, f"heatmap_{metric}{suffix}.png")))
    return paths


def plot_family(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """Each metric of the final hidden state against parameter count (log axis); None without a family."""
    from matplotlib.ticker import EngFormatter, NullFormatter

    final: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        model_rows = [row for row in rows if row["model"] == model and _finite(row.get("params"))]
        if not model_rows:
            continue
        last_step = max((row["step"] for row in model_rows if _finite(row.get("step"))), default=None)
        at_step = [row for row in model_rows if last_step is None or row.get("step") == last_step]
        final[model] = max(at_step, key=lambda row: row["layer"])
    if len({row["params"] for row in final.values()}) < 2:
        return None
    metrics = [
        m
        for m in ("mnn", "mnn_vs_noise", "matrix_entropy", "erank", "loss")
        if any(_finite(r.get(m)) for r in final.values())
    ]
    figure = new_figure(4.2 * len(metrics), 4)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    points = sorted(final.items(), key=lambda item: item[1]["params"])
    labels = model_labels(list(final))
    for axis, metric in zip(axes, metrics, strict=True):
        values = [row.get(metric) for _, row in points]
        errors = [_error(row, metric) for _, row in points]
        axis.errorbar([row["params"] for _, row in points], values, yerr=errors, marker="o", capsize=3)
        for model, row in points:
            axis.annotate(
                labels[model], (row["params"], row.get(metric)), fontsize=8, rotation=15, xytext=(3, 3),
                textcoords="offset points",
            )  # fmt: skip
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        axis.xaxis.set_major_formatter(EngFormatter())
        axis.set_xlabel("parameters")
        axis.set_ylabel(schema.label(metric))
        axis.set_title(f"{schema.title(metric)} vs model size")
        axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_approximation(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """MNN against the exact nuclear norm it approximates, per layer, with the line y = x."""
    rows = [row for row in rows if _finite(row.get("mnn")) and _finite(row.get("nuclear_norm"))]
    if not rows:
        return None
    figure = new_figure(12, 4.5)
    scatter, ratio = figure.subplots(1, 2)
    layers = sorted({int(row["layer"]) for row in rows})
    for layer, color in zip(layers, _colors(len(layers)), strict=True):
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
    scatter.set_xlabel(schema.label("nuclear_norm"))
    scatter.set_ylabel(schema.label("mnn"))
    scatter.set_title("MNN vs the nuclear norm it approximates")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8, ncol=2)
    ratios = [[r["mnn"] / r["nuclear_norm"] for r in rows if int(r["layer"]) == layer] for layer in layers]
    ratio.boxplot(ratios, positions=layers)
    ratio.axhline(1.0, color="grey", linestyle="--")
    ratio.set_xlabel("hidden-state index")
    ratio.set_ylabel(schema.label("mnn_ratio"))
    ratio.set_title("approximation ratio per layer (over all steps and models)")
    ratio.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def layer_profile_figure(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str] = ("mnn", "mnn_vs_noise", "matrix_entropy"),
    compact: bool = False,
) -> Any:
    """Metric against layer index at the latest step of ``rows``, over up to four earlier steps in fading colour.

    One panel per metric, side by side; ``compact``: sized for a dashboard card (a legend in the
    title instead of one per panel).
    """
    from matplotlib.ticker import MaxNLocator

    metrics = [metric for metric in metrics if any(_finite(row.get(metric)) for row in rows)] or list(metrics[:1])
    latest_step = max(row["step"] for row in rows)
    figure = new_figure(*COMPACT_SIZE) if compact else new_figure(5.5 * len(metrics), 4)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        # a metric's own last five steps: with exact_every, cheap probes have no spectral values
        steps = sorted({row["step"] for row in rows if _finite(row.get(metric))})[-5:] or [latest_step]
        for rank, step in enumerate(steps):
            points = sorted(
                (row["layer"], row[metric] if _finite(row.get(metric)) else math.nan, _error(row, metric))
                for row in rows
                if row["step"] == step
            )
            latest = rank == len(steps) - 1
            layers, values, errors = zip(*points, strict=True)
            axis.errorbar(
                layers,
                values,
                yerr=errors if latest else None,  # the current step's standard errors over sequences
                marker="o" if latest else ".",
                markersize=4 if compact else 6,
                color="C3" if latest else "C0",
                alpha=1.0 if latest else 0.25 + 0.5 * rank / max(1, len(steps) - 1),
                linewidth=(1.6 if compact else 2.2) if latest else 1.0,
                capsize=2 if compact else 3,
                label=f"step {step:g}" + (" (now, ± 1 s.e.)" if latest else ""),
            )
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        older = "" if steps[-1] == latest_step else f" (step {steps[-1]:g})"  # its last probe with a spectrum
        if compact:
            axis.set_xlabel("hidden state")
            axis.set_title(schema.title(metric) + older)
        else:
            axis.set_xlabel("hidden-state index (0 = embeddings)")
            axis.set_ylabel(schema.label(metric))
            axis.set_title(f"{schema.title(metric)} by layer{older}")
            axis.legend(fontsize=8)
    if compact:
        _compact_text(figure)
        shown = len({row["step"] for row in rows})
        earlier = " over the probes before it (blue, fading)" if shown > 1 else ""
        figure.suptitle(f"step {latest_step:g} (red, ± 1 s.e.){earlier}", fontsize=9)
        figure.tight_layout(pad=0.4, w_pad=0.6)
    else:  # fixed margins: tight_layout would draw the figure once more just to measure it
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


def plot_ranking(rows: Sequence[dict[str, Any]], path: str) -> str | None:
    """Models by the MNN of their responses (± 1 standard error), lowest first, and MNN vs noise."""
    rows = [row for row in rows if _finite(row.get("mnn"))]
    if not rows:
        return None
    labels = model_labels([row["model"] for row in rows])
    figure = new_figure(11, 0.45 * len(rows) + 2)
    axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(rows)))[::-1]
    for axis, metric in zip(axes, ("mnn", "mnn_vs_noise"), strict=True):
        values = [row.get(metric) for row in rows]
        axis.errorbar(values, positions, xerr=[_error(row, metric) for row in rows], fmt="o", capsize=3)
        axis.set_xlabel(schema.label(metric))
        axis.set_title(f"{schema.title(metric)} of the responses (± 1 s.e.)")
        axis.grid(alpha=0.3)
    axes[0].set_yticks(positions)
    axes[0].set_yticklabels(
        [f"{row['rank']}. {labels[row['model']]} ({row['mean_response_tokens']:.0f} tokens)" for row in rows]
    )
    figure.tight_layout()
    return save_figure(figure, path)
