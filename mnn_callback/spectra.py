"""Matmul-only spectral estimators for ``method="fast"``: nuclear norm by polar iteration, entropy by SLQ.

Pure torch on batches. Both avoid eigendecompositions, which GPUs run slowly and with host
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

import torch
from torch import Tensor

__all__ = ["POLAR_COEFFICIENTS", "polar_coefficients", "polar_nuclear_norm", "slq_entropy"]


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
