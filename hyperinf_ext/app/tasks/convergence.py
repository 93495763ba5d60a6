"""The HyperINF paper's synthetic convergence study: how fast each solver approaches A⁻¹v.

For every size d and sample count N one problem is drawn:

* x_i = z_i ⊙ σ with z_i ~ N(0, I_d) and per-dimension standard deviations σ log-spaced over
  ``SCALE_DECADES`` decades (randomly assigned to the dimensions), so the covariance spans about
  twice as many decades before damping;
* A = G + λI with G = (1/N)·Σ_i x_i x_iᵀ and λ = damping_scale·trace(G)/d (the DataInf damping rule);
* v ~ N(0, I_d), and the exact solution x* = A⁻¹v from a float64 ``torch.linalg.solve``.

Each solver yields an estimate of A⁻¹v after every iteration t = 1..T, scored by the relative error
‖x̂_t − x*‖/‖x*‖ (see :data:`SOLVERS`).  Everything runs in float64 so that the curves show the
algorithms, not float32 rounding.  :func:`run_convergence` runs the grid and writes
``convergence.png``, ``convergence.csv`` and ``convergence.json`` (through :mod:`.report`).
The problems and solver curves live in :mod:`.convergence_curves` (re-exported here).
"""
from __future__ import annotations

import math
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ... import ops
from .convergence_curves import (
    CG,
    DATAINF,
    LISSA,
    LISSA_BATCH,
    NEUMANN,
    PAPER,
    PAPER_X0,
    SCALE_DECADES,
    SCHULZ,
    SCHULZ_TOL,
    SERIES_SAFETY,
    SOLVERS,
    Problem,
    SchulzTrace,
    cg_curve,
    datainf_curve,
    lissa_curve,
    make_problem,
    neumann_curve,
    paper_schulz_curve,
    relative_error,
    schulz_curve,
    solve_all,
)
from .output import prepare_output_dir, staged_outputs
from .report import figure, write_csv, write_json

__all__ = [
    "CG", "DATAINF", "LINE_STYLES", "LISSA", "NEUMANN", "PAPER", "PLOT_CLIP", "SCHULZ", "SCHULZ_TOL", "TARGET",
    "SOLVERS",
    "Problem",
    "SchulzTrace",
    "make_problem",
    "relative_error",
    "schulz_curve",
    "paper_schulz_curve",
    "lissa_curve",
    "neumann_curve",
    "datainf_curve",
    "cg_curve",
    "solve_all",
    "first_below",
    "checkpoints",
    "table_rows",
    "run_convergence",
]

TARGET = 1e-6  # the table reports the first iteration at or below this relative error
CHECKPOINTS = (1, 5, 10, 20)
# Plot range: a diverged solver (inf/NaN or astronomically large) is drawn pinned to the top.
PLOT_CLIP = (1e-17, 1e3)
LINE_STYLES = {SCHULZ: "-", PAPER: "--", LISSA: ":", NEUMANN: "-.", DATAINF: "-", CG: "-"}

# --------------------------------------------------------------------------------------------------
# table and outputs


def checkpoints(iterations: int) -> list[int]:
    """The iterations the table reports: :data:`CHECKPOINTS` below the budget, then the last one."""
    return [t for t in CHECKPOINTS if t < iterations] + [iterations]


def first_below(errors: Sequence[float], target: float = TARGET) -> int | None:
    """First iteration t (1-based) with error <= target, or None (NaN never counts)."""
    for t, e in enumerate(errors, start=1):
        if e <= target:
            return t
    return None


def table_rows(curves: dict, iterations: int) -> list[dict]:
    """One row per (d, N, solver): the errors at :func:`checkpoints` and the first iteration below TARGET."""
    rows = []
    for d, by_n in curves.items():
        for n, by_solver in by_n.items():
            for solver, errs in by_solver.items():
                rows.append(
                    {
                        "d": d,
                        "N": n,
                        "solver": solver,
                        "errors": {str(t): errs[t - 1] for t in checkpoints(iterations)},
                        "first_iteration_below_target": first_below(errs),
                    }
                )
    return rows


# --------------------------------------------------------------------------------------------------
# entry point


SMALL_D = 512  # up to this size the study runs on one thread (see _threads_for)


@contextmanager
def _threads_for(d: int):
    """Run small-matrix work on one intra-op thread, restoring the previous count afterwards.

    A d ≤ 512 float64 product is a few ms of work: extra threads gain little on an idle machine,
    and on a shared CPU they wait for each other (measured: the default study took 7–12 s with 2
    threads on 2 busy cores and 3–4 s with one).
    """
    before = torch.get_num_threads()
    if d <= SMALL_D and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _check_int_list(name: str, xs) -> list[int]:
    try:
        out = list(xs)
    except TypeError:
        raise ValueError(f"{name}: expected a list of positive ints, got {xs!r}")
    if not out or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1 for x in out):
        raise ValueError(f"{name}: expected a non-empty list of positive ints, got {xs!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: duplicate values in {xs!r}")
    return [int(x) for x in out]


