"""Watch how a language model's hidden representations compress while it trains.

``import mnn_callback`` needs only torch and numpy: the Trainer callback, the Accelerate hook
and post hoc evaluation are imported on first use (``from mnn_callback import MNNCallback``).
"""

from __future__ import annotations

import importlib
from typing import Any

from mnn_callback import schema
from mnn_callback.accumulator import MetricAccumulator
from mnn_callback.errors import MNNWarning, UsageError
from mnn_callback.figures import Dashboards
from mnn_callback.metrics import (
    compute_metrics,
    effective_rank,
    matrix_entropy,
    matrix_nuclear_norm,
    nuclear_norm,
)
from mnn_callback.monitor import Monitor
from mnn_callback.probe import Probe
from mnn_callback.results import Measurement, ProbeResult
from mnn_callback.sinks import JsonlSink, MemorySink, Sink, TensorBoardSink, WandbSink
from mnn_callback.trackers import MlflowSink

__version__ = "0.1.0"

_LAZY = {
    "MNNCallback": "mnn_callback.callback",
    "MNNAccelerateHook": "mnn_callback.accelerate_hook",
    "MNNMonitor": "mnn_callback.loop",
    "MNNLightningCallback": "mnn_callback.lightning",
    "evaluate_models": "mnn_callback.evaluation",
    "rank_models": "mnn_callback.ranking",
}

__all__ = [
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
