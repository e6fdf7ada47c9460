"""Watch how a language model's hidden representations compress while it trains.

``import mnn_callback`` needs only torch and numpy: the Trainer callback and the Accelerate
hook are imported on first use (``from mnn_callback import MNNCallback``).
"""

from __future__ import annotations

import importlib
from typing import Any

from mnn_callback.metrics import (
    MetricAccumulator,
    MNNWarning,
    compute_metrics,
    diff_erank,
    effective_rank,
    matrix_entropy,
    matrix_nuclear_norm,
    nuclear_norm,
)
from mnn_callback.probe import Probe, ProbeResult
from mnn_callback.sinks import Dashboards, JsonlSink, Sink, TensorBoardSink, WandbSink

__version__ = "0.1.0"

_LAZY = {
    "MNNCallback": "mnn_callback.callback",
    "MNNAccelerateHook": "mnn_callback.accelerate_hook",
}

__all__ = [
    "Dashboards",
    "JsonlSink",
    "MNNAccelerateHook",
    "MNNCallback",
    "MNNWarning",
    "MetricAccumulator",
    "Probe",
    "ProbeResult",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "compute_metrics",
    "diff_erank",
    "effective_rank",
    "matrix_entropy",
    "matrix_nuclear_norm",
    "nuclear_norm",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mnn_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
