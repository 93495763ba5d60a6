"""Gradient projection kernels: y = grads @ proj, with per-example maxima for a scaled low-precision copy.

``project_kernel`` computes y [B·r, k] = grads [B, r, d] · proj [d, k]: the B·r gradient rows are
flattened (row m is example m // r, row m % r of it, read through the strides of grads, so no copy is
made), cut into BLOCK_M×BLOCK_N output tiles, and each program reduces over d in BLOCK_K chunks with
``tl.dot`` in proj's dtype.  With ``COMPUTE_AMAX`` its epilogue also folds max |y| of every row into a
per-example maximum with ``tl.atomic_max`` on the float's bit pattern read as an integer: for
non-negative floats (|y|) the integer order is the float order, so the integer maximum is the float
maximum, and a NaN (sign cleared by the abs) compares above +inf, so it propagates.

``scale_cast_kernel`` then writes values = y · 2^-k_b rounded to the output dtype, where 2^k_b is the
example's power-of-two scale (chosen by the host from the maxima): multiplying by the exact reciprocal of
a power of two is exact, so the cast is the only rounding.

As in ``gfim.py``, fp16/bf16 grads are handed to the GPU kernel in a vectorisable layout (d contiguous,
strides and base 16-element aligned; a zero-padded copy otherwise) and masked by the padded width
``d_load``; proj is masked by d itself, so the padding columns multiply zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import gfim as _gfim

INPUT_PRECISIONS = ("ieee", "tf32")
# integer type whose bit pattern holds the float of the same width (for atomic_max on |y|)
AMAX_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


@triton.jit
def project_kernel(
    g_ptr,  # [B, r, d] float16/bfloat16/float32/float64, any strides
    p_ptr,  # [d, k] float32/float64, contiguous
    y_ptr,  # [B·r, k] proj's dtype, contiguous (written)
    amax_ptr,  # [B] int32/int64 holding float bits, zero-initialised (COMPUTE_AMAX only)
    M,  # B·r rows
    d,
    d_load,  # columns of grads the loads may read: d, or d rounded up to 16 over zero padding
    k,
    r,
    stride_gb,
    stride_gr,
    stride_gd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_TO_ACC: tl.constexpr,  # convert the grads tile to proj's dtype before tl.dot
    COMPUTE_AMAX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (float32 only)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Example and rank index of each row, once per program; 64-bit offsets since B·r·d can pass 2³¹.
    ex = rm // r
    row_off = ex.to(tl.int64) * stride_gb + (rm - ex * r).to(tl.int64) * stride_gr
    a_ptrs = g_ptr + row_off[:, None] + rk[None, :] * stride_gd
    b_ptrs = p_ptr + rk[:, None] * k + rn[None, :]
    mask_m = rm[:, None] < M
    mask_n = rn[None, :] < k

    acc_ty = p_ptr.dtype.element_ty
    c = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
    # `//` rather than tl.cdiv: nested jit calls cost ~1 ms each in the interpreter.
    for kk in range(0, (d_load + BLOCK_K - 1) // BLOCK_K):
        k0 = kk * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m & (rk[None, :] < d_load - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < d - k0) & mask_n, other=0.0)
        if CAST_TO_ACC:
            a = a.to(acc_ty)
        c = tl.dot(a, b, c, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        a_ptrs += BLOCK_K * stride_gd
        b_ptrs += BLOCK_K * k
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * k + rn[None, :]
    tl.store(y_ptrs, c, mask=mask_m & mask_n)
    if COMPUTE_AMAX:
        # Rows past M and columns past k hold zeros (masked loads), which never raise a maximum.
        row_max = tl.max(tl.abs(c), axis=1)
        int_ty = amax_ptr.dtype.element_ty
        tl.atomic_max(amax_ptr + ex, row_max.to(int_ty, bitcast=True), mask=rm < M)


@triton.jit
def scale_cast_kernel(
    y_ptr,  # [B·r, k] float32/float64, contiguous
    inv_ptr,  # [B] y's dtype: 2^-k_b, the exact reciprocal of example b's scale
    out_ptr,  # [B·r, k] float16/bfloat16/float32, contiguous (written)
    M,
    k,
    r,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VIA_FP32: tl.constexpr,  # round to float32 first (float64 y into bfloat16 values, as torch's cast does)
    RNE_BY_HAND: tl.constexpr,  # round float32 → bfloat16 to nearest even with integer ops (interpreter)
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < k)
    inv = tl.load(inv_ptr + rm // r, mask=rm < M, other=1.0)
    offs = rm.to(tl.int64)[:, None] * k + rn[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    # A product by a power of two is exact; the cast rounds to nearest even, the one rounding.
    x = y * inv[:, None]
    if VIA_FP32:
        x = x.to(tl.float32)
    if RNE_BY_HAND:
        # The interpreter (triton 3.9) truncates float32 → bfloat16.  Adding 0x7FFF plus the lowest kept
        # bit rounds the 16 dropped bits to nearest even (finite x; ops/ refuses non-finite rows), after
        # which truncation is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ProjectConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class CastConfig:
    block_m: int
    block_n: int
    num_warps: int


def config(acc_dtype: torch.dtype, interpret: bool) -> ProjectConfig:
    """Tiles of ``project_kernel`` for a float32/float64 proj, on a GPU or in the interpreter.

    The interpreter pays per tl-op in Python: small tiles that still give several row, column and d
    tiles at test sizes (every masked edge runs).  On the GPU, float64 halves BLOCK_K to keep the fp64
    operands' register footprint near the fp32 one (as in gfim.config).
    """
    if interpret:
        return ProjectConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)
    if acc_dtype == torch.float64:
        return ProjectConfig(block_m=64, block_n=64, block_k=16, num_warps=4, num_stages=2)
    return ProjectConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)


def cast_config(interpret: bool) -> CastConfig:
    """Tiles of ``scale_cast_kernel``: an elementwise pass, so wide rows for coalesced accesses on the GPU."""
    if interpret:
        return CastConfig(block_m=16, block_n=32, num_warps=1)
    return CastConfig(block_m=16, block_n=128, num_warps=4)


def launch_project(
    y: torch.Tensor,
    grads: torch.Tensor,
    proj: torch.Tensor,
    amax_bits: torch.Tensor | None,
    cfg: ProjectConfig,
    *,
    input_precision: str = "ieee",
    pipelined: bool | None = None,
) -> torch.Tensor:
    """One launch of ``project_kernel``: y [B·r, k] (proj's dtype, contiguous) = grads [B, r, d] · proj [d, k].

    ``amax_bits`` ([B] int32 for a float32 proj, int64 for float64, zeros): when given, receives the bit
    pattern of max |y| over each example's r·k entries (``.view(proj.dtype)`` reads it).  grads of any
    float dtype and strides; fp16/bf16 grads on the GPU are first copied into the vectorisable layout
    when they lack it (``pipelined``, as in ``gfim.launch_gfim``).  ``input_precision="tf32"`` lets a
    float32 product use TF32 tensor cores (≈1e-3 relative error).  Returns y.
    """
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
    B, r, d = grads.shape
    k = proj.shape[1]
    M = B * r
    if M == 0 or k == 0:
        return y
    interpret = y.device.type == "cpu"
    if pipelined is None:
        pipelined = not interpret and grads.dtype in _gfim.LOW_PRECISION
    if pipelined and not _gfim.is_pipelinable(grads):
        grads = _gfim.pipelinable_copy(grads)
    cast = grads.dtype != proj.dtype
    precision = input_precision if proj.dtype == torch.float32 else "ieee"
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(k, cfg.block_n))
    project_kernel[grid](
        grads,
        proj,
        y,
        y if amax_bits is None else amax_bits,  # an unused pointer argument when COMPUTE_AMAX is off
        M,
        d,
        grads.shape[2],
        k,
        r,
        grads.stride(0),
        grads.stride(1),
        grads.stride(2),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        CAST_TO_ACC=cast,
        COMPUTE_AMAX=amax_bits is not None,
        INPUT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=True,
    )
    return y


def launch_scale_cast(out: torch.Tensor, y: torch.Tensor, inv: torch.Tensor, r: int, cfg: CastConfig) -> torch.Tensor:
    """out [B·r, k] (fp16/bf16/fp32, contiguous) = y [B·r, k] · inv[row // r] rounded to out's dtype.

    inv: [B] in y's dtype, powers of two (so the product is exact).  Returns out.
    """
    M, k = y.shape
    if M == 0 or k == 0:
        return out
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(k, cfg.block_n))
    bf16 = out.dtype == torch.bfloat16
    scale_cast_kernel[grid](y, inv, out, M, k, r, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            VIA_FP32=bf16 and y.dtype == torch.float64, RNE_BY_HAND=bf16 and y.device.type == "cpu",
                            num_warps=cfg.num_warps)
    return out
