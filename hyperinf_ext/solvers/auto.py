"""Verified solves of (G + λI): the solver is picked (``"auto"``: the cost model) and its answer checked.

Every function here damps G, runs the chosen solver and measures a relative residual before
returning; an answer above the tolerance raises :class:`ConvergenceError` instead of being returned
(an explicitly requested ``"cholesky"`` without ``tol`` — the direct baseline — records its residual
and fails only when it is not finite, as before the solvers layer).
``SolveInfo.residual`` bounds (Schulz: exactly; Cholesky: a probe estimate of the same norm; CG: κ
times the relative residual of the rows) the relative error of the solve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backends, ops
from ..errors import ConvergenceError
from . import cost
from .direct import (
    cholesky_factor,
    cholesky_inverse,
    cholesky_solve_rows,
    damp,
    default_tol,
    inverse_residual,
    probe_rows,
    rows_residual,
    symmetrise,
)
from .krylov import cg
from .schulz import scaled_schulz

SOLVER_CHOICES = (cost.AUTO,) + cost.SOLVERS
INVERSE_SOLVERS = (cost.AUTO, "schulz", "cholesky")  # those that leave an inverse or a factor to reuse


@dataclass
class SolveInfo:
    """What solved (G + λI): the solver, why, and its verified residual per matrix (float64 CPU)."""

    solver: str  # "schulz" | "cholesky" | "cg"
    residual: torch.Tensor  # bound of the relative error, shape = the batch of matrices
    tol: float
    reason: str
    backend: str | None = None  # Schulz's backend
    iterations: torch.Tensor | int | None = None
    extra: dict = field(default_factory=dict)


def check_solver(solver: object, name: str = "solver", allowed: tuple[str, ...] = SOLVER_CHOICES) -> str:
    """Validate a solver name; ``name`` is the argument it came from (``solver`` or its alias ``method``)."""
    if not isinstance(solver, str) or solver not in allowed:
        raise ValueError(f"{name}: unknown {name} {solver!r}; expected one of {allowed}")
    return solver


def _bracket(A: torch.Tensor, lam: torch.Tensor) -> tuple[float, float]:
    """(smallest λ, largest cheap upper bound) over the batch: the worst matrix's bracket."""
    if lam.numel() == 0:
        return 0.0, 0.0
    return float(lam.min()), float(ops.spectral_upper_bound(A).max())


def _pick(solver: str, A: torch.Tensor, bracket: tuple[float, float], *, rows: int | None, want: str,
          backend: str | None, tol: float, polish: bool) -> cost.Choice:
    if solver != cost.AUTO:
        return cost.Choice(solver, "requested")
    if backend is not None:
        return cost.Choice("schulz", f"backend {backend!r} requested: its Schulz")
    name, _ = backends.select(None, A.device)
    lower, upper = bracket
    lmax = None
    if rows is not None and want == "apply" and lower > 0 and cost.cg_attainable(upper / lower, A.dtype, tol):
        lmax = _lmax_estimate(A)  # CG is a candidate: its step count depends on the true κ
    return cost.choose(d=A.shape[-1], batch=max(1, A[..., 0, 0].numel()), rows=rows, dtype=A.dtype, device=A.device,
                       lower=lower, upper=upper, tol=tol, want=want, schulz_backend=name, polish=polish, lmax=lmax)


def _lmax_estimate(A: torch.Tensor, steps: int = 5) -> float:
    """max over the batch of a Rayleigh quotient after a few power steps (a lower estimate of λmax).

    One vector, 5 steps: 10·d² flops per matrix, a few CG steps' worth, so the estimate cannot cost
    more than it can save."""
    A3 = A.reshape(-1, *A.shape[-2:])
    Z = probe_rows(A3)[:, :1]
    for _ in range(steps):
        Z = torch.matmul(Z, A3)
        Z = Z / torch.linalg.vector_norm(Z, dim=-1, keepdim=True).clamp_min(torch.finfo(Z.dtype).tiny)
    return float(((torch.matmul(Z, A3) * Z).sum(-1)).max())


