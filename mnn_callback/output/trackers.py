"""Sinks for the other experiment trackers, each through its own client: MLflow, Comet, any Accelerate tracker.

Like :mod:`mnn_callback.output.sinks` (one small class per backend, lazy imports, no question of which
process runs them), for trackers whose runs other code starts: the Trainer's integrations, an
accelerator's ``init_trackers``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from mnn_callback.output.sinks import Sink, require_package
from mnn_callback.probing.results import Measurement

__all__ = ["CometSink", "MlflowSink", "TrackerSink"]


class TrackerSink(Sink):
    """Scalars to any Accelerate tracker (``tracker.log(values, step=step)``), as ``accelerator.log`` does;
    ``prefix`` goes before every key."""

    name = "tracker"

    def __init__(self, tracker: Any, *, prefix: str = "") -> None:
        self.tracker = tracker
        self.prefix = prefix
        self.name = f"{getattr(tracker, 'name', 'tracker')} tracker"  # type: ignore[misc]

    def log_measurement(self, measurement: Measurement) -> None:
        values = {self.prefix + key: value for key, value in measurement.scalars().items()}
        self.tracker.log(values, step=measurement.step)


class MlflowSink(Sink):
    """Scalars to an MLflow run at the training step: ``run_id``, else the active run (the one the
    Trainer's ``MLflowCallback`` started for ``report_to=["mlflow"]``); ``prefix`` goes before every key.

    Keys keep their slashes (``mnn/layer_0``); characters MLflow refuses become ``_``, as the
    Trainer's integration does.
    """

    name = "mlflow"

    def __init__(self, *, run_id: str | None = None, prefix: str = "") -> None:
        require_package("mlflow")
        import mlflow

        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError(
                    "no active MLflow run: add 'mlflow' to TrainingArguments(report_to=...) so the Trainer starts one, "
                    "or pass sinks=[MlflowSink(run_id=...)]"
                )
            run_id = active.info.run_id
        self.run_id = run_id
        self.prefix = prefix
        self.client = mlflow.MlflowClient()

    def log_measurement(self, measurement: Measurement) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(re.sub(r"[^0-9A-Za-z_\-. :/]", "_", self.prefix + key), value, now, measurement.step)
            for key, value in measurement.scalars().items()
        ]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])


class CometSink(Sink):
    """Scalars to a Comet experiment at the training step: ``experiment``, else the running one (the one
    the Trainer's ``CometCallback`` started for ``report_to=["comet_ml"]``, online or offline with
    ``COMET_START_ONLINE=0``); ``prefix`` goes before every key."""

    name = "comet_ml"

    def __init__(self, *, experiment: Any = None, prefix: str = "") -> None:
        require_package("comet_ml")
        import comet_ml

        if experiment is None:
            experiment = comet_ml.get_running_experiment()
            if experiment is None:
                raise RuntimeError(
                    "no running Comet experiment: add 'comet_ml' to TrainingArguments(report_to=...) so the Trainer "
                    "starts one, or pass sinks=[CometSink(experiment=...)]"
                )
        self.experiment = experiment
        self.prefix = prefix

    def log_measurement(self, measurement: Measurement) -> None:
        values = {self.prefix + key: value for key, value in measurement.scalars().items()}
        self.experiment.log_metrics(values, step=measurement.step, epoch=measurement.epoch)
