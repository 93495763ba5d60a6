"""Probe: GFIM accumulation of bf16 grads into fp32 (AVX512-BF16 kernel) against bf16/fp32 GEMMs.

Times, interleaved in one process (the box is shared, so each row takes the min over repeats):
  ours     torch.ops.hyperinf.gfim_accumulate_ on bf16 grads, fp32 acc (the vdpbf16ps kernel)
  old      the same with HYPERINF_GFIM_BF16_KERNEL=0 (bf16→fp32 chunks + fp32 GEMMs)
  mm bf16  torch.mm(g[l].T, g[l]) per layer on bf16 (oneDNN), bf16 output
  mm fp32  the same on fp32 copies
GFLOP/s count a GEMM as 2·m·d² and the SYRK (ours/old) as its symmetric half m·d·(d+1); issue #5
asks ours ≥ 70 % of the bf16 GEMM rate.

    python bench/probe_gfim_bf16.py [--repeats 7] [--m 8000]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import hyperinf_ext.backends.cpp  # noqa: F401  (registers torch.ops.hyperinf.*)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--m", type=int, default=8000)
    ap.add_argument("--shapes", default="768x12,2048x12", help="comma-separated dxL")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"bf16 kernel available: {torch.ops.hyperinf.gfim_bf16_kernel_available()}")
    m = args.m
    for shape in args.shapes.split(","):
        d, L = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        g = torch.randn(L, m, d, dtype=torch.bfloat16)
        gf = g.float()
        acc = torch.zeros(L, d, d)

        def ours():
            os.environ.pop("HYPERINF_GFIM_BF16_KERNEL", None)
            torch.ops.hyperinf.gfim_accumulate_(acc, g)

        def old():
            os.environ["HYPERINF_GFIM_BF16_KERNEL"] = "0"
            try:
                torch.ops.hyperinf.gfim_accumulate_(acc, g)
            finally:
                os.environ.pop("HYPERINF_GFIM_BF16_KERNEL", None)

        def mm_bf16():
            for l in range(L):
                torch.mm(g[l].T, g[l])

        def mm_fp32():
            for l in range(L):
                torch.mm(gf[l].T, gf[l])

        fns = {"ours": ours, "old": old, "mm bf16": mm_bf16, "mm fp32": mm_fp32}
        for fn in fns.values():
            fn()  # warm-up (allocations, oneDNN primitive cache)
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(_time(fn))
        best = {k: min(v) for k, v in times.items()}
        # Per-repeat ratio ours/mm bf16 (same round, so the load is as similar as it gets).
        ratios = sorted(o / b for o, b in zip(times["ours"], times["mm bf16"]))
        flops = {"ours": m * d * (d + 1) * L, "old": m * d * (d + 1) * L,
                 "mm bf16": 2 * m * d * d * L, "mm fp32": 2 * m * d * d * L}
        rate = {k: flops[k] / best[k] / 1e9 for k in fns}
        print(f"d={d} m={m} L={L}: " + ", ".join(f"{k} {best[k]*1e3:.0f} ms {rate[k]:.0f} GF/s" for k in fns))
        print(f"    ours {rate['ours'] / rate['mm bf16'] * 100:.0f}% of the bf16 GEMM rate "
              f"(old {rate['old'] / rate['mm bf16'] * 100:.0f}%); time ours/mm bf16: min-based "
              f"{best['ours'] / best['mm bf16']:.2f}, per-round median {ratios[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
