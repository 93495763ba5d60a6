"""The "torch" backend: plain-torch versions of every op — readable, and the oracle the others are tested against.

No argument checking here (``ops/`` does that once); layouts as ``ops/`` hands them to every backend:

* ``gfim_accumulate_(acc, grads)``: acc [L, d, d] float32/float64 contiguous, grads [L, m, d]
  (m = n·r rows, any float dtype, any strides).
* ``rank_gram_accumulate_(acc, grads)``: acc [L, r, r] float32/float64 contiguous, grads [L, n, r, d].
* ``project(grads, proj)``: grads [B, r, d] (any float dtype and strides), proj [d, k] float32/float64
  contiguous → [B, r, k] in proj's dtype.
* ``project_quantize(grads, proj, out_dtype, top_exponent)`` → (values [B, r, k] out_dtype, scale
  float32 [B]); the scale rule is :func:`pow2_scale`.
* ``quantize(y, out_dtype, top_exponent)``: y [B, r, k] float32/float64 → the same storage without a
  projection (this backend only: elementwise, it serves every device).
* ``schulz_inverse(A, lower, upper, tol, max_iter)``: A [B, d, d] float32/float64 contiguous,
  lower/upper [B] float64; the decisions are ``reference.SchulzSchedule``'s and the host loop is
  ``schulz_driver``'s (this module and the Triton backend supply only the GEMM steps).
"""
from __future__ import annotations

from typing import Callable

import torch

from .schulz_driver import SchulzDriver


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


def project(grads: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """grads [B, r, d] · proj [d, k] → [B, r, k] in proj's dtype (grads converted to it, products summed in it)."""
    return torch.matmul(grads.to(proj.dtype), proj)


# float32's normal exponents: the scales stay normal floats (see csrc/project.cpp).
MIN_SCALE_EXPONENT, MAX_SCALE_EXPONENT = -126, 127


def pow2_scale(amax: torch.Tensor, top_exponent: int) -> torch.Tensor:
    """The per-example scale of ``project_quantize`` from amax [B] = max |y_b| (float32/float64).

    amax = m·2^e with m in [1/2, 1) gives scale 2^max(e − top_exponent, −126) as float32 [B], so that
    max |y_b| / scale < 2^top_exponent; an all-zero example gets 1, a non-finite amax NaN, and an
    exponent past 127 (no float32 power of two that large) inf — ops/ refuses both.
    """
    a = amax.double()
    _, e = torch.frexp(a)
    k = (e.double() - top_exponent).clamp_min(MIN_SCALE_EXPONENT)
    s = torch.where(k > MAX_SCALE_EXPONENT, torch.full_like(a, float("inf")), torch.ldexp(torch.ones_like(a), k))
    s = torch.where(a == 0, torch.ones_like(a), s)
    return torch.where(torch.isfinite(a), s, torch.full_like(a, float("nan"))).float()


def project_quantize(grads: torch.Tensor, proj: torch.Tensor, out_dtype: torch.dtype,
                     top_exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, r, k] out_dtype, scale float32 [B]) with y = grads·proj ≈ values·scale[b]: :func:`quantize`
    of :func:`project`."""
    return quantize(project(grads, proj), out_dtype, top_exponent)


def quantize(y: torch.Tensor, out_dtype: torch.dtype, top_exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, r, k] out_dtype, scale float32 [B]) with y [B, r, k] (float32/float64) ≈ values·scale[b].

    values = y / scale rounded to out_dtype; the division by a power of two is exact, so the cast is
    the one rounding.
    """
    amax = y.abs().flatten(1).amax(1) if y.shape[1] * y.shape[2] else y.new_zeros(y.shape[0])
    scale = pow2_scale(amax, top_exponent)
    # Non-finite scales only occur on rows ops/ refuses; divide those by 1 (values stay finite-or-not as y).
    div = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale)).to(y.dtype)
    return (y / div[:, None, None]).to(out_dtype), scale


class _TorchSteps:
    """The two GEMMs of a Schulz step in plain torch, one matrix at a time (``schulz_driver.SchulzSteps``).

    ``callback(k, X_k)`` (this backend only) sees every iterate X_k, k = 1, 2, ..., as it is formed —
    how the convergence study records its error curves from this very loop.
    """

    def __init__(self, A: torch.Tensor, *, callback: Callable[[int, torch.Tensor], None] | None = None):
        self.A, self.callback = A, callback
        self.eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        self.steps = [0] * A.shape[0]

    def residual(self, X: torch.Tensor, R: torch.Tensor, active: list[bool]) -> list[float]:
        norms = [0.0] * len(active)
        for b in (b for b, on in enumerate(active) if on):
            R[b] = self.eye - self.A[b] @ X[b]
            norms[b] = float(torch.linalg.vector_norm(R[b]))
        return norms

    def update(self, X: torch.Tensor, R: torch.Tensor, out: torch.Tensor, coef: list[tuple[float, float]],
               active: list[bool]) -> None:
        for b in (b for b, on in enumerate(active) if on):
            c1, c2 = coef[b]
            X_new = c1 * X[b] + c2 * (X[b] @ R[b])
            out[b] = X_new
            self.steps[b] += 1
            if self.callback is not None:
                self.callback(self.steps[b], X_new)


_DOC = """``schulz_inverse(A, lower, upper, tol, max_iter, *, callback=None)``.

The inverse of each SPD matrix in A by scaled Schulz (Newton–Schulz) iteration; A [B, d, d]
float32/float64, lower/upper [B] float64 bounds on each spectrum.  Returns (X [B, d, d] A's dtype,
iterations [B] int64, residual [B] float64, status [B] int64).  The step is X_{k+1} = β(2 − β)·X_k +
β²·X_k·R_k (= βX_k(2I − βA X_k), R_k computed exactly once); start, β, stop and status come from
``reference.SchulzSchedule``, the loop from ``schulz_driver``; ``iterations`` counts the updates
applied to the returned X.  Matrix after matrix, so the memory beyond A and X is that of one matrix.
"""
schulz_inverse = SchulzDriver(_TorchSteps, one_at_a_time=True, doc=_DOC)
