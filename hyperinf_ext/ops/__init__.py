"""The public kernel-level API: argument checks (once, here) and dispatch to a backend.

Imports only ``backends`` and its own checks; the inverse-HVP front doors built on these ops are
``hyperinf_ext.inverse_hvp`` (solvers/ihvp.py) and ``hyperinf_ext.make_ihvp`` (curvature/ihvp.py).
The gradient projection ops (``project``, ``project_quantize``, ``quantize``) live in ``ops/projection.py``.

Every function validates shapes, dtypes, devices and finiteness (helpers in ``ops/checks.py``), brings tensors to the layout the
backends expect (see ``backends/schedule.py``) and calls ``backends.select`` — the single dispatch point.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import backends
from ..backends import schedule as reference
from .checks import (
    FLOAT_DTYPES,
    bounds_tensor,
    check_accumulated,
    check_accumulator,
    check_finite,
    check_square,
    check_symmetric,
    check_tensor,
    diverged_reason,
    failure_message,
)
from ..errors import ConvergenceError
from .info import SchulzInfo
from .projection import project, project_quantize, quantize

# Default Schulz acceptance bound on ‖I − A·X‖_F (an upper bound of ‖X − A⁻¹‖₂ / ‖A⁻¹‖₂), per
# compute dtype.  float32's rounding floor is about κ·u·√d/2 (measured: 5.6e-3 at κ = 1e4, d = 1024),
# so 1e-2 accepts what float32 can resolve and refuses the rest.
DEFAULT_TOL = {torch.float32: 1e-2, torch.float64: 1e-8}
# Where the default run stops, per compute dtype.  float32 iterates on to its rounding floor (the
# stagnation test ends it) and then accepts the result when the residual is ≤ DEFAULT_TOL: stopping
# at 1e-2 left float32 Schulz 10–50× less accurate than a float32 Cholesky solve, for one or two
# iterations (issue #10; bench/RESULTS.md).  float64 stops at 1e-8, a relative error far below
# anything influence scores resolve; its floor would cost two more float64 iterations.
DEFAULT_STOP = {torch.float32: 0.0, torch.float64: 1e-8}
DEFAULT_MAX_ITER = 100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every lower precision is accumulated and solved in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# GFIM


def gfim_accumulate_(acc: torch.Tensor, grads: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Add Σ_i g_iᵀ·g_i into ``acc`` in place (streaming GFIM accumulation); returns ``acc``.

    Non-finite gradients raise ValueError after the accumulation (found on acc's diagonal), leaving
    acc non-finite: start a fresh accumulator.

    acc: [d, d] or [L, d, d], float32 or float64.  grads: [n, r, d] (with 2-D acc) or [L, n, r, d]
    (with 3-D acc: L layers of the same d in one call), float16/bfloat16/float32/float64, any strides.
    Products are accumulated in acc's dtype.
    """
    check_tensor("acc", acc, (2, 3), (torch.float32, torch.float64))
    check_tensor("grads", grads, (acc.dim() + 1,))
    d = check_square("acc", acc)
    if grads.shape[-1] != d:
        raise ValueError(f"grads: last dimension {grads.shape[-1]} does not match acc's d = {d}")
    if acc.dim() == 3 and grads.shape[0] != acc.shape[0]:
        raise ValueError(f"grads: {grads.shape[0]} layers but acc holds {acc.shape[0]}")
    if grads.device != acc.device:
        raise ValueError(f"grads: on {grads.device} but acc is on {acc.device}")
    check_accumulator("acc", acc)
    if grads.numel() == 0:
        return acc
    acc3 = acc if acc.dim() == 3 else acc.unsqueeze(0)
    g3 = grads.reshape(acc3.shape[0], -1, d)  # [L, n·r, d]: a view whenever the strides allow
    _, impl = backends.select(backend, acc.device)
    if acc3.is_contiguous():
        impl.gfim_accumulate_(acc3, g3)
    else:
        work = acc3.contiguous()
        impl.gfim_accumulate_(work, g3)
        acc3.copy_(work)
    check_accumulated("grads", acc3)
    _check_underflow(acc3, g3)
    return acc


