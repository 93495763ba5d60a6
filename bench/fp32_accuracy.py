"""float32 accuracy of Schulz against a float32 Cholesky solve of the same input (issue #10 §2).

    python -m bench.fp32_accuracy [--d 256] [--seeds 3]

For κ = 1e2, 1e3, 1e4: G = Q·diag(ev)·Qᵀ with eigenvalues log-spaced in [1/(10κ), 1] and damping
λ = 1/κ (so κ(G + λI) ≈ κ), rounded to float32.  Reports, as the median over seeds,
* ``inverse_hvp`` relative error ‖out − ref‖_F/‖ref‖_F for v [8, d], ref = float64 solve of the
  same float32 G and λ, for ``method="schulz"`` and ``method="cholesky"`` (both float32);
* ``schulz_inverse(G + λI, lower_bound=λ)``: relative 2-norm error of X, its residual and iterations,
  with the default tolerance and with ``tol=1e-2`` (the float32 default before issue #10), and the
  median time of ``schulz_inverse`` (default backend) for each.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import hyperinf_ext as hx


def problem(d: int, kappa: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    ev = torch.logspace(0, -math.log10(10 * kappa), d, dtype=torch.float64)
    G = (Q * ev) @ Q.T
    G = (0.5 * (G + G.T)).float()
    v = torch.randn(8, d, generator=g, dtype=torch.float64).float()
    return G, 1.0 / kappa, v


def rel(x: torch.Tensor, ref: torch.Tensor, ord=None) -> float:
    if ord == 2:
        return float(torch.linalg.matrix_norm(x.double() - ref, 2) / torch.linalg.matrix_norm(ref, 2))
    return float((x.double() - ref).norm() / ref.norm())


def run(d: int, seeds: int) -> list[dict]:
    rows = []
    for kappa in (1e2, 1e3, 1e4):
        acc: dict[str, list[float]] = {}
        for seed in range(seeds):
            G, lam, v = problem(d, kappa, seed)
            A64 = G.double() + lam * torch.eye(d, dtype=torch.float64)
            ref = torch.linalg.solve(A64, v.double().T).T
            inv = torch.linalg.inv(A64)
            for method in ("schulz", "cholesky"):
                out = hx.inverse_hvp(G, v, damping=lam, method=method)
                acc.setdefault(f"ihvp_{method}", []).append(rel(out, ref))
            A32 = G + lam * torch.eye(d)
            for label, tol in (("default", None), ("tol1e-2", 1e-2)):
                X, info = hx.schulz_inverse(A32, lower_bound=lam, tol=tol, return_info=True)
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    hx.schulz_inverse(A32, lower_bound=lam, tol=tol)
                    times.append(time.perf_counter() - t0)
                acc.setdefault(f"X_t_{label}", []).append(statistics.median(times))
                acc.setdefault(f"X_err_{label}", []).append(rel(X, inv, 2))
                acc.setdefault(f"X_res_{label}", []).append(float(info.residual))
                acc.setdefault(f"X_it_{label}", []).append(int(info.iterations))
        rows.append({"kappa": kappa, **{k: statistics.median(v) for k, v in acc.items()}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    rows = run(a.d, a.seeds)
    print(f"#### float32 Schulz vs float32 Cholesky, d = {a.d}, median of {a.seeds} seeds\n")
    print("| κ | inverse_hvp schulz | inverse_hvp cholesky | ratio | schulz_inverse error (default) | residual | iterations "
          "| error with tol=1e-2 | residual | iterations | time default / tol=1e-2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kappa']:.0e} | {r['ihvp_schulz']:.2e} | {r['ihvp_cholesky']:.2e} | "
              f"{r['ihvp_schulz'] / r['ihvp_cholesky']:.1f} | {r['X_err_default']:.2e} | {r['X_res_default']:.2e} | "
              f"{r['X_it_default']:.0f} | {r['X_err_tol1e-2']:.2e} | {r['X_res_tol1e-2']:.2e} | {r['X_it_tol1e-2']:.0f} | "
              f"{r['X_t_default'] * 1e3:.1f} / {r['X_t_tol1e-2'] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
