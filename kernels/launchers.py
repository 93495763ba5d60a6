"""The Triton backend: the two functions of the backend contract (see ``hyperinf_ext.reference``).

``hyperinf_ext.backends`` loads this module as the "triton" backend.  Tensors on CUDA run the
compiled kernels; CPU tensors run through the Triton interpreter (TRITON_INTERPRET=1 set before
triton is imported), with smaller tiles.
"""
from __future__ import annotations

import math

import torch

from hyperinf_ext import reference

from . import gfim as _gfim
from . import schulz as _schulz

__all__ = ["gfim_accumulate_", "schulz_inverse"]


def _interpret(device: torch.device) -> bool:
    return device.type == "cpu"


def gfim_accumulate_(
    acc: torch.Tensor,
    grads: torch.Tensor,
    *,
    input_precision: str = "ieee",
    config: _gfim.GfimConfig | None = None,
) -> torch.Tensor:
    """acc[l] += grads[l]ᵀ·grads[l] in one kernel launch; returns acc.

    acc: [L, d, d] float32/float64 contiguous.  grads: [L, m, d] float16/bfloat16/float32/float64,
    any strides (read in place).  Products accumulate in float32 for a float32 acc (fp16/bf16 on
    tensor cores) and in float64 for a float64 acc; float64 grads into a float32 acc are rounded to
    float32 first, as the reference does.  ``input_precision="tf32"`` allows TF32 tensor cores for
    float32 grads into a float32 acc.  ``config`` overrides the tile sizes (tests, benchmarks).
    """
    cfg = config or _gfim.config(grads.dtype, acc.dtype, _interpret(acc.device))
    return _gfim.launch_gfim(acc, grads, cfg, input_precision=input_precision)


def schulz_inverse(
    A: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    tol: float,
    max_iter: int,
    *,
    input_precision: str = "ieee",
    config: _schulz.SchulzConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled Schulz inverse of each SPD matrix of A, step for step as ``reference.schulz_inverse``.

    A: [B, d, d] float32/float64 contiguous; lower, upper: [B] float64 (CPU) spectral bounds.
    Returns (X [B, d, d] A's dtype and device, iterations [B] int64, residual [B] float64,
    status [B] int64), the last three on the CPU.

    Each iteration is two launches over the whole batch (residual + norm, then update) and one
    device→host read of the per-tile norms; the stop rules, β and the eigenvalue bracket are the
    reference's scalar helpers run on the host per matrix.  X lives in two buffers used
    alternately, so the previous iterate (the stagnation rollback target) is always the other one.
    ``input_precision="tf32x3"`` runs float32 products on TF32 tensor cores with error compensation
    (close to, but not bit-for-bit, fp32 FMA; iteration counts may then differ from the reference
    by rounding ties); float64 ignores it.  ``config`` overrides the tile sizes (tests, benchmarks).
    """
    if input_precision not in _schulz.INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {_schulz.INPUT_PRECISIONS}, got {input_precision!r}")
    B, d, _ = A.shape
    dev, dtype = A.device, A.dtype
    cfg = config or _schulz.config(dtype, _interpret(dev))
    precision = input_precision if dtype == torch.float32 else "ieee"
    limit = reference.divergence_limit(d)

    lo = [float(v) for v in lower.reshape(-1).tolist()]
    up = [float(v) for v in upper.reshape(-1).tolist()]
    beta0 = [reference.initial_scale(lo[i], up[i]) for i in range(B)]
    brk_a = [beta0[i] * lo[i] for i in range(B)]
    brk_b = [beta0[i] * up[i] for i in range(B)]

    bufs = (torch.zeros_like(A), torch.empty_like(A))
    bufs[0].diagonal(dim1=-2, dim2=-1).copy_(torch.tensor(beta0, dtype=dtype).to(dev).unsqueeze(-1))
    R = torch.empty_like(A)
    partials = torch.empty(B, _schulz.num_tiles(d, cfg), dtype=dtype, device=dev)
    coef = torch.zeros(B, 2, dtype=torch.float64)

    iters = torch.zeros(B, dtype=torch.int64)
    resid = torch.zeros(B, dtype=torch.float64)
    status = torch.zeros(B, dtype=torch.int64)
    final_buf = [0] * B  # which of `bufs` holds the returned X of each matrix
    r_prev = [math.inf] * B
    beta = [math.inf] * B
    k = [0] * B
    active = [True] * B
    cur = 0

    active_dev = torch.ones(B, dtype=torch.int32, device=dev)
    while any(active):
        _schulz.launch_residual(A, bufs[cur], R, partials, active_dev, cfg, precision)
        # The one sync of the iteration; tile sums are added in float64.
        r_all = partials.double().sum(1).sqrt().cpu().tolist()
        for i in range(B):
            if not active[i]:
                continue
            r = r_all[i]
            st, fb = None, cur
            if not math.isfinite(r) or r > limit:
                st = reference.DIVERGED
            elif r <= tol:
                st = reference.CONVERGED
            elif (
                r_prev[i] < reference.QUADRATIC_PHASE
                and abs(beta[i] - 1.0) < reference.UNSCALED
                and r > 0.5 * r_prev[i]
            ):
                st = reference.STAGNATED
                if r > r_prev[i]:
                    # X_{k-1} is intact in the other buffer: this round's update has not run.
                    fb, r, k[i] = 1 - cur, r_prev[i], k[i] - 1
            elif k[i] == max_iter:
                st = reference.MAX_ITER
            if st is not None:
                final_buf[i] = fb
                iters[i], resid[i], status[i] = k[i], r, st
                active[i] = False
                continue
            b_, brk_a[i], brk_b[i] = reference.step_scale(brk_a[i], brk_b[i], r)
            beta[i], r_prev[i] = b_, r
            coef[i, 0], coef[i, 1] = b_ * (2.0 - b_), b_ * b_
            brk_a[i], brk_b[i] = reference.next_bracket(brk_a[i], brk_b[i], b_)
            k[i] += 1
        if not any(active):
            break
        # Matrices only ever leave the active set, so this mask also serves the next residual.
        active_dev = torch.tensor(active, dtype=torch.int32).to(dev)
        _schulz.launch_update(bufs[cur], R, bufs[1 - cur], coef.to(device=dev, dtype=dtype), active_dev, cfg, precision)
        cur = 1 - cur

    X = bufs[0]
    take = [i for i in range(B) if final_buf[i] == 1]
    if take:
        idx = torch.tensor(take, dtype=torch.int64, device=dev)
        X[idx] = bufs[1][idx]
    return X, iters, resid, status
