"""Inverse-HVP v·(G + λI)⁻¹ with few right-hand sides (one mean validation gradient: r rows) and many
(one per validation example: n_val·r rows): ours (make_ihvp "schulz", every CPU backend) vs
make_ihvp "cholesky" vs batched conjugate gradients (bench.baselines.batched_cg) run to the same accuracy,
and the library's defaults (solver="auto"): the one-shot ``hyperinf_ext.inverse_hvp(G, v, damping=λ)`` (knows
the rows: Schulz, Cholesky or CG) and ``hyperinf_ext.make_ihvp(G, damping=λ)`` then apply (a factor to reuse:
Schulz or Cholesky), each against the fastest method of the same run (target: <= DEFAULT_TARGET×).

G: L synthetic GFIMs with a power-law spectrum e_i = (i+1)^-p; λ by the DataInf rule
(0.1·trace(G)/(r·d), the library's default).  Times include the factorisation; they are measured as
factorisation (make_ihvp) + application, each the median of its own repeats in the same run.

pytest-benchmark: ``python -m pytest bench/bench_ihvp.py --benchmark-only`` (modest sizes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import hyperinf_ext
from hyperinf_ext import ops

from .baselines import batched_cg, cg_iterations_for, rel_err, solve_rows_f64
from .bench_inverse import DEFAULT_TARGET, default_table, default_target
from .inputs import cpu_backends, default_damping, gfim_like
from .timing import Section, Table, TimerConfig, fmt_ratio, fmt_sci, fmt_time, fmt_timing, measure_group, progress

DN = {torch.float32: "fp32", torch.float64: "fp64"}
MAKE_DEFAULT = "default: make_ihvp (solver=auto)"
ONE_SHOT = "default: inverse_hvp (solver=auto, one call)"


@dataclass
class IhvpConfig:
    d: int = 768
    L: int = 2
    r: int = 8
    n_val: int = 300
    power: float = 1.0
    # (dtype, damping rule, scale): rule None = HyperINF's default rule (well conditioned); "datainf" =
    # DataInf's 0.1·trace/(r·d) (κ ≈ 1e4 here: the ill-conditioned case where iterative solvers suffer)
    cases: tuple = ((torch.float64, None, None), (torch.float32, None, None),
                    (torch.float64, "datainf", 0.1), (torch.float32, "datainf", 0.1))
    cg_max_iter: int = 3000
    cg_calib_rows: int = 64  # many-RHS CG: iteration count calibrated on this many rows
    cg_time_budget_s: float = 6.0  # above this (estimated), time fewer CG iterations and extrapolate


FULL = IhvpConfig()
QUICK = IhvpConfig(d=96, L=2, r=4, n_val=16, cg_max_iter=600, cg_calib_rows=32, cg_time_budget_s=2.0,
                   cases=((torch.float64, None, None), (torch.float32, "datainf", 0.1)))


def case_damping(G: torch.Tensor, r: int, rule, scale) -> tuple[torch.Tensor, str]:
    """Per-layer λ [L] (float64) by ``rule`` (None: HyperINF's default rule) and its description."""
    from hyperinf_ext.curvature.damping import layer_damping

    if rule is None:
        rule, scale = default_damping()
        desc = f"HyperINF default damping ({rule} ×{scale:g})"
    else:
        desc = f"{rule} damping (×{scale:g})"
    lam = torch.tensor([layer_damping(rule, g, r, scale) for g in G], dtype=torch.float64)
    return lam, desc


def ihvp_case(cfg: IhvpConfig, dtype: torch.dtype, rule, scale, timer: TimerConfig) -> dict:
    progress(f"ihvp L={cfg.L} d={cfg.d} {DN[dtype]} damping {rule or 'default'}")
    G = gfim_like(cfg.L, cfg.d, cfg.power, dtype, seed=3)
    lam, desc = case_damping(G, cfg.r, rule, scale)
    A = G.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(lam.to(dtype).unsqueeze(-1))
    gen = torch.Generator().manual_seed(4)
    V = {"few": torch.randn(cfg.L, cfg.r, cfg.d, generator=gen, dtype=torch.float64).to(dtype),
         "many": torch.randn(cfg.L, cfg.n_val * cfg.r, cfg.d, generator=gen, dtype=torch.float64).to(dtype)}
    ref = {k: solve_rows_f64(A, v) for k, v in V.items()}
    kappa = float(((1.0 + lam) / lam).max())  # λmax(G) = 1 (and λmin(G) ≈ 0)

    methods = {f"ours: make_ihvp schulz [{b}]": dict(method="schulz", backend=b) for b in cpu_backends()}
    methods["make_ihvp cholesky"] = dict(method="cholesky")
    methods[MAKE_DEFAULT] = dict()
    factor_c = {name: (lambda kw: (lambda: hyperinf_ext.make_ihvp(G, damping=lam, **kw)))(kw) for name, kw in methods.items()}
    tf = measure_group(factor_c, timer, keep_result=True)
    out = {"kappa": kappa, "lam": lam, "damping": desc, "rows": {"few": V["few"].shape[1], "many": V["many"].shape[1]}, "res": {}}
    applies = {name: t.result for name, t in tf.items() if t.ok}
    for kind, v in V.items():
        cands = {name: (lambda f: (lambda: f(v)))(f) for name, f in applies.items()}
        # the one-shot default, interleaved with the applies (it factors and solves in one timed call)
        cands[ONE_SHOT] = lambda: hyperinf_ext.inverse_hvp(G, v, damping=lam, return_info=True)
        ta = measure_group(cands, timer, keep_result=True)
        for name in methods:
            tfac = tf[name]
            tap = ta.get(name)
            err = rel_err(tap.result, ref[kind]) if (tap is not None and tap.ok) else float("nan")
            if tap is not None:
                tap.result = None
            entry = {"factor": tfac, "apply": tap, "error": err,
                     "total": (tfac.median + tap.median) if (tfac.ok and tap is not None and tap.ok) else float("nan")}
            if name == MAKE_DEFAULT and tfac.ok and tfac.result is not None:
                entry["solver"] = tfac.result.info.solver
            out["res"][(kind, name)] = entry
        t1 = ta[ONE_SHOT]
        y, info = t1.result if t1.ok else (None, None)
        t1.result = None
        out["res"][(kind, ONE_SHOT)] = {"factor": None, "apply": None, "timing": t1, "total": t1.median if t1.ok else float("nan"),
                                        "error": rel_err(y, ref[kind]) if y is not None else float("nan"),
                                        "solver": info.solver if info is not None else (t1.error or "—")}
    for t in tf.values():
        t.result = None
    # CG to the same accuracy as ours (default backend; the Cholesky error if ours failed)
    ours = f"ours: make_ihvp schulz [{cpu_backends()[0]}]"
    for kind, v in V.items():
        # ours' accuracy, but never below twice the (backward-stable) Cholesky error: that is the
        # dtype's floor for this matrix, which CG cannot be asked to beat
        floor = 2 * out["res"][(kind, "make_ihvp cholesky")]["error"]
        target = out["res"][(kind, ours)]["error"]
        target = max(target, floor) if math.isfinite(target) else floor
        rows = v if kind == "few" else v[:, : cfg.cg_calib_rows]
        rref = ref[kind] if kind == "few" else ref[kind][:, : cfg.cg_calib_rows]
        k, best = cg_iterations_for(A, rows, rref, target, cfg.cg_max_iter)
        entry = {"target": target, "iterations": k, "best": best, "extrapolated": None}
        if k is None:
            entry["total"] = float("nan")
            out["res"][(kind, "conjugate gradients")] = entry
            continue

        def cg_run(iters):
            def run():
                A_ = G.clone()
                A_.diagonal(dim1=-2, dim2=-1).add_(lam.to(dtype).unsqueeze(-1))
                return batched_cg(A_, v, iters)
            return run

        probe = measure_group({"cg probe": cg_run(min(k, 10))}, timer, warmup=1, repeats=1, min_repeats=1)["cg probe"]
        est = probe.median / min(k, 10) * k
        if est > cfg.cg_time_budget_s:
            k_time = max(10, int(k * cfg.cg_time_budget_s / est))
            t = measure_group({"cg": cg_run(k_time)}, timer, warmup=0, keep_result=False)["cg"]
            t.scale = k / k_time
            entry.update(timing=t, total=t.median, error=best, extrapolated=(k_time, k))
        else:
            t = measure_group({"cg": cg_run(k)}, timer, warmup=0, keep_result=True)["cg"]
            err = rel_err(t.result, ref[kind]) if t.ok else float("nan")
            t.result = None
            entry.update(timing=t, total=t.median, error=err)
        out["res"][(kind, "conjugate gradients")] = entry
    return out


def _default_entry(res: dict, kind: str, name: str) -> dict | None:
    """The default ``name`` against the fastest non-default method of the same case and RHS count."""
    e = res["res"].get((kind, name))
    if e is None:
        return None
    others = {n: x for (k, n), x in res["res"].items()
              if k == kind and n not in (ONE_SHOT, MAKE_DEFAULT) and math.isfinite(x.get("total", math.nan))}
    if not others:
        return None
    best = min(others, key=lambda n: others[n]["total"])
    label = best if best != "conjugate gradients" else f"conjugate gradients ({others[best]['iterations']} it.)"
    if not math.isfinite(e["total"]):  # the default raised (its message is in "solver" for the one-shot call)
        msg = str(e.get("solver") or (e["factor"].error if e.get("factor") is not None else None) or "no result")
        return {"picked": "raised " + msg.split(" for matrix")[0], "time": math.nan, "error": math.nan, "fastest": label,
                "fastest_time": others[best]["total"], "fastest_error": others[best].get("error", math.nan),
                "ratio": math.inf, "raised": True}
    return {"picked": e.get("solver", "?"), "time": e["total"], "error": e["error"], "fastest": label,
            "fastest_time": others[best]["total"], "fastest_error": others[best].get("error", math.nan),
            "ratio": e["total"] / others[best]["total"]}


def section(quick: bool, timer: TimerConfig) -> Section:
    cfg = QUICK if quick else FULL
    sec = Section("Inverse-HVP (few vs many right-hand sides)")
    ours = f"ours: make_ihvp schulz [{cpu_backends()[0]}]"
    one_shot: list[tuple[str, dict]] = []
    factored: list[tuple[str, dict]] = []
    for dtype, rule, scale in cfg.cases:
        res = ihvp_case(cfg, dtype, rule, scale, timer)
        tab = Table(
            f"Inverse-HVP, L = {cfg.L} layers, d = {cfg.d}, {DN[dtype]}, spectrum (i+1)^-{cfg.power:g}, {res['damping']} "
            f"(κ ≈ {res['kappa']:.1e})",
            ["RHS rows / layer", "method", "total (factor + apply)", "factorisation", "apply", "total / ours",
             "rel. error vs fp64 solve"],
        )
        for kind in ("few", "many"):
            base = res["res"][(kind, ours)]["total"]
            for name in [k[1] for k in res["res"] if k[0] == kind]:
                e = res["res"][(kind, name)]
                if name == "conjugate gradients":
                    if e["iterations"] is None:
                        tab.rows.append([res["rows"][kind], "conjugate gradients", f"did not reach {fmt_sci(e['target'])} in "
                                         f"{cfg.cg_max_iter} it. (best {fmt_sci(e['best'])})", "—", "—", "—", "—"])
                        continue
                    label = f"conjugate gradients ({e['iterations']} it.)"
                    if e["extrapolated"]:
                        label += f" [timed {e['extrapolated'][0]} it., ×{e['extrapolated'][1] / e['extrapolated'][0]:.3g}; error on {cfg.cg_calib_rows} rows]"
                    tab.rows.append([res["rows"][kind], label, fmt_timing(e["timing"]), "—", "—",
                                     fmt_ratio(e["total"] / base), fmt_sci(e["error"])])
                    continue
                if name == ONE_SHOT:
                    tab.rows.append([res["rows"][kind], f"{name} → {e['solver']}", fmt_timing(e["timing"]), "(one call)", "—",
                                     fmt_ratio(e["total"] / base), fmt_sci(e["error"])])
                    continue
                label = f"{name} → {e['solver']}" if name == MAKE_DEFAULT and "solver" in e else name
                tab.rows.append([res["rows"][kind], label, fmt_time(e["total"]), fmt_timing(e["factor"]),
                                 fmt_timing(e["apply"]) if e["apply"] is not None else "—",
                                 fmt_ratio(e["total"] / base), fmt_sci(e["error"])])
        tab.notes.append("CG runs a fixed iteration count: the fewest reaching ours' error, or twice the Cholesky error "
                         "if larger (the dtype's floor), checked against the float64 solve in an untimed calibration run; "
                         "its time includes forming G + λI.")
        tab.notes.append(f"'→ solver': the solver the default (solver=\"auto\") picked.  '{ONE_SHOT}' is timed as one "
                         "call (damping, pick, solve, verification), interleaved with the applies; the fp64 reference is "
                         "a float64 LU solve, one layer at a time.")
        sec.tables.append(tab)
        case = f"{DN[dtype]}, κ≈{res['kappa']:.0e}"
        for kind in ("few", "many"):
            e1 = _default_entry(res, kind, ONE_SHOT)
            if e1 is not None:
                one_shot.append((f"{case}, {res['rows'][kind]} rows", e1))
            e2 = _default_entry(res, kind, MAKE_DEFAULT)
            if e2 is not None:
                factored.append((f"{case}, {res['rows'][kind]} rows", e2))
        # advice, computed
        for kind in ("few", "many"):
            totals = {name: e["total"] for (k, name), e in res["res"].items()
                      if k == kind and name not in (ONE_SHOT, MAKE_DEFAULT) and math.isfinite(e.get("total", math.nan))}
            if not totals:
                continue
            best = min(totals, key=totals.get)
            others = "; ".join(f"{n} {fmt_ratio(t / totals[best])}" for n, t in totals.items() if n != best)
            dflt = ""
            for name, short in ((ONE_SHOT, "inverse_hvp"), (MAKE_DEFAULT, "make_ihvp")):
                e = _default_entry(res, kind, name)
                if e is not None:
                    dflt += (f"; default {short} {e['picked']}" if e.get("raised")
                             else f"; default {short} (auto → {e['picked']}) {fmt_ratio(e['ratio'])}")
            sec.advice.append(f"inverse-HVP {DN[dtype]}, {res['rows'][kind]} RHS rows per layer (d={cfg.d}, κ≈{res['kappa']:.0e}, "
                              f"{res['damping']}): fastest is **{best}** ({fmt_time(totals[best])} incl. factorisation); "
                              f"time of the others relative to it — {others}{dflt}.")
        ch, sc = res["res"][("many", "make_ihvp cholesky")], res["res"][("many", ours)]
        if ch["apply"] is not None and sc["apply"] is not None and ch["apply"].ok and sc["apply"].ok:
            rows = res["rows"]["many"]
            a_c, a_s = ch["apply"].median / rows, sc["apply"].median / rows
            f_c, f_s = ch["factor"].median, sc["factor"].median
            if a_c > a_s and f_s > f_c:
                cross = (f_s - f_c) / (a_c - a_s)
                sec.advice.append(f"{DN[dtype]}: the Schulz inverse costs {fmt_ratio(f_s / f_c)} the Cholesky factorisation but "
                                  f"applies {fmt_ratio(a_c / a_s)} faster per row, so it pays off above ≈ {cross:.0f} RHS rows per "
                                  f"layer (d={cfg.d}, κ≈{res['kappa']:.0e}).")
            elif f_s <= f_c and a_s <= a_c:
                sec.advice.append(f"{DN[dtype]}: Schulz is at least as fast as Cholesky both to factor and to apply (d={cfg.d}, κ≈{res['kappa']:.0e}).")
            else:
                sec.advice.append(f"{DN[dtype]}: Cholesky is faster both to factor ({fmt_ratio(f_s / f_c)}) and to apply "
                                  f"({fmt_ratio(a_s / a_c)} per row): on this CPU it wins at any number of RHS rows (d={cfg.d}, κ≈{res['kappa']:.0e}).")
    t1 = default_table(f"Default one-shot inverse-HVP (hyperinf_ext.inverse_hvp, solver=\"auto\") against the fastest method of "
                       f"the same run (L = {cfg.L}, d = {cfg.d})", one_shot, DEFAULT_TARGET)
    t1.notes.append("'fastest other method': the fastest of ours (Schulz, each backend), make_ihvp cholesky and CG "
                    "(run to ours' accuracy) on the same case, totals including the factorisation; target: default / "
                    f"fastest ≤ {DEFAULT_TARGET}×.  The default also damps, picks and verifies its answer.")
    sec.tables.append(t1)
    t2 = default_table(f"Default factorisation (hyperinf_ext.make_ihvp, solver=\"auto\", then apply) against the same fastest "
                       "method", factored, DEFAULT_TARGET)
    t2.notes.append("make_ihvp does not know the rows it will be applied to and keeps a factor to reuse, so CG (no "
                    "factor) is never its pick: where CG is the fastest one-shot method this ratio is above 1 by design "
                    "(the one-shot default above is the call for a known v).  No target on this table.")
    sec.tables.append(t2)
    sec.targets.append(default_target("inverse-HVP (one-shot inverse_hvp)", one_shot, DEFAULT_TARGET))
    return sec


# --------------------------------------------------------------------------------------------------
# pytest-benchmark

BD, BL, BR = 256, 2, 8


@pytest.fixture(scope="module")
def ihvp_inputs():
    G = gfim_like(BL, BD, 1.0, torch.float64, seed=3)
    lam = ops.datainf_damping(G, BR)
    A = G.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(lam.unsqueeze(-1))
    gen = torch.Generator().manual_seed(4)
    V = {"few": torch.randn(BL, BR, BD, generator=gen, dtype=torch.float64),
         "many": torch.randn(BL, 64 * BR, BD, generator=gen, dtype=torch.float64)}
    return G, lam, A, V


@pytest.mark.parametrize("kind", ["few", "many"])
@pytest.mark.parametrize("method", [f"schulz:{b}" for b in cpu_backends()] + ["cholesky", "cg"])
def test_ihvp(benchmark, ihvp_inputs, method, kind):
    G, lam, A, V = ihvp_inputs
    v = V[kind]
    benchmark.group = f"ihvp L={BL} d={BD} fp64 {kind} RHS ({v.shape[1]} rows), incl. factorisation"
    ref = solve_rows_f64(A, v)
    if method == "cg":
        target = rel_err(hyperinf_ext.inverse_hvp(G, v, damping=lam, method="schulz"), ref)
        k, _ = cg_iterations_for(A, v, ref, target, 3000)
        assert k is not None
        y = benchmark(lambda: batched_cg(A, v, k))
        benchmark.extra_info["cg_iterations"] = k
    else:
        m, _, b = method.partition(":")
        y = benchmark(lambda: hyperinf_ext.inverse_hvp(G, v, damping=lam, method=m, backend=b or None))
    benchmark.extra_info["rel_err_vs_fp64"] = rel_err(y, ref)
