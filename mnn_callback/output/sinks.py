"""Where measurements go: TensorBoard, Weights & Biases, a JSONL file, memory (other trackers: ``trackers.py``).

One small class per backend, each importing its package lazily (``import mnn_callback`` needs
neither tensorboard nor wandb). Every sink receives the same structured
:class:`~mnn_callback.probing.results.Measurement`; its keys come from :mod:`mnn_callback.core.schema`.
:class:`SinkSet` fans out to several sinks so that one failing sink (an unwritable directory, a
full disk) costs a warning while the others keep working. Sinks never ask which process they
run on: the monitor creates them on the main process only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from mnn_callback.core import schema
from mnn_callback.core.errors import MNNWarning
from mnn_callback.core.guard import Guard
from mnn_callback.output.files import append_jsonl, check_appendable
from mnn_callback.probing.results import DashboardImage, Measurement

__all__ = [
    "JSONL_FILE",
    "SINKS",
    "JsonlSink",
    "MemorySink",
    "Sink",
    "SinkSet",
    "TensorBoardSink",
    "WandbSink",
    "check_sink_specs",
    "require_package",
]

JSONL_FILE = "mnn_metrics.jsonl"  # default name of the JSONL history, in the run's output directory


def require_package(sink_name: str) -> None:
    """Raise ``ImportError`` naming the fix when the package a sink needs cannot be imported."""
    package = {name: name for name in ("tensorboard", "wandb", "mlflow", "comet_ml")}.get(sink_name)
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
    """A destination for measurements. Subclasses override what they support."""

    name: ClassVar[str] = "sink"
    shows_images: ClassVar[bool] = False  # whether log_layout / log_images / log_series do anything

    def log_measurement(self, measurement: Measurement) -> None:
        raise NotImplementedError

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the probe configuration once per run."""

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        """Record a run event, e.g. a resume from a checkpoint."""

    def log_alert(self, title: str, text: str, step: int, **fields: Any) -> None:
        """The collapse alarm fired: by default an ``alert`` event (a JSONL line, a TensorBoard text entry)."""
        self.log_event("alert", step, message=text, **fields)

    def log_layout(self, layers: Sequence[int]) -> None:
        """Arrange the dashboard once the probed layers are known (first measurement)."""

    def log_images(self, images: Sequence[DashboardImage]) -> None:
        """Record rendered dashboard figures (PNG bytes, each at the step it belongs to)."""

    def log_series(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Record whole per-layer series at once (long-table rows of the history), where the backend can."""

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    """TensorBoard: the main run (``log_dir``) gets the probe's scalars, headline keys, figures and the
    custom-scalars layout; hidden state ``i`` a sub-run ``log_dir/layer_{i:02d}`` with tags ``by layer/mnn``,
    ... (one card per metric, one line per layer). Flushed after every probe. ``log_dir``: the sink owns
    the main writer; ``writer`` (e.g. Accelerate's tracker): flushed, left open. A failed writer (full
    disk) is replaced by a new event file in the same directory at the next call, with one warning.
    """

    name = "tensorboard"
    shows_images = True
    LAYER_GROUP = "by layer"

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None) -> None:
        if writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardSink needs log_dir or writer")
            writer = self._new_writer(os.fspath(log_dir))
            self._owned = {""}
        else:
            self._owned = set()
        self.log_dir = getattr(writer, "log_dir", None) or os.fspath(log_dir)
        self.writers: dict[str, Any] = {"": writer}  # "" is the main run, "layer_03" a sub-run
        self._failed: set[str] = set()

    @property
    def writer(self) -> Any:
        return self.writers[""]

    @staticmethod
    def _new_writer(log_dir: str) -> Any:
        require_package("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir)

    @contextlib.contextmanager
    def _writing(self, run: str = "") -> Iterator[Any]:
        """The writer of ``run`` (made, or replaced after a failure); a failure marks it and propagates."""
        if run not in self.writers or run in self._failed:
            self._open(run)
        try:
            yield self.writers[run]
        except Exception:
            self._failed.add(run)
            raise

    def _open(self, run: str) -> None:
        old = self.writers.get(run)
        self.writers[run] = self._new_writer(os.path.join(self.log_dir, run) if run else self.log_dir)
        if old is not None:
            if run in self._owned:
                with contextlib.suppress(Exception):  # its thread is dead: closing may fail again
                    old.close()
            self._failed.discard(run)
            warnings.warn(
                f"the TensorBoard writer of {self.log_dir} had failed (disk full?); writing to a new event file there",
                MNNWarning,
                stacklevel=5,
            )
        self._owned.add(run)

    def log_measurement(self, measurement: Measurement) -> None:
        step = measurement.step
        main = {key: value for key, value in measurement.scalars().items() if "/layer_" not in key}
        with self._writing() as writer:
            for key, value in main.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        for position, layer in enumerate(measurement.layers):
            with self._writing(f"layer_{layer:02d}") as writer:
                for name, values in measurement.layer_values().items():
                    writer.add_scalar(f"{self.LAYER_GROUP}/{name}", values[position], step)
                writer.flush()

    def log_layout(self, layers: Sequence[int]) -> None:
        """A custom-scalars layout: one chart per metric with a line per layer; loss and perplexity apart."""
        charts = {
            f"{row.title} by layer": ["Multiline", [rf"^{self.LAYER_GROUP}/{row.name}$"]]
            for row in schema.logged_layer_metrics()
        }
        charts["probe loss (nats per token)"] = ["Multiline", ["^probe/loss$"]]
        charts["probe perplexity"] = ["Multiline", ["^probe/perplexity$"]]
        with self._writing() as writer:
            writer.add_custom_scalars({"mnn_callback": charts})
            writer.flush()

    def log_images(self, images: Sequence[DashboardImage]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        with self._writing() as writer:
            file_writer = writer._get_file_writer()  # summaries from PNG bytes: no decoding, no re-encoding
            for image in images:
                width, height = _png_size(image.png)
                encoded = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=image.png)
                file_writer.add_summary(Summary(value=[Summary.Value(tag=image.tag, image=encoded)]), image.step)
            writer.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = "```json\n" + json.dumps(dict(config), indent=2, default=str) + "\n```"
        with self._writing() as writer:
            writer.add_text("mnn_callback/probe_config", text)
            writer.flush()

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        with self._writing() as writer:
            writer.add_text(
                "mnn_callback/events", f"{event}: {json.dumps(fields, default=str, ensure_ascii=False)}", step
            )

    def close(self) -> None:
        for run, writer in self.writers.items():
            if run in self._owned:
                writer.close()
            else:
                writer.flush()


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


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

    Uses ``run``, else the active ``wandb.run``, else starts one when ``start_run`` (``init_kwargs``
    go to ``wandb.init``). ``prefix`` goes before every key (a second monitor: ``"name/"``). Logs the
    step metric in the row, not ``step=``, so W&B never drops points as "steps going backwards"
    (resumes, mixed logging, figures arriving after their probe).
    """

    name = "wandb"
    shows_images = True

    def __init__(
        self,
        *,
        run: Any = None,
        start_run: bool = False,
        step_metric: str = "train/global_step",
        prefix: str = "",
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
        self.directory = os.path.dirname(run.dir) if getattr(run, "dir", None) else None  # the run's local folder
        self.step_metric = step_metric
        self.prefix = prefix
        self._image_dir = tempfile.mkdtemp(prefix="mnn-wandb-")
        run.define_metric(step_metric)
        for row in schema.logged_layer_metrics():
            run.define_metric(f"{prefix}{row.name}/*", step_metric=step_metric, step_sync=True)
        run.define_metric(f"{prefix}probe/*", step_metric=step_metric, step_sync=True)
        for row in schema.LAYER_METRICS:  # the runs table can sort runs by these
            if row.headline:
                run.define_metric(prefix + schema.headline_key(row.name), step_metric=step_metric, summary="min,last")

    def _log(self, values: dict[str, Any], step: int) -> None:
        row = {self.prefix + key: value for key, value in values.items()}  # a fresh dict: wandb mutates what it gets
        self.run.log({**row, self.step_metric: step})

    def log_measurement(self, measurement: Measurement) -> None:
        self._log(measurement.scalars(), measurement.step)

    def log_images(self, images: Sequence[DashboardImage]) -> None:
        import wandb

        for image in images:
            path = os.path.join(self._image_dir, f"{image.tag.replace('/', '_')}_{image.step}.png")
            with open(path, "wb") as handle:
                handle.write(image.png)
            self._log({image.tag: wandb.Image(path)}, image.step)  # wandb copies the file into the run

    def log_series(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """One W&B line-series chart per headline metric and eRank, all layers in one panel."""
        import wandb

        line_series = getattr(getattr(wandb, "plot", None), "line_series", None)
        if line_series is None:
            return
        steps = sorted({row["step"] for row in rows})
        layers = sorted({row["layer"] for row in rows})
        values = {(row["step"], row["layer"]): row for row in rows}
        charts = {}
        for name in ("mnn", "matrix_entropy", "erank"):
            ys = [[_plain(values.get((s, layer), {}).get(name)) for s in steps] for layer in layers]
            keys = [f"layer {layer}" for layer in layers]
            title = f"{schema.title(name)} by layer"
            charts[f"charts/{name}"] = line_series(xs=steps, ys=ys, keys=keys, title=title, xname="step")
        self._log(charts, step)

    def log_alert(self, title: str, text: str, step: int, **fields: Any) -> None:
        """``run.alert``: W&B's own alert (e-mail or Slack, as the user's W&B settings say), level WARN."""
        self.run.alert(title=title[:63], text=text, level="WARN")

    def log_config(self, config: Mapping[str, Any]) -> None:
        entry = "mnn_callback" + ("." + self.prefix.rstrip("/") if self.prefix else "")  # one per monitor
        self.run.config.update({entry: dict(config)}, allow_val_change=True)

    def close(self) -> None:
        if self._owns_run:
            self.run.finish()
        shutil.rmtree(self._image_dir, ignore_errors=True)


def _plain(value: Any) -> float:
    return float("nan") if value is None else float(value)


class JsonlSink(Sink):
    """One JSON object per line, appended and fsynced at every probe.

    Probe lines hold ``step``, ``epoch``, ``time`` (Unix seconds), ``monitor`` (the writer's name)
    and ``run`` (the run's id: a resumed run's ``resume`` event names the one it ``continues``),
    when given, and the flat metrics; other lines hold ``event`` (``config``, ``resume``,
    ``overhead``). Non-finite values are null. Each line is one locked append
    (:func:`~mnn_callback.output.files.append_jsonl`): a crash cuts at most that line, which readers
    skip, and writers never mix lines. A path that is not a regular file, or a symbolic link out
    of its directory, is refused (``ValueError``) before anything is written.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike, *, monitor: str | None = None, run: str | None = None) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        check_appendable(self.path)
        self.identity = {name: value for name, value in (("monitor", monitor), ("run", run)) if value is not None}

    def log_measurement(self, measurement: Measurement) -> None:
        record = {"step": measurement.step, "epoch": measurement.epoch, "time": time.time(), **self.identity}
        append_jsonl(self.path, {**record, **measurement.scalars()})

    def log_config(self, config: Mapping[str, Any]) -> None:
        append_jsonl(self.path, {"event": "config", "time": time.time(), **self.identity, "config": dict(config)})

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        append_jsonl(self.path, {"event": event, "step": step, "time": time.time(), **self.identity, **fields})


class MemorySink(Sink):
    """Keeps everything it receives in lists, in arrival order (``events``: ``(event, step, fields)``)."""

    name = "memory"
    shows_images = True

    def __init__(self) -> None:
        self.measurements: list[Measurement] = []
        self.images: list[DashboardImage] = []
        self.configs: list[dict[str, Any]] = []
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.layouts: list[list[int]] = []
        self.series: list[int] = []
        self.closed = False

    def log_measurement(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.configs.append(dict(config))

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self.events.append((event, step, fields))

    def log_layout(self, layers: Sequence[int]) -> None:
        self.layouts.append(list(layers))

    def log_images(self, images: Sequence[DashboardImage]) -> None:
        self.images.extend(images)

    def log_series(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        self.series.append(step)

    def close(self) -> None:
        self.closed = True


SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "jsonl": JsonlSink}
SINK_NAMES = (*SINKS, "mlflow", "comet_ml")  # trackers.MlflowSink, trackers.CometSink


def check_sink_specs(sinks: Sequence[Any] | None) -> None:
    """Refuse an adapter's ``sinks=`` entries it cannot use: unknown names, missing packages, non-sinks."""
    for sink in sinks or ():
        if isinstance(sink, str) and sink not in SINK_NAMES:
            raise ValueError(f"unknown sink {sink!r}; known sinks: {', '.join(SINK_NAMES)}")
        if isinstance(sink, str):
            require_package(sink)
        elif not isinstance(sink, Sink):
            raise TypeError(f"sinks must be names or Sink objects, got {type(sink).__name__}")


class SinkSet:
    """Fans calls out to sinks; a failing sink costs a warning (via ``guard``), not the others."""

    def __init__(self, sinks: Sequence[Sink], guard: Guard) -> None:
        self.sinks = list(sinks)
        self.guard = guard

    @property
    def shows_images(self) -> bool:
        return any(sink.shows_images for sink in self.sinks)

    def _each(self, method: str, *args: Any, images_only: bool = False) -> None:
        for sink in self.sinks:
            if images_only and not sink.shows_images:
                continue
            self.guard.call(f"the {sink.name} sink ({method})", getattr(sink, method), *args)

    def log_measurement(self, measurement: Measurement) -> None:
        self._each("log_measurement", measurement)

    def log_layout(self, layers: Sequence[int]) -> None:
        self._each("log_layout", layers, images_only=True)

    def log_images(self, images: Sequence[DashboardImage]) -> None:
        if images:
            self._each("log_images", images, images_only=True)

    def log_series(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        self._each("log_series", rows, step, images_only=True)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", config)

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        for sink in self.sinks:
            self.guard.call(f"the {sink.name} sink (log_event)", sink.log_event, event, step, **fields)

    def log_alert(self, title: str, text: str, step: int, **fields: Any) -> None:
        for sink in self.sinks:
            self.guard.call(f"the {sink.name} sink (log_alert)", sink.log_alert, title, text, step, **fields)

    def close(self) -> None:
        self._each("close")
        self.sinks = []
