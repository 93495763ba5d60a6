"""Gradient projection (issue #28): ops.project / ops.project_quantize on every CPU backend vs plain
torch.matmul by the same dense Gaussian matrix, and vs torch.matmul followed by a separate per-example
amax / power-of-two scale / cast in torch — the same work in unfused torch, measured in the same run.

    python -m bench.bench_project            # LLM-like sizes: B = 64, r = 8, d ∈ {576, 2048, 4096}, k ∈ {128, 512}
    python -m bench.bench_project --quick    # tiny sizes: checks that the script runs
    python -m bench.bench_project --threads 1   # one thread (steadier on a shared, loaded machine)

Prints Markdown tables.  Flops: 2·B·r·d·k per projection.  "rel. err" is max |ours − float64| over
max |float64| (for project_quantize, of the reconstruction values·scale).  A second table times the
layers an index keeps whole (k ≥ d): ops.quantize against project_quantize with the d×d identity, which
the index used for them before.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from hyperinf_ext import ops

from .inputs import cpu_backends
from .timing import Section, Table, TimerConfig, fmt_ratio, fmt_sci, fmt_timing, measure_group, progress


@dataclass
class ProjectConfig:
    B: int = 64
    r: int = 8
    dims: tuple = (576, 2048, 4096)
    ks: tuple = (128, 512)
    grads_dtype: torch.dtype = torch.float32


FULL = ProjectConfig()
QUICK = ProjectConfig(B=8, r=4, dims=(64, 129), ks=(16,))
MATMUL = "torch.matmul (dense Gaussian)"
MATMUL_Q = "torch.matmul + amax/scale/cast (torch)"


def _matmul_quantize(g: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused baseline: the GEMM, then per-example amax, power-of-two scale and fp16 cast as torch ops."""
    y = torch.matmul(g, P)
    amax = y.abs().flatten(1).amax(1)
    _, e = torch.frexp(amax)
    s = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), (e - 14).clamp_min(-126)), torch.ones_like(amax))
    return (y / s[:, None, None]).half(), s


def project_case(B: int, r: int, d: int, k: int, dtype: torch.dtype, timer: TimerConfig) -> dict:
    progress(f"project B={B} r={r} d={d} k={k}")
    gen = torch.Generator().manual_seed(d * 1000 + k)
    g = torch.randn(B, r, d, generator=gen).to(dtype)
    P = torch.randn(d, k, generator=gen) / k ** 0.5
    g32 = g.float()
    cands = {MATMUL: lambda: torch.matmul(g32, P), MATMUL_Q: lambda: _matmul_quantize(g32, P)}
    for b in cpu_backends():
        cands[f"ours project [{b}]"] = (lambda b: lambda: ops.project(g, P, backend=b))(b)
        cands[f"ours project_quantize fp16 [{b}]"] = (lambda b: lambda: ops.project_quantize(g, P, backend=b))(b)
    t = measure_group(cands, timer, keep_result=True)
    ref = g.double() @ P.double()
    scale = float(ref.abs().max())
    err = {}
    for name, tm in t.items():
        if not tm.ok:
            continue
        res = tm.result
        out = res[0].double() * res[1].double()[:, None, None] if isinstance(res, tuple) else res.double()
        err[name] = float((out - ref).abs().max()) / scale
        tm.result = None
    return {"t": t, "err": err, "flops": 2.0 * B * r * d * k}


def unprojected_case(B: int, r: int, d: int, dtype: torch.dtype, timer: TimerConfig) -> dict:
    progress(f"unprojected B={B} r={r} d={d}")
    g = torch.randn(B, r, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    cands = {f"project_quantize(g, eye(d)) [{b}]": (lambda b: lambda: ops.project_quantize(
        g, torch.eye(d), backend=b))(b) for b in cpu_backends()}
    cands["ours quantize [torch]"] = lambda: ops.quantize(g)
    t = measure_group(cands, timer, keep_result=True)
    ref = g.double()
    err = {}
    for name, tm in t.items():
        if tm.ok:
            v, s = tm.result
            err[name] = float((v.double() * s.double()[:, None, None] - ref).abs().max()) / float(ref.abs().max())
            tm.result = None
    return {"t": t, "err": err}


def section(quick: bool, timer: TimerConfig) -> Section:
    cfg = QUICK if quick else FULL
    sec = Section("Gradient projection")
    dn = str(cfg.grads_dtype).removeprefix("torch.")
    tab = Table(f"Projection grads [B={cfg.B}, r={cfg.r}, d] {dn} · proj [d, k] fp32 (dense Gaussian), CPU",
                ["d", "k", "implementation", "time (median)", "time / torch.matmul", "GFLOP/s", "rel. err vs fp64"])
    for d in cfg.dims:
        for k in cfg.ks:
            res = project_case(cfg.B, cfg.r, d, k, cfg.grads_dtype, timer)
            t = res["t"]
            base = t[MATMUL].median if t[MATMUL].ok else float("nan")
            for name, tm in t.items():
                rate = res["flops"] / tm.median / 1e9 if tm.ok else float("nan")
                tab.rows.append([d, k, name, fmt_timing(tm), fmt_ratio(tm.median / base), f"{rate:.1f}",
                                 fmt_sci(res["err"].get(name, float("nan")))])
    tab.notes.append("'time / torch.matmul' < 1 means faster than the plain GEMM; every ratio is within one run "
                     f"(threads: {torch.get_num_threads()}).")
    tab.notes.append("project_quantize rows include the per-example max, the power-of-two scale and the fp16 cast; "
                     "the 'torch.matmul + amax/scale/cast' row does the same work as separate torch ops.")
    sec.tables.append(tab)
    unp = Table(f"Layers kept whole (k ≥ d): grads [B={cfg.B}, r={cfg.r}, d] {dn} stored as fp16 values × scale, CPU",
                ["d", "implementation", "time (median)", "time / quantize", "rel. err vs fp64"])
    for d in cfg.dims:
        res = unprojected_case(cfg.B, cfg.r, d, cfg.grads_dtype, timer)
        t = res["t"]
        base = t["ours quantize [torch]"].median if t["ours quantize [torch]"].ok else float("nan")
        for name, tm in t.items():
            unp.rows.append([d, name, fmt_timing(tm), fmt_ratio(tm.median / base),
                             fmt_sci(res["err"].get(name, float("nan")))])
    unp.notes.append("The identity rows are what an index did per batch for such a layer before ops.quantize: a d×d "
                     "matrix and a GEMM whose result equals the input; the stored values are equal either way.")
    sec.tables.append(unp)
    return sec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_project", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks the script runs)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) first (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = TimerConfig(warmup=1, repeats=2, min_repeats=1, budget_s=0.2) if args.quick else TimerConfig(
        warmup=1, repeats=5, min_repeats=3, budget_s=1.5)
    sec = section(args.quick, timer)
    for tab in sec.tables:
        print(tab.markdown())


if __name__ == "__main__":
    main()
