"""LLM-sized LoRA layers, synthetic (no model): d = 4096, r = 16, a few hundred samples, where the GFIM
and the inverse dominate.  Measured on as many layers as this machine handles in reasonable time and
extrapolated per layer (to 64 layers on this CPU; to a GPU from the measured flop counts and an
assumed peak rate, with the code-generation facts of the AOT-compiled Triton kernels).

pytest-benchmark: ``python -m pytest bench/bench_llm_layers.py --benchmark-only`` (d = 1024).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from hyperinf_ext import ops, solvers

from .baselines import cholesky_inverse, gfim_batched_, inverse_f64, rel_err, status_summary
from .inputs import cpu_backends, default_damping, make_grads
from .timing import Section, Table, TimerConfig, fmt_ratio, fmt_sci, fmt_time, fmt_timing, measure_group, progress

DN = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}

# Assumed GPU peak rates (dense, TFLOP/s, vendor spec sheets) for the GPU extrapolation.  They are
# assumptions, not measurements: real kernels reach a fraction of them, so the times are lower bounds.
GPU_PEAKS = {
    "A100 (SXM)": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp64": 19.5},
    "H100 (SXM)": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp64": 67.0},
}


@dataclass
class LlmConfig:
    d: int = 4096
    r: int = 16
    n: int = 256
    L_target: int = 64
    L_gfim: int = 2  # layers in the timed GFIM call
    gfim_dtypes: tuple = (torch.float32, torch.bfloat16)
    decay: float = 0.5  # gradient column j scaled by (j+1)^-decay: GFIM spectrum ~ (j+1)^-1
    ptx_archs: tuple = (80, 90)


FULL = LlmConfig()
QUICK = LlmConfig(d=256, r=4, n=32, L_target=64, L_gfim=2, ptx_archs=(80,))


def ptx_facts(archs) -> Table:
    """Code-generation facts of the AOT-compiled Triton kernels (no GPU needed)."""
    tab = Table("Triton kernels compiled ahead of time (PTX facts; the kernels are not timed here: no GPU)",
                ["arch", "kernel", "tensor-core instructions (count)", "cp.async", "shared mem", "warps / stages"])
    try:
        from hyperinf_ext.kernels import aot
    except Exception as exc:  # noqa: BLE001
        tab.notes.append(f"not available: {type(exc).__name__}: {exc}")
        return tab
    for arch in archs:
        try:
            kernels = aot.compile_all(arch)
        except Exception as exc:  # noqa: BLE001
            tab.notes.append(f"sm_{arch}: compilation failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        for name, k in kernels.items():
            ptx = k.asm.get("ptx", "")
            kinds: dict[str, int] = {}
            for m in re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)", ptx):
                kinds[m] = kinds.get(m, 0) + 1
            md = k.metadata
            tc = ", ".join(f"{kname} ({c})" for kname, c in sorted(kinds.items())) or "none (FMA path)"
            tab.rows.append([f"sm_{arch}", name, tc, len(re.findall(r"cp\.async", ptx)),
                             f"{getattr(md, 'shared', '?')} B", f"{getattr(md, 'num_warps', '?')} / {getattr(md, 'num_stages', '?')}"])
    return tab


def section(quick: bool, timer: TimerConfig) -> Section:
    cfg = QUICK if quick else FULL
    sec = Section("LLM-sized layers (synthetic)")
    bks = cpu_backends()
    ours = f"ours [{bks[0]}]"
    d, r, n, Lg = cfg.d, cfg.r, cfg.n, cfg.L_gfim
    flops_gfim = n * r * d * (d + 1)  # per layer, symmetric count
    tab = Table(f"GFIM, d = {d}, r = {r}, n = {n} samples, {Lg} layers in one call (per-layer times)",
                ["grads", "implementation", f"time per layer", "GFLOP/s (sym.)", "batched GEMM / this"])
    per_layer: dict[str, float] = {}
    G = None
    for dtype in cfg.gfim_dtypes:
        progress(f"llm gfim d={d} r={r} n={n} {DN[dtype]}")
        grads = make_grads(Lg, n, r, d, dtype, seed=11, decay=cfg.decay)
        accs, cands = {}, {}
        for b in bks:
            accs[b] = torch.zeros(Lg, d, d)
            cands[f"ours [{b}]"] = (lambda acc, b: (lambda: ops.gfim_accumulate_(acc, grads, backend=b)))(accs[b], b)
        acc_e = torch.zeros(Lg, d, d)
        cands["torch baddbmm"] = lambda: gfim_batched_(acc_e, grads)
        if dtype == torch.float32:  # one untimed run of ours gives G (the GFIM section warmed every implementation)
            cands[ours]()
            G = accs[bks[0]][0].clone() / n
        t = measure_group(cands, timer, warmup=0)
        base = t["torch baddbmm"]
        for tm in t.values():
            tm.scale = 1.0 / Lg  # per-layer times (set on all before any ratio is taken)
        for name, tm in t.items():
            tab.rows.append([DN[dtype], name, fmt_timing(tm), f"{flops_gfim / tm.median / 1e9:.1f}" if tm.ok else "—",
                             fmt_ratio(base.median / tm.median) if tm.ok and base.ok else "—"])
        if t[ours].ok:
            per_layer[f"gfim {DN[dtype]}"] = t[ours].median
        del grads, accs, acc_e
    sec.tables.append(tab)

    # inverse of one layer (float32): ours vs direct, with HyperINF's default damping rule
    progress(f"llm inverse d={d}")
    from hyperinf_ext.curvature.damping import layer_damping

    rule, scale = default_damping()
    lam = layer_damping(rule, G, r, scale)
    A = G.clone()
    A.diagonal().add_(lam)
    A = 0.5 * (A + A.T)
    ref = inverse_f64(A)
    Gs = 0.5 * (G + G.T)  # the default damps G itself: the same matrix A is, before damping
    default = "default: solvers.spd_inverse (solver=auto)"
    cands = {
        f"ours: scaled Schulz [{bks[0]}] (lower_bound = damping)":
            lambda: ops.schulz_inverse(A, lower_bound=lam, backend=bks[0], return_info=True, check=False),
        "Cholesky + cholesky_inverse": lambda: cholesky_inverse(A),
        "torch.linalg.inv": lambda: torch.linalg.inv(A),  # one matrix: unaffected by the batched-LU bug
        default: lambda: solvers.spd_inverse(Gs, lam),
    }
    # The Schulz inverse at this size is the slowest single call of the suite: one timed run, no warm-up
    # (the GFIM calls above warmed the BLAS); the direct methods get the usual repeats.
    schulz_name = next(iter(cands))
    ti = measure_group({schulz_name: cands.pop(schulz_name)}, timer, warmup=0, repeats=1, min_repeats=1, keep_result=True)
    ti.update(measure_group(cands, timer, keep_result=True))
    kappa_bound = float(ops.spectral_upper_bound(A)) / lam
    itab = Table(f"Inverse of one layer's G + λI, d = {d}, fp32 (HyperINF default damping {rule} ×{scale:g}: λ = {lam:.2e}, "
                 f"κ ≤ {kappa_bound:.1e})",
                 ["method", "time", "iterations / status", "rel. error vs fp64 solve", "GFLOP/s"])
    iters = None
    default_solver = None
    for name, tm in ti.items():
        if not tm.ok:
            itab.rows.append([name, fmt_timing(tm), "—", "—", "—"])
            continue
        if name.startswith("ours"):
            X, info = tm.result
            iters = int(info.iterations.max())
            st = f"{iters} it., {status_summary(info.status)}"
            fl = (2 * iters + 1) * 2 * d ** 3
            per_layer["inverse (Schulz)"] = tm.median
        elif name == default:
            X, sinfo = tm.result
            default_solver = sinfo.solver
            st = f"auto → {sinfo.solver}, residual {float(sinfo.residual.max()):.1e}"
            it_d = int(sinfo.iterations.max()) if sinfo.solver == "schulz" else None
            fl = (2 * it_d + 1) * 2 * d ** 3 if it_d else d ** 3
            per_layer["inverse (default)"] = tm.median
        else:
            X, st = tm.result, "direct"
            fl = d ** 3 if name.startswith("Chol") else 2 * d ** 3
            if name.startswith("Chol"):
                per_layer["inverse (Cholesky)"] = tm.median
        itab.rows.append([name, fmt_timing(tm), st, fmt_sci(rel_err(X, ref)), f"{fl / tm.median / 1e9:.1f}"])
        tm.result = None
    itab.notes.append("Schulz flops = (2·iterations + 1) GEMMs of 2d³; Cholesky + cholesky_inverse counted as d³/3 + 2d³/3; inv (LU + inverse) as 2d³; "
                      "the default as the solver it picked (its damping, verification and symmetrisation included in its time).")
    fastest = {n: t.median for n, t in ti.items() if t.ok and n != default}
    if default in per_layer and fastest:
        best = min(fastest, key=fastest.get)
        itab.notes.append(f"default / fastest ({best}): {fmt_ratio(per_layer['inverse (default)'] / fastest[best])} "
                          "(target ≤ 1.15×, as for the inverse section).")
    sec.tables.append(itab)

    # extrapolation
    dname = f"inverse (default: {default_solver})" if default_solver else "inverse (default)"
    etab = Table(f"Extrapolation to {cfg.L_target} layers of d = {d}, r = {r}, n = {n}",
                 ["where", "GFIM (fp32 grads)", "GFIM (bf16 grads)", "inverse (Schulz)", dname,
                  f"total, {cfg.L_target} layers (bf16 GFIM + default inverse)"])
    g32, g16, inv = per_layer.get("gfim fp32"), per_layer.get("gfim bf16"), per_layer.get("inverse (Schulz)")
    inv_d = per_layer.get("inverse (default)")
    L = cfg.L_target
    if g32 and inv:
        g16_ = g16 if g16 else g32
        etab.rows.append([f"this CPU (measured per layer × {L})", fmt_time(g32 * L), fmt_time(g16_ * L), fmt_time(inv * L),
                          fmt_time(inv_d * L) if inv_d else "—", fmt_time((g16_ + inv_d) * L) if inv_d else "—"])
        if inv_d:
            etab.notes.append(f"with Schulz instead of the default on this CPU: {fmt_time((g16_ + inv) * L)} for {L} layers "
                              f"(the default spends {fmt_ratio(inv_d / inv)} the inverse time of Schulz).")
        if "inverse (Cholesky)" in per_layer:
            etab.notes.append(f"bare Cholesky + cholesky_inverse (no damping, verification or symmetrisation): "
                              f"{fmt_time((g16_ + per_layer['inverse (Cholesky)']) * L)} for {L} layers.")
    if iters is not None:
        fl_g = flops_gfim * L
        fl_s = (2 * iters + 1) * 2 * d ** 3 * L
        for gpu, peak in GPU_PEAKS.items():
            t_g32 = fl_g / (peak["fp32"] * 1e12)
            t_g16 = fl_g / (peak["bf16"] * 1e12)
            t_s32 = fl_s / (peak["fp32"] * 1e12)
            t_s3 = fl_s / (peak["tf32"] / 3 * 1e12)
            etab.rows.append([f"{gpu} at assumed peak (lower bound)", f"≥ {fmt_time(t_g32)} (fp32 FMA)", f"≥ {fmt_time(t_g16)} (bf16 mma)",
                              f"≥ {fmt_time(t_s32)} (fp32 FMA) / ≥ {fmt_time(t_s3)} (tf32x3)",
                              f"Schulz (auto on CUDA): as left", f"≥ {fmt_time(t_g16 + t_s3)}"])
        etab.notes.append(f"GPU rows: measured flop counts ({fl_g / 1e12:.2f} TFLOP of GFIM, {fl_s / 1e12:.2f} TFLOP of Schulz at the "
                          f"measured {iters} iterations) divided by ASSUMED spec-sheet peaks {GPU_PEAKS} (TFLOP/s); "
                          "tf32x3 = three TF32 tensor-core products per fp32 product.  The PTX table below says which "
                          "kernel variant uses tensor cores.  On CUDA solver=\"auto\" runs Schulz (no measured GPU cost "
                          "constants), so there the default inverse is the Schulz column.")
        etab.notes.append(f"GFIM time grows linearly with n (here {n}); the inverse does not depend on n.")
    sec.tables.append(etab)
    progress("AOT-compiling the Triton kernels (PTX facts)")
    sec.tables.append(ptx_facts(cfg.ptx_archs))
    return sec


# --------------------------------------------------------------------------------------------------
# pytest-benchmark

BD, BR, BN = 1024, 16, 64


@pytest.mark.parametrize("impl", [f"ours:{b}" for b in cpu_backends()] + ["baddbmm"])
def test_llm_gfim_layer(benchmark, impl):
    grads = make_grads(1, BN, BR, BD, torch.bfloat16, decay=0.5)
    acc = torch.zeros(1, BD, BD)
    benchmark.group = f"llm layer gfim d={BD} r={BR} n={BN} bf16"
    if impl == "baddbmm":
        benchmark(lambda: gfim_batched_(acc, grads))
    else:
        benchmark(lambda: ops.gfim_accumulate_(acc, grads, backend=impl[5:]))


@pytest.mark.parametrize("method", ["schulz", "cholesky"])
def test_llm_inverse_layer(benchmark, method):
    grads = make_grads(1, BN, BR, BD, torch.float32, decay=0.5)
    G = ops.gfim(grads)[0]
    lam = ops.datainf_damping(G, BR)
    A = G.clone()
    A.diagonal().add_(lam)
    benchmark.group = f"llm layer inverse d={BD} fp32"
    if method == "schulz":
        benchmark.pedantic(lambda: ops.schulz_inverse(A, lower_bound=lam, check=False), rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: cholesky_inverse(A), rounds=3, warmup_rounds=1)
