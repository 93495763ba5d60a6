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


def damping_tensor(G: torch.Tensor, damping) -> torch.Tensor:
    """λ as a float64 CPU tensor of G's batch shape (checked: non-negative, finite, broadcasting)."""
    return ops.bounds_tensor("damping", damping, G.shape[:-2]).reshape(G.shape[:-2])


def _add_damping_(A: torch.Tensor, lam: torch.Tensor) -> None:
    """A += λ·I in place (A [..., d, d] in the compute dtype); ValueError when the diagonal overflows."""
    A.diagonal(dim1=-2, dim2=-1).add_(lam.to(device=A.device, dtype=A.dtype).reshape(A.shape[:-2]).unsqueeze(-1))
    if A.numel() and not bool(torch.isfinite(torch.diagonal(A, dim1=-2, dim2=-1)).all()):
        raise ValueError(f"damping: G + damping·I overflows {A.dtype} (damping up to {float(lam.max()):.3e})")


def damp(G: torch.Tensor, damping) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = G + λ·I in G's compute dtype, λ as a float64 CPU tensor of the batch shape).

    G: [..., d, d] (float16/bfloat16 are lifted to float32, float32/float64 kept); damping: a
    non-negative float or a tensor broadcasting to G.shape[:-2].  A is a fresh tensor.
    """
    lam = damping_tensor(G, damping)
    A = G.to(ops.compute_dtype(G.dtype), copy=True)
    _add_damping_(A, lam)
    return A, lam


def symmetrise(X: torch.Tensor) -> torch.Tensor:
    """(X + Xᵀ)/2 over the last two axes: an inverse of a symmetric A is symmetric up to rounding.

    The result is row-major whatever X's layout (torch.cholesky_inverse returns column-major
    matrices): products with it then round the same way as with a saved and reloaded copy.
    """
    X = X.contiguous()
    return 0.5 * (X + X.transpose(-1, -2))


def _check_spd(info: torch.Tensor, dtype: torch.dtype) -> None:
    """ConvergenceError unless every ``info`` of ``cholesky_ex`` is 0 (each matrix factored)."""
    bad = (info != 0).reshape(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ConvergenceError(
            f"cholesky: G + damping·I is not positive definite (or singular to within {dtype}'s resolution; "
            f"{int(bad.sum())} of {bad.numel()} matrices, first: matrix {i}, minor {int(info.reshape(-1)[i])})"
        )


def check_invertible(A: torch.Tensor) -> None:
    """ConvergenceError when a matrix of A = G + λI [..., d, d] is singular to within float64's resolution.

    An unenforced Cholesky answer (the direct baseline) may be inaccurate for an ill-conditioned A in a
    low dtype, but it must be the inverse of something: where A has no inverse even in float64 (a
    singular GFIM at λ = 0, whose rounded pivots let the factorisation through), X fits nothing.  The
    test: the float64 Cholesky fails, or its smallest pivot L_ii² is within d·u₆₄·trace(A) of zero
    (the rounding of the factorisation itself, so below it no pivot is distinguishable from 0).
    """
    A3 = A.reshape(-1, *A.shape[-2:]).to(torch.float64)
    L, info = torch.linalg.cholesky_ex(A3)
    pivots = L.diagonal(dim1=-2, dim2=-1).square().amin(-1)
    floor = A3.shape[-1] * torch.finfo(torch.float64).eps * A3.diagonal(dim1=-2, dim2=-1).sum(-1).abs()
    bad = (info != 0) | ~(pivots > floor)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ConvergenceError(
            f"cholesky: G + damping·I is singular to within float64's resolution ({int(bad.sum())} of "
            f"{bad.numel()} matrices, first: matrix {i}); its Cholesky answer is no inverse: use a positive damping"
        )


def cholesky_factor(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of each SPD matrix of A [..., d, d]; ConvergenceError if one is not SPD."""
    L, info = torch.linalg.cholesky_ex(A)
    _check_spd(info, A.dtype)
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


_PROBE_CACHE: dict[tuple, torch.Tensor] = {}
_PROBE_CACHE_SIZE = 16


