"""Calibrate and check the cost model of ``solver="auto"`` (hyperinf_ext/solvers/cost.py).

    python -m bench.solver_costs [--quick] [--threads N]
    python -m bench.compare --only solver_costs      # the same, as a section of bench/RESULTS.md

1. Rates: GFLOP/s of each kernel the model counts (batched GEMM, one Schulz iteration per CPU backend,
   Cholesky factor, cholesky_inverse, cholesky_solve on CAL_ROWS rows, the same rows × a matrix, and
   8 rows × a matrix with the overhead of one CG step, at d = CAL_D, in float64 and float32.
   Printed as the CPU_RATES literal of cost.py (paste it there to recalibrate).
2. Check: on a grid of cases (explicit inverse for B layers; inverse-HVP with few and many rows),
   every solver is timed in the same run and the pick of the model *as calibrated in cost.py* is
   compared with the fastest (ratio auto/fastest; error of each against a float64 solve).
CPU only (on CUDA the constants are left to the GPU check; auto runs Schulz there).
"""
from __future__ import annotations

import argparse
import math

import torch

from hyperinf_ext import ops, solvers
from hyperinf_ext.solvers import cost

from .baselines import inverse_f64, rel_err, solve_rows_f64
from .inputs import cpu_backends, spd_batch
from .timing import (Section, Table, Target, TimerConfig, fmt_ratio, fmt_sci, fmt_time, load_average, machine_info, measure_group,
                     progress)

CAL_D, CAL_B, CAL_ROWS = 512, 2, 1024  # rows: where solving many right-hand sides matters
CG_MAX_ROWS = 64
DN = {torch.float32: "float32", torch.float64: "float64"}


def measure_rates(d: int, B: int, timer: TimerConfig) -> dict[torch.dtype, dict[str, float]]:
    """{dtype: {kernel: GFLOP/s, "cg_step_s": s}} at size d, batch B (flop counts as in cost.py).

    The kernels of a dtype are timed in interleaved groups (so the machine's load hits them alike
    and their ratios, which decide the picks, hold even when the absolute rates drift), and each
    rate is taken from its fastest repeat (other work only ever adds time).
    """
    out = {}
    g = 1e9
    for dtype in (torch.float64, torch.float32):
        A = spd_batch(d, B, 1e-2, 1e3, dtype)
        V = torch.randn(B, CAL_ROWS, d, dtype=dtype)
        v8 = V[:, :8].contiguous()
        L = torch.linalg.cholesky(A)
        steps = 30
        flops = {"gemm": 2.0 * B * d**3, "potrf": B * d**3 / 3.0, "potri": 2.0 * B * d**3 / 3.0,
                 "trsm": 2.0 * B * CAL_ROWS * d * d, "trsm_few": 2.0 * B * 8 * d * d,
                 "apply": 2.0 * B * CAL_ROWS * d * d, "rows": 2.0 * B * 8 * d * d}
        cands = {"gemm": lambda: torch.matmul(A, A), "potrf": lambda: torch.linalg.cholesky_ex(A),
                 "potri": lambda: torch.cholesky_inverse(L), "trsm": lambda: solvers.cholesky_solve_rows(L, V),
                 "trsm_few": lambda: solvers.cholesky_solve_rows(L, v8),
                 "apply": lambda: torch.matmul(V, A), "rows": lambda: torch.matmul(v8, A),
                 "cg": lambda: solvers.cg(A, v8, max_iter=steps)}
        for b in cpu_backends():
            _, info = ops.schulz_inverse(A, lower_bound=1e-2, backend=b, return_info=True, check=False)
            flops[f"schulz_{b}"] = 4.0 * B * d**3 * max(1, int(info.iterations.max()))
            cands[f"schulz_{b}"] = (lambda b: lambda: ops.schulz_inverse(A, lower_bound=1e-2, backend=b,
                                                                         check=False))(b)
        # few-row kernels in their own group: interleaved with d³ ones they find A evicted from cache,
        # which the solvers themselves (CG's loop, a solve after a factorisation) do not
        small = {k: cands.pop(k) for k in ("rows", "trsm_few", "cg")}
        t = {k: v.min for k, v in measure_group(cands, timer).items()}
        t.update({k: v.min for k, v in measure_group(small, timer).items()})
        r = {k: f / t[k] / g for k, f in flops.items()}
        r["cg_step_s"] = max(t["cg"] / steps - t["rows"], 1e-6)
        out[dtype] = {k: (round(v, 1) if k != "cg_step_s" else float(f"{v:.2g}")) for k, v in sorted(r.items())}
        progress(f"rates {DN[dtype]}: {out[dtype]}")
    return out