def _prepare(G: torch.Tensor, damping, solver: str, tol: float | None, allowed: tuple[str, ...]):
    """(A = G + λI, λ, verification tol, strict, the caller's tol, the bracket when auto needs it)."""
    check_solver(solver, allowed=allowed)
    A, lam = damp(G, damping)
    strict = solver != "cholesky" or tol is not None  # see the module docstring
    check_tol = default_tol(A.dtype) if tol is None else float(tol)
    bracket = _bracket(A, lam) if solver in (cost.AUTO, "cg") else (0.0, 0.0)
    return A, lam, check_tol, strict, tol, bracket


def _lower(lam: torch.Tensor) -> torch.Tensor | None:
    # the damping is a free lower bound of the spectrum of G + λI (G is PSD) — when it is positive
    return lam if bool((lam > 0).all()) else None


def _verified(solver: str, residual: torch.Tensor, tol: float, strict: bool = True) -> None:
    """ConvergenceError unless every residual <= tol.  Not ``strict`` (an explicitly requested Cholesky
    without ``tol``, the direct baseline as it always was): only a non-finite residual fails."""
    bad = ~(residual <= tol) if strict else ~torch.isfinite(residual)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ConvergenceError(
            f"{solver}: relative residual {float(residual.reshape(-1)[i]):.3e} > tol {tol:.1e} for matrix {i} "
            f"({int(bad.sum())} of {bad.numel()} failed): G + damping·I is too ill-conditioned for its dtype; "
            "use float64 or more damping"
        )


