"""Where probe results go: TensorBoard, Weights & Biases, a JSONL file.

One small class per backend, each importing its package lazily (``import mnn_callback`` needs
neither tensorboard nor wandb), and a registry keyed by name. :class:`SinkSet` fans a probe's
values out to several sinks so that one failing sink (an unwritable directory, a full disk)
costs a warning while the others keep working.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mnn_callback.files import json_safe
from mnn_callback.guard import Guard

__all__ = [
    "JSONL_FILE",
    "SINKS",
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
METRIC_PREFIXES = ("mnn", "nuclear_norm", "matrix_entropy", "erank", "diff_erank", "probe")


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

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        raise NotImplementedError

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the probe configuration once per run."""

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        """Record a run event, e.g. a resume from a checkpoint."""

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

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None) -> None:
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
        self.log_dir = writer.log_dir if hasattr(writer, "log_dir") else os.fspath(log_dir)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
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
    never drops points as "steps going backwards" after a resume or mixed logging.
    """

    name = "wandb"

    def __init__(
        self,
        *,
        run: Any = None,
        start_run: bool = False,
        step_metric: str = "train/global_step",
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
        run.define_metric(step_metric)
        for prefix in METRIC_PREFIXES:
            run.define_metric(f"{prefix}/*", step_metric=step_metric, step_sync=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        self.run.log({**metrics, self.step_metric: step})  # a fresh dict: wandb mutates what it gets

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


class SinkSet:
    """Fans values out to sinks; a failing sink costs a warning (via ``guard``), not the others."""

    def __init__(self, sinks: Sequence[Sink], guard: Guard) -> None:
        self.sinks = list(sinks)
        self.guard = guard

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in self.sinks:
            self.guard.call(f"the {sink.name} sink ({method})", getattr(sink, method), *args, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, epoch: float | None = None) -> None:
        self._each("log_metrics", dict(metrics), step, epoch=epoch)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", config)

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        self._each("log_event", event, step, **fields)

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        self._each("close")
        self.sinks = []