def rank_gram_accumulate_(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Add Σ_i g_i·g_iᵀ into ``acc`` in place (the r×r factor sum of LoRA gradients); returns ``acc``.

    acc: [L, r, r] float32 or float64, contiguous.  grads: [L, n, r, d], any float dtype and strides.
    Products are accumulated in acc's dtype (torch backend, one batched GEMM); the added matrix is
    exactly symmetric (its upper triangle mirrored).  Non-finite gradients raise ValueError after the
    accumulation, leaving acc non-finite, as in ``gfim_accumulate_``.
    """
    check_tensor("acc", acc, (3,), (torch.float32, torch.float64))
    check_tensor("grads", grads, (4,))
    r = check_square("acc", acc)
    check_accumulator("acc", acc, contiguous=True)
    if grads.shape[0] != acc.shape[0] or grads.shape[2] != r:
        raise ValueError(f"grads: shape {tuple(grads.shape)} does not match acc {tuple(acc.shape)}: expected [L, n, r, d] with L, r of acc")
    if grads.device != acc.device:
        raise ValueError(f"grads: on {grads.device} but acc is on {acc.device}")
    if grads.numel():
        backends.select("torch", acc.device)[1].rank_gram_accumulate_(acc, grads)
    check_accumulated("grads", acc)
    if grads.numel():
        _check_underflow(acc, grads.reshape(grads.shape[0], -1, grads.shape[-1]))
    return acc


def _check_underflow(acc3: torch.Tensor, g3: torch.Tensor) -> None:
    """ValueError when the squares of non-zero gradients g3 [L, m, ·] vanished in acc3 [L, ·, ·].

    A product that falls below the smallest normal number (tiny) is rounded to a multiple of tiny·eps,
    so the m products of a batch move an entry by at most m·tiny·eps: relative to a diagonal of at least
    m·tiny that is within eps, and below it the squares are no longer resolved (or flushed to 0).
    diag(acc) holds Σ g² ≥ max g², so a layer whose diagonal stays below m·tiny either has zero
    gradients or lost them to underflow: an O(d) test; the gradients are read only in that rare case,
    to tell the two apart."""
    fi = torch.finfo(acc3.dtype)
    low = fi.tiny * max(int(g3.shape[1]), 1)
    top = torch.diagonal(acc3, dim1=-2, dim2=-1).amax(-1)
    small = (top < low).cpu()
    if not bool(small.any()):
        return
    gmax = g3[small.to(g3.device)].abs().amax().double().item()
    if gmax > 0:
        raise ValueError(
            f"grads: the squares of gradients up to {gmax:.3e} underflow {acc3.dtype} (the accumulated diagonal "
            f"is at most {float(top[small.to(top.device)].max()):.3e} < {low:.1e}): scale the gradients by a power of "
            "two (make_ihvp with gradient dicts does) or accumulate in float64"
        )


def gfim(grads: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The generalized Fisher (1/n)·Σ_i g_iᵀ·g_i of per-sample LoRA gradients (no damping).

    grads: [n, r, d] (one layer) or [L, n, r, d] (L layers of equal d).
    Returns [d, d] (or [L, d, d]) in float32, or float64 for float64 input.
    """
    check_tensor("grads", grads, (3, 4))
    n = grads.shape[-3]
    if n == 0:
        raise ValueError("grads: no samples (n = 0)")
    d = grads.shape[-1]
    shape = (d, d) if grads.dim() == 3 else (grads.shape[0], d, d)
    acc = torch.zeros(shape, dtype=compute_dtype(grads.dtype), device=grads.device)
    gfim_accumulate_(acc, grads, backend=backend)
    return acc.div_(n)


def datainf_damping(G: torch.Tensor, rank: int, scale: float = 0.1) -> float | torch.Tensor:
    """DataInf damping λ = scale·trace(G)/(rank·d), which equals scale·mean_i(mean(g_i²)) for G = gfim(g).

    G: [d, d] → float, or [L, d, d] → float64 tensor [L].
    """
    check_tensor("G", G, (2, 3))
    d = check_square("G", G)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale: expected a finite non-negative number, got {scale!r}")
    check_finite("G", G)
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    if bool((diag < 0).any()):  # a GFIM Σ gᵀg has a non-negative diagonal; a negative λ would come out
        raise ValueError(f"G: has a negative diagonal entry ({float(diag.min()):.3g}); a GFIM is positive "
                         "semi-definite (pass gfim(grads), not another matrix)")
    lam = scale * diag.double().sum(-1) / (rank * d)
    return float(lam) if G.dim() == 2 else lam


# --------------------------------------------------------------------------------------------------
# Schulz inverse


def spectral_upper_bound(A: torch.Tensor) -> torch.Tensor:
    """Cheap upper bound of λmax for symmetric A [..., d, d]: min(max absolute row sum, ‖A‖_F), float64.

    Below float64 the sums run in float32 (a float64 copy of A cost 4× the sums) and the result is
    raised by 2·d·u32, far above the summation's rounding, so it stays an upper bound; an overflow
    there (entries near float32's range) repeats the sums in float64."""
    def bound(M: torch.Tensor) -> torch.Tensor:
        return torch.minimum(M.abs().sum(-1).amax(-1), torch.linalg.matrix_norm(M)).double()

    if A.dtype != torch.float64:
        ub = bound(A.float()) * (1.0 + 2.0 * A.shape[-1] * torch.finfo(torch.float32).eps)
        if bool(torch.isfinite(ub).all()):
            return ub
    return bound(A.double())


def schulz_inverse(
    A: torch.Tensor,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    lower_bound: float | torch.Tensor | None = None,
    backend: str | None = None,
    return_info: bool = False,
    check: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
):
    """Inverse of a batch of symmetric positive-definite matrices by scaled Schulz iteration.

    A: [..., d, d], float16/bfloat16/float32/float64 (low precision is computed in float32).
    Each matrix starts from X₀ = β₀·I with β₀ from its own cheap spectral bounds (upper: min of
    the max row sum and ‖A‖_F), so the iteration converges whatever the scale of A; each matrix is
    first scaled by a power of two (exact) so that its bounds and products stay in the dtype's range.
    With ``lower_bound`` (a known lower bound of the spectrum, e.g. the damping; float or tensor
    broadcasting to the batch) every step is scaled optimally for the current eigenvalue bracket.

    Stopping: with ``tol`` given, when ‖I − A·X‖_F <= tol (or on stagnation at the dtype's rounding
    floor, which then fails).  By default float64 stops at 1e-8, and float32 iterates to its rounding
    floor (the stagnation test ends it) and accepts the result when the residual is <= 1e-2, so its
    accuracy is that of float32 itself (ops.DEFAULT_TOL / DEFAULT_STOP).

    Returns X [..., d, d] (float32, or float64 for float64 input), or (X, SchulzInfo) with
    ``return_info=True``.  Raises ConvergenceError when any matrix ends above the tolerance, is not
    positive definite, is too ill-conditioned for the dtype, or has an inverse beyond the dtype's
    range (unless ``check=False``, which returns what was reached; see info.status).

    ``callback(k, X_k)`` sees every iterate of a single matrix A [d, d] (it runs the torch reference
    loop, the only backend that reports steps; X_k is of A scaled by 2^-e when A's entries lie
    outside 2^±64, see info.extra["scale_exponent"]).
    """
    check_tensor("A", A, tuple(range(2, 10)))
    d = check_square("A", A)
    check_finite("A", A)
    if tol is not None and (isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < 1)):
        # ‖I − A·X‖ ≥ 1 is met by X = 0: such a tol would call anything converged
        raise ValueError(f"tol: expected a number in (0, 1), got {tol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0):
        raise ValueError(f"max_iter: expected a non-negative int, got {max_iter!r}")
    if callback is not None:
        if A.dim() != 2:
            raise ValueError(f"callback: per-step callbacks take one matrix [d, d], got shape {tuple(A.shape)}")
        if backend not in (None, "torch"):
            raise ValueError(f"callback: only the torch (reference) backend reports its steps, not {backend!r}")
        backend = "torch"
    steps = {} if callback is None else {"callback": callback}
    cdtype = compute_dtype(A.dtype)
    batch_shape = A.shape[:-2]
    A3 = A.to(cdtype).reshape(-1, d, d).contiguous()
    check_symmetric("A", A3)
    if tol is None:
        accept, stop = DEFAULT_TOL[cdtype], DEFAULT_STOP[cdtype]
    else:
        accept = stop = float(tol)
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    lower = torch.zeros(A3.shape[0], dtype=torch.float64, device="cpu") if lower_bound is None else bounds_tensor(
        "lower_bound", lower_bound, batch_shape
    )
    name, impl = backends.select(backend, A.device)
    B = A3.shape[0]
    if B == 0:
        empty = torch.zeros(batch_shape, dtype=torch.float64, device="cpu")
        info = SchulzInfo(torch.zeros(batch_shape, dtype=torch.int64, device="cpu"), empty, [], empty, empty, name, accept)
        X = torch.empty_like(A3).reshape(A.shape[:-2] + (d, d))
        return (X, info) if return_info else X

    # Matrices whose largest entry is far from 1 are scaled by 2^-e into [1/2, 1) first (exact: the
    # iteration's decisions and residuals are unchanged), so that their bounds and iterates cannot
    # under- or overflow (‖A‖_F of float64 entries below 1e-154 underflowed to 0, which was then
    # reported as "not positive definite").  Within 2^±64 nothing is scaled (and nothing copied).
    e = range_exponents(A3.abs().amax(dim=(-2, -1)), SCALE_FREE_EXPONENT)
    scaled = bool(e.any())
    As = ldexp(A3, -e) if scaled else A3
    upper = spectral_upper_bound(As).cpu()
    lower_s = torch.minimum(ldexp(lower, -e) if scaled else lower, upper)
    diag_min = torch.diagonal(As, dim1=-2, dim2=-1).amin(-1).double().cpu()
    not_pd = (diag_min <= 0) | (upper <= 0)

    if bool(not_pd.any()):
        # A non-positive diagonal entry rules out positive definiteness without iterating.
        X = torch.full_like(As, float("nan"))
        iters = torch.zeros(B, dtype=torch.int64, device="cpu")
        resid = torch.full((B,), float("inf"), dtype=torch.float64, device="cpu")
        status = torch.full((B,), reference.DIVERGED, dtype=torch.int64, device="cpu")
        ok = ~not_pd
        if bool(ok.any()):
            idx = ok.nonzero().squeeze(1)
            Xi, ii, ri, si = impl.schulz_inverse(As[idx.to(As.device)].contiguous(), lower_s[idx], upper[idx], stop, max_iter,
                                                 **steps)
            X[idx.to(As.device)], iters[idx], resid[idx], status[idx] = Xi, ii.cpu(), ri.cpu().double(), si.cpu()
    else:
        X, iters, resid, status = impl.schulz_inverse(As, lower_s, upper, stop, max_iter, **steps)
        iters, resid, status = iters.cpu(), resid.cpu().double(), status.cpu()
    if scaled:  # (As·2^e)⁻¹ = As⁻¹·2^-e: undo the scaling exactly, unless that leaves the dtype's range
        X = ldexp(X, -e)

    names = []
    for i in range(B):
        st = int(status[i])
        if st != reference.DIVERGED and float(resid[i]) <= accept:
            # With the default, float32 stops by stagnation at its floor (or max_iter) once it is
            # below the acceptance bound: that is convergence.
            st = reference.CONVERGED
        names.append(reference.STATUS_NAMES[st])
    if any(s == "converged" for s in names):
        finite = torch.isfinite(X).flatten(1).all(1).cpu()
        names = ["overflow" if s == "converged" and not bool(finite[i]) else s for i, s in enumerate(names)]

    info = SchulzInfo(
        iterations=iters.reshape(batch_shape),
        residual=resid.reshape(batch_shape),
        status=names,
        lower=(ldexp(lower_s, e) if scaled else lower_s).reshape(batch_shape),
        upper=(ldexp(upper, e) if scaled else upper).reshape(batch_shape),
        backend=name,
        tol=accept,
        extra={"stop": stop, "scale_exponent": e.reshape(batch_shape)},
    )
    if check and not info.converged:
        raise ConvergenceError(failure_message(info, cdtype, As), info)
    X = X.reshape(A.shape[:-2] + (d, d))
    return (X, info) if return_info else X


SCALE_FREE_EXPONENT = 64  # matrices with max |entry| in [2^-64, 2^64) are iterated unscaled


def range_exponents(amax: torch.Tensor, free: int) -> torch.Tensor:
    """Per entry of ``amax`` (the largest |value| of each matrix, vector…), the exponent e (integer-valued
    float64 CPU) with amax·2^-e in [1/2, 1) — or 0 for every entry when all of them lie in [2^-free, 2^free]
    or are 0, so that the common case scales nothing.  With :func:`ldexp` the one power-of-two range
    scaling of the ops and the solvers (exact: only the exponents change)."""
    amax = amax.detach().double().cpu().reshape(-1)
    _, e = torch.frexp(amax)
    e = torch.where(amax > 0, e, torch.zeros_like(e)).to(torch.float64)
    return e if bool((e.abs() > free).any()) else torch.zeros_like(e)


def ldexp(T: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """T[i] · 2^k[i] for T [B, ...] and integer-valued float64 k [B] (:func:`range_exponents`): a new tensor,
    exact where the result is representable (in steps that keep every factor 2^step finite and normal)."""
    k = k.clone()
    step_max = int(math.log2(torch.finfo(T.dtype).max)) - 1  # 126 (float32), 1022 (float64)
    out = None
    while bool((k != 0).any()):
        step = k.clamp(-step_max, step_max)
        f = torch.pow(2.0, step).to(device=T.device, dtype=T.dtype).reshape((-1,) + (1,) * (T.dim() - 1))
        out = T * f if out is None else out.mul_(f)
        k -= step
    return T.clone() if out is None else out


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device``, fastest first (see ``backends.available_backends``)."""
    return backends.available_backends(device)


def __getattr__(name: str):
    # ops.make_ihvp / ops.inverse_hvp lived here before the layers (issue #21): say where they went
    # rather than import upwards.
    if name in ("make_ihvp", "inverse_hvp"):
        raise AttributeError(f"hyperinf_ext.ops.{name} moved: use hyperinf_ext.{name} (the ops are the kernel "
                             "level; the inverse-HVP front doors sit above them)")
    raise AttributeError(f"module 'hyperinf_ext.ops' has no attribute {name!r}")