def spd_inverse(
    G: torch.Tensor,
    damping,
    *,
    solver: str = cost.AUTO,
    backend: str | None = None,
    tol: float | None = None,
    polish: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Damp G, invert, symmetrise: X = (G + λI)⁻¹ [..., d, d] (compute dtype) and its SolveInfo.

    solver: "auto" (cost model, an explicit inverse), "schulz" (scaled, λ as lower bound; float64 with
    float32 phase + polish when ``polish``) or "cholesky".  Raises ConvergenceError when not verified.
    """
    A, lam, tol, strict, asked, bracket = _prepare(G, damping, solver, tol, INVERSE_SOLVERS)
    choice = _pick(solver, A, bracket, rows=None, want="inverse", backend=backend, tol=tol, polish=polish)
    if choice.solver == "schulz":
        # Schulz gets the caller's tol (None: ops' default, which in float32 runs to the rounding floor)
        X, sinfo = scaled_schulz(A, lower=_lower(lam), tol=asked, backend=backend, polish=polish)
        info = SolveInfo("schulz", sinfo.residual, sinfo.tol, choice.reason, sinfo.backend, sinfo.iterations,
                         {"warm_start": sinfo.extra.get("warm_start", False)})
    else:
        X = cholesky_inverse(A)
        residual = inverse_residual(A, lambda Z: torch.matmul(Z, X.reshape(-1, *X.shape[-2:]))).reshape(lam.shape)
        _verified("cholesky", residual, tol, strict)
        info = SolveInfo("cholesky", residual, tol, choice.reason)
    return symmetrise(X), info


class Factorization:
    """(G + λI) factored once: ``solve_rows(V [B, k, d]) -> V·(G + λI)⁻¹`` for B = the batch of matrices.

    Schulz keeps the (symmetrised) inverse; Cholesky keeps the factor.  ``info`` is verified.
    """

    def __init__(self, G: torch.Tensor, damping, *, solver: str = cost.AUTO, backend: str | None = None,
                 tol: float | None = None, rows: int | None = None):
        A, lam, tol, strict, asked, bracket = _prepare(G, damping, solver, tol, INVERSE_SOLVERS)
        choice = _pick(solver, A, bracket, rows=rows, want="apply", backend=backend, tol=tol, polish=False)
        if choice.solver == "cg":  # a factorisation is reused: CG has nothing to keep
            choice = cost.Choice("cholesky", choice.reason + "; cg has no factor to reuse: cholesky", choice.costs)
        self._build(A, lam, choice, backend, tol, strict, asked)

    @classmethod
    def _of_damped(cls, A: torch.Tensor, lam: torch.Tensor, choice: cost.Choice, backend: str | None,
                   tol: float, strict: bool, asked: float | None) -> "Factorization":
        self = cls.__new__(cls)
        self._build(A, lam, choice, backend, tol, strict, asked)
        return self

    def _build(self, A: torch.Tensor, lam: torch.Tensor, choice: cost.Choice, backend: str | None, tol: float,
               strict: bool, asked: float | None) -> None:
        self.dtype = A.dtype
        A3 = A.reshape(-1, *A.shape[-2:])
        if choice.solver == "schulz":
            X, sinfo = scaled_schulz(A, lower=_lower(lam), tol=asked, backend=backend, polish=False)
            X3 = symmetrise(X).reshape(A3.shape)
            self._solve: Callable[[torch.Tensor], torch.Tensor] = lambda V: torch.matmul(V, X3)
            self.info = SolveInfo("schulz", sinfo.residual, sinfo.tol, choice.reason, sinfo.backend, sinfo.iterations)
        else:
            ops._check_symmetric("G", A3)
            L = cholesky_factor(A3)
            self._solve = lambda V: cholesky_solve_rows(L, V)
            residual = inverse_residual(A3, self._solve).reshape(lam.shape)
            _verified("cholesky", residual, tol, strict)
            self.info = SolveInfo("cholesky", residual, tol, choice.reason)

    def solve_rows(self, V: torch.Tensor) -> torch.Tensor:
        return self._solve(V.to(self.dtype))


def solve_rows(
    G: torch.Tensor,
    damping,
    V: torch.Tensor,
    *,
    solver: str = cost.AUTO,
    backend: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """One-shot V·(G + λI)⁻¹ for G [B, d, d], V [B, k, d]: Schulz, Cholesky or CG, whichever is cheapest.

    CG (λ > 0) stops when κ·‖V − Y·A‖/‖V‖ <= tol (κ = ub/λ, so the bound is on the relative error as
    for Schulz); when it does not get there in ``max_iter`` (default 2·d + 20) steps, "auto" falls
    back to Cholesky (said in ``info.reason``) and an explicit "cg" raises ConvergenceError.
    """
    A, lam, tol, strict, asked, bracket = _prepare(G, damping, solver, tol, SOLVER_CHOICES)
    choice = _pick(solver, A, bracket, rows=V.shape[-2], want="apply", backend=backend, tol=tol, polish=False)
    if choice.solver == "cg":
        lower, upper = bracket
        if not lower > 0:
            raise ValueError("solver: 'cg' needs a positive damping (its stopping bound divides by it)")
        kappa = upper / lower
        Vc = V.to(A.dtype)
        steps = 2 * A.shape[-1] + 20 if max_iter is None else max_iter
        Y, taken = cg(A, Vc, max_iter=steps, tol=tol / kappa)
        residual = kappa * rows_residual(A.reshape(-1, *A.shape[-2:]), Vc, Y).reshape(lam.shape)
        info = SolveInfo("cg", residual, tol, choice.reason, iterations=taken, extra={"kappa_bound": kappa})
        try:
            _verified("cg", residual, tol)
            return Y, info
        except ConvergenceError:
            if solver != cost.AUTO:
                raise
        choice = cost.Choice("cholesky", choice.reason + f"; cg stopped at residual {float(residual.max()):.2e}: "
                             "fell back to cholesky", choice.costs)
    fac = Factorization._of_damped(A, lam, choice, backend, tol, strict, asked)
    return fac.solve_rows(V), fac.info
