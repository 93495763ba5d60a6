"""The "torch" backend: plain-torch versions of every op — readable, and the oracle the others are tested against.

No argument checking here (``ops.py`` does that once); layouts as ``ops.py`` hands them to every backend:

* ``gfim_accumulate_(acc, grads)``: acc [L, d, d] float32/float64 contiguous, grads [L, m, d]
  (m = n·r rows, any float dtype, any strides).
* ``rank_gram_accumulate_(acc, grads)``: acc [L, r, r] float32/float64 contiguous, grads [L, n, r, d].
* ``schulz_inverse(A, lower, upper, tol, max_iter)``: A [B, d, d] float32/float64 contiguous,
  lower/upper [B] float64; the decisions are ``reference.SchulzSchedule``'s.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..reference import SchulzSchedule, update_coefficients


def _add_mirrored_(acc: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
    # BLAS does not promise a bit-symmetric product: keep the upper triangle and mirror it, as SYRK does.
    acc.add_(torch.triu(prod) + torch.triu(prod, diagonal=1).transpose(-1, -2))
    return acc


def gfim_accumulate_(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """acc[l] += grads[l]ᵀ·grads[l].  acc: [L, d, d] fp32/fp64; grads: [L, m, d]. Returns acc."""
    g = grads.to(acc.dtype)
    return _add_mirrored_(acc, torch.matmul(g.transpose(-1, -2), g))


def rank_gram_accumulate_(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """acc[l] += Σ_i g_i·g_iᵀ over the n examples.  acc: [L, r, r] fp32/fp64; grads: [L, n, r, d].

    One batched GEMM: [L, r, n·d] times its transpose, in acc's dtype.  Returns acc.
    """
    L, n, r, d = grads.shape
    g = grads.to(acc.dtype).permute(0, 2, 1, 3).reshape(L, r, n * d)
    return _add_mirrored_(acc, torch.bmm(g, g.transpose(1, 2)))


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

    The step is X_{k+1} = β(2 − β)·X_k + β²·X_k·R_k (= βX_k(2I − βA X_k), R_k computed exactly once);
    start, β, stop and status come from ``reference.SchulzSchedule``.  ``iterations`` counts the
    updates applied to the returned X.  ``callback(k, X_k)`` (this backend only) sees every iterate
    X_k, k = 1, 2, ..., matrix after matrix — how the convergence study records its error curves
    from this very loop.
    """
    B, d, _ = A.shape
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    X_out = torch.empty_like(A)
    iters = torch.zeros(B, dtype=torch.int64)
    resid = torch.zeros(B, dtype=torch.float64)
    status = torch.zeros(B, dtype=torch.int64)
    schedule = SchulzSchedule(d, tol, max_iter)
    for i in range(B):
        X = eye * schedule.start(float(lower[i]), float(upper[i]))
        X_prev = None
        while True:
            R = eye - A[i] @ X
            if schedule.decide(float(torch.linalg.vector_norm(R))) is not None:
                break
            c1, c2 = update_coefficients(schedule.next_beta())
            X_prev, X = X, c1 * X + c2 * (X @ R)
            if callback is not None:
                callback(schedule.iterations, X)
        X_out[i] = X_prev if schedule.rollback else X
        iters[i], resid[i], status[i] = schedule.iterations, schedule.residual, schedule.status
    return X_out, iters, resid, status
