"""Schulz inverses: the library's scaled Schulz (with its float32 → float64 polish) and the paper's.

Both take A [..., d, d] symmetric positive definite and return X ≈ A⁻¹ of the same shape.
"""
from __future__ import annotations

import torch

from .. import ops
from .direct import Callback, symmetrise
from .mixed import mixed_schulz

# precision= of scaled_schulz: None runs ops.schulz_inverse in A's dtype (plus the float64 polish);
# the mixed ones run solvers/mixed.py (bf16 or TF32 GEMMs, then float32; opt-in until measured on a GPU).
MIXED_PRECISIONS = {"mixed": "bf16", "mixed-bf16": "bf16", "mixed-tf32": "tf32"}

# float32 phase + float64 polish (scaled_schulz with polish=True): float64 matrices of d >= POLISH_MIN_D
# with a known lower bound and λmax/λ <= POLISH_MAX_KAPPA are inverted by float32 Schulz to
# ‖I − A·X‖_F <= POLISH_TOL (float32 GEMMs run about twice as fast on CPU), then by plain float64 steps
# X ← X + X·(I − A·X), which square the residual, until the float64 tolerance holds.
POLISH_MIN_D = 128  # below, a float64 iteration is too cheap for a float32 phase to pay
POLISH_TOL = 1e-3  # two float64 steps then reach ~1e-12
POLISH_MAX_KAPPA = 1e4  # above, float32 rounding (~κ·ε·√d) would stall the first phase
POLISH_MAX_STEPS = 4

# The HyperINF paper's code: X₀ = 5e-5·I, then 30 unscaled steps, no residual test.
PAPER_X0 = 5e-5
PAPER_ITERATIONS = 30


def scaled_schulz(
    A: torch.Tensor,
    *,
    lower: float | torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    backend: str | None = None,
    polish: bool = True,
    check: bool = True,
    callback: Callback | None = None,
    precision: str | None = None,
) -> tuple[torch.Tensor, ops.SchulzInfo]:
    """X ≈ A⁻¹ by ``ops.schulz_inverse`` (lower: a lower spectral bound, e.g. the damping), plus info.

    With ``polish`` (and float64 A eligible, see POLISH_*), the float32 phase + float64 polish is
    tried first; it meets the same residual test as the all-float64 run, which is done instead when
    it falls short.  ``info.extra["warm_start"]`` says which ran.  ``callback(k, X_k)`` sees every
    iterate of the reference loop (it forces the torch backend and skips the polish).

    ``precision="mixed"`` (= "mixed-bf16") or "mixed-tf32": low-precision GEMMs first, float32 steps to
    finish (solvers/mixed.py; float32 result, the float32 tolerance; ``backend`` and ``polish`` do not
    apply).  info.extra["path"] says per matrix whether the mixed run or its all-float32 fallback ran.
    """
    if precision is not None:
        if precision not in MIXED_PRECISIONS:
            raise ValueError(f"precision: expected None or one of {sorted(MIXED_PRECISIONS)}, got {precision!r}")
        if callback is not None:
            raise ValueError("precision: the mixed run reports no per-step callback")
        return mixed_schulz(A, lower=lower, tol=tol, max_iter=max_iter, low=MIXED_PRECISIONS[precision], check=check)
    if callback is None and polish:
        warm = _float32_then_polish(A, lower, tol, backend)
        if warm is not None:
            return warm
    X, info = ops.schulz_inverse(A, lower_bound=lower, tol=tol, max_iter=max_iter, backend=backend,
                                 return_info=True, check=check, **({} if callback is None else {"callback": callback}))
    info.extra["warm_start"] = False
    return X, info


def _float32_then_polish(A, lower, tol, backend) -> tuple[torch.Tensor, ops.SchulzInfo] | None:
    if A.dtype != torch.float64 or A.shape[-1] < POLISH_MIN_D or lower is None:
        return None
    lower_t = torch.as_tensor(lower, dtype=torch.float64, device="cpu")
    if not bool((lower_t > 0).all()):
        return None
    if float((ops.spectral_upper_bound(A).cpu() / lower_t).max()) > POLISH_MAX_KAPPA:
        return None
    tol = ops.DEFAULT_TOL[torch.float64] if tol is None else float(tol)
    X32, info = ops.schulz_inverse(A.float(), lower_bound=lower, backend=backend, return_info=True,
                                   tol=max(POLISH_TOL, tol), check=False)
    if not info.converged:
        return None
    A3 = A.reshape(-1, *A.shape[-2:])
    X = X32.double().reshape(A3.shape)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A3)
    for step in range(POLISH_MAX_STEPS + 1):
        R = torch.baddbmm(eye, A3, X, alpha=-1)  # I − A·X
        residual = torch.linalg.matrix_norm(R)
        if not bool(torch.isfinite(residual).all()):
            return None
        if bool((residual <= tol).all()):
            info.iterations = info.iterations + step
            info.residual = residual.cpu().reshape(info.residual.shape)
            info.tol = tol
            info.extra["warm_start"] = True
            return X.reshape(A.shape), info
        if step < POLISH_MAX_STEPS:
            X = torch.baddbmm(X, X, R)  # X + X·R: the residual squares
    return None


