"""Verified solves of (G + λI): the solver is picked (``"auto"``: the cost model) and its answer checked.

Every function here damps G, runs the chosen solver and measures a relative residual before
returning; an answer above the tolerance raises :class:`ConvergenceError` instead of being returned
(an explicitly requested ``"cholesky"`` without ``tol`` — the direct baseline — records its residual
and fails only when it is not finite or G + λI is singular to within float64, as before the solvers
layer).
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
    check_invertible,
    cholesky_factor,
    cholesky_solve_rows,
    damp,
    in_range,
    damping_tensor,
    default_tol,
    inverse_residual,
    inverse_residual_f64,
    rows_out_of_range,
    rows_residual,
    unscaled_rows,
    verified_cholesky_inverse,
)
from .krylov import cg
from .schulz import scaled_schulz, symmetric_schulz

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
    upper = float(ops.spectral_upper_bound(A).max())
    if upper == 0:  # every Schulz start and CG bound divides by it (a NaN is left to Schulz's input check)
        raise ConvergenceError("G + damping·I is zero (G = 0 and damping = 0): it has no inverse; add damping")
    return float(lam.min()), upper


def _pick(solver: str, A: torch.Tensor, bracket: Callable[[], tuple[float, float]], *, rows: int | None, want: str,
          backend: str | None, tol: float, polish: bool, lam: torch.Tensor | None = None,
          dtype: torch.dtype | None = None) -> cost.Choice:
    """The solver to run.  ``bracket()`` is called only when the pick depends on it: an explicit inverse or a
    factorisation is first costed with Schulz at its fewest steps (cost.choose with upper=None), and when
    another solver wins even so, no spectral bound is computed.  A may be G (undamped: only its shape,
    device and dtype are read then; ``dtype`` the compute dtype, ``lam`` the damping)."""
    if solver != cost.AUTO:
        return cost.Choice(solver, "requested")
    if backend is not None:
        return cost.Choice("schulz", f"backend {backend!r} requested: its Schulz")
    name, _ = backends.select(None, A.device)
    dtype = A.dtype if dtype is None else dtype
    common = dict(d=A.shape[-1], batch=max(1, A[..., 0, 0].numel()), rows=rows, dtype=dtype, device=A.device,
                  tol=tol, want=want, schulz_backend=name, polish=polish)
    if want == "inverse" or rows is None:
        low = float(lam.min()) if lam is not None and lam.numel() else 0.0
        quick = cost.choose(lower=low, upper=None, **common)
        if quick.solver != "schulz":
            return quick
    lower, upper = bracket()
    return cost.choose(lower=lower, upper=upper, **common)


def _prepare(G: torch.Tensor, damping, solver: str, tol: float | None, allowed: tuple[str, ...]):
    """(A = G + λI, λ, verification tol, strict, the caller's tol, the bracket — a callable, evaluated once)."""
    check_solver(solver, allowed=allowed)
    A, lam = damp(G, damping)
    strict = solver != "cholesky" or tol is not None  # see the module docstring
    check_tol = default_tol(A.dtype) if tol is None else float(tol)
    return A, lam, check_tol, strict, tol, _lazy_bracket(A, lam)


def _lazy_bracket(A: torch.Tensor, lam: torch.Tensor) -> Callable[[], tuple[float, float]]:
    memo: list = []

    def get() -> tuple[float, float]:
        if not memo:
            memo.append(_bracket(A, lam))
        return memo[0]

    return get


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


def _recheck(residual: torch.Tensor, tol: float, strict: bool, dtype: torch.dtype,
             precise: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, str]:
    """A float32 residual above tol (but finite) is measured again with float64 products (``precise()``):
    near float32's conditioning limit the float32 evaluation's own rounding (≈ √d·u·κ) is as large as the
    residual it measures.  The re-measured value of the same stored answer is what the check then uses."""
    if (strict and dtype == torch.float32 and bool(torch.isfinite(residual).all())
            and not bool((residual <= tol).all())):
        return precise().reshape(residual.shape), "; residual re-measured in float64"
    return residual, ""


def spd_inverse(
    G: torch.Tensor,
    damping,
    *,
    solver: str = cost.AUTO,
    backend: str | None = None,
    tol: float | None = None,
    polish: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """X = (G + λI)⁻¹ [..., d, d] and its SolveInfo (:func:`_spd_inverse` on G + λI range-scaled by a power
    of two, see :func:`direct.in_range`).  ConvergenceError when not verified, or when X is beyond the dtype."""
    Gs, lam, e = in_range(G, damping_tensor(G, damping))
    X, info = _spd_inverse(Gs, lam, solver=solver, backend=backend, tol=tol, polish=polish)
    if e is None:
        return X, info
    d = X.shape[-1]
    X = ops.ldexp(X.reshape(-1, d, d), -e).reshape(X.shape)
    if not bool(torch.isfinite(X).all()):
        raise ConvergenceError(
            f"the inverse of G + damping·I is beyond {X.dtype}'s range (the largest entry of G + damping·I is below "
            f"2^{int(e.min())}, so its inverse has entries above about 2^{-int(e.min())}): rescale G, add damping"
            + (" or use float64" if X.dtype != torch.float64 else ""))
    return X, info


def _spd_inverse(
    G: torch.Tensor,
    damping,
    *,
    solver: str = cost.AUTO,
    backend: str | None = None,
    tol: float | None = None,
    polish: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Damp G, invert: X = (G + λI)⁻¹ [..., d, d] (compute dtype) and its SolveInfo.

    solver: "auto" (cost model, an explicit inverse), "schulz" (scaled, λ as lower bound; float64 with
    float32 phase + polish when ``polish``) or "cholesky".  Raises ConvergenceError when not verified.
    X is row-major and exactly symmetric, except a Schulz inverse whose symmetric form would break tol
    (:func:`schulz.symmetric_schulz`, near the dtype's conditioning limit): that one is returned as
    iterated, for rows V·X (or Xᵀ·W for columns) — what its residual bounds.

    Cholesky runs in one buffer (:func:`direct.verified_cholesky_inverse`: damping, factor and inverse
    in place, a probe residual that is also the finiteness check).  When "auto" picked Cholesky and
    its answer fails verification (not positive definite in the dtype, or residual > tol — float32
    near its conditioning limit), Schulz is run instead (it iterates to its own rounding floor and is
    verified exactly), and ``info.reason`` says so; when Schulz fails too, ConvergenceError names both.
    An explicitly requested "cholesky" never falls back.
    """
    check_solver(solver, allowed=INVERSE_SOLVERS)
    lam = damping_tensor(G, damping)
    cdtype = ops.compute_dtype(G.dtype)
    strict = solver != "cholesky" or tol is not None  # see the module docstring
    check_tol = default_tol(cdtype) if tol is None else float(tol)
    damped: list = []

    def A_of() -> torch.Tensor:  # G + λI, made once and only when Schulz or the bracket needs it
        if not damped:
            damped.append(damp(G, lam)[0])
        return damped[0]

    choice = _pick(solver, G, lambda: _bracket(A_of(), lam), rows=None, want="inverse", backend=backend,
                   tol=check_tol, polish=polish, lam=lam, dtype=cdtype)
    if choice.solver != "schulz":
        try:
            X, residual = verified_cholesky_inverse(G, lam)
            residual, note = _recheck(residual.reshape(lam.shape), check_tol, strict, cdtype,
                                      lambda: inverse_residual_f64(G, lam, X))
            _verified("cholesky", residual, check_tol, strict)
            if not bool((residual <= check_tol).all()):
                check_invertible(A_of())  # the unenforced baseline still needs an A that has an inverse
            return X, SolveInfo("cholesky", residual, check_tol, choice.reason + note)
        except ConvergenceError as e:
            if solver != cost.AUTO:
                raise
            failed = str(e)
        choice = cost.Choice("schulz", choice.reason + f"; cholesky failed verification ({_short(failed)}): "
                             "fell back to schulz", choice.costs)
        try:
            return _schulz_inverse(A_of(), lam, choice, tol, backend, polish)
        except ConvergenceError as e:
            raise ConvergenceError(f"auto: cholesky failed ({_short(failed)}), then its fallback schulz failed "
                                   f"({_short(str(e))}): G + damping·I is too ill-conditioned for {cdtype}; "
                                   "use float64 or more damping") from e
    return _schulz_inverse(A_of(), lam, choice, tol, backend, polish)


def _short(msg: str) -> str:
    """A solver's error message without its closing advice (what failed and by how much)."""
    for advice in (": G + damping·I is too ill-conditioned", ": the condition number is beyond"):
        msg = msg.split(advice)[0]
    return msg


def _schulz_inverse(A: torch.Tensor, lam: torch.Tensor, choice: cost.Choice, asked: float | None,
                    backend: str | None, polish: bool) -> tuple[torch.Tensor, SolveInfo]:
    # Schulz gets the caller's tol (None: ops' default, which in float32 runs to the rounding floor)
    X, sinfo = symmetric_schulz(A, lower=_lower(lam), tol=asked, backend=backend, polish=polish)
    info = SolveInfo("schulz", sinfo.residual, sinfo.tol, choice.reason, sinfo.backend, sinfo.iterations,
                     {"warm_start": sinfo.extra.get("warm_start", False), "symmetric": sinfo.extra["symmetric"]})
    return X, info


class Factorization:
    """(G + λI) factored once: ``solve_rows(V [B, k, d]) -> V·(G + λI)⁻¹`` for B = the batch of matrices.

    Schulz keeps its inverse (symmetric where that stays within tol, :func:`schulz.symmetric_schulz`);
    Cholesky keeps the factor.  ``info`` is verified.
    """

    def __init__(self, G: torch.Tensor, damping, *, solver: str = cost.AUTO, backend: str | None = None,
                 tol: float | None = None, rows: int | None = None):
        G, damping, self._exp = in_range(G, damping_tensor(G, damping))
        A, lam, tol, strict, asked, bracket = _prepare(G, damping, solver, tol, INVERSE_SOLVERS)
        choice = _pick(solver, A, bracket, rows=rows, want="apply", backend=backend, tol=tol, polish=False, lam=lam)
        if choice.solver == "cg":  # a factorisation is reused: CG has nothing to keep
            choice = cost.Choice("cholesky", choice.reason + "; cg has no factor to reuse: cholesky", choice.costs)
        self._build(A, lam, choice, backend, tol, strict, asked, fallback=solver == cost.AUTO)

    @classmethod
    def _of_damped(cls, A: torch.Tensor, lam: torch.Tensor, choice: cost.Choice, backend: str | None,
                   tol: float, strict: bool, asked: float | None, fallback: bool = False) -> "Factorization":
        self = cls.__new__(cls)
        self._exp = None
        self._build(A, lam, choice, backend, tol, strict, asked, fallback)
        return self

    def _build(self, A: torch.Tensor, lam: torch.Tensor, choice: cost.Choice, backend: str | None, tol: float,
               strict: bool, asked: float | None, fallback: bool = False) -> None:
        """Factor A by ``choice``; with ``fallback`` (auto), a Cholesky that fails verification hands over
        to Schulz (said in info.reason), and ConvergenceError names both when Schulz fails too."""
        self.dtype = A.dtype
        A3 = A.reshape(-1, *A.shape[-2:])
        if choice.solver == "schulz":
            X, sinfo = symmetric_schulz(A, lower=_lower(lam), tol=asked, backend=backend, polish=False)
            X3 = X.reshape(A3.shape)
            self._solve: Callable[[torch.Tensor], torch.Tensor] = lambda V: torch.matmul(V, X3)
            self.info = SolveInfo("schulz", sinfo.residual, sinfo.tol, choice.reason, sinfo.backend, sinfo.iterations,
                                  {"symmetric": sinfo.extra["symmetric"]})
        else:
            ops.check_symmetric("G", A3)
            try:
                L = cholesky_factor(A3)
                solve = lambda V: cholesky_solve_rows(L, V)  # noqa: E731
                residual, note = _recheck(inverse_residual(A3, solve).reshape(lam.shape), tol, strict, A3.dtype,
                                          lambda: inverse_residual(A3, solve, precise=True))
                _verified("cholesky", residual, tol, strict)
                if not bool((residual <= tol).all()):
                    check_invertible(A3)  # the unenforced baseline still needs an A that has an inverse
            except ConvergenceError as e:
                if not fallback:
                    raise
                failed = _short(str(e))
                try:
                    self._build(A, lam, cost.Choice("schulz", choice.reason + f"; cholesky failed verification "
                                                    f"({failed}): fell back to schulz", choice.costs),
                                backend, tol, strict, asked)
                except ConvergenceError as e2:
                    raise ConvergenceError(f"auto: cholesky failed ({failed}), then its fallback schulz failed "
                                           f"({_short(str(e2))}): G + damping·I is too ill-conditioned for "
                                           f"{A.dtype}; use float64 or more damping") from e2
                return
            self._solve = solve
            self.info = SolveInfo("cholesky", residual, tol, choice.reason + note)

    def solve_rows(self, V: torch.Tensor) -> torch.Tensor:
        if self._exp is None:
            return self._solve(V.to(self.dtype))
        return unscaled_rows(self._solve, V.to(self.dtype), self._exp)


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
    """One-shot V·(G + λI)⁻¹ (:func:`_solve_rows`) on G + λI range-scaled by a power of two (:func:`direct.in_range`)."""
    Gs, lam, e = in_range(G, damping_tensor(G, damping))
    kw = dict(solver=solver, backend=backend, tol=tol, max_iter=max_iter)
    if e is None and rows_out_of_range(V):  # CG's norms square the rows: they too are brought into range
        e = torch.zeros(V.shape[0], dtype=torch.float64, device="cpu")
    if e is None:
        return _solve_rows(G, lam, V, **kw)
    info: list = []

    def solve(W: torch.Tensor) -> torch.Tensor:
        Y, i = _solve_rows(Gs, lam, W, **kw)
        info.append(i)
        return Y

    return unscaled_rows(solve, V.to(Gs.dtype), e), info[0]


def _solve_rows(
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
    for Schulz).  An explicit "cg" runs up to ``max_iter`` (default 2·d + 20) steps and raises
    ConvergenceError when it does not get there; "auto" gives CG the step budget of its pick
    (``cost.Choice.cg_steps``: where Cholesky would have been cheaper; ``max_iter`` overrides it) and
    gives up at half of it when the residual lags (cost module doc), then falls back to Cholesky (said
    in ``info.reason``).
    """
    A, lam, tol, strict, asked, bracket = _prepare(G, damping, solver, tol, SOLVER_CHOICES)
    choice = _pick(solver, A, bracket, rows=V.shape[-2], want="apply", backend=backend, tol=tol, polish=False, lam=lam)
    if choice.solver == "cg":
        ops.check_symmetric("G", A.reshape(-1, *A.shape[-2:]))  # as Schulz and Cholesky: not "ill-conditioned"
        lower, upper = bracket()
        if not lower > 0:
            raise ValueError("solver: 'cg' needs a positive damping (its stopping bound divides by it)")
        kappa = upper / lower
        Vc = V.to(A.dtype)
        checkpoint = None
        if max_iter is not None:
            steps = max_iter
        elif choice.cg_steps is not None:
            steps = choice.cg_steps
            if steps >= 4:
                checkpoint = (steps // 2, (tol / kappa) ** cost.CG_CHECK_PROGRESS)
        else:
            steps = 2 * A.shape[-1] + 20
        Y, taken = cg(A, Vc, max_iter=steps, tol=tol / kappa, checkpoint=checkpoint)
        residual = kappa * rows_residual(A.reshape(-1, *A.shape[-2:]), Vc, Y).reshape(lam.shape)
        info = SolveInfo("cg", residual, tol, choice.reason, iterations=taken, extra={"kappa_bound": kappa})
        try:
            _verified("cg", residual, tol)
            return Y, info
        except ConvergenceError:
            if solver != cost.AUTO:
                raise
        gave_up = f" (gave up at half its budget of {steps})" if checkpoint and taken == checkpoint[0] else ""
        choice = cost.Choice("cholesky", choice.reason + f"; cg stopped at residual {float(residual.max()):.2e} "
                             f"after {taken} steps{gave_up}: fell back to cholesky", choice.costs)
    fac = Factorization._of_damped(A, lam, choice, backend, tol, strict, asked, fallback=solver == cost.AUTO)
    return fac.solve_rows(V), fac.info
