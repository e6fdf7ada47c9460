"""Watch how a language model's hidden representations compress while it trains."""

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

__version__ = "0.1.0"

__all__ = [
    "MNNWarning",
    "MetricAccumulator",
    "compute_metrics",
    "diff_erank",
    "effective_rank",
    "matrix_entropy",
    "matrix_nuclear_norm",
    "nuclear_norm",
]