def paper_schulz(
    A: torch.Tensor,
    *,
    x0: float = PAPER_X0,
    iterations: int = PAPER_ITERATIONS,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The paper's Schulz: X₀ = x0·I, then ``iterations`` × X ← X·(2I − A·X), batched over A [..., d, d].

    No scaling and no residual test: the eigenvalues σ of x0·A evolve as σ ↦ σ(2 − σ), so it
    converges only when λmax(A) < 2/x0 (4·10⁴ for the paper's start) and otherwise blows up; the
    iterates are returned as they are (a baseline, not a verified solver).
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    X = (x0 * eye).expand(A.shape).clone()
    two_eye = 2.0 * eye
    for t in range(1, iterations + 1):
        X = X @ (two_eye - A @ X)
        if callback is not None:
            callback(t, X)
    return X


def symmetric_schulz(A: torch.Tensor, *, lower: float | torch.Tensor | None = None, tol: float | None = None,
                     backend: str | None = None, polish: bool = True) -> tuple[torch.Tensor, ops.SchulzInfo]:
    """Schulz's X, symmetric where that keeps it within tol, and the residual ‖I − A·X‖_F of what is returned.

    V·X − V·A⁻¹ = V·A⁻¹·(A·X − I): the residual bounds the relative error of rows V·X (and of Xᵀ·W).
    Schulz's residual is one-sided: the errors A's left product does not see are large along A's small
    eigenvalues, on the left, and the symmetric part (X + Xᵀ)/2 moves half of them to the right, where V·X
    sees them amplified up to κ times — rows off by 500 % at κ = 10⁵ in float32 with a reported residual of
    6e-3.  So the symmetric part is measured; over tol it takes one symmetric Newton step
    X ← X + (X·R + (X·R)ᵀ)/2 (R = I − A·X; exactly symmetric, squares the residual in exact arithmetic);
    a matrix still over tol is returned as iterated (``info.extra["symmetric"]`` False for it), whose
    rows are as accurate as Schulz's test says."""
    X, sinfo = scaled_schulz(A, lower=lower, tol=tol, backend=backend, polish=polish)
    d = A.shape[-1]
    X3 = X.reshape(-1, d, d).contiguous()
    A3 = A.to(X3.dtype).reshape(-1, d, d)
    eye = torch.eye(d, dtype=X3.dtype, device=X3.device)

    # in place where it is safe: at most five [L, d, d] tensors at once (A, X, Xs, R, X·R), one more than the
    # Schulz loop (attributor/plan.py SCHULZ_WORKSPACE counts the larger)
    def residual_of(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = torch.matmul(A3, Y).neg_().add_(eye)
        return R, torch.linalg.matrix_norm(R).to(device="cpu", dtype=torch.float64)

    Xs = symmetrise(X3)
    R, r = residual_of(Xs)
    if not bool((r <= sinfo.tol).all()):
        XR = torch.matmul(Xs, R)
        del R
        Xs2 = XR + XR.transpose(-1, -2)
        del XR
        Xs2.mul_(0.5).add_(Xs)
        R, r2 = residual_of(Xs2)
        del R
        better = r2 < r
        Xs = torch.where(better.to(Xs.device)[:, None, None], Xs2, Xs)
        del Xs2
        r = torch.where(better, r2, r)
    else:
        del R
    symmetric = r <= sinfo.tol
    out = torch.where(symmetric.to(X3.device)[:, None, None], Xs, X3)
    raw = sinfo.residual.reshape(-1).to(torch.float64)
    sinfo.residual = torch.where(symmetric, r, raw).reshape(sinfo.residual.shape)
    sinfo.extra["symmetric"] = symmetric.reshape(sinfo.residual.shape)
    return out.reshape(X.shape), sinfo
