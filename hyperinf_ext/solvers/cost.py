"""The cost model behind ``solver="auto"``: predicted seconds of each solver for one call.

Costs are flop counts over measured rates (GFLOP/s), per device kind and compute dtype, plus a
per-step overhead for CG's many small steps.  Iteration counts are predicted from the spectral
bracket [λ, ub] that the solvers themselves use (λ = the damping, ub = ``ops.spectral_upper_bound``):

* Schulz: the library's own bracket recursion (``reference.initial_scale`` / ``next_bracket``) run
  on scalars until √d·max|1 − σ| <= tol — a pessimistic count (the residual test usually stops
  earlier, since the true spectrum lies inside the bracket);  4·d³ flops per step (I − A·X, X·R).
* Cholesky: d³/3 (factor) + 2d³/3 (explicit inverse) or 2·k·d² per solve of k rows (TRSM rate,
  measured on 8 and on 1024 rows), plus the verification's 8 probe rows.
* CG: 2·k·d² flops per step ("rows" rate, measured on 8 rows) plus a fixed overhead per step, for
  CG_EXPECTED_FRACTION of the classical bound min(d, ½·√κ·ln(2√κ·κ/tol)) steps (κ = ub/λ, the bound
  its stopping test uses).  The bound is far too pessimistic: on 49 spectra (power laws e_i ∝ i^−p,
  p = 0.5..2, damping spectral ×0.3..10, and log-spaced κ = 3..1000; d = 256 and 768; 8 rows; float32
  and float64) CG took 0.12–0.47 of it, median 0.32, so a third of it is the expectation and a run
  that overruns is cut short: CG gets a step budget (``Choice.cg_steps``), the steps at which it
  would cost what the next cheapest solver costs, and gives up at half the budget when its residual
  has not made a third of the way (in log) to the target — CG's log-residual is convex in the step
  (it accelerates), and measured runs had made 0.42–0.51 of the way at half their steps.  A run that
  gives up hands over to that solver, so a wrong guess costs at most about 1.5× its time.  CG is a
  candidate only when rounding lets it reach the residual it must (:func:`cg_attainable`: κ <= 205 in
  float32, 4700 in float64 at the default tolerances).
* Applying an explicit inverse to k rows: 2·k·d² at the "apply" rate (a GEMM, measured on 1024 rows).

The rates were measured by ``python -m bench.solver_costs`` (see bench/RESULTS.md, "Solver cost
model"), which also checks the picks against the solvers timed in the same run.  CUDA has no
measured constants yet ("to be measured by the GPU check"): there ``auto`` runs Schulz, the solver
the Triton kernels fuse, which is the conservative choice for a GEMM machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..backends import schedule as reference

SOLVERS = ("schulz", "cholesky", "cg")
AUTO = "auto"

# GFLOP/s (and seconds per CG step) on CPU, measured by `python -m bench.solver_costs --threads 1`
# on 2026-12-01 04:13 UTC (fastest of 7 interleaved repeats at d = 512, batch 2, few-row kernels grouped
# apart; 2-core AMD EPYC VM, AVX-512, torch 2.13.0+cpu with MKL 2024.2, load average 6 on the 2 cores:
# the VM was shared).  A second run 4 minutes earlier agreed within 10% on every constant.  One thread:
# on this shared VM 2-thread MKL timings varied up to 10× between runs (its threaded Cholesky most),
# while single-thread ratios — which decide the picks — held.  Against the previous calibration the GEMM
# rates doubled (another load on the VM then), the float32 potrf rate fell (28.9 → 19.2) and the CG
# per-step overhead is 0.03 ms, not 0.24/0.47 ms (so CG wins few-row, well-conditioned float32 solves
# too).  The check in the same run found auto's pick the fastest solver in every case of its grid; see
# bench/RESULTS.md, "Solver cost model".
CPU_RATES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"apply": 52.6, "cg_step_s": 0.000027, "gemm": 51.3, "potrf": 12.1, "potri": 22.7, "rows": 32.1,
                    "schulz_cpp": 49.3, "schulz_torch": 45.1, "trsm": 35.5, "trsm_few": 16.2},
    torch.float32: {"apply": 107.5, "cg_step_s": 0.000034, "gemm": 109.3, "potrf": 19.2, "potri": 44.9, "rows": 62.2,
                    "schulz_cpp": 101.5, "schulz_torch": 97.0, "trsm": 48.5, "trsm_few": 29.2},
}
PROBES = 8  # rows of the Cholesky verification (direct.PROBES)
FEW_ROWS = 64  # below, solves run at the "trsm_few" rate (measured on 8 rows), above at "trsm" (1024 rows)
MIN_SCHULZ_STEPS = 1  # no spectral bracket computed: Schulz's cost is at least one step (its residual test needs one)
UNKNOWN_BRACKET_ITERATIONS = 50  # Schulz with no lower bound (λ = 0): no prediction; a typical count
CG_EXPECTED_FRACTION = 1.0 / 3.0  # of the classical CG step bound: what measured spectra took (module doc)
CG_CHECK_PROGRESS = 1.0 / 3.0  # at half its budget, CG must have made this much of the way (in log)


@dataclass
class Choice:
    """The solver auto picked, why, and the predicted seconds of every candidate."""

    solver: str
    reason: str
    costs: dict[str, float] = field(default_factory=dict)
    cg_steps: int | None = None  # CG picked: the steps at which it would cost what the next cheapest does


def schulz_iterations(lower: float, upper: float, d: int, tol: float, max_iter: int = 100) -> int:
    """Predicted scaled-Schulz steps for a matrix with spectrum in [lower, upper] (see module doc)."""
    if not lower > 0:
        return UNKNOWN_BRACKET_ITERATIONS
    lower = min(lower, upper)
    beta = reference.initial_scale(lower, upper)
    a, b = beta * lower, beta * upper
    for k in range(max_iter):
        if math.sqrt(d) * max(1.0 - a, b - 1.0) <= tol:
            return k
        beta, a, b = reference.step_scale(a, b, math.inf)
        a, b = reference.next_bracket(a, b, beta)
    return max_iter


def cg_iterations(kappa: float, d: int, tol: float) -> int:
    """The classical bound of the CG steps to reach the relative residual tol/κ, capped at d.

    From ‖e_k‖_A <= 2ρ^k·‖e_0‖_A, ρ = (√κ − 1)/(√κ + 1) <= exp(−2/√κ), and ‖r‖ <= √κ·‖e‖_A-relative:
    k = ½·√κ·ln(2·√κ·κ/tol), κ the bound ub/λ that CG's stopping test also uses.
    """
    if not math.isfinite(kappa):
        return d
    return max(1, min(d, math.ceil(0.5 * math.sqrt(kappa) * math.log(2.0 * math.sqrt(kappa) * kappa / tol))))


def cg_attainable(kappa: float, dtype: torch.dtype, tol: float) -> bool:
    """Whether CG can be asked for tol: it must reach a relative residual tol/κ (κ·residual bounds the
    error), and rounding keeps its residual above about u·κ — so κ² <= tol/(2·u) with a margin of 2.
    Measured (d = 768, float32, tol 1e-2): CG passed its check at κ = ub/λ = 42..166 on power-law spectra;
    a run that stalls nearer the limit gives up at half its budget (module doc)."""
    return math.isfinite(kappa) and kappa * kappa <= tol / (2.0 * torch.finfo(dtype).eps)


def _rates(device: torch.device, dtype: torch.dtype) -> dict[str, float] | None:
    return CPU_RATES.get(dtype) if device.type == "cpu" else None


def choose(
    *,
    d: int,
    batch: int,
    rows: int | None,
    dtype: torch.dtype,
    device: torch.device,
    lower: float,
    upper: float | None,
    tol: float,
    want: str = "apply",
    schulz_backend: str = "torch",
    polish: bool = False,
) -> Choice:
    """Pick the cheapest of Schulz, Cholesky and (for ``rows`` known, λ > 0) CG.

    d, batch: matrices d×d, ``batch`` of them solved together.  rows: right-hand-side rows per
    matrix, or None when unknown (a factorisation applied later: only the set-up cost counts).
    dtype: the compute dtype.  lower/upper: the spectral bracket (worst matrix of the batch); upper None:
    not computed — Schulz is then costed at its fewest steps (MIN_SCHULZ_STEPS, a lower bound of its
    cost whatever the spectrum) and CG is not a candidate, so a pick other than Schulz holds for every
    bracket (auto computes the bracket only when this optimistic Schulz wins, or for CG).
    want: "apply" (rows solved), or "inverse" (an explicit X is kept: Schulz or Cholesky inverse).
    schulz_backend: the backend Schulz would run on; polish: float64 Schulz runs as float32 + polish.
    CG picked: ``Choice.cg_steps`` is its step budget (module doc).
    """
    device = torch.device(device)
    rates = _rates(device, dtype)
    if rates is None:
        return Choice("schulz", f"{device.type}: no measured cost constants; Schulz is the GEMM-bound default")
    g = 1e9
    costs: dict[str, float] = {}
    k = 0 if rows is None else rows
    apply_x = batch * 2.0 * k * d * d / (rates["apply"] * g)
    if upper is None:
        # a lower bound of either path: the float32 phase + polish costs more than one float64 step
        # (two float64 polish steps alone do), so one step at the dtype's own rate bounds both
        sch = MIN_SCHULZ_STEPS * 4.0 * d**3 / (rates.get(f"schulz_{schulz_backend}", rates["gemm"]) * g)
    elif polish and dtype == torch.float64 and torch.float32 in CPU_RATES:
        r32 = CPU_RATES[torch.float32]
        steps = schulz_iterations(lower, upper, d, 1e-3)
        sch = steps * 4.0 * d**3 / (r32.get(f"schulz_{schulz_backend}", r32["gemm"]) * g)
        sch += 2 * 4.0 * d**3 / (rates["gemm"] * g)  # two float64 polish steps
    else:
        steps = schulz_iterations(lower, upper, d, tol)
        sch = steps * 4.0 * d**3 / (rates.get(f"schulz_{schulz_backend}", rates["gemm"]) * g)
    costs["schulz"] = batch * sch + apply_x
    chol = d**3 / 3.0 / (rates["potrf"] * g)
    probes = 2.0 * PROBES * d * d / (rates["rows"] * g)  # the verification's probe rows times A
    if want == "inverse":
        chol += 2.0 * d**3 / 3.0 / (rates["potri"] * g) + 2.0 * k * d * d / (rates["apply"] * g) + 2 * probes
    else:
        trsm = rates["trsm"] if k >= FEW_ROWS else rates["trsm_few"]  # TRSM on a few rows runs far below peak
        chol += 2.0 * k * d * d / (trsm * g) + probes + 2.0 * PROBES * d * d / (rates["trsm_few"] * g)
    costs["cholesky"] = batch * chol
    per_step = batch * 2.0 * k * d * d / (rates["rows"] * g) + rates["cg_step_s"]
    expected = 0
    if want == "apply" and rows is not None and upper is not None and cg_attainable(upper / lower if lower > 0 else math.inf, dtype, tol):
        expected = math.ceil(CG_EXPECTED_FRACTION * cg_iterations(upper / lower, d, tol))
        costs["cg"] = expected * per_step
    best = min(costs, key=costs.get)
    budget = None
    if best == "cg":  # the steps at which the next cheapest solver would have cost the same
        budget = max(expected, math.floor(min(c for s, c in costs.items() if s != "cg") / per_step))
    shown = ", ".join(f"{s} {'>= ' if s == 'schulz' and upper is None else ''}{c * 1e3:.3g} ms" for s, c in costs.items())
    return Choice(best, f"cost model ({device.type}, {str(dtype).replace('torch.', '')}, d={d}, "
                        f"batch={batch}, rows={rows}): {shown}"
                        + (f"; cg within {budget} steps" if budget is not None else ""), costs, budget)
