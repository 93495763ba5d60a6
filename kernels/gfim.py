"""GFIM accumulation kernel: acc[l] += grads[l]ᵀ·grads[l] for all L layers in one launch.

SYRK-style: the d×d output of every layer is cut into BLOCK_D×BLOCK_D tiles and only the
upper-triangular tile pairs (i <= j) are computed; each program reduces over the m = n·r gradient
rows in BLOCK_K chunks with ``tl.dot`` and writes both its tile and the mirrored tile, so every
output element has exactly one writer (no atomics) and the result is exactly symmetric whenever
``acc`` was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOW_PRECISION = (torch.float16, torch.bfloat16)
INPUT_PRECISIONS = ("ieee", "tf32")


@triton.jit
def gfim_kernel(
    acc_ptr,  # [L, d, d] float32/float64, contiguous
    g_ptr,  # [L, m, d] float16/bfloat16/float32/float64, any strides
    d,
    m,
    stride_gl,
    stride_gm,
    stride_gd,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_TO_ACC: tl.constexpr,  # convert loads to acc's dtype before tl.dot
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (only matters for float32 operands)
):
    # Linear index over upper-triangular tile pairs, enumerated column by column:
    # t = tj·(tj+1)/2 + ti with 0 <= ti <= tj.  The float sqrt only seeds tj; the two integer
    # corrections make it exact whatever the rounding of sqrt.
    t = tl.program_id(0)
    layer = tl.program_id(1)
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    ti = t - tj * (tj + 1) // 2

    ri = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    # 64-bit layer offset: L·m·d can exceed 2³¹ elements.
    g_base = g_ptr + layer.to(tl.int64) * stride_gl
    a_ptrs = g_base + rk[:, None] * stride_gm + ri[None, :] * stride_gd
    b_ptrs = g_base + rk[:, None] * stride_gm + rj[None, :] * stride_gd
    mask_i = ri[None, :] < d
    mask_j = rj[None, :] < d

    acc_ty = acc_ptr.dtype.element_ty
    c = tl.zeros((BLOCK_D, BLOCK_D), dtype=acc_ty)
    # `//` rather than tl.cdiv: nested jit calls cost ~1 ms each in the interpreter.
    for k in range(0, (m + BLOCK_K - 1) // BLOCK_K):
        mask_k = rk[:, None] < m - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_k & mask_i, other=0.0)
        b = tl.load(b_ptrs, mask=mask_k & mask_j, other=0.0)
        if CAST_TO_ACC:
            a = a.to(acc_ty)
            b = b.to(acc_ty)
        # fp16/bf16 operands go straight to the tensor cores with float32 accumulation.
        c = tl.dot(tl.trans(a), b, c, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_gm
        b_ptrs += BLOCK_K * stride_gm

    acc_base = acc_ptr + layer.to(tl.int64) * d * d
    ct = tl.trans(c)
    # A diagonal tile is symmetric only up to the summation order of the dot; taking its upper
    # triangle and mirroring it makes the output exactly symmetric.  Off the diagonal every row
    # index is below every column index, so this select keeps c unchanged there.
    c = tl.where(ri[:, None] <= rj[None, :], c, ct)
    mask_c = (ri[:, None] < d) & (rj[None, :] < d)
    c_ptrs = acc_base + ri[:, None] * d + rj[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs, mask=mask_c, other=0.0) + c, mask=mask_c)
    # Mirror tile (j, i), skipped on the diagonal, which was written whole just above (ri lies
    # below tj·BLOCK_D exactly when ti < tj; a tensor test since the interpreter rejects a scalar
    # bool in a mask).
    mask_t = (rj[:, None] < d) & (ri[None, :] < d) & (ri[None, :] < tj * BLOCK_D)
    t_ptrs = acc_base + rj[:, None] * d + ri[None, :]
    tl.store(t_ptrs, tl.load(t_ptrs, mask=mask_t, other=0.0) + ct, mask=mask_t)


@dataclass(frozen=True)
class GfimConfig:
    block_d: int
    block_k: int
    num_warps: int
    num_stages: int


def config(in_dtype: torch.dtype, acc_dtype: torch.dtype, interpret: bool) -> GfimConfig:
    """Block sizes for one (grads dtype, acc dtype) pair, on a GPU or in the interpreter.

    The interpreter pays per tl-op in Python, so it gets mid-size tiles that still exercise the
    multi-tile and masked paths at test sizes.  On the GPU, float64 halves BLOCK_K to keep the
    register footprint of the fp64 operands close to the fp32 one.
    """
    if interpret:
        return GfimConfig(block_d=32, block_k=32, num_warps=1, num_stages=1)
    if acc_dtype == torch.float64:
        return GfimConfig(block_d=64, block_k=16, num_warps=4, num_stages=2)
    return GfimConfig(block_d=64, block_k=32, num_warps=4, num_stages=3)


def cast_to_acc(in_dtype: torch.dtype, acc_dtype: torch.dtype, interpret: bool) -> bool:
    """Whether the kernel converts loaded tiles to acc's dtype before tl.dot.

    fp16/bf16 into a float32 accumulator stay as they are (tensor-core mma).  Exception: the
    interpreter (triton 3.9) multiplies bfloat16 tiles as their raw uint16 bit patterns in tl.dot, so
    there bf16 is upcast first; bf16·bf16 products are exact in float32, so the numbers are those
    of the mma path up to summation order.
    """
    if in_dtype in LOW_PRECISION and acc_dtype == torch.float32:
        return interpret and in_dtype == torch.bfloat16
    return in_dtype != acc_dtype


def num_tile_pairs(d: int, block_d: int) -> int:
    t = triton.cdiv(d, block_d)
    return t * (t + 1) // 2


def launch_gfim(
    acc: torch.Tensor,
    grads: torch.Tensor,
    cfg: GfimConfig,
    *,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """One launch of ``gfim_kernel`` over all layers: acc [L, d, d] (fp32/fp64, contiguous) += gᵀg.

    grads: [L, m, d] float16/bfloat16/float32/float64 with any strides (no copy is made).
    ``input_precision="tf32"`` lets float32 operands use TF32 tensor cores (≈1e-3 relative error).
    """
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
    L, m, d = grads.shape
    if L == 0 or m == 0 or d == 0:
        return acc
    interpret = acc.device.type == "cpu"
    cast = cast_to_acc(grads.dtype, acc.dtype, interpret)
    operand_dtype = acc.dtype if cast else grads.dtype
    # TF32 is a float32-operand mode only; every other operand dtype has one exact path.
    precision = input_precision if operand_dtype == torch.float32 else "ieee"
    grid = (num_tile_pairs(d, cfg.block_d), L)
    gfim_kernel[grid](
        acc,
        grads,
        d,
        m,
        grads.stride(0),
        grads.stride(1),
        grads.stride(2),
        BLOCK_D=cfg.block_d,
        BLOCK_K=cfg.block_k,
        CAST_TO_ACC=cast,
        INPUT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=True,
    )
    return acc