def run_convergence(
    sizes: list[int],
    samples: list[int],
    iterations: int,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    damping_scale: float = 0.1,
) -> dict:
    """Run every solver on the synthetic system of each (d, N) and write the study's outputs.

    Args:
        sizes: dimensions d.  samples: sample counts N.  iterations: T, iterations per solver.
        seed: base seed; each (d, N) problem has its own stream derived from (seed, d, N).
        out_dir: created if missing; receives convergence.png, convergence.csv, convergence.json.
        progress: show a tqdm bar on stderr.
        damping_scale: λ = damping_scale·trace(G)/d.

    Returns:
        ``{"curves": {d: {N: {solver: [error after t=1..T]}}}, "table": str, "rows": [...],
        "problems": [...], "settings": {...}, "png": Path, "csv": Path, "json": Path}``.
        Errors are relative, ‖x̂ − A⁻¹v‖/‖A⁻¹v‖; a diverging solver's entries are inf/NaN.
    """
    sizes = _check_int_list("sizes", sizes)
    samples = _check_int_list("samples", samples)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations: expected a positive int, got {iterations!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if not (isinstance(damping_scale, (int, float)) and math.isfinite(damping_scale) and damping_scale > 0):
        # λ is Schulz's lower bound and DataInf divides by it: it must be positive.
        raise ValueError(f"damping_scale: expected a finite positive number, got {damping_scale!r}")
    iterations, seed, damping_scale = int(iterations), int(seed), float(damping_scale)
    out_dir = prepare_output_dir(out_dir, "out_dir")  # before the study, not after it

    from tqdm.auto import tqdm

    curves: dict[int, dict[int, dict[str, list[float]]]] = {}
    problems: dict[tuple[int, int], dict] = {}
    grid = [(d, n) for d in sizes for n in samples]
    with tqdm(grid, desc="convergence", disable=not progress, unit="problem") as bar:
        for d, n in bar:
            bar.set_postfix_str(f"d={d} N={n}")
            with _threads_for(d):
                p = make_problem(d, n, seed, damping_scale)
                cell, trace = solve_all(p, iterations)
                # Cross-check the replay against the library's default backend on every run, not only
                # in the tests.  (The torch backend agrees bit for bit, see the tests; a compiled backend
                # rounds differently, so at the float64 floor its stagnation test may fire one step apart.)
                X_lib, info = ops.schulz_inverse(
                    p.A, lower_bound=p.lam, max_iter=iterations, tol=SCHULZ_TOL, check=False, return_info=True
                )
                library = {
                    "backend": info.backend,
                    "iterations": int(info.iterations),
                    "status": info.status[0],
                    "max_abs_diff": float((X_lib - trace.X).abs().max()),
                }
                lmin, lmax = p.eigen_range()
            curves.setdefault(d, {})[n] = cell
            problems[(d, n)] = {
                "d": d,
                "N": n,
                "damping": p.lam,
                "lambda_min": lmin,
                "lambda_max": lmax,
                "condition_number": lmax / lmin,
                "spectral_upper_bound": p.upper,
                "series_scale": p.series_scale,
                "schulz_iterations": trace.iterations,
                "schulz_status": trace.status,
                "schulz_residual": trace.residual,
                "library": library,
            }

    rows = table_rows(curves, iterations)
    table = convergence_table(rows, TARGET)
    settings = {
        "sizes": sizes,
        "samples": samples,
        "iterations": iterations,
        "seed": seed,
        "damping_scale": damping_scale,
        "scale_decades": SCALE_DECADES,
        "paper_x0": PAPER_X0,
        "lissa_batch": LISSA_BATCH,
        "series_safety": SERIES_SAFETY,
        "schulz_tol": SCHULZ_TOL,
        "target": TARGET,
        "solvers": list(SOLVERS),
        "dtype": "float64",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    png, csv_path, json_path = out_dir / "convergence.png", out_dir / "convergence.csv", out_dir / "convergence.json"
    problem_list = list(problems.values())
    with staged_outputs(out_dir) as stage:
        write_convergence_csv(stage / csv_path.name, curves)
        # a diverged solver's error stays visible in the JSON as "nan"/"inf"
        write_json(stage / json_path.name, {"settings": settings, "problems": problem_list, "table": rows},
                   nonfinite="string")
        plot_convergence(stage / png.name, curves, problems, iterations, target=TARGET, clip=PLOT_CLIP,
                         styles=LINE_STYLES)
    return {
        "curves": curves,
        "table": table,
        "rows": rows,
        "problems": problem_list,
        "settings": settings,
        "png": png,
        "csv": csv_path,
        "json": json_path,
    }

# ------------------------------------------------------------------------------ report


def write_convergence_csv(path: str | Path, curves: Mapping[int, Mapping[int, Mapping[str, Sequence[float]]]]) -> None:
    """``convergence.csv``: one row per (d, N, solver, iteration); errors as ``repr`` (round-trips exactly)."""
    write_csv(path, ["d", "N", "solver", "iteration", "error"], (
        [d, n, solver, t, repr(float(e))]
        for d, by_n in curves.items()
        for n, by_solver in by_n.items()
        for solver, errs in by_solver.items()
        for t, e in enumerate(errs, start=1)
    ))


def error_text(e: float) -> str:
    return f"{e:.2e}" if math.isfinite(e) else str(e)


def convergence_table(rows: Sequence[Mapping[str, Any]], target: float) -> str:
    """Fixed-width table of the convergence study: the error at each checkpoint of ``rows[*]["errors"]``
    (the last one is the final iteration) and the first iteration reaching ``target``."""
    cps = [int(t) for t in rows[0]["errors"]] if rows else []
    heads = [f"t={t}" for t in cps[:-1]] + [f"t={t} (final)" for t in cps[-1:]]
    reach = f"first t <= {target:g}"
    wsolver = max([len("solver")] + [len(r["solver"]) for r in rows])
    wcols = [max(len(h), 9) for h in heads]
    header = f"{'d':>6} {'N':>7}  {'solver':<{wsolver}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, wcols))
    header += f"  {reach:>{len(reach)}}"
    lines = [header, "-" * len(header)]
    prev = None
    for r in rows:
        if prev is not None and (r["d"], r["N"]) != prev:
            lines.append("")
        prev = (r["d"], r["N"])
        errs = [error_text(r["errors"][str(t)]) for t in cps]
        first = r["first_iteration_below_target"]
        cells = "  ".join(f"{e:>{w}}" for e, w in zip(errs, wcols))
        lines.append(
            f"{r['d']:>6} {r['N']:>7}  {r['solver']:<{wsolver}}  {cells}  "
            f"{('—' if first is None else str(first)):>{len(reach)}}"
        )
    return "\n".join(lines)


def plot_convergence(
    path: str | Path,
    curves: Mapping[int, Mapping[int, Mapping[str, Sequence[float]]]],
    problems: Mapping[tuple[int, int], Mapping[str, float]],
    iterations: int,
    *,
    target: float,
    clip: tuple[float, float],
    styles: Mapping[str, str],
) -> None:
    """One log-scale panel of error per iteration for each (d, N), one line per solver.

    ``problems[(d, N)]`` gives the panel title's ``condition_number`` and ``damping``; errors outside
    ``clip`` (or inf/NaN: a diverged solver) are drawn pinned to its edge and the line is labelled so;
    ``target`` is drawn as a dotted line; ``styles`` maps solver names to line styles.
    """
    sizes = list(curves)
    samples = list(next(iter(curves.values())))
    nr, nc = len(sizes), len(samples)
    fig = figure(5.2 * nc, 3.9 * nr + 0.6, 110)
    axes = fig.subplots(nr, nc, squeeze=False)
    lo, hi = clip
    ts = np.arange(1, iterations + 1)
    for i, d in enumerate(sizes):
        for j, n in enumerate(samples):
            ax = axes[i][j]
            for solver, errs in curves[d][n].items():
                e = np.asarray(errs, dtype=np.float64)
                bad = ~np.isfinite(e) | (e > hi)
                y = np.clip(np.where(np.isfinite(e), e, hi), lo, hi)
                label = solver + (" (diverged: clipped)" if bad.any() else "")
                ax.semilogy(ts, y, styles.get(solver, "-"), lw=1.6, label=label)
            ax.axhline(target, color="0.6", lw=0.8, ls=":")
            info = problems[(d, n)]
            ax.set_title(f"d={d}, N={n}  (κ(A)={info['condition_number']:.3g}, λ={info['damping']:.2g})", fontsize=9)
            ax.set_ylim(lo, hi * 10)
            ax.set_xlim(1, max(iterations, 2))
            ax.grid(True, which="major", alpha=0.3)
            if i == nr - 1:
                ax.set_xlabel("iteration")
            if j == 0:
                ax.set_ylabel("‖x̂ − A⁻¹v‖ / ‖A⁻¹v‖")
            ax.legend(fontsize=7, loc="lower left")
    # short enough for a single 5-inch column: a long title is clipped at both edges
    fig.suptitle("Inverse-HVP solvers: error per iteration", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
