"""Spectra of Gram matrices: the exact eigensolve and the matmul-only estimators of ``method="fast"``.

Pure torch on batches. The exact method (:func:`eigvalsh_safely`, :func:`spectral_sums`) solves
the smaller Gram matrix of each sequence in one batched ``eigvalsh`` call and never raises. The
fast estimators avoid eigendecompositions, which GPUs run slowly and with host
synchronisation, at the price of a small, measured error (``tests/test_spectra.py``,
``benchmarks/bench_spectra.py``):

- :func:`polar_nuclear_norm`: ``||Z||_* = <polar(Z), Z>_F`` with ``polar(Z) = U V^T``, computed
  by odd-polynomial Newton-Schulz iterations ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` with the
  per-step minimax ("Polar Express", Amsel et al. 2025) coefficients of :data:`POLAR_COEFFICIENTS`.
- :func:`slq_entropy`: ``H = tr f(P)``, ``f(x) = -x ln x``, ``P = G / tr G``, by stochastic Lanczos
  quadrature with Hutch++ deflation (Meyer et al. 2021): the trace of ``f(P)`` on a subspace that
  holds the dominant eigenvectors is computed from its basis vectors, the rest is estimated
  from random probes projected out of it. Random vectors come from a private generator with a
  fixed seed: deterministic, and the global RNG is not touched.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from mnn_callback.core.errors import MNNWarning

__all__ = [
    "POLAR_COEFFICIENTS",
    "eigvalsh_safely",
    "polar_coefficients",
    "polar_nuclear_norm",
    "renyi2_nats",
    "slq_entropy",
    "smaller_gram",
    "spectral_sums",
    "warn_failed_solves",
]


def _minimax_quintic(low: float, high: float, iterations: int = 60) -> tuple[float, float, float]:
    """Odd ``p(x) = a x + b x^3 + c x^5`` minimising ``max |1 - p(x)|`` on ``[low, high]`` (Remez exchange)."""
    if low / high > 1 - 1e-6:  # the interval has shrunk to a point: the classical quintic, scaled
        return 15 / (8 * high), -10 / (8 * high**3), 3 / (8 * high**5)
    reference = [low, low + (high - low) / 3, low + 2 * (high - low) / 3, high]
    coefficients = (0.0, 0.0, 0.0)
    for _ in range(iterations):
        matrix = [[x, x**3, x**5, (-1) ** i] for i, x in enumerate(reference)]
        a, b, c, _level = torch.linalg.solve(
            torch.tensor(matrix, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        ).tolist()
        coefficients = (a, b, c)
        # interior extrema of the error: p'(x) = a + 3b x^2 + 5c x^4 = 0, a quadratic in x^2
        discriminant = 9 * b * b - 20 * a * c
        roots = []
        if c != 0 and discriminant >= 0:
            for sign in (-1, 1):
                y = (-3 * b + sign * math.sqrt(discriminant)) / (10 * c)
                if low**2 < y < high**2:
                    roots.append(math.sqrt(y))
        new_reference = sorted([low, *roots, high])
        if len(new_reference) != 4 or max(abs(x - y) for x, y in zip(new_reference, reference, strict=True)) < 1e-15:
            break
        reference = new_reference
    return coefficients


def polar_coefficients(lower: float = 1e-4, steps: int = 10) -> list[tuple[float, float, float]]:
    """Per-step minimax quintic coefficients for the polar iteration, from singular values in [lower, 1].

    Each step maps the current interval [l, u] of singular values to [min p, max p] over it; the
    next step is optimal for that interval. Computed once at import (float64, a few ms).
    """
    low, high = lower, 1.0
    coefficients = []
    for _ in range(steps):
        a, b, c = _minimax_quintic(low, high)
        coefficients.append((a, b, c))
        candidates = [low, high]
        discriminant = 9 * b * b - 20 * a * c
        if c != 0 and discriminant >= 0:
            for sign in (-1, 1):
                y = (-3 * b + sign * math.sqrt(discriminant)) / (10 * c)
                if low**2 < y < high**2:
                    candidates.append(math.sqrt(y))
        values = [a * x + b * x**3 + c * x**5 for x in candidates]
        low, high = min(values), max(values)
    return coefficients


# Singular values above 1e-4 of the largest reach 1 within 1e-6 after these 10 steps (float64).
POLAR_COEFFICIENTS: list[tuple[float, float, float]] = polar_coefficients()


def polar_nuclear_norm(z: Tensor, coefficients: list[tuple[float, float, float]] | None = None) -> Tensor:
    """Nuclear norm of each matrix of a batch ``z`` (B, n, d) as ``<polar(z), z>_F``.

    ``z`` is scaled by its Frobenius norm (so every singular value is at most 1) and iterated on
    its smaller side, m = min(n, d): each step costs about 4 m^2 max(n, d) + 2 m^3 flops. The
    iteration runs on Z itself, not on its Gram matrix: a Gram-matrix form is cheaper but squares
    the round-off, and zero singular values then come out as sqrt(eps)-sized noise (tried and
    measured: errors of several percent on rank-deficient inputs in float32). Singular values
    below ~1e-4 of the Frobenius norm count partially. Zero matrices give 0.
    """
    coefficients = POLAR_COEFFICIENTS if coefficients is None else coefficients
    target = z.mT if z.shape[-2] > z.shape[-1] else z  # (B, m, M) with m <= M: the Gram X X^T is m x m
    frobenius = torch.linalg.vector_norm(target, dim=(-2, -1))
    x = target / torch.where(frobenius > 0, frobenius, 1.0)[:, None, None]
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x * target).sum(dim=(-2, -1))


def _lanczos_quadrature(matrix: Tensor, start: Tensor, steps: int) -> Tensor:
    """``v^T f(A) v`` for every row v of ``start`` (B, N, m), f(x) = -x ln x, by Lanczos quadrature.

    Runs ``steps`` Lanczos steps per vector (batched, with full reorthogonalisation), then uses
    the eigenvalues and first eigenvector components of each tridiagonal matrix as Gauss nodes
    and weights. A vector whose Krylov space closes early (breakdown) gets an exact answer.
    Vectors are rows (B, N, m), so every reduction runs over contiguous memory.
    """
    batch, count, m = start.shape
    norms = torch.linalg.vector_norm(start, dim=-1)  # (B, N)
    vector = start / torch.where(norms > 0, norms, 1.0)[..., None]
    basis = start.new_zeros(batch, count, steps, m)
    alphas = start.new_zeros(batch, count, steps)
    betas = start.new_zeros(batch, count, steps)
    previous = torch.zeros_like(vector)
    beta = start.new_zeros(batch, count)
    for step in range(steps):
        basis[:, :, step] = vector
        product = vector @ matrix  # rows times a symmetric matrix: (A v)^T
        alpha = (vector * product).sum(dim=-1)
        product = product - alpha[..., None] * vector - beta[..., None] * previous
        # full reorthogonalisation against the basis so far: no ghost eigenvalues
        done = basis[:, :, : step + 1]  # (B, N, s, m)
        product = product - ((done @ product[..., None]).mT @ done).squeeze(-2)
        alphas[..., step] = alpha
        beta = torch.linalg.vector_norm(product, dim=-1)
        alive = beta > 1e-6 * alphas[..., : step + 1].abs().amax(dim=-1).clamp(min=1e-30)
        beta = torch.where(alive, beta, 0.0)
        betas[..., step] = beta
        previous = vector
        vector = torch.where(alive[..., None], product / torch.where(alive, beta, 1.0)[..., None], 0.0)
    tridiagonal = (
        torch.diag_embed(alphas) + torch.diag_embed(betas[..., :-1], 1) + torch.diag_embed(betas[..., :-1], -1)
    )
    nodes, vectors = torch.linalg.eigh(tridiagonal)  # (B, N, steps): small, batched
    nodes = nodes.clamp(min=0.0)
    weights = vectors[..., 0, :] ** 2
    return norms**2 * -(weights * torch.special.xlogy(nodes, nodes)).sum(dim=-1)


def slq_entropy(
    gram: Tensor,
    *,
    deflation: int = 256,
    probes: int = 128,
    steps: int = 16,
    seed: int = 0,
) -> Tensor:
    """Shannon entropy (nats) of the spectrum of each Gram matrix of a batch (B, m, m), matmul only.

    ``H = tr f(P)``, ``P = G / tr G``, ``f(x) = -x ln x``, estimated with Hutch++: ``Q`` =
    orthonormal basis of ``P^2 S`` for ``deflation`` random vectors S (it holds the dominant
    eigenvectors, whose large eigenvalue ruins plain Hutchinson estimates), the trace of
    ``Q^T f(P) Q`` by Lanczos quadrature from each basis vector, and the trace on the rest from
    ``probes`` orthonormal random vectors of the complement of Q, scaled by its dimension over
    their number (exact once they span it: for m <= deflation + probes, 384 with the
    defaults, up to the quadrature's error). A zero matrix has entropy 0. The defaults are
    measured, not derived: with 128 deflation vectors the largest error on 384 x 384 MiniLM Grams
    was 9e-3 nats, with 256 it is below 2e-4, and at 7B shapes (m = 512) the fast method takes
    ~7% longer (``docs/benchmarks.md``).
    """
    batch, m, _ = gram.shape
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    matrix = gram / torch.where(trace > 0, trace, 1.0)[:, None, None]
    generator = torch.Generator(device=gram.device).manual_seed(seed)
    deflation = min(deflation, m)
    probes = min(probes, m - deflation)

    def rademacher(columns: int) -> Tensor:
        signs = torch.randint(0, 2, (batch, m, columns), generator=generator, device=gram.device)
        return (2 * signs - 1).to(gram.dtype)

    sketch = matrix @ rademacher(deflation)
    basis, _ = torch.linalg.qr(matrix @ torch.linalg.qr(sketch)[0])  # one power step: a sharper subspace
    total = _lanczos_quadrature(matrix, basis.mT, steps).sum(dim=-1)
    if probes > 0:
        project_out = lambda vectors: vectors - basis @ (basis.mT @ vectors)  # noqa: E731
        complement, _ = torch.linalg.qr(project_out(rademacher(probes)))
        complement, _ = torch.linalg.qr(project_out(complement))  # again: round-off leaks back into Q
        total = total + _lanczos_quadrature(matrix, complement.mT, steps).sum(dim=-1) * (m - deflation) / probes
    return torch.where(trace > 0, total, 0.0)


# ---------------------------------------------------------------------------------------------
# The exact method: one batched eigensolve of the smaller Gram matrices
# ---------------------------------------------------------------------------------------------


def _solve_or_none(gram: Tensor) -> Tensor | None:
    """``eigvalsh`` of a batch, or None when it raises (a solve that did not converge)."""
    try:
        return torch.linalg.eigvalsh(gram)
    except RuntimeError:  # torch.linalg.LinAlgError; ill-conditioned input, seen on CUDA and in MKL
        return None


def eigvalsh_safely(gram: Tensor) -> tuple[Tensor, int]:
    """Eigenvalues of a batch of symmetric matrices and the number of failed matrices; never raises.

    A solve fails in two ways: it raises (no convergence), or it returns NaN eigenvalues for a
    finite matrix without raising, which MKL's float32 ``syevd`` does for some Grams of
    rank-deficient hidden states with round-off-sized channels (~2% of pruned-LayerNorm GPT-2
    sequences, ``tests/test_spectra.py``). Both are retried in float64 on the CPU, the batch at
    once, then matrix by matrix; matrices that still fail get NaN eigenvalues and are counted.
    A matrix with non-finite entries gets NaN eigenvalues and is not counted (nothing to solve).
    """
    finite = torch.isfinite(gram).all(dim=(-2, -1))
    eigenvalues = _solve_or_none(gram)
    if eigenvalues is not None:
        retry = finite & ~torch.isfinite(eigenvalues).all(dim=-1)
        if not retry.any():  # the common case: one batched solve (and one host synchronisation)
            return eigenvalues, 0
        eigenvalues = eigenvalues.clone()
    else:
        eigenvalues = torch.full(gram.shape[:-1], math.nan, dtype=gram.dtype, device=gram.device)
        retry = finite
    where = retry.nonzero().flatten()
    again, failed = _solve_in_float64(gram[where].to(device="cpu", dtype=torch.float64))
    eigenvalues[where] = again.to(device=gram.device, dtype=gram.dtype)
    return eigenvalues, failed


def _solve_in_float64(gram64: Tensor) -> tuple[Tensor, int]:
    """Eigenvalues of finite float64 CPU matrices, the batch at once, then one by one; NaN for failures."""
    eigenvalues = _solve_or_none(gram64)
    if eigenvalues is not None and bool(torch.isfinite(eigenvalues).all()):
        return eigenvalues, 0
    eigenvalues = torch.full(gram64.shape[:-1], math.nan, dtype=torch.float64)
    failed = 0
    for index in range(gram64.shape[0]):
        solved = _solve_or_none(gram64[index])
        if solved is None or not bool(torch.isfinite(solved).all()):
            failed += 1
        else:
            eigenvalues[index] = solved
    return eigenvalues, failed


def smaller_gram(z: Tensor) -> Tensor:
    """The smaller Gram matrix of each sequence: Z Z^T (L x L) when L <= d, else Z^T Z (d x d)."""
    return z @ z.mT if z.shape[1] <= z.shape[2] else z.mT @ z


def renyi2_nats(gram: Tensor) -> Tensor:
    """Order-2 entropy of the spectrum, -ln(||G||_F^2 / tr(G)^2), from the Gram matrix alone (0 for G = 0)."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    frobenius2 = gram.square().sum(dim=(-2, -1))
    ratio = frobenius2 / torch.where(trace > 0, trace, 1.0).square()
    return torch.where(trace > 0, -torch.log(ratio.clamp(min=torch.finfo(gram.dtype).tiny)), 0.0)


def spectral_sums(eigenvalues: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of singular values of Z and the Shannon entropy (nats) from Gram eigenvalues (B, m).

    Rows with non-finite eigenvalues (a failed solve) give NaN.
    """
    dtype = eigenvalues.dtype
    solved = torch.isfinite(eigenvalues).all(dim=-1)
    if eigenvalues.shape[-1] == 0:  # no tokens: an empty spectrum, masked as NaN by the caller
        eigenvalues = eigenvalues.new_zeros(eigenvalues.shape[0], 1)
    lam = torch.nan_to_num(eigenvalues, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    # Zero eigenvalues come out of a float32 solve as +-(0.1 to 1.5) * eps * lambda_max (measured
    # on rank-deficient Grams, m = 64..1024), and their square roots would bias the nuclear norm
    # upwards: treat eigenvalues under sqrt(m) * eps * lambda_max as zero. A cutoff of
    # m * eps * lambda_max also zeroed real eigenvalues of anisotropic (outlier-dimension) inputs.
    cutoff = torch.finfo(dtype).eps * math.sqrt(lam.shape[-1]) * lam.amax(dim=-1, keepdim=True)
    lam = torch.where(lam > cutoff, lam, 0.0)
    singular_sum = lam.sqrt().sum(dim=-1)
    total = lam.sum(dim=-1, keepdim=True)
    p = lam / torch.where(total > 0, total, 1.0)
    entropy_nats = 0.0 - torch.special.xlogy(p, p).sum(dim=-1)  # 0.0 - x: no -0.0
    nan = torch.full_like(singular_sum, math.nan)
    return torch.where(solved, singular_sum, nan), torch.where(solved, entropy_nats, nan)


def warn_failed_solves(failed: int, total: int) -> None:
    if failed:
        warnings.warn(
            f"the eigensolver failed on {failed} of {total} Gram matrices, also in float64 on the CPU; "
            "their spectral metrics are NaN",
            MNNWarning,
            stacklevel=4,
        )
