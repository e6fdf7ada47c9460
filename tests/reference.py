"""Independent float64 NumPy reference of the metrics, written from the textbook formulas.

Full SVD of Z for the nuclear norm, eigenvalues of the d x d matrix Z^T Z / n for the entropy,
column norms for MNN: none of the shortcuts (smaller-side Gram, chunking, cutoffs) of the package.
"""

from __future__ import annotations

import math

import numpy as np


def reference_metrics(x: np.ndarray, top_d: int | None = None) -> dict[str, float]:
    """Metrics of one sequence ``x`` of shape (n, d), computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2 or not np.isfinite(x).all():
        return dict.fromkeys(
            ["mnn", "nuclear_norm", "matrix_entropy", "entropy_nats", "erank", "renyi2_entropy"], math.nan
        )
    centred = x - x.mean(axis=0)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    z = np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)
    columns = np.sort(np.linalg.norm(z, axis=0))[::-1]
    top = min(n, d) if top_d is None else min(top_d, d)
    singular_values = np.linalg.svd(z, compute_uv=False)
    eigenvalues = np.clip(np.linalg.eigvalsh(z.T @ z / n), 0.0, None)
    if eigenvalues.sum() > 0:
        p = eigenvalues / eigenvalues.sum()
        renyi2 = float(-np.log((p**2).sum()))
        p = p[p > 0]
        entropy = float(-(p * np.log(p)).sum())
    else:
        entropy = renyi2 = 0.0
    return {
        "mnn": float(columns[:top].sum() / n),
        "nuclear_norm": float(singular_values.sum() / n),
        "matrix_entropy": entropy / math.log(d) if d > 1 else 0.0,
        "entropy_nats": entropy,
        "erank": math.exp(entropy),
        "renyi2_entropy": renyi2 / math.log(d) if d > 1 else 0.0,
    }
