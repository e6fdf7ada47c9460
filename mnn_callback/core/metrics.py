"""Compression metrics of hidden states: Matrix Nuclear-Norm, Matrix Entropy, eRank, nuclear norm.

Pure torch functions on tensors: no transformers import, any device, any float input dtype.

Notation. One sequence has ``n`` valid tokens and hidden size ``d``; ``X`` is its ``(n, d)``
matrix of hidden states. ``Z`` is ``X`` with the mean token vector subtracted and each row
divided by its L2 norm (a row that is zero after centring stays zero). With
``lambda_1 >= lambda_2 >= ...`` the eigenvalues of ``Z^T Z`` (the nonzero ones equal those
of ``Z Z^T``) and ``sigma_k = sqrt(lambda_k)`` the singular values of ``Z``::

    MNN(X)            = (1/n) * sum of the D largest column norms ||Z[:, j]||_2, D = min(n, d)
    mnn_vs_noise(X)   = MNN(X) / E[MNN(G)], G an n x d matrix of i.i.d. N(0, 1) entries
    nuclear_norm(X)   = (1/n) * sum_k sigma_k
    H(X)              = -sum_k p_k ln p_k,   p_k = lambda_k / sum_j lambda_j     (nats)
    matrix_entropy(X) = H(X) / ln d                                             (in [0, 1])
    erank(X)          = exp(H(X))                                               (in [1, min(n, d)])
    renyi2_entropy(X) = -ln(sum_k lambda_k^2 / (sum_k lambda_k)^2) / ln d       (in [0, 1])

MNN is the Matrix Nuclear-Norm of Li et al. (2024), Eq. 11 / Algorithm 1: a cheap proxy of the
nuclear norm of ``Z`` that needs only column norms. Matrix Entropy and eRank are those of
Diff-eRank (Wei et al., 2024). Lower Matrix Entropy and eRank mean a spectrum concentrated on
fewer directions; they, the nuclear norm and the Rényi entropy do not change when the hidden
space is rotated. MNN does (its column norms depend on the basis: the same data can score 0.09
in one basis and 0.91 in another), it is capped at ``(min(n, d) / n)^1/2``, and its response
to a collapse onto fewer directions is not one-signed: a random-basis collapse raises it below
0.6 d tokens and lowers it from d on, with a band between where its direction is not determined;
a collapse onto coordinate axes or outlier coordinates lowers it at every n
(:mod:`mnn_callback.core.regime`). So a lower MNN is not by itself a
more compressed representation. ``mnn_vs_noise`` compares it with random Gaussian hidden states
of the same n and d (:mod:`mnn_callback.core.noise`). The order-2 (Rényi) entropy is a different
quantity from the Shannon one (it weighs large eigenvalues more, and is never larger); it is
exact and costs one Frobenius norm of the Gram matrix.

Shapes: ``hidden`` is ``(L, d)`` or ``(B, L, d)``; ``attention_mask`` is ``(L,)`` or ``(B, L)``
with 1 for the valid tokens of each sequence (padding may sit left or right). Every function
returns one value per sequence, shape ``(B,)`` (0-d for 2-D input), in the compute ``dtype``
(float32 by default, float64 on request) on the input's device. A sequence with fewer than 2
valid tokens, or with a non-finite value among its valid tokens, gives NaN; nothing raises
for those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mnn_callback.core.noise import expected_noise_mnn
from mnn_callback.core.spectra import (
    eigvalsh_safely,
    polar_nuclear_norm,
    renyi2_nats,
    slq_entropy,
    smaller_gram,
    spectral_sums,
    warn_failed_solves,
)

__all__ = [
    "METHODS",
    "PendingMetrics",
    "compute_metrics",
    "effective_rank",
    "finish_metrics",
    "matrix_entropy",
    "matrix_nuclear_norm",
    "nuclear_norm",
    "prepare_metrics",
]

METHODS = ("exact", "fast", "cheap")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class _Normalized:
    """Centred, row-normalised hidden states of a batch, and what is known per sequence."""

    z: Tensor  # (B, L, d) in the compute dtype; rows of padding and of invalid sequences are 0
    lengths: Tensor  # (B,) number of valid tokens, int64
    valid: Tensor  # (B,) bool: at least 2 valid tokens, all of them finite


def _as_batch(hidden: Tensor, attention_mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, bool]:
    """Validate inputs; return ``hidden`` as (B, L, d), the mask as (B, L) bool, and whether input was 2-D."""
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must have a floating-point dtype, got {hidden.dtype}")
    if hidden.ndim not in (2, 3):
        raise ValueError(f"hidden must have shape (L, d) or (B, L, d), got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] < 1:
        raise ValueError(f"hidden size d must be at least 1, got shape {tuple(hidden.shape)}")
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    was_2d = hidden.ndim == 2
    batch = hidden.unsqueeze(0) if was_2d else hidden
    if attention_mask is None:
        mask = torch.ones(batch.shape[:2], dtype=torch.bool, device=batch.device)
    else:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        expected = tuple(hidden.shape[:-1])
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask must have shape {expected} to match hidden {tuple(hidden.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=batch.device) != 0
        if was_2d:
            mask = mask.unsqueeze(0)
    return batch, mask, was_2d


def _normalize(hidden: Tensor, mask: Tensor, dtype: torch.dtype) -> _Normalized:
    """Centre each sequence on its valid tokens and L2-normalise the rows (all in place on one copy)."""
    x = hidden.detach().to(dtype=dtype, copy=True)  # own copy: everything below is in place
    lengths = mask.sum(dim=-1)
    if x.shape[1] == 0:  # no tokens at all
        return _Normalized(z=x, lengths=lengths, valid=torch.zeros_like(lengths, dtype=torch.bool))
    finite_rows = torch.isfinite(x).all(dim=-1)
    valid = (finite_rows | ~mask).all(dim=-1) & (lengths >= 2)
    keep = (mask & valid[:, None]).unsqueeze(-1)
    x.masked_fill_(~keep, 0.0)

    # Z does not change when a sequence is scaled, so scale each to max |x| = 1 first: no
    # overflow of squares for huge activations, no underflow for tiny ones.
    scale = torch.maximum(x.amax(dim=(1, 2)), -x.amin(dim=(1, 2)))
    x /= torch.where(scale > 0, scale, 1.0)[:, None, None]
    largest_row = torch.linalg.vector_norm(x, dim=-1).amax(dim=-1)

    x -= x.sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None, None].to(dtype)
    x.masked_fill_(~keep, 0.0)

    # A row equal to the mean comes out of the subtraction as round-off, not zero. Rows below
    # that round-off level (like numpy's rank tolerance) count as exactly zero: dividing by inf.
    row_norms = torch.linalg.vector_norm(x, dim=-1)
    tolerance = torch.finfo(dtype).eps * lengths.to(dtype) * largest_row
    x /= torch.where(row_norms > tolerance[:, None], row_norms, math.inf).unsqueeze(-1)
    return _Normalized(z=x, lengths=lengths, valid=valid)


def _mnn(z: Tensor, lengths: Tensor, top_d: int | None) -> Tensor:
    """(1/n) * sum of the D largest column L2 norms of Z, D = top_d or min(n, d)."""
    d = z.shape[-1]
    column_norms = torch.linalg.vector_norm(z, dim=1).sort(dim=-1, descending=True).values
    top = lengths.clamp(max=d) if top_d is None else torch.full_like(lengths, min(top_d, d))
    in_top = torch.arange(d, device=z.device) < top[:, None]
    return (column_norms * in_top).sum(dim=-1) / lengths.clamp(min=1).to(z.dtype)


def _direct_values(normalized: _Normalized, top_d: int | None) -> dict[str, Tensor]:
    """The per-sequence metrics computed from Z directly, without its spectrum (every method has them).

    ``mnn_vs_noise`` is defined for the default D = min(n, d) only (NaN with ``top_d``).
    """
    _, length, d = normalized.z.shape
    mnn = _mnn(normalized.z, normalized.lengths, top_d)
    if top_d is None:
        noise = expected_noise_mnn(normalized.lengths, d, longest=length).to(mnn.dtype)
    else:
        noise = torch.full_like(mnn, math.nan)
    return {"mnn": mnn, "mnn_vs_noise": mnn / noise}


def _spectra(z: Tensor, method: str, memory_share: float = 0.25, min_chunk_elements: int = 2**20) -> dict[str, Tensor]:
    """Per sequence: ``singular_sum`` (sum of singular values of Z), ``entropy_nats``, ``renyi2_nats``.

    Gram matrices are built on the smaller side (padding rows of Z are zero and only add zero
    eigenvalues) in chunks of sequences holding at most ``memory_share`` of Z's elements (or
    ``min_chunk_elements``; at least one sequence), which bounds the memory on top of Z.
    ``exact``: one batched eigensolve per chunk. ``fast``: polar iteration and SLQ (matmul only).
    ``cheap``: the Rényi-2 entropy only (no spectrum).
    """
    batch, length, d = z.shape
    side = min(length, d)
    keys = ("renyi2_nats",) if method == "cheap" else ("singular_sum", "entropy_nats", "renyi2_nats")
    if batch == 0 or side == 0:
        return dict.fromkeys(keys, z.new_zeros(batch))
    budget = max(memory_share * z.numel(), min_chunk_elements)
    parts: dict[str, list[Tensor]] = {key: [] for key in keys}
    failed = 0
    for part in z.split(max(1, int(budget // (side * side)))):
        gram = smaller_gram(part)
        parts["renyi2_nats"].append(renyi2_nats(gram))
        if method == "cheap":
            continue
        if method == "fast":
            parts["singular_sum"].append(polar_nuclear_norm(part))
            parts["entropy_nats"].append(slq_entropy(gram))
        else:
            eigenvalues, part_failed = eigvalsh_safely(gram)
            failed += part_failed
            singular_sum, entropy_nats = spectral_sums(eigenvalues)
            parts["singular_sum"].append(singular_sum)
            parts["entropy_nats"].append(entropy_nats)
    warn_failed_solves(failed, batch)
    return {key: torch.cat(values) for key, values in parts.items()}


def _spectral_values(spectra: dict[str, Tensor], lengths: Tensor, d: int) -> dict[str, Tensor]:
    """The metrics from the raw spectral quantities: normalised by n, ln d; eRank = exp(H).

    Without ``entropy_nats`` (a cheap pass) only the Rényi-2 entropy.
    """
    log_d = math.log(d) if d > 1 else 1.0
    values = {"renyi2_entropy": spectra["renyi2_nats"] / log_d}
    if "entropy_nats" in spectra:
        entropy_nats = spectra["entropy_nats"]
        values["nuclear_norm"] = spectra["singular_sum"] / lengths.clamp(min=1).to(entropy_nats.dtype)
        values["matrix_entropy"] = entropy_nats / log_d
        values["entropy_nats"] = entropy_nats
        values["erank"] = entropy_nats.exp()
    return values


def _finish(values: dict[str, Tensor], valid: Tensor, was_2d: bool) -> dict[str, Tensor]:
    out = {}
    for key, value in values.items():
        value = torch.where(valid, value, torch.full_like(value, math.nan))
        out[key] = value[0] if was_2d else value
    return out


def _check_options(top_d: int | None, method: str) -> None:
    if top_d is not None and (isinstance(top_d, bool) or not isinstance(top_d, int) or top_d < 1):
        raise ValueError(f"top_d must be a positive int or None, got {top_d!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def compute_metrics(
    hidden: Tensor,
    attention_mask: Tensor | None = None,
    *,
    top_d: int | None = None,
    dtype: torch.dtype = torch.float32,
    method: str = "exact",
) -> dict[str, Tensor]:
    """All metrics of each sequence from one centring, normalisation and spectral pass.

    Args:
        hidden: hidden states, ``(L, d)`` or ``(B, L, d)``, any float dtype and device.
        attention_mask: ``(L,)`` or ``(B, L)``, nonzero for valid tokens; all valid if omitted.
        top_d: number of largest column norms MNN adds up; ``min(n, d)`` per sequence if None.
        dtype: compute dtype, ``torch.float32`` (default) or ``torch.float64``.
        method: ``"exact"`` (eigendecomposition of the smaller Gram matrix), ``"fast"`` (matmul
            only, for GPUs: polar iteration for the nuclear norm, stochastic Lanczos quadrature for
            the entropy; see :mod:`mnn_callback.core.spectra` for the errors), or ``"cheap"`` (MNN and
            the Rényi-2 entropy only: no spectrum, and no key for the spectral metrics).

    Returns:
        ``mnn``, ``mnn_vs_noise`` (MNN / its expectation for random Gaussian hidden states of the
        same n and d), ``nuclear_norm``, ``matrix_entropy`` (H / ln d), ``entropy_nats`` (H),
        ``erank`` (exp H) and ``renyi2_entropy`` (-ln(||G||_F^2 / tr(G)^2) / ln d, exact in
        both methods), each of shape ``(B,)`` (0-d for 2-D input); formulas in the module
        docstring. NaN for sequences with fewer than 2 valid tokens or non-finite values.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> values = compute_metrics(x)
        >>> {k: round(values[k].item(), 4) for k in ("mnn", "nuclear_norm", "matrix_entropy", "erank")}
        {'mnn': 0.7071, 'nuclear_norm': 0.7071, 'matrix_entropy': 1.0, 'erank': 2.0}
        >>> round(values["mnn_vs_noise"].item(), 2)  # at its cap: a little above random directions of this shape
        1.02
    """
    _check_options(top_d, method)
    batch, mask, was_2d = _as_batch(hidden, attention_mask, dtype)
    normalized = _normalize(batch, mask, dtype)
    values = _direct_values(normalized, top_d)
    spectra = _spectra(normalized.z, method)
    values.update(_spectral_values(spectra, normalized.lengths, batch.shape[-1]))
    return _finish(values, normalized.valid, was_2d)


@dataclass
class PendingMetrics:
    """What :func:`prepare_metrics` computed of a batch, and the Gram matrices still to solve.

    Hold several (layers, micro-batches) and solve them all with one :func:`finish_metrics`
    call: one batched eigensolve, one host synchronisation.
    """

    values: dict[str, Tensor]  # the direct values and renyi2 (nats) per sequence, done
    gram: Tensor  # (B, m, m)
    lengths: Tensor
    valid: Tensor
    hidden_size: int
    was_2d: bool

    @property
    def nbytes(self) -> int:
        return self.gram.numel() * self.gram.element_size()


@torch.no_grad()
def prepare_metrics(
    hidden: Tensor,
    attention_mask: Tensor | None = None,
    *,
    top_d: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PendingMetrics:
    """The first half of ``compute_metrics(method="exact")``: everything but the eigensolve.

    Computes the metrics that need no eigensolve (MNN, Rényi-2) and keeps the Gram matrices; Z
    itself is dropped.
    """
    _check_options(top_d, "exact")
    batch, mask, was_2d = _as_batch(hidden, attention_mask, dtype)
    normalized = _normalize(batch, mask, dtype)
    gram = smaller_gram(normalized.z)
    values = {**_direct_values(normalized, top_d), "renyi2_nats": renyi2_nats(gram)}
    return PendingMetrics(values, gram, normalized.lengths, normalized.valid, batch.shape[-1], was_2d)


@torch.no_grad()
def finish_metrics(pending: list[PendingMetrics]) -> list[dict[str, Tensor]]:
    """Solve the Gram matrices of all ``pending`` batches in ONE batched eigensolve; their metrics, in order.

    Grams of different sizes are zero-padded to the largest (zero rows only add zero
    eigenvalues). The results equal ``compute_metrics(method="exact")`` on each batch.
    """
    if not pending:
        return []
    side = max(item.gram.shape[-1] for item in pending)
    padded = torch.cat(
        [
            torch.nn.functional.pad(item.gram, (0, side - item.gram.shape[-1], 0, side - item.gram.shape[-2]))
            for item in pending
        ]
    )
    eigenvalues, failed = eigvalsh_safely(padded)
    warn_failed_solves(failed, padded.shape[0])
    results, offset = [], 0
    for item in pending:
        count = item.gram.shape[0]
        part = eigenvalues[offset : offset + count]
        offset += count
        # padding added zero eigenvalues; drop as many smallest ones to keep the item's own size
        part = part[:, side - item.gram.shape[-1] :] if count else part[:, :0]
        singular_sum, entropy_nats = spectral_sums(part)
        direct = dict(item.values)
        spectra = {"singular_sum": singular_sum, "entropy_nats": entropy_nats, "renyi2_nats": direct.pop("renyi2_nats")}
        values = {**direct, **_spectral_values(spectra, item.lengths, item.hidden_size)}
        results.append(_finish(values, item.valid, item.was_2d))
    return results


@torch.no_grad()
def matrix_nuclear_norm(
    hidden: Tensor,
    attention_mask: Tensor | None = None,
    *,
    top_d: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Matrix Nuclear-Norm: ``(1/n) * sum of the D largest column L2 norms of Z``, ``D = min(n, d)``.

    In [0, 1] with the default ``top_d``. Needs no eigendecomposition.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> round(matrix_nuclear_norm(x).item(), 4)  # columns of norm sqrt(2), n = 4
        0.7071
    """
    if top_d is not None and (isinstance(top_d, bool) or not isinstance(top_d, int) or top_d < 1):
        raise ValueError(f"top_d must be a positive int or None, got {top_d!r}")
    batch, mask, was_2d = _as_batch(hidden, attention_mask, dtype)
    normalized = _normalize(batch, mask, dtype)
    return _finish(_direct_values(normalized, top_d), normalized.valid, was_2d)["mnn"]


