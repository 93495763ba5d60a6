"""CPU numerics of mixed-precision Schulz (issue #15 part 2): iterations, residual and error vs float64.

    OMP_NUM_THREADS=1 python -m bench.mixed_schulz [--d 256] [--seeds 2]

For κ = 1e2..1e6 and two spectra (log-spaced eigenvalues in [1/κ, 1]; a damped 'GFIM' gᵀg/m + λI with
λ = λmax/κ), runs ``mixed_schulz`` (bf16 and TF32 GEMMs, emulated on the CPU by rounding the GEMM
inputs) and all-float32 ``ops.schulz_inverse``, both with the lower bound known (as the damping is),
and prints one markdown row per case: low-precision steps + float32 steps (vs all-float32 steps), the
residual ‖I − A·X‖_F in float64, the relative 2-norm error against the float64 inverse, and which path
ran ("mixed", or "fp32" where the mixed run fell short and the all-float32 fallback ran; the mixed
attempt's own residual is shown beside it).
Timing is not measured here (the CPU emulation is slower than float32); bench/gpu.py times it.

Measured (this VM, torch 2.13 CPU, ``--d 256 --seeds 1``, log-spaced spectrum; steps = low + float32,
residual ‖I − A·X‖_F and error ‖X − A⁻¹‖₂/‖A⁻¹‖₂ in float64; "fb" = fell short, all-float32 fallback):

| κ | bf16 steps | TF32 steps | all-fp32 steps | residual mixed (bf16) / fp32 | error mixed (bf16) / fp32 | path |
|---|---|---|---|---|---|---|
| 1e2 | 2 + 7 | 4 + 5 | 9 | 2.87e-05 / 2.92e-05 | 2.08e-06 / 2.10e-06 | mixed |
| 1e3 | 2 + 8 | 4 + 6 | 10 | 1.95e-04 / 1.95e-04 | 1.41e-05 / 1.44e-05 | mixed |
| 1e4 | 2 + 9 | 4 + 7 | 11 | 1.47e-03 / 1.46e-03 | 1.04e-04 / 9.53e-05 | mixed |
| 1e5 | 2 + 11 | 4 + 8 | 12 (stagnates at 1.2e-02) | 1.7e-02 → fb 1.19e-02 / 1.20e-02 | 7.86e-04 / 7.90e-04 | fb |
| 1e6 | 2 + 12 | 4 + 10 | 14 (stagnates at 1.0e-01) | 1.4e-01 → fb 1.02e-01 / 1.00e-01 | 6.52e-03 / 6.16e-03 | fb |

The damped-GFIM spectrum gives the same picture (κ ≤ 1e4: mixed, same residuals; κ ≥ 1e5: float32
itself cannot reach 1e-2 at d = 256, neither can the mixed run, and the fallback runs).
"""
from __future__ import annotations

import argparse
import math

import torch

from hyperinf_ext import ops
from hyperinf_ext.solvers.mixed import mixed_schulz

KAPPAS = (1e2, 1e3, 1e4, 1e5, 1e6)


def spd(kind: str, d: int, kappa: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """A [d, d] float64 SPD of condition ≈ kappa and its lower spectral bound (exact λmin for 'log',
    the damping for 'gfim')."""
    if kind == "log":
        Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
        lam = torch.logspace(0, -math.log10(kappa), d, dtype=torch.float64)
        A = (Q * lam) @ Q.T
        return 0.5 * (A + A.T), float(lam.min())
    g = torch.randn(d // 4, d, dtype=torch.float64, generator=gen)  # rank d/4: most eigenvalues are the damping
    A = g.T @ g / (d // 4)
    damping = float(torch.linalg.eigvalsh(A).max()) / kappa
    A = A + damping * torch.eye(d, dtype=torch.float64)
    return 0.5 * (A + A.T), damping


def measure(A64: torch.Tensor, lower: float, low: str) -> dict:
    """One case: mixed vs all-float32 on A64 [d, d] float64 (rounded to float32 as both see it)."""
    d = A64.shape[-1]
    A = A64.float()
    ref = torch.linalg.inv(A.double())  # the float64 inverse of the float32 matrix both invert
    eye = torch.eye(d, dtype=torch.float64)

    def quality(X: torch.Tensor) -> tuple[float, float]:
        Xd = X.double()
        return (float(torch.linalg.matrix_norm(eye - A.double() @ Xd)),
                float(torch.linalg.matrix_norm(Xd - ref, 2) / torch.linalg.matrix_norm(ref, 2)))

    X32, i32 = ops.schulz_inverse(A, lower_bound=lower, return_info=True, check=False, backend="torch")
    Xm, im = mixed_schulz(A, lower=lower, low=low, check=False)
    r32, e32 = quality(X32)
    rm, em = quality(Xm)
    return {"low_steps": int(im.extra["low_steps"]), "fp32_steps": int(im.extra["fp32_steps"]),
            "handover": float(im.extra["handover_residual"]),
            "attempt": float(im.extra["mixed_residual"]), "all_fp32_steps": int(i32.iterations),
            "res_mixed": rm, "res_fp32": r32, "err_mixed": em, "err_fp32": e32,
            "path": im.extra["path"][0], "status": im.status[0], "status_fp32": i32.status[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--lows", default="bf16,tf32")
    args = p.parse_args(argv)
    print(f"d = {args.d}, lower bound known; steps: low + float32 (all-float32); residual ‖I − A·X‖_F and "
          "‖X − A⁻¹‖₂/‖A⁻¹‖₂ in float64")
    print("| spectrum | κ | low | seed | steps mixed | steps fp32 | r at hand-over | residual mixed | residual fp32 "
          "| error mixed | error fp32 | path | status (mixed / fp32) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("log", "gfim"):
        for kappa in KAPPAS:
            for low in args.lows.split(","):
                for seed in range(args.seeds):
                    A, lower = spd(kind, args.d, kappa, torch.Generator().manual_seed(seed))
                    m = measure(A, lower, low)
                    path = m["path"] if m["path"] == "mixed" else f"fp32 (mixed: {m['attempt']:.1e})"
                    print(f"| {kind} | {kappa:.0e} | {low} | {seed} | {m['low_steps']} + {m['fp32_steps']} "
                          f"| {m['all_fp32_steps']} | {m['handover']:.2g} | {m['res_mixed']:.2e} | {m['res_fp32']:.2e} "
                          f"| {m['err_mixed']:.2e} | {m['err_fp32']:.2e} | {path} | {m['status']} / {m['status_fp32']} |",
                          flush=True)


if __name__ == "__main__":
    main()
