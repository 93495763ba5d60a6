"""Inverse of batches of SPD matrices: ours (scaled Schulz, every CPU backend, lower_bound = damping)
vs Schulz from the paper's fixed start (X₀ = 5e-5·I, 30 iterations) vs torch.linalg.inv (one matrix at
a time: batched, it fails in torch 2.13's CPU build once 2+ threads ran) vs Cholesky
(torch.linalg.cholesky + torch.cholesky_inverse) vs the library's default, ``solvers.spd_inverse``
with solver="auto" (damping, cost-model pick, verification and symmetrisation included); time,
iterations, status and error against a float64 solve of the same (rounded) input, and the default's
time against the fastest method of the same run (target: <= DEFAULT_TARGET×).  Plus the cost of one
Schulz iteration against its two GEMMs.

Matrices: Q·diag(e)·Qᵀ with e log-spaced in [λ, λ·κ] (λ plays the damping, the lower bound we pass).

pytest-benchmark: ``python -m pytest bench/bench_inverse.py --benchmark-only`` (modest sizes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from hyperinf_ext import ops, solvers
from hyperinf_ext.curvature.methods import PaperSchulz

from .baselines import cholesky_inverse, inv_per_matrix, inverse_f64, paper_schulz, schulz_status, status_summary
from .inputs import cpu_backends, spd_batch
from .timing import (Section, Table, Target, TimerConfig, fmt_ratio, fmt_sci, fmt_time, fmt_timing, measure_group,
                     progress)

DN = {torch.float32: "fp32", torch.float64: "fp64"}
DEFAULT_TARGET = 1.15  # the default (solver="auto") within this factor of the fastest method of the same run
DEFAULT = "default: solvers.spd_inverse (solver=auto)"
INV = "torch.linalg.inv (one matrix at a time)"


@dataclass
class InvCase:
    d: int
    B: int  # matrices actually inverted
    lam: float
    kappa: float
    dtypes: tuple = (torch.float32, torch.float64)
    all_backends_fp64: bool = True  # False: float64 only on the default backend (time)
    paper_dtypes: tuple = (torch.float32, torch.float64)
    warmup: int | None = None  # None = the timer's; 0 for the largest case (the smaller ones warmed the same code)
    repeats: int | None = None  # None = the timer's; 1 for the largest case (the 15-minute budget of the full run)


@dataclass
class InvConfig:
    batch: int = 12  # the batch the table reports (times scaled by batch/B when B < batch)
    cases: list = field(default_factory=lambda: [
        InvCase(256, 12, 1e-1, 1e2),
        InvCase(256, 12, 1e-3, 1e4),
        InvCase(256, 12, 1e-3, 1e6),
        InvCase(256, 12, 1e-6, 1e4),  # small-gradient scale: the paper's fixed start is too small for 30 steps
        InvCase(256, 12, 1.0, 1e5),  # λmax = 1e5 > 4e4: the paper's start diverges
        InvCase(768, 12, 1e-3, 1e4, all_backends_fp64=False, paper_dtypes=(torch.float32,)),
        InvCase(2048, 1, 1e-3, 1e4, dtypes=(torch.float32,), paper_dtypes=(torch.float32,), warmup=0, repeats=1),
    ])
    # per-iteration cost: (d, k1, k2) — marginal cost (t(k2) − t(k1)) / (k2 − k1), and t(k2)/k2
    per_iter: tuple = ((256, 2, 10), (768, 2, 6), (2048, 1, 3))
    per_iter_dtypes: tuple = (torch.float32, torch.float64)
    per_iter_fp64_max_d: int = 768
    per_iter_target: float = 1.2


FULL = InvConfig()
QUICK = InvConfig(
    batch=4,
    cases=[InvCase(48, 4, 1e-1, 1e2), InvCase(48, 4, 1e-6, 1e4), InvCase(48, 4, 1.0, 1e5), InvCase(96, 2, 1e-3, 1e4)],
    per_iter=((64, 2, 6), (128, 1, 3)),
    per_iter_fp64_max_d=64,
)


def inverse_case(case: InvCase, timer: TimerConfig) -> tuple[list, dict]:
    """Rows for one case and facts: {'ours': (t, dtype)...}."""
    progress(f"inverse d={case.d} B={case.B} eigenvalues [{case.lam:g}, {case.lam * case.kappa:g}]")
    bks = cpu_backends()
    rows: list[tuple] = []  # (method, dtype, Timing, iterations, status, error)
    for dtype in case.dtypes:
        A = spd_batch(case.d, case.B, case.lam, case.kappa, dtype, seed=case.d)
        ref = inverse_f64(A)
        cands, post = {}, {}
        for b in bks:
            if dtype == torch.float64 and not case.all_backends_fp64 and b != bks[0]:
                continue
            name = f"ours: scaled Schulz [{b}]"
            cands[name] = (lambda b: (lambda: ops.schulz_inverse(A, lower_bound=case.lam, backend=b, return_info=True, check=False)))(b)
            post[name] = "schulz"
        if dtype in case.paper_dtypes:
            cands[f"paper Schulz (X₀={PaperSchulz.X0_SCALE:g}·I, {PaperSchulz.ITERATIONS} it.)"] = lambda: paper_schulz(A)
        direct = {INV: lambda: inv_per_matrix(A), "Cholesky + cholesky_inverse": lambda: cholesky_inverse(A)}
        # the library's default: G = A − λI damped by λ, solver="auto" (picked, verified, symmetrised)
        G = A - case.lam * torch.eye(case.d, dtype=dtype)
        direct[DEFAULT] = lambda: solvers.spd_inverse(G, case.lam)
        post[DEFAULT] = "auto"
        if case.repeats == 1:
            # the largest case: one run of the slow iterative methods, the usual repeats of the direct
            # ones and the default (their ratios, which the default's target is about, stay interleaved)
            t = measure_group(cands, timer, keep_result=True, warmup=case.warmup, repeats=1, min_repeats=1)
            t.update(measure_group(direct, timer, keep_result=True))
        else:
            t = measure_group({**cands, **direct}, timer, keep_result=True, warmup=case.warmup,
                              repeats=case.repeats, min_repeats=case.repeats)
        tol = ops.DEFAULT_TOL[dtype]
        for name, tm in t.items():
            res = tm.result
            if tm.error or res is None:
                rows.append((name, dtype, tm, "—", tm.error or "no result", float("nan")))
                continue
            if post.get(name) == "schulz":
                X, info = res
                it = info.iterations.reshape(-1)
                iters = f"{int(it.min())}–{int(it.max())}" if int(it.min()) != int(it.max()) else f"{int(it.max())}"
                status = status_summary(info.status)
            elif post.get(name) == "auto":
                X, sinfo = res
                iters, status = sinfo.solver, f"residual ≤ {float(sinfo.residual.max()):.1e}"
            elif name.startswith("paper"):
                X = res
                st, _ = schulz_status(A, X, tol)
                iters, status = str(PaperSchulz.ITERATIONS), status_summary(st) + f" (tol {tol:g})"
            else:
                X, iters, status = res, "direct", "—"
            try:
                err = rel_err_safe(X, ref)
            except Exception:  # noqa: BLE001
                err = float("nan")
            rows.append((name, dtype, tm, iters, status, err))
            tm.result = None
        del A, ref
    return rows, {}


def rel_err_safe(X: torch.Tensor, ref: torch.Tensor) -> float:
    from .baselines import rel_err

    if not bool(torch.isfinite(X).all()):
        return float("inf")
    return rel_err(X, ref)


def per_iteration(d: int, k1: int, k2: int, dtype: torch.dtype, timer: TimerConfig) -> dict:
    """Time of one Schulz iteration (backends' schulz_inverse with max_iter = k, check=False) vs two torch.mm."""
    progress(f"schulz per-iteration cost d={d} {DN[dtype]}")
    A = spd_batch(d, 1, 1e-3, 1e6, dtype, seed=7)  # no lower bound given: plain Schulz, far from converged in k2 steps
    A2 = A[0].contiguous()
    X = torch.randn(d, d, dtype=dtype)
    R = torch.randn(d, d, dtype=dtype)
    cands = {"two torch.mm (A·X, X·R)": lambda: (torch.mm(A2, X), torch.mm(X, R))}
    bks = cpu_backends()
    for b in bks:
        for k in (k1, k2):
            cands[f"{b} k={k}"] = (lambda b, k: (lambda: ops.schulz_inverse(A, max_iter=k, backend=b, check=False, return_info=True)))(b, k)
    step = None
    if "cpp" in bks and hasattr(torch.ops.hyperinf, "schulz_step_"):
        Xn, Rb = torch.empty_like(A2), torch.empty_like(A2)
        X0 = torch.eye(d, dtype=dtype) / float(A2.abs().sum(1).max())
        step = "cpp schulz_step_ op (one fused step)"
        cands[step] = lambda: torch.ops.hyperinf.schulz_step_(Xn, Rb, A2, X0, 1.0)
    # sub-10-ms runs (d ≤ 256) are at the mercy of a single preemption: more interleaved rounds
    many = max(timer.repeats, 25) if d <= 256 else None
    t = measure_group(cands, timer, keep_result=True, repeats=many, min_repeats=many)
    out = {"mm": t["two torch.mm (A·X, X·R)"], "backends": {}, "step": t.get(step) if step else None}
    for b in bks:
        t1, t2 = t[f"{b} k={k1}"], t[f"{b} k={k2}"]
        iters_ok = t2.ok and t2.result is not None and int(t2.result[1].iterations.max()) == k2
        out["backends"][b] = {
            "marginal": (t2.median - t1.median) / (k2 - k1) if (t1.ok and t2.ok) else float("nan"),
            "avg": t2.median / k2 if t2.ok else float("nan"),
            "ran_k": iters_ok,
            "t2": t2,
        }
        t1.result = t2.result = None
    return out


def default_vs_fastest(rows: list, dtype) -> dict | None:
    """The default's row against the fastest other method (same case, dtype) that returned a finite answer.

    rows: (method, dtype, Timing, iterations, status, error).  None when the default was not run; an entry
    with ratio = inf and ``raised`` when it raised (e.g. ConvergenceError: verification failed).
    """
    mine = [(n, tm, it, err) for n, dt, tm, it, st, err in rows if dt == dtype and n == DEFAULT]
    if not mine:
        return None
    _, tm, picked, err = mine[0]
    others = {n: (t, e) for n, dt, t, it, st, e in rows if dt == dtype and n != DEFAULT and t.ok and math.isfinite(e)}
    if not others:
        return None
    best = min(others, key=lambda n: others[n][0].median)
    if not tm.ok:
        msg = (tm.error or "no result").split(" for matrix")[0]
        return {"picked": f"raised {msg}", "time": math.nan, "error": math.nan, "fastest": best,
                "fastest_time": others[best][0].median, "fastest_error": others[best][1], "ratio": math.inf,
                "raised": True}
    return {"picked": picked, "time": tm.median, "error": err, "fastest": best, "fastest_time": others[best][0].median,
            "fastest_error": others[best][1], "ratio": tm.median / others[best][0].median}


def default_table(title: str, entries: list[tuple[str, dict]], target: float) -> Table:
    tab = Table(title, ["case", "default solver (auto's pick)", "default time", "fastest other method", "its time",
                        "default / fastest", "default error vs fp64 solve", "fastest's error"])
    for case, e in entries:
        over = "" if e["ratio"] <= target else " (over)"
        tab.rows.append([case, e["picked"], fmt_time(e["time"]) if math.isfinite(e["time"]) else "—", e["fastest"],
                         fmt_time(e["fastest_time"]), (fmt_ratio(e["ratio"]) + over) if math.isfinite(e["ratio"]) else "—",
                         fmt_sci(e["error"]), fmt_sci(e["fastest_error"])])
    return tab


def default_target(what: str, entries: list[tuple[str, dict]], target: float) -> Target:
    if not entries:
        return Target(f"default (solver=auto) within {target}× of the fastest method, every {what} case", None,
                      "the default did not run")
    timed = [(c, e) for c, e in entries if math.isfinite(e["ratio"])]
    worst_case, worst = max(timed or entries, key=lambda ce: ce[1]["ratio"])
    over = [c for c, e in entries if e["ratio"] > target]
    return Target(
        f"default (solver=auto) within {target}× of the fastest method, every {what} case",
        not over,
        f"{len(entries) - len(over)} of {len(entries)} cases; worst timed {fmt_ratio(worst['ratio'])} ({worst_case}: "
        f"{worst['picked']} vs {worst['fastest']})" + (f"; over: {'; '.join(over)}" if over else "")
        + "".join(f"; {c}: the default {e['picked']}" for c, e in entries if e.get("raised")),
    )


def section(quick: bool, timer: TimerConfig) -> Section:
    cfg = QUICK if quick else FULL
    sec = Section("Inverse (Schulz vs baselines)")
    bks = cpu_backends()
    defaults: list[tuple[str, dict]] = []
    for case in cfg.cases:
        rows, _ = inverse_case(case, timer)
        scale = cfg.batch / case.B
        title = (f"Inverse, d = {case.d}, batch {cfg.batch}, eigenvalues in [{case.lam:g}, {case.lam * case.kappa:g}] "
                 f"(κ = {case.kappa:.0e}; lower_bound = {case.lam:g})")
        tab = Table(title, ["method", "dtype", f"time per batch of {cfg.batch}", "time / ours", "iterations", "status",
                            "max rel. error vs fp64 solve"])
        ours_t = {}
        for name, dtype, tm, iters, status, err in rows:
            tm.scale = scale
            if name == f"ours: scaled Schulz [{bks[0]}]" and tm.ok:
                ours_t[dtype] = tm.median
        for name, dtype, tm, iters, status, err in rows:
            base = ours_t.get(dtype)
            ratio = fmt_ratio(tm.median / base) if (base and tm.ok) else "—"
            tab.rows.append([name, DN[dtype], fmt_timing(tm), ratio, iters, status, fmt_sci(err)])
        if case.warmup == 0:
            tab.notes.append("no separate warm-up run of the Schulz methods here: the smaller cases above ran the same code just before.")
        if case.repeats == 1:
            tab.notes.append("one timed run of each Schulz method at this size (time budget of the full run); the direct "
                             "methods and the default get the usual warm-up and repeats, interleaved with each other.")
        if case.B < cfg.batch:
            tab.notes.append(f"timed on {case.B} matri{'x' if case.B == 1 else 'ces'}, times ×{scale:g} (linear in the batch).")
        tab.notes.append("'time / ours' = method time / ours on the default backend in the same dtype (> 1: ours is faster).")
        tab.notes.append(f"'{INV}': batched torch.linalg.inv fails in torch 2.13's CPU build once the process ran with "
                         "2+ threads (MKL: \"Pivots given to lu_solve must all be greater or equal to 1\"); one matrix at a "
                         "time it works, and that is what is timed.  The fp64 reference is a float64 LU solve, also per matrix.")
        tab.notes.append(f"'{DEFAULT}': the library's default on G = A − λI with damping λ: the iterations column "
                         "says which solver the cost model picked, the status column its verified residual; its time "
                         "includes damping, the pick, the verification and symmetrisation.")
        sec.tables.append(tab)
        for dtype in case.dtypes:
            e = default_vs_fastest(rows, dtype)
            if e is not None:
                defaults.append((f"d={case.d}, [{case.lam:g}, {case.lam * case.kappa:g}], {DN[dtype]}", e))
        # facts for advice
        for dtype in case.dtypes:
            ok = {name: tm.median for name, dt, tm, *_ in rows if dt == dtype and tm.ok and name != DEFAULT}
            if ok and dtype in ours_t and case.kappa == 1e4:
                best = min(ok, key=ok.get)
                chol = ok.get("Cholesky + cholesky_inverse", float("nan"))
                e = default_vs_fastest(rows, dtype)
                dflt = ("" if e is None else f"; the default (solver=auto) {e['picked']}" if e.get("raised") else
                        f"; the default (solver=auto) picks {e['picked']}: {fmt_ratio(e['ratio'])} the fastest's time")
                sec.advice.append(f"explicit inverse, batch of {cfg.batch} d={case.d} {DN[dtype]}, eigenvalues in "
                                  f"[{case.lam:g}, {case.lam * case.kappa:g}]: fastest is **{best}** ({fmt_time(ok[best])}); "
                                  f"ours (Schulz) takes {fmt_ratio(ours_t[dtype] / ok[best])} its time"
                                  + ("" if best.startswith("Cholesky") else f", Cholesky {fmt_ratio(chol / ok[best])}")
                                  + dflt + ".")
        for name, dtype, tm, iters, status, err in rows:
            if name.startswith("paper"):
                sec.notes.append(f"d={case.d}, eigenvalues [{case.lam:g}, {case.lam * case.kappa:g}], {DN[dtype]}: paper Schulz → {status}, "
                                 f"error {fmt_sci(err)}.")
    dtab = default_table(f"Default solver (solvers.spd_inverse, solver=\"auto\") against the fastest method of the same run "
                         f"(batch of {cfg.batch})", defaults, DEFAULT_TARGET)
    dtab.notes.append("'fastest other method': the fastest of every other method timed on the same case and dtype that "
                      "returned a finite answer (both Schulz backends, paper Schulz, torch.linalg.inv one matrix at a "
                      f"time, Cholesky + cholesky_inverse); target: default / fastest ≤ {DEFAULT_TARGET}×.  The default "
                      "also damps, verifies (8 probe rows) and symmetrises; the baselines do not.")
    sec.tables.append(dtab)
    sec.targets.append(default_target("explicit-inverse", defaults, DEFAULT_TARGET))
    # per-iteration cost
    tab = Table("Cost of one Schulz iteration vs its two GEMMs (one matrix, max_iter = k, check=False)",
                ["d", "dtype", "backend", "marginal: (t(k2) − t(k1))/(k2 − k1)", "t(k2)/k2", "two torch.mm",
                 "ratio (marginal)", "ratio (t/k)"])
    for d, k1, k2 in cfg.per_iter:
        for dtype in cfg.per_iter_dtypes:
            if dtype == torch.float64 and d > cfg.per_iter_fp64_max_d:
                continue
            res = per_iteration(d, k1, k2, dtype, timer)
            mm = res["mm"].median
            for b, v in res["backends"].items():
                note = "" if v["ran_k"] else " (did not run k2 iterations!)"
                tab.rows.append([d, DN[dtype], b + note, fmt_time(v["marginal"]), fmt_time(v["avg"]), fmt_time(mm),
                                 fmt_ratio(v["marginal"] / mm), fmt_ratio(v["avg"] / mm)])
                if b == bks[0]:
                    ratio = v["marginal"] / mm
                    sec.targets.append(Target(
                        f"one Schulz iteration ≤ {cfg.per_iter_target}× its two GEMMs (d={d}, {DN[dtype]}, {b})",
                        bool(ratio <= cfg.per_iter_target) if ratio == ratio else None,
                        f"{fmt_ratio(ratio)} (marginal; t(k)/k gives {fmt_ratio(v['avg'] / mm)}; k = {k1}→{k2})"
                        + ("" if ratio <= cfg.per_iter_target else f"; over by {100 * (ratio / cfg.per_iter_target - 1):.0f}%"),
                    ))
            if res["step"] is not None:
                st = res["step"]
                tab.rows.append([d, DN[dtype], "cpp schulz_step_ op", fmt_time(st.median), "—", fmt_time(mm),
                                 fmt_ratio(st.median / mm), "—"])
    tab.notes.append("Marginal cost removes the set-up (spectral bounds, symmetry check) and the final residual; t(k)/k "
                     "includes them (k updates need k + 1 residuals, so 2k + 1 GEMMs).")
    sec.tables.append(tab)
    return sec


# --------------------------------------------------------------------------------------------------
# pytest-benchmark


METHODS = [f"schulz:{b}" for b in cpu_backends()] + ["paper", "inv", "cholesky", "default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("method", METHODS)
def test_inverse(benchmark, method, d, dtype):
    lam, kappa = 1e-3, 1e4
    A = spd_batch(d, 12, lam, kappa, dtype)
    benchmark.group = f"inverse batch 12 d={d} κ=1e4 {DN[dtype]}"
    if method.startswith("schulz:"):
        b = method.split(":")[1]
        X, info = benchmark(lambda: ops.schulz_inverse(A, lower_bound=lam, backend=b, return_info=True, check=False))
        benchmark.extra_info["iterations_max"] = int(info.iterations.max())
    elif method == "paper":
        X = benchmark(lambda: paper_schulz(A))
    elif method == "inv":
        X = benchmark(lambda: inv_per_matrix(A))
    elif method == "default":
        G = A - lam * torch.eye(d, dtype=dtype)
        X, info = benchmark(lambda: solvers.spd_inverse(G, lam))
        benchmark.extra_info["solver"] = info.solver
    else:
        X = benchmark(lambda: cholesky_inverse(A))
    benchmark.extra_info["rel_err_vs_fp64"] = rel_err_safe(X, inverse_f64(A))


@pytest.mark.parametrize("impl", [f"{b}" for b in cpu_backends()] + ["two_mm"])
def test_schulz_iteration(benchmark, impl):
    d, k = 256, 8
    A = spd_batch(d, 1, 1e-3, 1e6, torch.float32, seed=7)
    benchmark.group = f"one Schulz iteration d={d} fp32 (schulz rows: k={k} iterations)"
    if impl == "two_mm":
        X, R, A2 = torch.randn(d, d), torch.randn(d, d), A[0]
        benchmark(lambda: (torch.mm(A2, X), torch.mm(X, R)))
    else:
        benchmark(lambda: ops.schulz_inverse(A, max_iter=k, backend=impl, check=False))
