"""Damping, symmetrising, Cholesky and the a-posteriori checks every solver's result goes through.

Shapes: matrices are ``[..., d, d]`` (a batch of layers of equal d), right-hand sides are rows
``[..., k, d]`` solved from the right, ``V·A⁻¹`` (A symmetric, so this is ``(A⁻¹·Vᵀ)ᵀ``).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from ..errors import ConvergenceError

Callback = Callable[[int, torch.Tensor], None]  # (step t = 1, 2, ..., the current estimate)

# Random probe rows for the residual estimate of a direct solve: E‖z·(I − X·A)‖² = ‖I − X·A‖_F² for
# z ~ N(0, I), so the mean over PROBES rows estimates the same norm Schulz reports, at O(PROBES·d²).
PROBES = 8
PROBE_SEED = 0


def damp(G: torch.Tensor, damping) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = G + λ·I in G's compute dtype, λ as a float64 CPU tensor of the batch shape).

    G: [..., d, d] (float16/bfloat16 are lifted to float32, float32/float64 kept); damping: a
    non-negative float or a tensor broadcasting to G.shape[:-2].  A is a fresh tensor.
    """
    lam = ops._bounds_tensor("damping", damping, G.shape[:-2]).reshape(G.shape[:-2])
    A = G.to(ops.compute_dtype(G.dtype), copy=True)
    A.diagonal(dim1=-2, dim2=-1).add_(lam.to(device=A.device, dtype=A.dtype).unsqueeze(-1))
    if A.numel() and not bool(torch.isfinite(torch.diagonal(A, dim1=-2, dim2=-1)).all()):
        raise ValueError(f"damping: G + damping·I overflows {A.dtype} (damping up to {float(lam.max()):.3e})")
    return A, lam


def symmetrise(X: torch.Tensor) -> torch.Tensor:
    """(X + Xᵀ)/2 over the last two axes: an inverse of a symmetric A is symmetric up to rounding.

    The result is row-major whatever X's layout (torch.cholesky_inverse returns column-major
    matrices): products with it then round the same way as with a saved and reloaded copy.
    """
    X = X.contiguous()
    return 0.5 * (X + X.transpose(-1, -2))


def cholesky_factor(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of each SPD matrix of A [..., d, d]; ConvergenceError if one is not SPD."""
    L, info = torch.linalg.cholesky_ex(A)
    bad = (info != 0).reshape(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ConvergenceError(
            f"cholesky: G + damping·I is not positive definite (or singular to within {A.dtype}'s resolution; "
            f"{int(bad.sum())} of {bad.numel()} matrices, first: matrix {i}, minor {int(info.reshape(-1)[i])})"
        )
    if not bool(torch.isfinite(L).all()):
        raise ConvergenceError(f"cholesky: the factor of G + damping·I is beyond {A.dtype}'s range; rescale G")
    return L


def cholesky_solve_rows(L: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """V·A⁻¹ for A = L·Lᵀ: L [B, d, d], V [B, k, d] in L's dtype → [B, k, d]."""
    return torch.cholesky_solve(V.transpose(-1, -2), L).transpose(-1, -2)


def cholesky_inverse(A: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """A⁻¹ of SPD A [..., d, d] by Cholesky factor + ``torch.cholesky_inverse`` (one step for callback)."""
    X = torch.cholesky_inverse(cholesky_factor(A))
    if callback is not None:
        callback(1, X)
    return X


def probe_rows(A: torch.Tensor) -> torch.Tensor:
    """Fixed random rows Z [B, PROBES, d] (seeded, so a check is reproducible) in A's dtype/device."""
    B, d = A.reshape(-1, *A.shape[-2:]).shape[0], A.shape[-1]
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(B, PROBES, d, generator=g, dtype=torch.float64).to(device=A.device, dtype=A.dtype)


def inverse_residual(A: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Estimate of ‖I − X·A‖_F per matrix (float64 CPU [B]) for the solve ``Z ↦ Z·X`` of rows [B, k, d].

    ‖I − X·A‖_F bounds ‖X − A⁻¹‖₂/‖A⁻¹‖₂, the same quantity Schulz's residual test bounds.
    """
    A3 = A.reshape(-1, *A.shape[-2:])
    Z = probe_rows(A3)
    R = Z - torch.matmul(solve(Z), A3)
    return (torch.linalg.vector_norm(R.double(), dim=(-2, -1)) / PROBES**0.5).cpu()


def rows_residual(A: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Relative residual ‖V − Y·A‖_F/‖V‖_F per matrix (float64 CPU [B]); A [B, d, d], V, Y [B, k, d]."""
    num = torch.linalg.vector_norm((V - torch.matmul(Y, A)).double(), dim=(-2, -1))
    den = torch.linalg.vector_norm(V.double(), dim=(-2, -1))
    return (num / torch.where(den > 0, den, torch.ones_like(den))).cpu()


def default_tol(dtype: torch.dtype) -> float:
    """The residual tolerance of the compute dtype (the Schulz default, so every solver meets one test)."""
    return ops.DEFAULT_TOL[ops.compute_dtype(dtype)]
