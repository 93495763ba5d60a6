"""Inverse-HVP of one (or a stack of) d×d matrix: ``v·(G + λI)⁻¹`` with argument checks and a verified solver.

``hyperinf_ext.inverse_hvp`` is :func:`inverse_hvp`; ``hyperinf_ext.make_ihvp`` is the front door in
``hyperinf_ext.curvature.ihvp``, which sends a matrix G here and gradient dicts to the curvature layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

import torch

from .. import ops
from . import cost
from .auto import Factorization, SolveInfo, check_solver, solve_rows

if TYPE_CHECKING:
    from typing_extensions import Unpack


class SolverOptions(TypedDict, total=False):
    """The solver keywords of every IHVP entry point (these and ``hyperinf_ext.make_ihvp``/``hyperinf_ext.inverse_hvp``), declared once.

    solver: "auto" (default), "schulz", "cholesky" (and "cg" where the right-hand sides are given);
    method: the old name of ``solver`` (an alias); backend: whose Schulz kernel runs (None: the
    fastest for G's device); tol: the residual the result must reach (None: the dtype's default).
    """

    solver: str | None
    backend: str | None
    tol: float | None
    method: str | None


def solver_options(options: dict, where: str) -> tuple[str, str | None, float | None]:
    """(solver, backend, tol) from :class:`SolverOptions` keywords, the ``method`` alias resolved.

    A keyword that is not a solver option raises TypeError, as it would for an explicit signature.
    """
    unknown = sorted(set(options) - SolverOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    return resolve_solver(options.get("solver"), options.get("method")), options.get("backend"), options.get("tol")


def resolve_solver(solver: str | None, method: str | None) -> str:
    """``solver=`` (new name) or ``method=`` (its alias, kept for old callers); errors name the one used."""
    if method is not None and solver is not None and solver != method:
        raise ValueError(f"method: alias of solver; got both solver={solver!r} and method={method!r}")
    if method is not None:
        return check_solver(method, "method")
    return check_solver(cost.AUTO if solver is None else solver)


def _check_G(G: torch.Tensor) -> int:
    ops.check_tensor("G", G, (2, 3))
    d = ops.check_square("G", G)
    ops.check_finite("G", G)
    return d


def _rows(v: torch.Tensor, G: torch.Tensor, d: int) -> torch.Tensor | None:
    """v [..., d] (3-D G: [L, ..., d]) as rows [B, k, d] after checks; None when v is empty."""
    ops.check_tensor("v", v, tuple(range(1, 10)))
    if v.shape[-1] != d:
        raise ValueError(f"v: last dimension {v.shape[-1]} does not match G's d = {d}")
    if v.device != G.device:
        raise ValueError(f"v: on {v.device} but G is on {G.device}")
    ops.check_finite("v", v)
    if G.dim() == 3:
        L = G.shape[0]
        if v.dim() < 2 or v.shape[0] != L:
            raise ValueError(f"v: with {L} stacked matrices v must be [L={L}, ..., d], got {tuple(v.shape)}")
    if v.numel() == 0:
        return None  # nothing to solve (no rows, or no layers)
    return v.reshape(G.shape[0], -1, d) if G.dim() == 3 else v.reshape(1, -1, d)


def _empty(v: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The (empty) result for a v without rows: v's shape in the dtype a solve would return."""
    return v.to(torch.promote_types(v.dtype, ops.compute_dtype(G.dtype)), copy=True)


def _out(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    out = out.to(torch.promote_types(v.dtype, out.dtype)).reshape(v.shape)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"v: the result v·(G + damping·I)⁻¹ overflows {out.dtype} (|v| up to {float(v.abs().max()):.3e} times an "
            "inverse beyond that dtype's range); rescale v or G, add damping"
            + (", or use float64" if out.dtype != torch.float64 else "")
        )
    return out


class IHVP:
    """``apply(v) -> v·(G + damping·I)⁻¹`` from one factorisation; ``info`` says which solver and its residual."""

    def __init__(self, G: torch.Tensor, d: int, fac: Factorization):
        self._G, self._d, self._fac = G, d, fac
        self.info: SolveInfo = fac.info

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v3 = _rows(v, self._G, self._d)
        if v3 is None:
            return _empty(v, self._G)
        return _out(v, self._fac.solve_rows(v3))


def make_ihvp(G: torch.Tensor, *, damping: float | torch.Tensor, **options: Unpack[SolverOptions]) -> IHVP:
    """Factor (G + damping·I) once and return ``apply(v) -> v·(G + damping·I)⁻¹`` (an :class:`IHVP`).

    G: [d, d] or [L, d, d] (damping a float or [L]).  ``apply`` takes v [..., d] (for 3-D G:
    [L, ..., d]) and returns the same shape, in the promoted dtype of v and the compute dtype.
    ``options`` (:class:`SolverOptions`): solver (alias ``method``) "auto" (default: the cost model of
    ``solvers.cost``; Schulz when a ``backend`` is given), "schulz" (the damping as a free lower
    spectral bound) or "cholesky"; backend; tol.
    The factorisation is verified (``apply.info.residual`` <= tol) or ConvergenceError is raised.
    """
    d = _check_G(G)
    solver, backend, tol = solver_options(options, "make_ihvp")
    if solver == "cg":
        raise ValueError("solver: 'cg' solves given right-hand sides; use inverse_hvp (make_ihvp keeps a factor)")
    return IHVP(G, d, Factorization(G, damping, solver=solver, backend=backend, tol=tol))


def inverse_hvp(
    G: torch.Tensor, v: torch.Tensor, *, damping: float | torch.Tensor, return_info: bool = False,
    **options: Unpack[SolverOptions],
) -> torch.Tensor | tuple[torch.Tensor, SolveInfo | None]:
    """v·(G + damping·I)⁻¹ for v [..., r, d] or [..., d] (same shape out); G [d, d] or [L, d, d].

    Knowing the rows, "auto" also considers conjugate gradients (float64).  Returns the result, or
    (result, SolveInfo) with ``return_info``.  See :func:`make_ihvp` for the solvers.
    """
    d = _check_G(G)
    solver, backend, tol = solver_options(options, "inverse_hvp")
    v3 = _rows(v, G, d)
    if v3 is None:
        out, info = _empty(v, G), None
    else:
        Y, info = solve_rows(G, damping, v3, solver=solver, backend=backend, tol=tol)
        out = _out(v, Y)
    return (out, info) if return_info else out