def probe_rows(A: torch.Tensor) -> torch.Tensor:
    """Fixed random rows Z [B, PROBES, d] (seeded, so a check is reproducible) in A's dtype/device.

    The same rows every call (cached per shape, dtype and device; callers must not write to them).
    No entry is zero, so a NaN or ±inf anywhere in a matrix Z is multiplied by reaches the residual.
    """
    B, d = A.reshape(-1, *A.shape[-2:]).shape[0], A.shape[-1]
    key = (B, d, A.dtype, A.device)
    Z = _PROBE_CACHE.get(key)
    if Z is None:
        g = torch.Generator().manual_seed(PROBE_SEED)
        Z = torch.randn(B, PROBES, d, generator=g, dtype=torch.float64, device="cpu")
        Z = torch.where(Z == 0, torch.ones_like(Z), Z).to(device=A.device, dtype=A.dtype)
        if len(_PROBE_CACHE) >= _PROBE_CACHE_SIZE:
            _PROBE_CACHE.pop(next(iter(_PROBE_CACHE)))
        _PROBE_CACHE[key] = Z
    return Z


def inverse_residual(A: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor], precise: bool = False) -> torch.Tensor:
    """Estimate of ‖I − X·A‖_F per matrix (float64 CPU [B]) for the solve ``Z ↦ Z·X`` of rows [B, k, d].

    ‖I − X·A‖_F bounds ‖X − A⁻¹‖₂/‖A⁻¹‖₂, the same quantity Schulz's residual test bounds.
    ``precise``: the product with A and the difference in float64 (the solve itself in A's dtype), so
    that the rounding of the check does not add to the residual of the solve it checks.
    """
    A3 = A.reshape(-1, *A.shape[-2:])
    Z = probe_rows(A3)
    if precise:
        R = Z.double() - torch.matmul(solve(Z).double(), A3.double())
    else:
        R = Z - torch.matmul(solve(Z), A3)
    return (torch.linalg.vector_norm(R, dim=(-2, -1), dtype=torch.float64) / PROBES**0.5).cpu()