def _spectral_metric(hidden: Tensor, attention_mask: Tensor | None, dtype: torch.dtype) -> dict[str, Tensor]:
    batch, mask, was_2d = _as_batch(hidden, attention_mask, dtype)
    normalized = _normalize(batch, mask, dtype)
    values = _spectral_values(_spectra(normalized.z, "exact"), normalized.lengths, batch.shape[-1])
    return _finish(values, normalized.valid, was_2d)


@torch.no_grad()
def nuclear_norm(
    hidden: Tensor,
    attention_mask: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Exact nuclear norm of Z on MNN's scale: ``(1/n) * sum_k sigma_k(Z)``, in [0, 1].

    The quantity MNN approximates, so the approximation error can be measured.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> round(nuclear_norm(x).item(), 4)  # singular values sqrt(2), sqrt(2); n = 4
        0.7071
    """
    return _spectral_metric(hidden, attention_mask, dtype)["nuclear_norm"]


@torch.no_grad()
def matrix_entropy(
    hidden: Tensor,
    attention_mask: Tensor | None = None,
    *,
    normalized: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Matrix Entropy: Shannon entropy of the normalised spectrum of ``Z^T Z``.

    ``p_k = lambda_k / sum_j lambda_j``, ``H = -sum_k p_k ln p_k``. Returns ``H / ln d`` (in
    [0, 1], d = hidden size, as in the Diff-eRank code) when ``normalized``, else ``H`` in nats.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> round(matrix_entropy(x).item(), 4), round(matrix_entropy(x, normalized=False).item(), 4)
        (1.0, 0.6931)
    """
    values = _spectral_metric(hidden, attention_mask, dtype)
    return values["matrix_entropy"] if normalized else values["entropy_nats"]


@torch.no_grad()
def effective_rank(
    hidden: Tensor,
    attention_mask: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Effective rank ``exp(H)``, H the matrix entropy in nats; in [1, min(n, d)].

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> round(effective_rank(x).item(), 4)
        2.0
    """
    return _spectral_metric(hidden, attention_mask, dtype)["erank"]
