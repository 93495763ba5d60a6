"""GFIM accumulation kernel: acc[l] += grads[l]ᵀ·grads[l] for all L layers in one launch.

SYRK-style: the d×d output of every layer is cut into BLOCK_D×BLOCK_D tiles and only the
upper-triangular tile pairs (i <= j) are computed; each program reduces over the m = n·r gradient
rows in BLOCK_K chunks with ``tl.dot`` and writes both its tile and the mirrored tile, so every
output element has exactly one writer (no atomics) and the result is exactly symmetric whenever
``acc`` was.

Software pipelining of the loads (cp.async on sm_80+) needs 4/8/16-byte copies.  A 2-byte
fp16/bf16 element can only be copied that way in vectors, so Triton must prove that the d axis is
contiguous (stride 1), that the row/layer strides and the base are 16-element aligned, and that the
load mask is constant over 16 columns; otherwise it falls back to scalar ``ld.global`` +
``st.shared`` with no async copy at all (4-byte fp32 elements are copied one by one
asynchronously either way).  ``launch_gfim`` therefore hands fp16/bf16 grads to the GPU kernel in
that layout, copying them once into a zero-padded buffer when they are not, and the loads are masked
by the padded width ``d_load`` (a multiple of 16) rather than by d.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOW_PRECISION = (torch.float16, torch.bfloat16)
INPUT_PRECISIONS = ("ieee", "tf32")


@triton.jit
def _tile_pair(t):
    """(ti, tj) of the t-th upper-triangular tile pair, enumerated column by column.

    t = tj·(tj+1)/2 + ti with 0 <= ti <= tj.  The float sqrt only seeds tj; the two integer
    corrections make it exact whatever the rounding of sqrt.
    """
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    return t - tj * (tj + 1) // 2, tj


@triton.jit
def _add_symmetric(acc_ptr, c, layer, d, ti, tj, BLOCK_D: tl.constexpr):
    """acc[layer] += c at tile (ti, tj) and cᵀ at the mirror tile (tj, ti), exactly symmetric."""
    ri = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = tj * BLOCK_D + tl.arange(0, BLOCK_D)
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


@triton.jit
def gfim_kernel(
    acc_ptr,  # [L, d, d] float32/float64, contiguous
    g_ptr,  # [L, m, d] float16/bfloat16/float32/float64, any strides
    d,
    d_load,  # columns of grads the loads may read: d, or d rounded up to 16 over zero padding
    m,
    stride_gl,
    stride_gm,
    stride_gd,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_TO_ACC: tl.constexpr,  # convert loads to acc's dtype before tl.dot
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (only matters for float32 operands)
):
    layer = tl.program_id(1)
    ti, tj = _tile_pair(tl.program_id(0))
    ri = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    # 64-bit layer offset: L·m·d can exceed 2³¹ elements.
    g_base = g_ptr + layer.to(tl.int64) * stride_gl
    # The left operand is loaded directly as its [BLOCK_D, BLOCK_K] tile (d contiguous down the
    # columns) rather than loaded [BLOCK_K, BLOCK_D] and tl.trans'ed: on sm_80 Triton pipelines a
    # transposed register value through registers (ld.global + st.shared) instead of cp.async.
    a_ptrs = g_base + ri[:, None] * stride_gd + rk[None, :] * stride_gm
    b_ptrs = g_base + rk[:, None] * stride_gm + rj[None, :] * stride_gd
    mask_i = ri[:, None] < d_load
    mask_j = rj[None, :] < d_load

    acc_ty = acc_ptr.dtype.element_ty
    c = tl.zeros((BLOCK_D, BLOCK_D), dtype=acc_ty)
    # `//` rather than tl.cdiv: nested jit calls cost ~1 ms each in the interpreter.
    for k in range(0, (m + BLOCK_K - 1) // BLOCK_K):
        k_left = m - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rk[None, :] < k_left) & mask_i, other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_j, other=0.0)
        if CAST_TO_ACC:
            a = a.to(acc_ty)
            b = b.to(acc_ty)
        # fp16/bf16 operands go straight to the tensor cores with float32 accumulation.  out_dtype is
        # spelled out: Triton 3.6 (the lent GPUs') requires it to equal acc's dtype and defaults to fp32.
        c = tl.dot(a, b, c, input_precision=INPUT_PRECISION, out_dtype=acc_ty)
        a_ptrs += BLOCK_K * stride_gm
        b_ptrs += BLOCK_K * stride_gm
    _add_symmetric(acc_ptr, c, layer, d, ti, tj, BLOCK_D)


@triton.jit
def gfim_tma_kernel(
    acc_ptr,  # [L, d, d] float32, contiguous
    g_desc,  # tensor descriptor of grads [L, m, d] fp16/bf16, block [1, BLOCK_K, BLOCK_D]
    d,
    m,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_TO_ACC: tl.constexpr,  # the interpreter's bf16 tl.dot needs float32 operands (cast_to_acc)
):
    """gfim_kernel's fp16/bf16 path with its tiles fetched by the tensor-memory accelerator (sm_90).

    The descriptor is 3-D so that a K chunk running past a layer's m rows is zero-filled by the
    hardware instead of reading the next layer; no masks in the loop.  Below sm_90 (and in the
    interpreter) Triton lowers descriptor loads to ordinary masked loads.
    """
    layer = tl.program_id(1)
    ti, tj = _tile_pair(tl.program_id(0))
    c = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for k in range(0, (m + BLOCK_K - 1) // BLOCK_K):
        a = g_desc.load([layer, k * BLOCK_K, ti * BLOCK_D]).reshape(BLOCK_K, BLOCK_D)
        b = g_desc.load([layer, k * BLOCK_K, tj * BLOCK_D]).reshape(BLOCK_K, BLOCK_D)
        if CAST_TO_ACC:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        c = tl.dot(tl.trans(a), b, c, out_dtype=tl.float32)
    _add_symmetric(acc_ptr, c, layer, d, ti, tj, BLOCK_D)


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


ALIGN = 16  # elements: what Triton's launch-time specialisation calls "divisible by 16"


def is_pipelinable(grads: torch.Tensor) -> bool:
    """Whether grads [L, m, d] already have the layout that lets the GPU kernel vectorise its loads.

    d contiguous, d and the other two strides multiples of ALIGN elements, 16-byte aligned base:
    exactly what the JIT needs to see to specialise ``stride_gd`` to 1 and the rest to divisible-by-16.
    """
    L, m, d = grads.shape
    return (
        grads.stride(2) == 1
        and d % ALIGN == 0
        and grads.stride(1) % ALIGN == 0
        and grads.stride(0) % ALIGN == 0
        and grads.data_ptr() % 16 == 0
    )


def pipelinable_copy(grads: torch.Tensor) -> torch.Tensor:
    """grads copied into a contiguous [L, m, d₁₆] buffer, zero beyond column d (d₁₆ = d rounded up)."""
    L, m, d = grads.shape
    d_pad = triton.cdiv(d, ALIGN) * ALIGN
    buf = grads.new_zeros(L, m, d_pad) if d_pad != d else torch.empty(L, m, d, dtype=grads.dtype, device=grads.device)
    buf[:, :, :d].copy_(grads)
    return buf


def launch_gfim(
    acc: torch.Tensor,
    grads: torch.Tensor,
    cfg: GfimConfig,
    *,
    input_precision: str = "ieee",
    pipelined: bool | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """One launch of ``gfim_kernel`` over all layers: acc [L, d, d] (fp32/fp64, contiguous) += gᵀg.

    grads: [L, m, d] float16/bfloat16/float32/float64 with any strides (no copy is made).
    ``input_precision="tf32"`` lets float32 operands use TF32 tensor cores (≈1e-3 relative error).
    ``pipelined`` (default: on CUDA for fp16/bf16 grads) first copies grads that lack the
    vectorisable layout (see the module docstring) into one that has it; the interpreter can be made
    to run that path too, for its numerics.  ``tma=True`` runs fp16/bf16 grads into a float32 acc
    through ``gfim_tma_kernel`` (tiles fetched by the sm_90 tensor-memory accelerator; other dtypes
    ignore it, and so does a GPU below sm_90).  It is opt-in until the GPU check (bench/gpu.py) has timed it against the cp.async path.
    """
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
    L, m, d = grads.shape
    if L == 0 or m == 0 or d == 0:
        return acc
    interpret = acc.device.type == "cpu"
    if pipelined is None:
        pipelined = not interpret and grads.dtype in LOW_PRECISION
    if pipelined and not is_pipelinable(grads):
        grads = pipelinable_copy(grads)
    if tma and grads.dtype in LOW_PRECISION and acc.dtype == torch.float32 and tma_supported(acc.device):
        if not is_pipelinable(grads):
            grads = pipelinable_copy(grads)
        return _launch_tma(acc, grads, d, cfg, interpret)
    d_load = grads.shape[2]
    cast = cast_to_acc(grads.dtype, acc.dtype, interpret)
    operand_dtype = acc.dtype if cast else grads.dtype
    # TF32 is a float32-operand mode only; every other operand dtype has one exact path.
    precision = input_precision if operand_dtype == torch.float32 else "ieee"
    grid = (num_tile_pairs(d, cfg.block_d), L)
    gfim_kernel[grid](
        acc,
        grads,
        d,
        d_load,
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


def tma_supported(device: torch.device) -> bool:
    """The TMA kernel runs in the interpreter and on sm_90+ (below, Triton would lower it to scalar loads)."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_block(cfg: GfimConfig) -> list[int]:
    """Block shape of gfim_tma_kernel's descriptor: one layer's [BLOCK_K, BLOCK_D] tile."""
    return [1, cfg.block_k, cfg.block_d]


def _launch_tma(acc: torch.Tensor, grads: torch.Tensor, d: int, cfg: GfimConfig, interpret: bool) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    L, m, _ = grads.shape
    # Shape [L, m, d] over a buffer whose rows may be padded past d: the hardware zero-fills every
    # element outside it, the padding columns included.
    desc = TensorDescriptor(grads, [L, m, d], list(grads.stride()), tma_block(cfg))
    grid = (num_tile_pairs(d, cfg.block_d), L)
    gfim_tma_kernel[grid](
        acc,
        desc,
        d,
        m,
        BLOCK_D=cfg.block_d,
        BLOCK_K=cfg.block_k,
        CAST_TO_ACC=cast_to_acc(grads.dtype, acc.dtype, interpret),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=True,
    )
    return acc