def _cases(quick: bool) -> list[tuple]:
    """(what, d, B, rows, dtype, λ, κ): inverses of B layers, and inverse-HVPs with few / many rows."""
    if quick:
        return [("inverse", 96, 4, None, torch.float64, 1e-2, 1e3), ("ihvp", 96, 2, 4, torch.float64, 1e-2, 1e3),
                ("ihvp", 96, 2, 4, torch.float64, 1.0, 3.0)]
    cases = []
    for dtype in (torch.float64, torch.float32):
        cases += [("inverse", 128, 8, None, dtype, 1e-2, 1e3), ("inverse", 512, 2, None, dtype, 1e-2, 1e3),
                  ("inverse", 1024, 1, None, dtype, 1e-2, 1e3)]
    cases += [("ihvp", 512, 2, 8, torch.float64, 1e-2, 1e3), ("ihvp", 512, 2, 2400, torch.float64, 1e-2, 1e3),
              ("ihvp", 512, 2, 8, torch.float64, 1.0, 3.0), ("ihvp", 1024, 1, 1, torch.float64, 1.0, 3.0),
              ("ihvp", 512, 2, 8, torch.float32, 1e-2, 1e3), ("ihvp", 64, 8, 20000, torch.float64, 1e-2, 1e3)]
    return cases


def check_picks(quick: bool, timer: TimerConfig, ratios: list | None = None) -> Table:
    tab = Table("solver=\"auto\" against every solver, same run",
                ["case", "d", "B", "rows", "dtype", "κ", "auto picks", "fastest", "schulz", "cholesky", "cg",
                 "auto / fastest", "auto error vs fp64"])
    for what, d, B, rows, dtype, lam, kappa in _cases(quick):
        G = spd_batch(d, B, lam, kappa, dtype)  # G's spectrum [λ, λκ]; damping λ → A in [2λ, λ(κ+1)]
        lamt = torch.full((B,), lam, dtype=torch.float64)
        if what == "inverse":
            A64 = G.double() + lam * torch.eye(d, dtype=torch.float64)
            ref = inverse_f64(A64)  # one matrix at a time: batched LU fails in torch 2.13 CPU after 2+ threads
            cands = {s: (lambda s: lambda: solvers.spd_inverse(G, lamt, solver=s))(s)
                     for s in ("schulz", "cholesky", "auto")}
        else:
            V = torch.randn(B, rows, d, dtype=torch.float64).to(dtype)
            A64 = G.double() + lam * torch.eye(d, dtype=torch.float64)
            ref = solve_rows_f64(A64, V)
            # CG only where it can compete (float64, few rows): with thousands of rows it runs for minutes
            cg_ok = dtype == torch.float64 and rows <= CG_MAX_ROWS
            names = ("schulz", "cholesky", "cg", "auto") if cg_ok else ("schulz", "cholesky", "auto")
            cands = {s: (lambda s: lambda: solvers.solve_rows(G, lamt, V, solver=s))(s) for s in names}
        progress(f"{what} d={d} B={B} rows={rows} {DN[dtype]}")
        t = measure_group(cands, timer, keep_result=True)
        picked = t["auto"].result[1].solver if t["auto"].ok else "error"
        times = {s: t[s].min for s in cands if s != "auto" and t[s].ok}
        fastest = min(times.values())
        err = rel_err(t["auto"].result[0], ref) if t["auto"].ok else math.nan
        if ratios is not None and t["auto"].ok:
            ratios.append((f"{what} d={d} B={B}" + (f" rows={rows}" if rows else "") + f" {DN[dtype]} κ={(kappa + 1) / 2:.3g}",
                           t["auto"].min / fastest, picked, min(times, key=times.get)))
        tab.rows.append([what, d, B, rows if rows else "—", DN[dtype], f"{(kappa + 1) / 2:.3g}",
                         picked, min(times, key=times.get)] + [
                            fmt_time(times.get(s, math.nan)) for s in ("schulz", "cholesky", "cg")]
                        + [fmt_ratio(t["auto"].min / fastest), fmt_sci(err)])
        progress(" | ".join(str(c) for c in tab.rows[-1]))
    tab.notes.append("times: fastest repeat of each solver (damping, solve, verification included), "
                     "interleaved in the same run; "
                     "κ of G + λI; 'auto / fastest' compares auto's own timed run with the fastest explicit solver.")
    return tab


