"""Sinks for the other experiment trackers, each through its own client: MLflow, Comet, any Accelerate tracker.

Like :mod:`mnn_callback.output.sinks` (one small class per backend, lazy imports, no question of which
process runs them), for trackers whose runs other code starts: the Trainer's integrations, an
accelerator's ``init_trackers``.
"""

from __future__ import annotations

import os
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


def _trainer_comet_modes() -> tuple[str, ...]:
    """What ``COMET_MODE`` may hold for the installed transformers' ``CometCallback``: any other value turns
    its Comet logging off ("Invalid COMET_MODE env value"). transformers 4 also reads online and offline."""
    try:
        import transformers
    except ImportError:
        return ("get", "get_or_create", "create")
    major = int(transformers.__version__.split(".")[0])
    return ("get", "get_or_create", "create") + (("online", "offline") if major < 5 else ())


def _comet_configuration_problem() -> str | None:
    """What in Comet's configuration keeps ``comet_ml.start()`` from starting an experiment, if anything."""
    import comet_ml

    try:
        offline = comet_ml.config.get_config("comet.start.online") is False
        api_key = comet_ml.config.get_config("comet.api_key")
    except Exception as error:  # e.g. COMET_START_ONLINE="" (not a bool): the setting is the problem
        return f"Comet's configuration cannot be read ({error})"
    if not offline and api_key is None:
        return (
            "Comet is not configured: no API key (COMET_API_KEY) for an online experiment, and "
            "COMET_START_ONLINE is not 0 for an offline one"
        )
    return None


def _why_no_comet_experiment(ended: Any) -> str:
    """Why ``comet_ml.get_running_experiment()`` found no experiment to log to (``ended``: the last one, ended)."""
    if ended is None:
        found = "no running Comet experiment (comet_ml.get_running_experiment() is None)"
    else:
        found = f"no running Comet experiment: the last one ({ended.get_key()}) has ended"
    mode, modes = os.environ.get("COMET_MODE", ""), _trainer_comet_modes()
    if mode and mode.lower() not in modes:
        why = (
            f"COMET_MODE={mode!r} is not a mode of the Trainer's CometCallback ({', '.join(modes)}): "
            "it turned the Trainer's Comet logging off and started no experiment; for an offline experiment set "
            "COMET_START_ONLINE=0 and unset COMET_MODE"
        )
    else:
        why = _comet_configuration_problem() or (
            "the Trainer's CometCallback starts one when training starts (for 'comet_ml' in "
            "TrainingArguments(report_to=...), on the main process), so a monitor whose callback runs before it "
            "finds none; without a Trainer, start one with comet_ml.start(...) before the monitor"
        )
    return f"{found}; {why}; or pass sinks=[CometSink(experiment=...)]"


class CometSink(Sink):
    """Scalars to a Comet experiment at the training step: ``experiment``, else the running one
    (``comet_ml.get_running_experiment()``: the one the Trainer's ``CometCallback`` started for
    ``report_to=["comet_ml"]``, online or offline with ``COMET_START_ONLINE=0``); ``prefix`` goes before every key.

    An experiment that has ended (``end()``, ``comet_ml.end()``) takes no more data: it is never taken for the
    running one, and one that ends during the run makes every later log an error, not a silent loss.
    """

    name = "comet_ml"

    def __init__(self, *, experiment: Any = None, prefix: str = "") -> None:
        require_package("comet_ml")
        import comet_ml

        if experiment is None:
            experiment = comet_ml.get_running_experiment()
            if experiment is None or getattr(experiment, "ended", False):
                raise RuntimeError(_why_no_comet_experiment(experiment))
        self.experiment = experiment
        self.prefix = prefix

    def log_measurement(self, measurement: Measurement) -> None:
        if getattr(self.experiment, "ended", False):
            raise RuntimeError(
                f"the Comet experiment {self.experiment.get_key()} has ended: it takes no more data "
                f"(the scalars of step {measurement.step} are not in it)"
            )
        values = {self.prefix + key: value for key, value in measurement.scalars().items()}
        self.experiment.log_metrics(values, step=measurement.step, epoch=measurement.epoch)