def inverse_residual_f64(G: torch.Tensor, lam: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The probe estimate of ‖I − X·(G + λI)‖_F (as :func:`verified_cholesky_inverse`'s) with every
    product in float64: the residual of the stored X itself, without a float32 evaluation's rounding
    (about √d·u·κ, as large as the residual near float32's limit).  float64 CPU [B]."""
    d = G.shape[-1]
    G3, X3 = G.reshape(-1, d, d), X.reshape(-1, d, d)
    Z = probe_rows(G3).double()
    Y = torch.matmul(Z, X3.double())
    lam_b = lam.to(device=Y.device, dtype=torch.float64).reshape(-1, 1, 1)
    R = Z - torch.baddbmm(Y * lam_b, Y, G3.double())
    return (torch.linalg.vector_norm(R, dim=(-2, -1)) / PROBES**0.5).cpu()


_POTRI_SYMMETRIC: dict[tuple, bool] = {}


def _potri_is_symmetric(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.cholesky_inverse writes both triangles, equal (LAPACK potri computes one; torch's
    CPU kernel mirrors it into the other).  Checked once per device kind and dtype on a small batch;
    where it does not hold, :func:`verified_cholesky_inverse` symmetrises explicitly."""
    key = (device.type, dtype)
    if key not in _POTRI_SYMMETRIC:
        g = torch.Generator().manual_seed(1)
        M = torch.randn(2, 37, 37, generator=g, dtype=torch.float64, device="cpu")
        A = (M @ M.mT + 37 * torch.eye(37, dtype=torch.float64, device="cpu")).to(device=device, dtype=dtype)
        X = torch.cholesky_inverse(torch.linalg.cholesky(A))
        _POTRI_SYMMETRIC[key] = bool(torch.equal(X, X.mT))
    return _POTRI_SYMMETRIC[key]


def verified_cholesky_inverse(G: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X = (G + λI)⁻¹ [..., d, d], its residual estimate [batch] float64 CPU) by Cholesky, in one buffer.

    The lean path of an explicit inverse: G + λI is written into one fresh buffer, factored in place
    (``cholesky_ex(out=)``) and inverted in place (``cholesky_inverse(out=)``), so the call allocates
    what a bare ``cholesky`` + ``cholesky_inverse`` does, or less.  X is returned row-major and exactly
    symmetric (X == Xᵀ bit for bit: torch's kernel mirrors potri's triangle, checked once per device
    kind and dtype, else symmetrised here).  ConvergenceError when a matrix is not positive definite.

    The residual is :func:`inverse_residual`'s probe estimate of ‖I − X·A‖_F, computed as
    Z − (Z·X)·G − λ·(Z·X) (no copy of A is kept).  It is also the finiteness check: every entry of X
    and of G is multiplied by a non-zero probe entry, so a NaN or ±inf in either (an inverse beyond the
    dtype's range, a non-finite G) makes the residual non-finite, which no tolerance accepts.
    """
    d = G.shape[-1]
    cdtype = ops.compute_dtype(G.dtype)
    G3 = G.reshape(-1, d, d)
    if G3.dtype != cdtype:
        G3 = G3.to(cdtype)
    buf = G3.clone(memory_format=torch.contiguous_format)  # A = G + λI, then L, then X: one allocation
    _add_damping_(buf, lam)
    # buf.mT is the column-major layout LAPACK works in; as a matrix it is Aᵀ = A
    col = buf.mT
    info = torch.empty(buf.shape[:-2], dtype=torch.int32, device=buf.device)
    L, info = torch.linalg.cholesky_ex(col, out=(col, info))
    _check_spd(info, cdtype)
    Xc = torch.cholesky_inverse(L, out=L)
    X = Xc.mT if _potri_is_symmetric(buf.device, cdtype) else symmetrise(Xc)
    if not X.is_contiguous():  # the out= buffers were not used as given: a row-major copy
        X = X.contiguous()
    Z = probe_rows(G3)
    Y = torch.matmul(Z, X)
    lam_b = lam.to(device=Y.device, dtype=Y.dtype).reshape(-1, 1, 1)
    R = Z - torch.baddbmm(Y * lam_b, Y, G3)  # Z·(I − X·A), A = G + λI
    residual = (torch.linalg.vector_norm(R, dim=(-2, -1), dtype=torch.float64) / PROBES**0.5).cpu()
    return X.reshape(G.shape[:-2] + (d, d)), residual


def rows_residual(A: torch.Tensor, V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Relative residual ‖V − Y·A‖_F/‖V‖_F per matrix (float64 CPU [B]); A [B, d, d], V, Y [B, k, d]."""
    num = torch.linalg.vector_norm((V - torch.matmul(Y, A)).double(), dim=(-2, -1))
    den = torch.linalg.vector_norm(V.double(), dim=(-2, -1))
    return (num / torch.where(den > 0, den, torch.ones_like(den))).cpu()


def default_tol(dtype: torch.dtype) -> float:
    """The residual tolerance of the compute dtype (the Schulz default, so every solver meets one test)."""
    return ops.DEFAULT_TOL[ops.compute_dtype(dtype)]


_FREE_EXPONENT = {torch.float32: 32, torch.float64: 256}  # a quarter of each dtype's exponent range


def in_range(G: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(G·2^-e, λ·2^-e, e [B]) when the largest entry of some G + λI lies outside 2^±(maxexp/4) of the
    compute dtype (2^±32 float32, 2^±256 float64), else (G, λ, None): O(d²) reads, no copy.

    Solving 2^e·(G·2^-e + λ·2^-e) instead keeps every intermediate in range — ‖A‖_F of the bracket squares
    the entries (G at 1e-170 gave an upper bound of 0 in float64), Cholesky takes their square roots — and
    (2^e·A')⁻¹ = 2^-e·A'⁻¹ is undone exactly."""
    if G.numel() == 0:
        return G, lam, None
    d = G.shape[-1]
    cdtype = ops.compute_dtype(G.dtype)
    G3 = G.reshape(-1, d, d)
    amax = torch.maximum(G3.amax((-2, -1)), -G3.amin((-2, -1))).double().cpu()
    e = ops.range_exponents(torch.maximum(amax, lam.reshape(-1)), _FREE_EXPONENT[cdtype])
    if not bool(e.any()):
        return G, lam, None
    Gs = ops.ldexp(G3.to(cdtype), -e).reshape(G.shape[:-2] + (d, d))
    return Gs, ops.ldexp(lam.reshape(-1), -e).reshape(lam.shape), e


def rows_out_of_range(V: torch.Tensor) -> bool:
    """Whether the largest |entry| of rows V lies outside the band :func:`in_range` leaves unscaled."""
    return bool(V.numel()) and bool(
        ops.range_exponents(V.abs().amax(), _FREE_EXPONENT[ops.compute_dtype(V.dtype)]).any())


def unscaled_rows(solve: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """V·(2^e·A')⁻¹ = 2^(f−e)·((V·2^-f)·A'⁻¹) for V [B, k, d], with ``solve(W) = W·A'⁻¹`` and f from V's own
    range per matrix: neither the product nor the rows under- or overflow before the exact rescaling."""
    f = ops.range_exponents(V.abs().amax((-2, -1)), 0)
    return ops.ldexp(solve(ops.ldexp(V, -f)), f - e)
