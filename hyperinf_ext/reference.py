"""Plain-torch versions of every op: readable, and the oracle the other backends are tested against.

These functions do no argument checking (``ops.py`` does that once) and assume the layouts that
``ops.py`` hands to every backend:

* ``gfim_accumulate_(acc, grads)``: ``acc`` is ``[L, d, d]`` (float32 or float64, contiguous),
  ``grads`` is ``[L, m, d]`` with ``m = n·r`` rows (any float dtype, any strides).
* ``schulz_inverse(A, lower, upper, tol, max_iter)``: ``A`` is ``[B, d, d]`` float32/float64
  contiguous, ``lower``/``upper`` are ``[B]`` float64 spectral bounds of each matrix
  (``0 <= lower < upper``, ``lower == 0`` meaning "unknown").

The Schulz algorithm below is THE specification: the C++ and Triton backends implement the same
steps, so iteration counts and statuses agree across backends.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

# Status codes of one matrix after `schulz_inverse`, shared by every backend.
CONVERGED = 0  # residual <= tol
STAGNATED = 1  # rounding floor of the dtype reached above tol
MAX_ITER = 2  # iteration budget spent above tol
DIVERGED = 3  # residual grew past what an SPD matrix allows: A is not positive definite

STATUS_NAMES = {CONVERGED: "converged", STAGNATED: "stagnated", MAX_ITER: "max_iter", DIVERGED: "diverged"}

# Once the residual is below this and the step was (nearly) unscaled, Schulz is in its quadratic
# phase: a step that fails to halve the residual means rounding error dominates (stagnation).
QUADRATIC_PHASE = 0.5
UNSCALED = 1e-2  # |β − 1| below this counts as an unscaled step


def gfim_accumulate_(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """acc[l] += grads[l]ᵀ·grads[l].  acc: [L, d, d] fp32/fp64; grads: [L, m, d]. Returns acc."""
    g = grads.to(acc.dtype)
    prod = torch.matmul(g.transpose(-1, -2), g)
    # BLAS does not promise a bit-symmetric product: keep the upper triangle and mirror it, as SYRK does.
    upper = torch.triu(prod)
    acc.add_(upper + torch.triu(prod, diagonal=1).transpose(-1, -2))
    return acc


def initial_scale(lower: float, upper: float) -> float:
    """β₀ with X₀ = β₀·I: optimal 2/(λmin+λmax) when a lower bound is known, else the safe 1/λmax."""
    return 2.0 / (lower + upper) if lower > 0 else 1.0 / upper


def step_scale(a: float, b: float, residual: float) -> tuple[float, float, float]:
    """Scaling β for one step given the bracket [a, b] of the eigenvalues of A·X.

    The residual r = ‖I − A·X‖_F bounds ‖I − A·X‖₂, so every eigenvalue σ of A·X lies in
    [1 − r, 1 + r]; combining that with the analytic bracket keeps the scaling safe even when the
    supplied lower bound is loose or rounding has moved the spectrum.  Returns (β, a, b) with the
    tightened bracket.  β = 2/(a+b) maps [a, b] onto [4ab/(a+b)², 1], which is optimal for the
    quadratic σ ↦ βσ(2 − βσ).  With no lower information (a == 0) plain Schulz (β = 1) is used.
    """
    if residual < 1.0:
        b = min(b, 1.0 + residual)
        if a > 0.0:
            a = max(a, 1.0 - residual)
    if a <= 0.0:
        return 1.0, a, b
    return 2.0 / (a + b), a, b


def next_bracket(a: float, b: float, beta: float) -> tuple[float, float]:
    """Bracket of the eigenvalues of A·X after the step X ← βX(2I − βAX)."""

    def f(s: float) -> float:
        return beta * s * (2.0 - beta * s)

    lo = min(f(a), f(b))
    hi = 1.0 if a <= 1.0 / beta <= b else max(f(a), f(b))
    return lo, hi


def divergence_limit(d: int) -> float:
    """For SPD A every eigenvalue of I − A·X stays in [0, 1) so ‖I − A·X‖_F < √d; far past it, A is not SPD."""
    return 2.0 * math.sqrt(d) + 1.0


def schulz_inverse(
    A: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    tol: float,
    max_iter: int,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of each SPD matrix in ``A`` by scaled Schulz (Newton–Schulz) iteration.

    A: [B, d, d] float32/float64. lower, upper: [B] float64 bounds on the spectrum of each matrix.
    Returns (X [B, d, d] same dtype as A, iterations [B] int64, residual [B] float64, status [B] int64).

    Per matrix, with R_k = I − A·X_k and r_k = ‖R_k‖_F:
      X₀ = β₀·I, β₀ = initial_scale(lower, upper); bracket [a, b] = [β₀·lower, β₀·upper].
      for k = 0, 1, ...:
        r_k; stop CONVERGED if r_k <= tol; DIVERGED if r_k is not finite or > divergence_limit(d);
        STAGNATED if r_{k-1} < QUADRATIC_PHASE and |β_{k-1} − 1| < UNSCALED and r_k > r_{k-1}/2
        (the iterate with the smaller residual is the one returned); MAX_ITER if k == max_iter.
        β, a, b = step_scale(a, b, r_k)
        X_{k+1} = β(2 − β)·X_k + β²·X_k·R_k      (= βX_k(2I − βA X_k), with R_k computed exactly once)
        a, b = next_bracket(a, b, β)
    ``iterations`` counts the updates applied to the returned X.  ``callback(k, X_k)`` (this backend
    only) sees every iterate X_k, k = 1, 2, ..., matrix after matrix — how the convergence study
    records its error curves from this very loop.
    """
    B, d, _ = A.shape
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    X_out = torch.empty_like(A)
    iters = torch.zeros(B, dtype=torch.int64)
    resid = torch.zeros(B, dtype=torch.float64)
    status = torch.zeros(B, dtype=torch.int64)
    limit = divergence_limit(d)
    for i in range(B):
        lo, up = float(lower[i]), float(upper[i])
        beta0 = initial_scale(lo, up)
        a, b = beta0 * lo, beta0 * up
        X = eye * beta0
        X_prev, r_prev, beta = None, math.inf, math.inf
        k = 0
        while True:
            R = eye - A[i] @ X
            r = float(torch.linalg.vector_norm(R))
            if not math.isfinite(r) or r > limit:
                st = DIVERGED
                break
            if r <= tol:
                st = CONVERGED
                break
            if r_prev < QUADRATIC_PHASE and abs(beta - 1.0) < UNSCALED and r > 0.5 * r_prev:
                st = STAGNATED
                if r > r_prev:
                    X, r, k = X_prev, r_prev, k - 1
                break
            if k == max_iter:
                st = MAX_ITER
                break
            beta, a, b = step_scale(a, b, r)
            X_prev, r_prev = X, r
            X = beta * (2.0 - beta) * X + beta * beta * (X @ R)
            a, b = next_bracket(a, b, beta)
            k += 1
            if callback is not None:
                callback(k, X)
        X_out[i] = X
        iters[i], resid[i], status[i] = k, r, st
    return X_out, iters, resid, status