def timer_for(quick: bool) -> TimerConfig:
    return TimerConfig(warmup=1, repeats=3 if quick else 7, min_repeats=2, budget_s=2.0 if quick else 4.0)


def rates_table(rates: dict, d: int, B: int) -> Table:
    keys = sorted({k for r in rates.values() for k in r})
    tab = Table(f"Measured rates (GFLOP/s; CG step overhead in s) at d = {d}, batch {B}, this run",
                ["dtype"] + keys + ["cost.py's CPU_RATES (what auto uses)"])
    for dtype, r in rates.items():
        used = cost.CPU_RATES.get(dtype, {})
        tab.rows.append([DN[dtype]] + [r.get(k, "—") for k in keys]
                        + [", ".join(f"{k} {used[k]:g}" for k in keys if k in used) or "—"])
    tab.notes.append("Each rate from the fastest of the interleaved repeats of its kernel (flop counts as in cost.py); "
                     "'rows', 'trsm_few' and CG in their own group.  These are this run's measurements; the picks below use "
                     "the constants in cost.py (calibrated by `python -m bench.solver_costs --threads 1`; paste the "
                     "printed CPU_RATES there to recalibrate).")
    return tab


def section(quick: bool, timer: TimerConfig) -> Section:
    """bench.compare's section: rates and the check of auto's picks, with this module's own timer (7 repeats,
    fastest kept), at the thread count compare set."""
    t = timer_for(quick)
    sec = Section("Solver cost model (`solver=\"auto\"`)")
    d, B = (96, 2) if quick else (CAL_D, CAL_B)
    rates = measure_rates(d, B, t)
    sec.tables.append(rates_table(rates, d, B))
    ratios: list = []
    tab = check_picks(quick, t, ratios)
    tab.notes.append(f"torch threads in this run: {torch.get_num_threads()}; cost.py's constants were calibrated with one thread.")
    sec.tables.append(tab)
    if ratios:
        wrong = [c for c, r, picked, best in ratios if picked != best]
        worst = max(ratios, key=lambda x: x[1])
        sec.targets.append(Target(
            "solver=\"auto\" within 1.15× of the fastest explicit solver (cost-model check grid, fastest repeats)",
            all(r <= 1.15 for _, r, _, _ in ratios),
            f"{sum(r <= 1.15 for _, r, _, _ in ratios)} of {len(ratios)} cases; worst {fmt_ratio(worst[1])} ({worst[0]}: auto "
            f"picked {worst[2]}, fastest {worst[3]}); the pick was the fastest solver in {len(ratios) - len(wrong)} of "
            f"{len(ratios)}" + (f" (not in: {'; '.join(wrong)})" if wrong else "")))
    return sec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke test")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 gives stable ratios on a busy shared machine")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = timer_for(args.quick)
    info = machine_info()
    print(f"machine: {info.get('CPU', '?')}; threads {torch.get_num_threads()}; torch {torch.__version__}; "
          f"load average {load_average()}")
    d, B = (96, 2) if args.quick else (CAL_D, CAL_B)
    rates = measure_rates(d, B, timer)
    print(f"\n# measured at d = {d}, batch {B}: paste into hyperinf_ext/solvers/cost.py to recalibrate")
    print("CPU_RATES = {")
    for dtype, r in rates.items():
        print(f"    torch.{DN[dtype]}: {r},")
    print("}\n")
    print(check_picks(args.quick, timer).markdown())


if __name__ == "__main__":
    main()
