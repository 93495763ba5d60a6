"""The convergence study's problems and solver curves: the synthetic system A·x = v of each (d, N) and
the relative error of every solver's estimate after each iteration (see convergence.py for the study)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import ops, solvers

__all__ = [
    "SOLVERS", "Problem", "SchulzTrace", "make_problem", "relative_error", "schulz_curve", "paper_schulz_curve",
    "lissa_curve", "neumann_curve", "datainf_curve", "cg_curve", "solve_all",
]

SCHULZ = "schulz (ours)"
PAPER = "schulz (paper: X0=5e-5·I)"
LISSA = "lissa"
NEUMANN = "neumann"
DATAINF = "datainf"
CG = "cg"
SOLVERS = (SCHULZ, PAPER, LISSA, NEUMANN, DATAINF, CG)

SCALE_DECADES = 3.0  # spread of the per-dimension standard deviations of x
PAPER_X0 = solvers.PAPER_X0  # the HyperINF code's fixed start X₀ = 5e-5·I
LISSA_BATCH = 32
SERIES_SAFETY = 1.5  # s = 1.5·ub(λmax(A)): keeps mini-batch products contractive on average
# tol must be > 0 for ops.schulz_inverse; the smallest normal float64 makes the residual test
# unreachable, so only stagnation (the float64 floor) or the budget stops the iteration.
SCHULZ_TOL = float(torch.finfo(torch.float64).tiny)

_DT = torch.float64


# --------------------------------------------------------------------------------------------------
# problem


@dataclass
class Problem:
    """One synthetic system A·x = v (all tensors float64, CPU)."""

    d: int
    n: int
    x: torch.Tensor  # [N, d] samples
    A: torch.Tensor  # [d, d] = (1/N)·xᵀx + λI
    v: torch.Tensor  # [d]
    x_star: torch.Tensor  # [d] = A⁻¹v
    lam: float  # damping λ, a free lower bound of the spectrum of A
    upper: float  # ops.spectral_upper_bound(A), the bound the library's Schulz uses
    lissa_seed: int  # seed of LiSSA's mini-batch sampler, derived from the problem's seed

    @property
    def series_scale(self) -> float:
        """s of the Neumann/LiSSA series: SERIES_SAFETY × the cheap upper bound of λmax(A)."""
        return SERIES_SAFETY * self.upper

    def eigen_range(self) -> tuple[float, float]:
        """(λmin, λmax) of A, exactly (eigvalsh); for diagnostics only."""
        ev = torch.linalg.eigvalsh(self.A)
        return float(ev[0]), float(ev[-1])


def _seeds(seed: int, d: int, n: int) -> tuple[int, int]:
    # Mixing (seed, d, N) gives each cell of the grid its own stream, so a problem does not change
    # when other sizes are added to or removed from a run.
    state = np.random.SeedSequence([int(seed), int(d), int(n)]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


def make_problem(d: int, n: int, seed: int, damping_scale: float = 0.1, x_scale: float = 1.0) -> Problem:
    """Draw the synthetic system of size ``d`` from ``n`` samples (deterministic in seed, d, n).

    ``x_scale`` multiplies every sample (A's data part scales by x_scale²); the tests use it to push
    λmax past the range where the paper's fixed Schulz start converges.
    """
    data_seed, lissa_seed = _seeds(seed, d, n)
    g = torch.Generator().manual_seed(data_seed)
    sigma = torch.logspace(0.0, -SCALE_DECADES, d, dtype=_DT, device="cpu")[torch.randperm(d, generator=g, device="cpu")]
    x = torch.randn(n, d, generator=g, dtype=_DT, device="cpu") * sigma * x_scale
    v = torch.randn(d, generator=g, dtype=_DT, device="cpu")
    G = x.T @ x / n
    G = 0.5 * (G + G.T)  # exactly symmetric, as ops.schulz_inverse checks
    lam = damping_scale * float(torch.diagonal(G).sum()) / d
    A = G + lam * torch.eye(d, dtype=_DT, device="cpu")
    x_star = torch.linalg.solve(A, v)
    upper = float(ops.spectral_upper_bound(A))
    return Problem(d=d, n=n, x=x, A=A, v=v, x_star=x_star, lam=lam, upper=upper, lissa_seed=lissa_seed)


def relative_error(estimate: torch.Tensor, x_star: torch.Tensor) -> float:
    """‖x̂ − x*‖/‖x*‖ as a Python float; inf/NaN estimates give inf/NaN (reported as they are)."""
    return float(torch.linalg.vector_norm(estimate - x_star) / torch.linalg.vector_norm(x_star))


# --------------------------------------------------------------------------------------------------
# solvers: each returns the relative error after iterations 1..T


@dataclass
class SchulzTrace:
    """The scaled Schulz run as ops.schulz_inverse(A, lower_bound=λ, max_iter=T, tol=SCHULZ_TOL) does it."""

    errors: list[float]
    X: torch.Tensor  # the iterate the library returns
    iterations: int  # updates applied to X (the library's info.iterations)
    residual: float  # ‖I − A·X‖_F
    status: str


def schulz_curve(p: Problem, iterations: int) -> SchulzTrace:
    """Scaled Schulz with λ as lower bound: the library's own run, its iterates seen through a callback.

    ``errors[t-1]`` is the error of the iterate that ops.schulz_inverse returns with
    ``max_iter=t``: X_t until the iteration stops on its own (stagnation at the float64 floor), the
    returned iterate afterwards — the library then stops, so the line flattens.  The run is
    ``solvers.scaled_schulz`` on the torch (reference) backend, whose loop calls back after every step.
    """
    errors: list[float] = []
    record = _recorder(p, errors)
    X, info = solvers.scaled_schulz(p.A, lower=p.lam, max_iter=iterations, tol=SCHULZ_TOL, backend="torch",
                                    polish=False, check=False, callback=lambda t, X: record(t, X @ p.v))
    k = int(info.iterations)
    # A stagnated run may hand back the previous iterate: a budget t >= k then returns it too.
    final = relative_error(X @ p.v, p.x_star)
    errors = errors[:k] + [final] * (iterations - k)
    return SchulzTrace(errors=errors, X=X, iterations=k, residual=float(info.residual), status=info.status[0])


def _recorder(p: Problem, errors: list[float]):
    """A solver callback appending the relative error of each step's estimate of A⁻¹v to ``errors``."""
    return lambda t, estimate: errors.append(relative_error(estimate, p.x_star))


def paper_schulz_curve(p: Problem, iterations: int, x0: float = PAPER_X0) -> list[float]:
    """Unscaled Schulz X ← X(2I − AX) from X₀ = x0·I, as the HyperINF paper's code runs it.

    The eigenvalues σ of x0·A evolve as σ ↦ σ(2 − σ), which converges only for 0 < σ < 2, i.e.
    λmax(A) < 2/x0 = 4·10⁴; beyond that the iterates blow up and the errors become inf/NaN.  They
    are returned unmodified (the plot clips them).
    """
    errors: list[float] = []
    record = _recorder(p, errors)
    solvers.paper_schulz(p.A, x0=x0, iterations=iterations, callback=lambda t, X: record(t, X @ p.v))
    return errors


def _series(p: Problem, iterations: int, product) -> list[float]:
    # Neumann series of A⁻¹ = (1/s)·Σ_k (I − A/s)^k: u_t = v + (I − A/s)·u_{t−1} with u₀ = v, so
    # u_t/s holds the first t+1 terms (LiSSA's indexing, see methods.LiSSA).
    errors: list[float] = []
    solvers.neumann(p.v, product, p.series_scale, iterations, callback=_recorder(p, errors))
    return errors


def neumann_curve(p: Problem, iterations: int) -> list[float]:
    """Deterministic truncated Neumann series with the full A and s = SERIES_SAFETY·ub(λmax(A)).

    The error after t steps is (I − A/s)^{t+1}·x*, and I − A/s has its spectrum in (0, 1), so the
    error never increases; it shrinks by at most 1 − λmin/s per step, hence the slow tail.
    """
    return _series(p, iterations, lambda u: p.A @ u)


def lissa_curve(p: Problem, iterations: int, batch_size: int = LISSA_BATCH) -> list[float]:
    """LiSSA: the Neumann recursion with a fresh mini-batch curvature A_B each step.

    A_B = (1/|B|)·Σ_{i∈B} x_i x_iᵀ + λI over |B| = min(batch_size, N) samples drawn without
    replacement (seeded per problem).  A_B is an unbiased estimate of A, so the iterates converge in
    expectation, but the sampling noise puts a floor under the error.
    """
    g = torch.Generator().manual_seed(p.lissa_seed)
    m = min(batch_size, p.n)

    def product(u: torch.Tensor) -> torch.Tensor:
        return solvers.fisher_product(u, p.x[torch.randperm(p.n, generator=g, device="cpu")[:m]], p.lam)

    return _series(p, iterations, product)


def datainf_curve(p: Problem, iterations: int) -> list[float]:
    """DataInf's closed form (1/λ)(v − (1/N)Σ_i (x_iᵀv)/(λ + ‖x_i‖²)·x_i), the same at every iteration.

    It inverts each rank-one term x_i x_iᵀ + λI exactly (Sherman–Morrison) and averages the
    inverses instead of inverting the average, so its error is a fixed approximation bias.
    """
    est = solvers.datainf(p.v, [p.x], p.lam, p.n)
    return [relative_error(est, p.x_star)] * iterations


def cg_curve(p: Problem, iterations: int) -> list[float]:
    """Conjugate gradients on A·x = v from x₀ = 0 (one product with A per iteration).

    In exact arithmetic CG terminates within d iterations; once the residual is exactly zero (or
    the curvature pᵀAp is no longer positive, which only rounding can cause for SPD A) the iterate
    is kept, because another step would divide by zero.
    """
    errors: list[float] = []
    solvers.cg(p.A, p.v, max_iter=iterations, callback=_recorder(p, errors))
    return errors


def solve_all(p: Problem, iterations: int) -> tuple[dict[str, list[float]], SchulzTrace]:
    """Error curves of every solver in :data:`SOLVERS` on ``p`` (and the Schulz trace)."""
    trace = schulz_curve(p, iterations)
    curves = {
        SCHULZ: trace.errors,
        PAPER: paper_schulz_curve(p, iterations),
        LISSA: lissa_curve(p, iterations),
        NEUMANN: neumann_curve(p, iterations),
        DATAINF: datainf_curve(p, iterations),
        CG: cg_curve(p, iterations),
    }
    return curves, trace
