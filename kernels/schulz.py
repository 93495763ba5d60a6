"""Batched Schulz-iteration kernels: the two GEMMs of one step, with their epilogues fused.

One Schulz step on matrix b (the scaled Schulz iteration of the package's torch backend) is

* residual: R = I − A·X and the squared Frobenius norm of R (``schulz_residual_kernel``),
* update:   X_new = c1·X + c2·(X·R) with c1 = β(2 − β), c2 = β² (``schulz_update_kernel``).

Both kernels run over all B matrices of a batch in one launch (grid = (output tiles, B)); a
per-matrix ``active`` flag makes the programs of finished matrices return at once, so a batch
whose matrices converge at different steps costs only the work of the ones still iterating.
Both run one program (``_schulz_step_tile``: grouped tile order, the tiled GEMM ``_product_tile``
and the epilogue of the step, chosen at compile time).  The step
coefficients and the stop decisions come from the host driver.  All matrices are [B, d, d]
contiguous float32 or float64; the dtype of the pointers selects the
dot precision (float32: "ieee" FMA, or "tf32x3" compensated TF32 tensor cores; float64: DMMA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# "tf32x3": TF32 tensor cores with error compensation for float32 (plain TF32 is too coarse for
# a residual that must reach 1e-2 at condition 1e4).
INPUT_PRECISIONS = ("ieee", "tf32x3")

# The program and its main loop are @triton.jit helpers called once per program (not once per K
# step): the interpreter re-patches triton.language on every nested jit call (~1 ms each), so
# per-step helpers would dominate its run time.  For the same reason the kernels use `//` instead of
# tl.cdiv.


@triton.jit
def _product_tile(
    left_ptr,
    right_ptr,
    off,
    rm,
    rn,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """(Left·Right)[rm, rn] of two [d, d] row-major matrices starting at element ``off``.

    Returns a [BLOCK_M, BLOCK_N] tile in the operands' dtype; rows/columns past d read as zero.
    """
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm[:, None] < d
    mask_n = rn[None, :] < d
    l_ptrs = left_ptr + off + rm[:, None] * d + rk[None, :]
    r_ptrs = right_ptr + off + rk[:, None] * d + rn[None, :]
    acc_ty = left_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    for k in range(0, (d + BLOCK_K - 1) // BLOCK_K):
        left = d - k * BLOCK_K
        lt = tl.load(l_ptrs, mask=mask_m & (rk[None, :] < left), other=0.0)
        rt = tl.load(r_ptrs, mask=(rk[:, None] < left) & mask_n, other=0.0)
        # out_dtype spelled out: Triton 3.6 requires it to equal acc's dtype (fp64 here) and defaults to fp32.
        acc = tl.dot(lt, rt, acc, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        l_ptrs += BLOCK_K
        r_ptrs += BLOCK_K * d
    return acc


@triton.jit
def _schulz_step_tile(left_ptr, right_ptr, out_ptr, aux_ptr, active_ptr, d, n_tiles, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, RESIDUAL: tl.constexpr):
    """The program of both kernels: output tile program_id(0) of matrix program_id(1), P = Left·Right.

    RESIDUAL: out = I − P and aux[b, tile] = Σ out² (Left = A, Right = X, aux = partials [B, n_tiles]);
    else out = c1·Left + c2·P (Left = X, Right = R, aux = coef [B, 2]).  Programs of inactive
    matrices (active[b] == 0) do nothing.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if tl.load(active_ptr + b) != 0:
        # Grouped tile order: GROUP_M tile rows are swept together so the left panels they share stay
        # in L2 while the right operand streams.
        grid_m = (d + BLOCK_M - 1) // BLOCK_M
        grid_n = (d + BLOCK_N - 1) // BLOCK_N
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        group_size = tl.minimum(grid_m - first_m, GROUP_M)
        rm = (first_m + (pid % width) % group_size) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = ((pid % width) // group_size) * BLOCK_N + tl.arange(0, BLOCK_N)
        # 64-bit matrix offset: B·d² can exceed 2³¹ elements.
        off = b.to(tl.int64) * d * d
        acc = _product_tile(left_ptr, right_ptr, off, rm, rn, d, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        mask = (rm[:, None] < d) & (rn[None, :] < d)
        idx = off + rm[:, None] * d + rn[None, :]
        if RESIDUAL:
            eye = tl.where(rm[:, None] == rn[None, :], 1.0, 0.0).to(acc.dtype)
            # Padding rows/columns must contribute nothing to the norm (the padded diagonal would be 1).
            r = tl.where(mask, eye - acc, 0.0)
            tl.store(out_ptr + idx, r, mask=mask)
            # Per-tile partial sums, added up on the host in float64: deterministic, unlike atomics.
            tl.store(aux_ptr + b.to(tl.int64) * n_tiles + pid, tl.sum(r * r))
        else:
            # The "2X − XAX" combination of Schulz, scaled by β, fused into the epilogue.
            c1 = tl.load(aux_ptr + 2 * b)
            c2 = tl.load(aux_ptr + 2 * b + 1)
            x = tl.load(left_ptr + idx, mask=mask, other=0.0)
            tl.store(out_ptr + idx, c1 * x + c2 * acc, mask=mask)


# The two kernels are entry points with the argument lists ``kernels/aot.py`` compiles; their
# program is ``_schulz_step_tile``.


@triton.jit
def schulz_residual_kernel(
    a_ptr,  # [B, d, d] the matrices to invert
    x_ptr,  # [B, d, d] current iterates X
    r_ptr,  # [B, d, d] out: R = I − A·X
    part_ptr,  # [B, n_tiles] out: Σ R² over each output tile (same dtype as A)
    active_ptr,  # [B] int32: 0 skips the matrix
    d,
    n_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """R = I − A·X and the per-tile Σ R² of one output tile of one matrix."""
    _schulz_step_tile(a_ptr, x_ptr, r_ptr, part_ptr, active_ptr, d, n_tiles,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, INPUT_PRECISION, True)


@triton.jit
def schulz_update_kernel(
    x_ptr,  # [B, d, d] current iterates X
    r_ptr,  # [B, d, d] their residuals R = I − A·X
    out_ptr,  # [B, d, d] out: X_new (a different buffer: X must survive for stagnation rollback)
    coef_ptr,  # [B, 2] (c1, c2) per matrix, same dtype as X
    active_ptr,  # [B] int32: 0 skips the matrix
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """X_new = c1·X + c2·X·R of one output tile of one matrix."""
    _schulz_step_tile(x_ptr, r_ptr, out_ptr, coef_ptr, active_ptr, d, 0,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, INPUT_PRECISION, False)


@dataclass(frozen=True)
class SchulzConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def config(dtype: torch.dtype, interpret: bool) -> SchulzConfig:
    """Tile sizes for float32/float64 matrices on a GPU, or in the interpreter (CPU tensors).

    The interpreter pays per tl-op in Python, so it gets large tiles (few programs) that still
    split d = 77 into 2×2 masked tiles.
    """
    if interpret:
        return SchulzConfig(block_m=64, block_n=64, block_k=64, group_m=2, num_warps=1, num_stages=1)
    if dtype == torch.float64:
        return SchulzConfig(block_m=64, block_n=64, block_k=16, group_m=8, num_warps=4, num_stages=2)
    return SchulzConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)


def num_tiles(d: int, cfg: SchulzConfig) -> int:
    return triton.cdiv(d, cfg.block_m) * triton.cdiv(d, cfg.block_n)


def _common(cfg: SchulzConfig, input_precision: str) -> dict:
    return dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        INPUT_PRECISION=input_precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=True,
    )


def launch_residual(
    A: torch.Tensor,
    X: torch.Tensor,
    R: torch.Tensor,
    partials: torch.Tensor,
    active: torch.Tensor,
    cfg: SchulzConfig,
    input_precision: str = "ieee",
) -> None:
    """R[b] = I − A[b]·X[b] and partials[b, t] = Σ R[b]² over output tile t, for active b.

    A, X, R: [B, d, d] contiguous, one dtype (fp32/fp64); partials: [B, num_tiles(d, cfg)] same
    dtype; active: [B] int32 on the same device.
    """
    B, d, _ = A.shape
    grid = (num_tiles(d, cfg), B)
    schulz_residual_kernel[grid](A, X, R, partials, active, d, partials.shape[1], **_common(cfg, input_precision))


def launch_update(
    X: torch.Tensor,
    R: torch.Tensor,
    out: torch.Tensor,
    coef: torch.Tensor,
    active: torch.Tensor,
    cfg: SchulzConfig,
    input_precision: str = "ieee",
) -> None:
    """out[b] = coef[b, 0]·X[b] + coef[b, 1]·X[b]·R[b] for active b.

    X, R, out: [B, d, d] contiguous, one dtype (fp32/fp64), out a different buffer from X and R;
    coef: [B, 2] same dtype; active: [B] int32.
    """
    B, d, _ = X.shape
    grid = (num_tiles(d, cfg), B)
    schulz_update_kernel[grid](X, R, out, coef, active, d, **_common(cfg, input_precision))
