"""Where probe results go: TensorBoard, Weights & Biases, a JSONL file.

One small class per backend, each importing its package lazily (``import mnn_callback`` needs
neither tensorboard nor wandb), and a registry keyed by name. :class:`SinkSet` fans a probe's
values out to several sinks so that one failing sink (an unwritable directory, a full disk)
costs a warning while the others keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mnn_callback.files import json_safe
from mnn_callback.guard import Guard

__all__ = [
    "HEADLINE_KEYS",
    "JSONL_FILE",
    "SINKS",
    "Dashboards",
    "JsonlSink",
    "Sink",
    "SinkSet",
    "TensorBoardSink",
    "WandbSink",
    "make_sink",
    "require_package",
]

JSONL_FILE = "mnn_metrics.jsonl"  # default name of the JSONL history, in the run's output directory

# Key prefixes the sinks write; W&B plots them all against the trainer's global step.
METRIC_PREFIXES = (
    "mnn",
    "nuclear_norm",
    "matrix_entropy",
    "erank",
    "diff_erank",
    "mnn_ratio",
    "renyi2_entropy",
    "probe",
)
# One headline pair for comparing runs: the final hidden state, the layer the MNN paper reports.
HEADLINE_KEYS = ("mnn/last", "matrix_entropy/last")
# Dashboard charts: (title, key prefix of the per-layer keys).
LAYOUT_CHARTS = (
    ("MNN by layer", "mnn"),
    ("Matrix Entropy by layer", "matrix_entropy"),
    ("eRank by layer", "erank"),
    ("exact nuclear norm by layer", "nuclear_norm"),
    ("Diff-eRank by layer", "diff_erank"),
    ("MNN / exact nuclear norm (approximation ratio) by layer", "mnn_ratio"),
    ("Rényi-2 entropy by layer", "renyi2_entropy"),
)


# Dashboard images: ~70 KB each at this resolution (a run with 1000 probes: ~70 MB of images)
FIGURE_DPI = 72


def _plain(value: Any) -> float:
    return float("nan") if value is None else float(value)


def require_package(sink_name: str) -> None:
    """Raise ``ImportError`` naming the fix when the package a sink needs cannot be imported."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(sink_name)
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError:
        raise ImportError(
            f"the {sink_name} sink needs the {package} package, which is not installed: "
            f"pip install 'mnn-callback[{sink_name}]'"
        ) from None


