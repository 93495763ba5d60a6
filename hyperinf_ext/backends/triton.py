"""The "triton" backend: host drivers of the Triton kernels (``kernels/``, installed as ``hyperinf_ext.kernels``).

Tensors on CUDA run the compiled kernels; CPU tensors run through the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), with smaller tiles.  The kernels know nothing
of the package: the Schulz decisions are taken here, by ``reference.SchulzSchedule``.
"""
from __future__ import annotations

import torch

from ..kernels import gfim as _gfim
from ..kernels import schulz as _schulz
from ..reference import SchulzSchedule, update_coefficients

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
    """Scaled Schulz inverse of each SPD matrix of A, step for step as the torch backend's.

    A: [B, d, d] float32/float64 contiguous; lower, upper: [B] float64 (CPU) spectral bounds.
    Returns (X [B, d, d] A's dtype and device, iterations [B] int64, residual [B] float64,
    status [B] int64), the last three on the CPU.

    Each iteration is two launches over the whole batch (residual + norm, then update) and one
    device→host read of the per-tile norms; the stop rules, β and the eigenvalue bracket are one
    ``reference.SchulzSchedule`` per matrix, run on the host.  X lives in two buffers used
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

    schedules = [SchulzSchedule(d, tol, max_iter) for _ in range(B)]
    beta0 = [s.start(lo, up) for s, lo, up in zip(schedules, lower.reshape(-1).tolist(), upper.reshape(-1).tolist())]
    bufs = (torch.zeros_like(A), torch.empty_like(A))
    bufs[0].diagonal(dim1=-2, dim2=-1).copy_(torch.tensor(beta0, dtype=dtype).to(dev).unsqueeze(-1))
    R = torch.empty_like(A)
    partials = torch.empty(B, _schulz.num_tiles(d, cfg), dtype=dtype, device=dev)
    coef = torch.zeros(B, 2, dtype=torch.float64)

    final_buf = [0] * B  # which of `bufs` holds the returned X of each matrix
    active = [True] * B
    cur = 0
    active_dev = torch.ones(B, dtype=torch.int32, device=dev)
    while any(active):
        _schulz.launch_residual(A, bufs[cur], R, partials, active_dev, cfg, precision)
        # The one sync of the iteration; tile sums are added in float64.
        r_all = partials.double().sum(1).sqrt().cpu().tolist()
        for i, s in enumerate(schedules):
            if not active[i]:
                continue
            if s.decide(r_all[i]) is not None:
                # On rollback X_{k-1} is intact in the other buffer: this round's update has not run.
                final_buf[i] = 1 - cur if s.rollback else cur
                active[i] = False
                continue
            coef[i, 0], coef[i, 1] = update_coefficients(s.next_beta())
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
    iters = torch.tensor([s.iterations for s in schedules], dtype=torch.int64)
    resid = torch.tensor([s.residual for s in schedules], dtype=torch.float64)
    status = torch.tensor([s.status for s in schedules], dtype=torch.int64)
    return X, iters, resid, status
