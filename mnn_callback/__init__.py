"""Watch how a language model's hidden representations compress while it trains.

``import mnn_callback`` needs only torch and numpy: the Trainer callback, the Accelerate hook
and post hoc evaluation are imported on first use (``from mnn_callback import MNNCallback``).
"""

from __future__ import annotations

import importlib
from typing import Any

from mnn_callback.core import schema
from mnn_callback.core.accumulator import MetricAccumulator
from mnn_callback.core.errors import MNNWarning, UsageError
from mnn_callback.core.metrics import (
    compute_metrics,
    effective_rank,
    matrix_entropy,
    matrix_nuclear_norm,
    nuclear_norm,
)
from mnn_callback.monitoring.alarm import CollapseAlert, CollapseWarning
from mnn_callback.monitoring.monitor import Monitor
from mnn_callback.output.figures import Dashboards
from mnn_callback.output.sinks import JsonlSink, MemorySink, Sink, TensorBoardSink, WandbSink
from mnn_callback.output.trackers import CometSink, MlflowSink
from mnn_callback.probing.probe import Probe
from mnn_callback.probing.results import Measurement, ProbeResult

__version__ = "0.1.0"

_LAZY = {
    "MNNCallback": "mnn_callback.adapters.callback",
    "MNNAccelerateHook": "mnn_callback.adapters.accelerate_hook",
    "MNNMonitor": "mnn_callback.adapters.loop",
    "MNNLightningCallback": "mnn_callback.adapters.lightning",
    "evaluate_models": "mnn_callback.posthoc.evaluation",
    "rank_models": "mnn_callback.posthoc.ranking",
}

__all__ = [
    "CollapseAlert",
    "CollapseWarning",
    "CometSink",
    "Dashboards",
    "JsonlSink",
    "MNNAccelerateHook",
    "MNNCallback",
    "MNNLightningCallback",
    "MNNMonitor",
    "MNNWarning",
    "Measurement",
    "MemorySink",
    "MetricAccumulator",
    "MlflowSink",
    "Monitor",
    "Probe",
    "ProbeResult",
    "Sink",
    "TensorBoardSink",
    "UsageError",
    "WandbSink",
    "compute_metrics",
    "effective_rank",
    "evaluate_models",
    "matrix_entropy",
    "matrix_nuclear_norm",
    "nuclear_norm",
    "rank_models",
    "schema",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mnn_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