class Sink:
    """A destination for probe results. Subclasses override what they support."""

    name: ClassVar[str] = "sink"
    draws_figures: ClassVar[bool] = False  # whether log_layout/log_figure/log_series do anything

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        raise NotImplementedError

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the probe configuration once per run."""

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        """Record a run event, e.g. a resume from a checkpoint."""

    def log_layout(self, layers: Sequence[int]) -> None:
        """Arrange the dashboard once the probed layers are known (first probe)."""

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        """Record a matplotlib figure (the caller closes it afterwards)."""

    def log_series(self, history: Sequence[Mapping[str, Any]], layers: Sequence[int], step: int) -> None:
        """Record whole per-layer series at once, where the backend has such charts."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    """Scalars via ``SummaryWriter.add_scalar(key, value, step)``; flushed after every probe.

    Pass ``log_dir`` to own a writer (closed by :meth:`close`), or an existing ``writer``
    (e.g. Accelerate's TensorBoard tracker), which is flushed but left open.
    """

    name = "tensorboard"
    draws_figures = True

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None, scalars: bool = True) -> None:
        if writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardSink needs log_dir or writer")
            require_package("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=os.fspath(log_dir))
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        self.scalars = scalars  # False when scalars reach TensorBoard another way (accelerator.log)
        self.log_dir = writer.log_dir if hasattr(writer, "log_dir") else os.fspath(log_dir)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        if not self.scalars:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_layout(self, layers: Sequence[int]) -> None:
        """A custom-scalars layout: one multi-line chart per metric holding every probed layer."""
        charts = {title: ["Multiline", [rf"^{prefix}/layer_\d+$"]] for title, prefix in LAYOUT_CHARTS}
        charts["probe loss and perplexity"] = ["Multiline", ["^probe/loss$", "^probe/perplexity$"]]
        self.writer.add_custom_scalars({"mnn_callback": charts})
        self.writer.flush()

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=False)
        self.writer.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = "```json\n" + json.dumps(dict(config), indent=2, default=str) + "\n```"
        self.writer.add_text("mnn_callback/probe_config", text)
        self.writer.flush()

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self.writer.add_text("mnn_callback/events", f"{event}: {json.dumps(fields, default=str)}", step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


def _wandb_has_credentials(wandb: Any) -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))  # reads stored credentials, no network
    except Exception:
        return False


class WandbSink(Sink):
    """Logs to a W&B run against ``train/global_step``, the step metric of transformers' WandbCallback.

    Uses ``run`` if given, else the active ``wandb.run`` (the one the Trainer's WandbCallback
    or Accelerate's tracker started), else starts one when ``start_run`` (``init_kwargs`` go
    to ``wandb.init``). Logs without ``step=`` and with the step metric in the row, so W&B
    never drops points as "steps going backwards" after a resume or mixed logging;
    ``step_metric=None`` logs with ``step=`` instead, like Accelerate's tracker.
    ``scalars=False`` leaves the scalars to another logger and draws only the dashboards.
    """

    name = "wandb"
    draws_figures = True

    def __init__(
        self,
        *,
        run: Any = None,
        start_run: bool = False,
        step_metric: str | None = "train/global_step",
        scalars: bool = True,
        **init_kwargs: Any,
    ) -> None:
        require_package("wandb")
        import wandb

        self._owns_run = False
        if run is None:
            run = wandb.run
        if run is None:
            if not start_run:
                raise RuntimeError(
                    "no active W&B run: add 'wandb' to TrainingArguments(report_to=...) so the Trainer starts one, "
                    "or pass sinks=[WandbSink(start_run=True, project=...)]"
                )
            if not _wandb_has_credentials(wandb):
                raise RuntimeError(
                    "W&B has no API key and is not offline: run `wandb login`, set WANDB_API_KEY, "
                    "or set WANDB_MODE=offline to log locally"
                )
            run = wandb.init(**init_kwargs)
            self._owns_run = True
        self.run = run
        self.step_metric = step_metric
        self.scalars = scalars
        if step_metric is not None:
            run.define_metric(step_metric)
            for prefix in METRIC_PREFIXES:
                run.define_metric(f"{prefix}/*", step_metric=step_metric, step_sync=True)
        for key in HEADLINE_KEYS:  # the runs table can sort runs by these
            run.define_metric(key, step_metric=step_metric, summary="min,last")

    def _log(self, values: dict[str, Any], step: int) -> None:
        if self.step_metric is None:
            self.run.log(values, step=step)  # W&B's own step, as accelerate's tracker logs
        else:
            self.run.log({**values, self.step_metric: step})  # a fresh dict: wandb mutates what it gets

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        if self.scalars:
            self._log(dict(metrics), step)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        import wandb

        self._log({tag: wandb.Image(figure)}, step)

    def log_series(self, history: Sequence[Mapping[str, Any]], layers: Sequence[int], step: int) -> None:
        """One W&B line-series chart per metric, all layers in one panel (wandb.plot.line_series)."""
        import wandb

        line_series = getattr(getattr(wandb, "plot", None), "line_series", None)
        if line_series is None:
            return
        charts = {}
        steps = [entry["step"] for entry in history]
        for title, prefix in LAYOUT_CHARTS[:3]:
            ys = [[_plain(entry.get(f"{prefix}/layer_{layer}")) for entry in history] for layer in layers]
            keys = [f"layer {layer}" for layer in layers]
            charts[f"charts/{prefix}"] = line_series(xs=steps, ys=ys, keys=keys, title=title, xname="step")
        self._log(charts, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update({"mnn_callback": dict(config)}, allow_val_change=True)

    def close(self) -> None:
        if self._owns_run:
            self.run.finish()


class JsonlSink(Sink):
    """One JSON object per line, appended, flushed and fsynced at every probe.

    Probe lines hold ``step``, ``epoch``, ``time`` (Unix seconds) and the metrics; other lines
    hold ``event`` (``config``, ``resume``). Non-finite values are written as null. The file
    is opened for each write, so a crash can cut at most the line being written, which
    readers skip (:func:`mnn_callback.files.read_jsonl`).
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(json_safe(dict(record)), allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        self._append({"step": step, "epoch": epoch, "time": time.time(), **metrics})

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._append({"event": "config", "time": time.time(), "config": dict(config)})

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self._append({"event": event, "step": step, "time": time.time(), **fields})


SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "jsonl": JsonlSink}


def make_sink(name: str, **options: Any) -> Sink:
    """A sink from the registry by name, e.g. ``make_sink("jsonl", path="run/mnn_metrics.jsonl")``."""
    if name not in SINKS:
        raise ValueError(f"unknown sink {name!r}; known sinks: {', '.join(SINKS)}")
    return SINKS[name](**options)


@dataclass
class Dashboards:
    """Which pictures the sinks draw besides the scalars; each switchable (all on by default).

    ``layout``: TensorBoard custom-scalars charts, one per metric with all layers.
    ``layer_profile``: at each probe, metric vs layer at the current step over a few earlier ones.
    ``heatmap_every``: every K probes, layer x step heatmaps of MNN and Matrix Entropy so far,
    and W&B line-series charts with all layers (0: never).
    """

    layout: bool = True
    layer_profile: bool = True
    heatmap_every: int = 10

    @classmethod
    def off(cls) -> Dashboards:
        return cls(layout=False, layer_profile=False, heatmap_every=0)


def probed_layers(metrics: Mapping[str, Any]) -> list[int]:
    """The layer indices of ``mnn/layer_{i}`` keys, sorted."""
    return sorted(int(key.rsplit("_", 1)[1]) for key in metrics if key.startswith("mnn/layer_"))


class SinkSet:
    """Fans values out to sinks; a failing sink costs a warning (via ``guard``), not the others.

    :meth:`log_probe` also draws the :class:`Dashboards` figures, once per probe for all sinks
    (matplotlib, lazily imported, Agg backend), and closes them after logging.
    """

    def __init__(self, sinks: Sequence[Sink], guard: Guard, dashboards: Dashboards | None = None) -> None:
        self.sinks = list(sinks)
        self.guard = guard
        self.dashboards = dashboards or Dashboards.off()
        self.probes = 0
        self._layout_done = False
        self.figure_seconds = 0.0  # time spent drawing and logging figures, for the overhead figures

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in self.sinks:
            if method in ("log_layout", "log_figure", "log_series") and not sink.draws_figures:
                continue
            self.guard.call(f"the {sink.name} sink ({method})", getattr(sink, method), *args, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        self._each("log_metrics", dict(metrics), step, epoch=epoch)

    def log_probe(
        self,
        metrics: Mapping[str, float],
        step: int,
        history: Sequence[Mapping[str, Any]],
        *,
        epoch: float | None = None,
    ) -> None:
        """The scalars of one probe, then the dashboard pictures (``history`` ends with this probe)."""
        self.log_metrics(metrics, step, epoch=epoch)
        layers = probed_layers(metrics)
        if not layers or not any(sink.draws_figures for sink in self.sinks):
            return  # nothing to draw for: no figure is built
        self.probes += 1
        if self.dashboards.layout and not self._layout_done:
            self._layout_done = True
            self._each("log_layout", layers)
        heatmaps = self.dashboards.heatmap_every and self.probes % self.dashboards.heatmap_every == 0
        if not (self.dashboards.layer_profile or heatmaps):
            return
        started = time.perf_counter()
        figures = self.guard.call(
            "drawing the dashboard figures", _figures, history, self.dashboards.layer_profile, heatmaps
        )
        for tag, figure in (figures or {}).items():
            self._each("log_figure", tag, figure, step)
        if figures:
            import matplotlib.pyplot as plt

            for figure in figures.values():
                plt.close(figure)
        if heatmaps:
            self._each("log_series", list(history), layers, step)
        self.figure_seconds += time.perf_counter() - started

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", config)

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self._each("log_event", event, step, **fields)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")
        self.sinks = []


def _figures(history: Sequence[Mapping[str, Any]], layer_profile: bool, heatmaps: bool) -> dict[str, Any]:
    """The dashboard figures for ``history`` (needs matplotlib: ``pip install 'mnn-callback[plot]'``)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("dashboard figures need matplotlib: pip install 'mnn-callback[plot]'")
    from mnn_callback import plots

    figures = {}
    if layer_profile:
        figures["mnn_callback/layer_profile"] = plots.layer_profile_figure(history)
    if heatmaps and len(history) >= 2:
        table = plots.table_from_history(history)
        for metric in ("mnn", "matrix_entropy"):
            title = f"{plots.METRIC_LABELS[metric].split(' (')[0]} by layer and step"
            figures[f"mnn_callback/heatmap_{metric}"] = plots.heatmap_figure(table, metric, title)
    for figure in figures.values():
        figure.set_dpi(FIGURE_DPI)
    return figures
