"""Explicit error slacks for numerical assertions, derived from the dtype and the conditioning.

A test that compares a computed quantity with a float64 reference must allow for the rounding of
both: BLAS libraries (MKL on Intel vs AMD, OpenBLAS) take different summation orders, so only the
a-priori bounds below are portable, never a measured value.  u is the unit roundoff (eps/2).
"""
from __future__ import annotations

import math

import torch

U64 = torch.finfo(torch.float64).eps / 2


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def cond2(A: torch.Tensor) -> torch.Tensor:
    """2-norm condition number of each SPD matrix of A [..., d, d] (float64 eigenvalues)."""
    ev = torch.linalg.eigvalsh(A.double())
    return ev[..., -1] / ev[..., 0]


def inverse_reference_slack(A: torch.Tensor) -> torch.Tensor:
    """Bound on the relative 2-norm error of a float64 reference inverse/solve of A, plus the
    rounding of a float64 residual: 2·d·u64·κ per matrix (backward-stable solvers, γ_d ≈ d·u)."""
    return 2 * A.shape[-1] * U64 * cond2(A)


def residual_slack(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far ‖I − A·X‖_F computed in ``dtype`` can be from the exact value when X ≈ A⁻¹:
    γ_d·‖|A|·|X|‖_F ≤ d·u·√d·κ (Higham, Accuracy and Stability, §3.5)."""
    d = A.shape[-1]
    return d * math.sqrt(d) * unit_roundoff(dtype) * cond2(A)


def fro(x: torch.Tensor) -> float:
    """‖x‖_F in float64 without over- or underflow of the squares (scaled by max |x|)."""
    x = x.double()
    s = float(x.abs().max()) if x.numel() else 0.0
    if s == 0.0 or not math.isfinite(s):
        return s
    return s * float((x / s).norm())


def gfim_slack(grads: torch.Tensor, acc_dtype: torch.dtype) -> float:
    """Bound on ‖Σ gᵀg computed in acc_dtype − exact‖_F relative to ‖Σ gᵀg‖_F: γ_m·‖|g|ᵀ|g|‖_F/‖gᵀg‖_F
    with m the number of rows summed (n·r), plus the float64 reference's own γ_m."""
    g = grads.double().reshape(-1, grads.shape[-3] * grads.shape[-2], grads.shape[-1])
    m = g.shape[1]
    exact = torch.matmul(g.transpose(-1, -2), g)
    absprod = torch.matmul(g.abs().transpose(-1, -2), g.abs())
    ratio = fro(absprod) / max(fro(exact), 1e-300)
    return (m + 2) * (unit_roundoff(acc_dtype) + U64) * ratio


def rank_gram_slack(grads: torch.Tensor, acc_dtype: torch.dtype) -> float:
    """Bound on ‖Σ_i g_i·g_iᵀ computed in acc_dtype − exact‖_F relative to the exact sum, for grads
    [L, n, r, d]: the same γ_m bound as ``gfim_slack`` on the r×r side, with m = n·d products summed
    per entry (plus the float64 reference's own γ_m)."""
    L, n, r, d = grads.shape
    g = grads.double().permute(0, 2, 1, 3).reshape(L, r, n * d)
    exact = torch.matmul(g, g.transpose(-1, -2))
    absprod = torch.matmul(g.abs(), g.abs().transpose(-1, -2))
    ratio = fro(absprod) / max(fro(exact), 1e-300)
    return (n * d + 2) * (unit_roundoff(acc_dtype) + U64) * ratio


def iterations_agree(it_a: torch.Tensor, it_b: torch.Tensor, stop: float) -> bool:
    """Iteration counts of two backends on the same input.  Stopping at a tolerance above the
    rounding noise, they take the same decisions; stopping at the rounding floor (float32's default,
    stop = 0), the last step's stagnation test compares residuals made of rounding noise, which another
    summation order can move by a step or two."""
    if stop > 0:
        return torch.equal(it_a, it_b)
    return bool(((it_a - it_b).abs() <= 2).all())


def inverses_agree(X: torch.Tensor, Xr: torch.Tensor, A: torch.Tensor, res: torch.Tensor, res_r: torch.Tensor,
                   dtype: torch.dtype) -> bool:
    """Two approximate inverses of A [..., d, d], each within its residual of A⁻¹ (up to the residuals'
    rounding s in ``dtype``): ‖X − Xr‖₂/‖Xr‖₂ ≤ (r + r_r + 2s)/(1 − r_r − s), per matrix."""
    d = A.shape[-1]
    A3, X3, R3 = A.double().reshape(-1, d, d), X.double().reshape(-1, d, d), Xr.double().reshape(-1, d, d)
    s = residual_slack(A3, dtype)
    r, rr = res.double().reshape(-1), res_r.double().reshape(-1)
    diff = torch.linalg.matrix_norm(X3 - R3, 2) / torch.linalg.matrix_norm(R3, 2)
    return bool((diff <= (r + rr + 2 * s) / (1 - rr - s).clamp_min(1e-3)).all())
