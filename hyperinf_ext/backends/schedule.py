"""The Schulz specification: status codes, the scaling/bracket rules and the one per-matrix schedule.

Every backend iterates X_{k+1} = β_k·X_k(2I − β_k·A·X_k) on each SPD matrix A [d, d], and every
Python driver of that iteration — the torch loop (``backends/torch.py``) and the Triton host driver
(``backends/triton.py``) — takes its decisions from :class:`SchulzSchedule`: the start X₀ = β₀·I,
each step's β, the eigenvalue bracket, and when to stop with which status.  The C++ twin
(``csrc/schulz.cpp``) implements the same rules and is tested for identical decisions.

Layout the backends receive from ``ops/`` (no checks below): A [B, d, d] float32/float64
contiguous, lower/upper [B] float64 spectral bounds (0 <= lower < upper, lower == 0 = "unknown").
"""
from __future__ import annotations

import math

# Status codes of one matrix after `schulz_inverse`, shared by every backend.
CONVERGED = 0  # residual <= tol
STAGNATED = 1  # rounding floor of the dtype reached above tol
MAX_ITER = 2  # iteration budget spent above tol
DIVERGED = 3  # residual grew past what an SPD matrix allows: A is not positive definite

STATUS_NAMES = {CONVERGED: "converged", STAGNATED: "stagnated", MAX_ITER: "max_iter", DIVERGED: "diverged"}

# Once the residual is below this and the step was (nearly) unscaled, Schulz is in its quadratic
# phase: a step that fails to halve the residual means rounding error dominates (stagnation).
QUADRATIC_PHASE = 0.5
UNSCALED = 1e-2  # |β − 1| below this counts as an unscaled step


def initial_scale(lower: float, upper: float) -> float:
    """β₀ with X₀ = β₀·I: optimal 2/(λmin+λmax) when a lower bound is known, else the safe 1/λmax."""
    return 2.0 / (lower + upper) if lower > 0 else 1.0 / upper


def step_scale(a: float, b: float, residual: float) -> tuple[float, float, float]:
    """Scaling β for one step given the bracket [a, b] of the eigenvalues of A·X.

    The residual r = ‖I − A·X‖_F bounds ‖I − A·X‖₂, so every eigenvalue σ of A·X lies in
    [1 − r, 1 + r]; combining that with the analytic bracket keeps the scaling safe even when the
    supplied lower bound is loose or rounding has moved the spectrum.  Returns (β, a, b) with the
    tightened bracket.  β = 2/(a+b) maps [a, b] onto [4ab/(a+b)², 1], which is optimal for the
    quadratic σ ↦ βσ(2 − βσ).  With no lower information (a == 0) plain Schulz (β = 1) is used.
    """
    if residual < 1.0:
        b = min(b, 1.0 + residual)
        if a > 0.0:
            a = max(a, 1.0 - residual)
    if a <= 0.0:
        return 1.0, a, b
    return 2.0 / (a + b), a, b


def next_bracket(a: float, b: float, beta: float) -> tuple[float, float]:
    """Bracket of the eigenvalues of A·X after the step X ← βX(2I − βAX)."""

    def f(s: float) -> float:
        return beta * s * (2.0 - beta * s)

    lo = min(f(a), f(b))
    hi = 1.0 if a <= 1.0 / beta <= b else max(f(a), f(b))
    return lo, hi


def divergence_limit(d: int) -> float:
    """For SPD A every eigenvalue of I − A·X stays in [0, 1) so ‖I − A·X‖_F < √d; far past it, A is not SPD."""
    return 2.0 * math.sqrt(d) + 1.0


class SchulzSchedule:
    """The decisions of scaled Schulz on ONE matrix; the driver owns the iterates and the GEMMs.

    Per matrix, with R_k = I − A·X_k and r_k = ‖R_k‖_F::

        beta0 = s.start(lower, upper)          # X₀ = β₀·I, bracket [β₀·lower, β₀·upper]
        loop:
            r_k = ‖I − A·X_k‖_F
            status = s.decide(r_k)             # None: keep iterating
            if status is not None:             # s.rollback: return X_{k−1} instead of X_k
                break
            beta = s.next_beta()               # X_{k+1} = β(2 − β)·X_k + β²·X_k·R_k
        s.iterations, s.residual               # of the returned iterate

    ``decide`` stops CONVERGED if r_k <= tol; DIVERGED if r_k is not finite or > divergence_limit(d);
    STAGNATED if r_{k−1} < QUADRATIC_PHASE and |β_{k−1} − 1| < UNSCALED and r_k > r_{k−1}/2 (rolling
    back to X_{k−1} when r_k > r_{k−1}); MAX_ITER if k == max_iter.  All arithmetic is Python float
    (IEEE double), as in the C++ twin, so every driver takes the same decisions on the same residuals.
    """

    __slots__ = ("tol", "max_iter", "limit", "a", "b", "k", "r", "r_prev", "beta", "status", "rollback")

    def __init__(self, d: int, tol: float, max_iter: int) -> None:
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.limit = divergence_limit(d)

    def start(self, lower: float, upper: float) -> float:
        """Reset for a matrix with spectral bounds [lower, upper]; returns β₀ (X₀ = β₀·I)."""
        beta0 = initial_scale(lower, upper)
        self.a, self.b = beta0 * lower, beta0 * upper
        self.k, self.r, self.r_prev, self.beta = 0, math.inf, math.inf, math.inf
        self.status: int | None = None
        self.rollback = False
        return beta0

    def decide(self, residual: float) -> int | None:
        """Status to stop with at residual r_k = ‖I − A·X_k‖_F, or None to take another step."""
        r = self.r = float(residual)
        if not math.isfinite(r) or r > self.limit:
            self.status = DIVERGED
        elif r <= self.tol:
            self.status = CONVERGED
        elif self.r_prev < QUADRATIC_PHASE and abs(self.beta - 1.0) < UNSCALED and r > 0.5 * self.r_prev:
            self.status = STAGNATED
            # Rounding has taken over: return whichever of X_{k−1}, X_k has the smaller residual.
            if r > self.r_prev:
                self.rollback = True
                self.r, self.k = self.r_prev, self.k - 1
        elif self.k == self.max_iter:
            self.status = MAX_ITER
        return self.status

    def next_beta(self) -> float:
        """β_k of the step from X_k (after ``decide`` returned None); advances the bracket and k."""
        beta, a, b = step_scale(self.a, self.b, self.r)
        self.beta, self.r_prev = beta, self.r
        self.a, self.b = next_bracket(a, b, beta)
        self.k += 1
        return beta

    @property
    def iterations(self) -> int:
        """Updates applied to the iterate this schedule returns (after a rollback: one fewer)."""
        return self.k

    @property
    def residual(self) -> float:
        """‖I − A·X‖_F of the returned iterate."""
        return self.r


def update_coefficients(beta: float) -> tuple[float, float]:
    """(c1, c2) of X_{k+1} = c1·X_k + c2·X_k·R_k for the step β: (β(2 − β), β²)."""
    return beta * (2.0 - beta), beta * beta
