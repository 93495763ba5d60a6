"""Mixed-precision scaled Schulz: low-precision GEMMs (bf16 or TF32) first, float32 steps to finish.

The GPU counterpart of schulz.py's float32 → float64 polish.  A [..., d, d] SPD (any float dtype,
computed in float32) → X ≈ A⁻¹ float32 of the same shape, plus an ``ops.SchulzInfo``.

Per matrix, with the one Schulz rule of ``hyperinf_ext.backends.schedule`` (initial_scale, step_scale,
next_bracket, divergence_limit, QUADRATIC_PHASE / UNSCALED):

1. low phase: X₀ = β₀·I, then scaled steps X ← β(2−β)·X + β²·X·R whose two GEMMs (R = I − A·X and
   X·R) take inputs rounded to the low format (bf16: u = 2⁻⁸, TF32: u = 2⁻¹¹) and accumulate and
   return float32.  It hands over at the first of: (a) r = ‖I − A·X‖_F ≤ HANDOVER_FACTOR·u·√d, the
   resolution of the low GEMMs (rounding R and A alone moves r by about u·√d); (b) once r < 1, r stops decreasing,
   or stops halving once below QUADRATIC_PHASE (the low GEMMs no longer resolve what is left; the
   smaller-residual iterate is kept); (c) the next
   step would lift the smallest eigenvalues of A·X — and so the condition of X — past
   RESOLVE_FACTOR/(2u) times where X₀ = β₀·I had them (with a lower bound: the bracket's a past
   RESOLVE_FACTOR/(u·κ̂), κ̂ = upper/lower).  Rounding X to the low format perturbs A·X by about
   u·‖A‖·‖X‖, which past that point exceeds the eigenvalues being resolved: bf16 steps beyond it made
   X indefinite (measured at κ = 1e4..1e6), and the float32 finish then diverges;
   (d) LOW_MAX_STEPS.
2. float32 finish: the same scaled loop, warm-started at the hand-over iterate with the low phase's
   bracket [a, b] (a tightened by step_scale to 1 − r once the float32 residual r < 1), with
   float32 GEMMs, to the requested tolerance (default: float32's rounding floor, accepted at
   ops.DEFAULT_TOL, exactly as ``ops.schulz_inverse``).

Why a warm-started *scaled* finish rather than plain X ← X + X·R: at κ ≳ 1/u (10³ for bf16) the
low phase cannot bring r below 1, and plain steps from r ≥ 1 only double the smallest eigenvalues of
A·X per step where the scaled ones nearly quadruple them; once r < 1 step_scale's bracket makes β → 1,
so the finish *is* the plain squaring iteration from there on, with the reference's stagnation test.
In exact arithmetic every low iterate is a polynomial p(A_low) with p > 0 on (−∞, λmax]
(p_{k+1} = βp_k(2 − βt·p_k)), so X is positive definite and spec(A·X) real and positive even where
A_low is not: the float32 finish converges from it.  Rounding X keeps that only while u·κ(X) is small,
which is what rule (c) enforces; the upper end of the finish's bracket is widened by the measured
‖(A − A_low)·X‖_F (the difference of the two residuals), since an upper end below spec(A·X) is what
makes a scaled step overshoot 2/β.

The result must pass the all-float32 acceptance test (residual ≤ tol, not diverged); matrices that
fall short are redone by ``ops.schulz_inverse`` in float32 and info.extra["path"] says, per matrix,
which ran ("mixed" or "fp32").
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from .. import ops
from ..backends import schedule as reference
from ..errors import ConvergenceError

# Unit roundoff of the low GEMM's inputs (accumulation and output are float32 in both).
LOW_UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "tf32": 2.0 ** -11}
HANDOVER_FACTOR = 2.0  # (a): hand over once r <= 2·u·√d, twice the low GEMMs' own residual noise
# (c): hand over before the lift of spec(A·X)'s lower end passes RESOLVE_FACTOR/(2u): 16× for bf16 (two
# optimal steps), 128× for TF32 (three).  Measured at d = 128: 1/4 let bf16 rounding make X indefinite.
RESOLVE_FACTOR = 0.125
LOW_MAX_STEPS = 40  # (d): scaled Schulz needs ~log4(κ) + 5 steps; more means something is wrong


def round_to_low(x: torch.Tensor, low: str) -> torch.Tensor:
    """x (float32) rounded to the low format's precision (round to nearest even), kept as float32.

    bf16: 8 significant bits; tf32: 11 (float32's exponent, 10 stored mantissa bits).  Products of two
    such numbers are exact in float32, so a float32 GEMM of rounded inputs is the tensor-core GEMM with
    float32 accumulation, up to summation order.
    """
    if low == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    if low == "tf32":
        bits = x.contiguous().view(torch.int32)
        drop = 13  # float32 has 23 stored mantissa bits, TF32 10
        half = (1 << (drop - 1)) - 1
        lsb = (bits >> drop) & 1
        rounded = ((bits + half + lsb) >> drop) << drop  # round half to even; exponents of finite x only grow by one
        return rounded.view(torch.float32)
    raise ValueError(f"low: expected one of {sorted(LOW_UNIT_ROUNDOFF)}, got {low!r}")


@contextlib.contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """Within the block, float32 CUDA matmuls may (``enabled``) or may not use TF32 tensor cores; restored after.

    Through ``torch.backends.cuda.matmul.fp32_precision`` ("tf32"/"ieee") where torch has it: torch
    deprecates the legacy ``allow_tf32`` flag, and a process that sets both kinds of flag gets a
    RuntimeError from torch when it reads one back.  Older torch: ``allow_tf32``.
    """
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision"):
        name, value = "fp32_precision", "tf32" if enabled else "ieee"
    else:
        name, value = "allow_tf32", enabled
    old = getattr(flags, name)
    setattr(flags, name, value)
    try:
        yield
    finally:
        setattr(flags, name, old)


class _LowGemm:
    """The low phase's two GEMMs on float32 [B, d, d] operands, float32 results.

    Reductions: torch lets cuBLAS reduce bf16 GEMMs in reduced precision by default
    (``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``, True): split-K partial sums
    may be rounded to bf16 before they are added, a further relative error of about u_bf16 per
    rounding of a partial sum (log₂ of the split count of them at most), on top of the inputs'
    rounding.  That is within the hand-over test's resolution (HANDOVER_FACTOR·u·√d with u = u_bf16):
    the low phase only ever claims bf16 accuracy, and the float32 finish (TF32 off) owns the result.
    The CPU emulation rounds inputs only and accumulates in float32, so a GPU run's low-phase residuals
    may differ from it by those roundings, not by more.
    CUDA: bf16 tensor-core GEMMs (float32 accumulation and epilogue, bf16 output widened: R keeps its
    relative accuracy since I − A·X is formed in the epilogue before rounding) or TF32 GEMMs.
    Elsewhere: the same rounding emulated (inputs rounded, float32 GEMM).
    """

    def __init__(self, A: torch.Tensor, low: str):
        self.low, self.cuda = low, A.is_cuda
        d = A.shape[-1]
        if self.cuda and low == "bf16":
            self.A = A.to(torch.bfloat16)
            self.eye = torch.eye(d, dtype=torch.bfloat16, device=A.device).expand_as(A)
        else:
            self.A = A if self.cuda else round_to_low(A, low)
            self.eye = torch.eye(d, dtype=torch.float32, device=A.device).expand_as(A)

    def residual(self, X: torch.Tensor) -> torch.Tensor:
        """I − A·X, float32 [B, d, d]."""
        if self.cuda and self.low == "bf16":
            return torch.baddbmm(self.eye, self.A, X.to(torch.bfloat16), alpha=-1).float()
        if self.cuda:
            with tf32_matmul(True):
                return torch.baddbmm(self.eye, self.A, X, alpha=-1)
        return torch.baddbmm(self.eye, self.A, round_to_low(X, self.low), alpha=-1)

    def mm(self, X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """X·R, float32 [B, d, d]."""
        if self.cuda and self.low == "bf16":
            return torch.bmm(X.to(torch.bfloat16), R.to(torch.bfloat16)).float()
        if self.cuda:
            with tf32_matmul(True):
                return torch.bmm(X, R)
        return torch.bmm(round_to_low(X, self.low), round_to_low(R, self.low))


class _Fp32Gemm:
    """float32 GEMMs (TF32 explicitly off on CUDA: the finish must resolve float32's own floor)."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.eye = torch.eye(A.shape[-1], dtype=torch.float32, device=A.device).expand_as(A)

    def residual(self, X: torch.Tensor) -> torch.Tensor:
        with tf32_matmul(False):
            return torch.baddbmm(self.eye, self.A, X, alpha=-1)

    def mm(self, X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        with tf32_matmul(False):
            return torch.bmm(X, R)


def _lift(a: float, b: float, r: float) -> float:
    """Factor by which the next step raises the lower end of spec(A·X): a'/a, or 2β (the slope at 0) without a
    lower bound.  The iterate's condition grows by the same factor, and bf16 rounding of X (relative u)
    perturbs spec(A·X) by about u·κ(X_k)/κ(X₀)·(its smallest eigenvalue's size) — rule (c)."""
    bt, aa, bb = reference.step_scale(a, b, r)
    if aa <= 0.0:
        return 2.0 * bt
    return reference.next_bracket(aa, bb, bt)[0] / aa


def _scaled_phase(gemm, X: torch.Tensor, a: list[float], b: list[float], *, stop: float, max_steps: int,
                  handover: tuple[float, float] | None, R0: torch.Tensor | None = None) -> dict:
    """Scaled Schulz steps on the batch X [B, d, d] (float32, updated copy returned), per-matrix decisions.

    handover = (r_switch, g_max) runs the low phase's rules (a)–(d); None runs the reference's stop rules
    (tol, stagnation at the floor, divergence, max_steps).  R0: I − A·X if already computed.  Returns X, steps [B], residual [B] (of the
    returned X as this phase's GEMMs compute it), status [B] (reference codes) and the final bracket.
    """
    B, d = X.shape[0], X.shape[-1]
    limit = reference.divergence_limit(d)
    X_prev = X.clone()
    steps, resid, status = [0] * B, [math.inf] * B, [reference.MAX_ITER] * B
    r_prev, beta = [math.inf] * B, [math.inf] * B
    a_prev, b_prev = list(a), list(b)  # the bracket of X_prev, restored with it
    growth = [1.0] * B  # how far the smallest eigenvalues of A·X have been lifted since X₀: ≈ κ(X_k)/κ(X₀)
    active = [True] * B
    while True:
        R = gemm.residual(X) if R0 is None else R0
        R0 = None
        r_now = torch.linalg.matrix_norm(R).double().cpu().tolist()
        c1, c2 = [1.0] * B, [0.0] * B
        undo = [False] * B
        for i in range(B):
            if not active[i]:
                continue
            r = r_now[i]
            stop_here, st = False, None
            if not math.isfinite(r) or r > limit:
                stop_here, st = True, reference.DIVERGED
            elif handover is None:
                if r <= stop:
                    stop_here, st = True, reference.CONVERGED
                elif (r_prev[i] < reference.QUADRATIC_PHASE and abs(beta[i] - 1.0) < reference.UNSCALED
                      and r > 0.5 * r_prev[i]):
                    stop_here, st = True, reference.STAGNATED
                    undo[i] = r > r_prev[i]
            else:
                r_switch, g_max = handover
                if r <= r_switch or growth[i] * _lift(a[i], b[i], r) > g_max:  # (a), or (c) after this step
                    stop_here, st = True, reference.CONVERGED
                elif (r_prev[i] < 1.0 and r >= r_prev[i]) or (r_prev[i] < reference.QUADRATIC_PHASE and r > 0.5 * r_prev[i]):
                    # (b): no longer decreasing, or no longer squaring in the quadratic phase (the
                    # reference's stagnation test): rounding dominates; keep the better iterate.  Only
                    # once r < 1: before, r ≈ √(number of unresolved eigenvalues) barely moves per step
                    # and (c) is what bounds the phase.
                    stop_here, st = True, reference.STAGNATED
                    undo[i] = r > r_prev[i]
            if not stop_here and steps[i] >= max_steps:
                stop_here, st = True, reference.MAX_ITER
            if stop_here:
                active[i] = False
                status[i] = st
                resid[i] = r_prev[i] if undo[i] else r
                if undo[i]:
                    steps[i] -= 1
                    a[i], b[i] = a_prev[i], b_prev[i]
                continue
            a_prev[i], b_prev[i] = a[i], b[i]
            growth[i] *= _lift(a[i], b[i], r)
            bt, a[i], b[i] = reference.step_scale(a[i], b[i], r)
            beta[i], r_prev[i], resid[i] = bt, r, r
            c1[i], c2[i] = bt * (2.0 - bt), bt * bt
            a[i], b[i] = reference.next_bracket(a[i], b[i], bt)
            steps[i] += 1
        if any(undo):
            idx = torch.tensor([i for i in range(B) if undo[i]], device=X.device)
            X[idx] = X_prev[idx]
        if not any(active):
            break
        XR = gemm.mm(X, R)
        coef = torch.tensor([c1, c2], dtype=torch.float32, device=X.device).T.reshape(B, 2, 1, 1)
        X_prev.copy_(X)
        X = coef[:, 0] * X + coef[:, 1] * XR  # inactive matrices: c1 = 1, c2 = 0 (unchanged)
    return {"X": X, "steps": steps, "residual": resid, "status": status, "a": a, "b": b}


def mixed_schulz(
    A: torch.Tensor,
    *,
    lower: float | torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    low: str = "bf16",
    check: bool = True,
) -> tuple[torch.Tensor, ops.SchulzInfo]:
    """X ≈ A⁻¹ (float32 [..., d, d]) of SPD A [..., d, d]: low-precision Schulz, then float32 steps.

    lower: a lower spectral bound (e.g. the damping; float or tensor broadcasting to the batch) — without
    it the steps are unscaled (β = 1), as in ops.schulz_inverse.  tol: the float32 acceptance/stop bound
    (default: float32's floor, accepted at ops.DEFAULT_TOL[float32]).  low: "bf16" or "tf32".
    Raises ConvergenceError as ``ops.schulz_inverse`` does (unless check=False).  info.iterations
    counts the steps of the path that ran; info.extra: "path" (per matrix, "mixed" or "fp32"), and of
    the mixed attempt "low_steps", "fp32_steps", "handover_residual", "mixed_residual"; "low".
    """
    if low not in LOW_UNIT_ROUNDOFF:
        raise ValueError(f"low: expected one of {sorted(LOW_UNIT_ROUNDOFF)}, got {low!r}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected square matrices [..., d, d], got shape {tuple(A.shape)}")
    d, batch_shape = A.shape[-1], A.shape[:-2]
    A3 = A.to(torch.float32).reshape(-1, d, d).contiguous()
    B = A3.shape[0]
    accept = ops.DEFAULT_TOL[torch.float32] if tol is None else float(tol)
    stop = ops.DEFAULT_STOP[torch.float32] if tol is None else float(tol)
    max_iter = ops.DEFAULT_MAX_ITER if max_iter is None else max_iter

    def all_fp32(idx: torch.Tensor):
        sub = A3[idx.to(A3.device)]
        lo = None if lower is None else torch.broadcast_to(torch.as_tensor(lower, dtype=torch.float64, device="cpu"),
                                                           batch_shape).reshape(-1)[idx]
        return ops.schulz_inverse(sub, lower_bound=lo, tol=tol, max_iter=max_iter, return_info=True, check=False)

    finite = bool(torch.isfinite(A3).all()) if B else True
    amax = A3.abs().amax(dim=(-2, -1)).double().cpu() if B else torch.zeros(0, dtype=torch.float64, device="cpu")
    # Entries far from 1 (bounds, iterates could leave the range) or non-finite input: ops handles them.
    if B == 0 or not finite or bool(((amax > 2.0 ** 64) | (amax < 2.0 ** -64)).any()):
        X, info = ops.schulz_inverse(A3, lower_bound=None if lower is None else torch.broadcast_to(
            torch.as_tensor(lower, dtype=torch.float64, device="cpu"), batch_shape).reshape(-1) if B else lower,
            tol=tol, max_iter=max_iter, return_info=True, check=check)
        info.extra.update(path=["fp32"] * B, low=low)
        return X.reshape(A.shape), info

    upper = ops.spectral_upper_bound(A3).cpu()
    lo_t = torch.zeros(B, dtype=torch.float64, device="cpu") if lower is None else torch.broadcast_to(
        torch.as_tensor(lower, dtype=torch.float64, device="cpu"), batch_shape).reshape(-1).clone()
    lo_t = torch.minimum(lo_t, upper)
    beta0 = [reference.initial_scale(float(l), float(u)) for l, u in zip(lo_t, upper)]
    a = [b0 * float(l) for b0, l in zip(beta0, lo_t)]
    b = [b0 * float(u) for b0, u in zip(beta0, upper)]
    u_low = LOW_UNIT_ROUNDOFF[low]
    eye = torch.eye(d, dtype=torch.float32, device=A3.device)
    X0 = eye * torch.tensor(beta0, dtype=torch.float32, device=A3.device).reshape(B, 1, 1)

    g_max = RESOLVE_FACTOR / (2.0 * u_low)
    low_gemm = _LowGemm(A3, low)
    lowp = _scaled_phase(low_gemm, X0, a, b, stop=0.0, max_steps=min(LOW_MAX_STEPS, max_iter),
                         handover=(HANDOVER_FACTOR * u_low * math.sqrt(d), g_max))
    # The low bracket is of A_low·X; A·X differs by (A − A_low)·X.  Its size, measured as the difference of
    # the two residuals of the hand-over iterate, widens the upper end (an upper end below the true
    # spectrum is what makes a scaled step overshoot past 2/β and diverge; a lower end above it only
    # makes the steps less than optimal, and step_scale tightens both to [1 − r, 1 + r] once r < 1).
    gemm32 = _Fp32Gemm(A3)
    X_low = lowp["X"]
    R32 = gemm32.residual(X_low)
    shift = torch.linalg.matrix_norm(R32 - low_gemm.residual(X_low)).double().cpu().tolist()
    b_fin = [bb + s for bb, s in zip(lowp["b"], shift)]
    budget = max(0, max_iter - max(lowp["steps"]))
    fin = _scaled_phase(gemm32, X_low, list(lowp["a"]), b_fin, stop=stop, max_steps=budget, handover=None, R0=R32)
    X = fin["X"]
    iters = torch.tensor([s + t for s, t in zip(lowp["steps"], fin["steps"])], dtype=torch.int64, device="cpu")
    resid = torch.tensor(fin["residual"], dtype=torch.float64, device="cpu")
    status = list(fin["status"])
    path = ["mixed"] * B
    ok = [st != reference.DIVERGED and r <= accept for st, r in zip(status, fin["residual"])]
    if not all(ok):  # fall short of the all-float32 test: redo those matrices in float32
        idx = torch.tensor([i for i in range(B) if not ok[i]], dtype=torch.int64, device="cpu")
        Xf, inf = all_fp32(idx)
        X[idx.to(X.device)] = Xf
        for j, i in enumerate(idx.tolist()):
            iters[i], resid[i], path[i] = int(inf.iterations.reshape(-1)[j]), float(inf.residual.reshape(-1)[j]), "fp32"
            status[i] = {v: k for k, v in reference.STATUS_NAMES.items()}.get(inf.status[j], reference.DIVERGED)
    names = [reference.STATUS_NAMES[reference.CONVERGED] if st != reference.DIVERGED and r <= accept
             else reference.STATUS_NAMES[st] for st, r in zip(status, resid.tolist())]
    info = ops.SchulzInfo(
        iterations=iters.reshape(batch_shape), residual=resid.reshape(batch_shape), status=names,
        lower=lo_t.reshape(batch_shape), upper=upper.reshape(batch_shape), backend=f"mixed-{low}", tol=accept,
        extra={"stop": stop, "path": path, "low": low,
               "low_steps": torch.tensor(lowp["steps"], dtype=torch.int64, device="cpu").reshape(batch_shape),
               "fp32_steps": torch.tensor(fin["steps"], dtype=torch.int64, device="cpu").reshape(batch_shape),
               "handover_residual": torch.tensor(lowp["residual"], dtype=torch.float64, device="cpu").reshape(batch_shape),
               "mixed_residual": torch.tensor(fin["residual"], dtype=torch.float64, device="cpu").reshape(batch_shape)},
    )
    if check and not info.converged:
        raise ConvergenceError(f"mixed-precision Schulz: statuses {info.status}, residuals {info.residual.tolist()}"
                               f" (tol {accept:g})", info)
    return X.reshape(A.shape), info
