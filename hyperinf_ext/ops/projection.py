"""Gradient projection ops of the compressed gradient index (issue #28): checks once, then a backend.

* :func:`project` — grads [B, r, d] · proj [d, k] in proj's dtype (the exactly preconditioned query
  gradients are projected with it).
* :func:`project_quantize` — the same product stored as out_dtype values times a power-of-two scale
  per example, so that rows of any magnitude keep out_dtype's full relative precision.
* :func:`quantize` — that storage for rows that are not projected (an index layer kept whole): the
  result of ``project_quantize`` with the identity, without its d×d matrix and GEMM.

Every backend implements the first two (``backends.select(..., op=...)``); ``quantize`` is elementwise
and memory-bound, the torch backend's on every device.  The scale rule is ``backends.torch.pow2_scale``,
with the top exponent per output dtype chosen here.
"""
from __future__ import annotations

import torch

from .. import backends
from .checks import check_tensor

PROJ_DTYPES = (torch.float32, torch.float64)
QUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Per out_dtype, E such that every stored value satisfies |value| < 2^E (the row maximum lands in
# [2^(E−1), 2^E)).
# * float16 (max 65504 < 2^16, smallest normal 2^-14): E = 14 keeps the largest value 4× below the
#   finite limit, so a reader that sums a few stored values or rescales them in float16 cannot
#   overflow, and still leaves 28 normal binades under the row maximum: entries down to 2^-28·max
#   (≈ 3.7e-9 of it) keep float16's full 11-bit precision; smaller ones become subnormal (absolute error
#   ≤ 2^-25·scale), far below what a dot product of the row resolves.
# * bfloat16 and float32 share float32's exponent range (normal 2^-126 … max < 2^128): E = 1 normalises
#   each row to a maximum in [1, 2), the middle of that range (127 binades free on either side),
#   and keeps the scale 2^(e−1) a normal float32 for every finite float32 row (e ≤ 128).
TOP_EXPONENT = {torch.float16: 14, torch.bfloat16: 1, torch.float32: 1}


def _check(grads: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """ValueError naming the argument for anything the ops refuse; returns proj contiguous."""
    check_tensor("grads", grads, (3,))
    if isinstance(proj, torch.Tensor) and proj.device != grads.device:
        raise ValueError(f"proj: on {proj.device} but grads is on {grads.device}")
    check_tensor("proj", proj, (2,), PROJ_DTYPES)
    if grads.shape[-1] != proj.shape[0]:
        raise ValueError(
            f"grads: last dimension d = {grads.shape[-1]} does not match proj's first dimension {proj.shape[0]} "
            "(expected grads [B, r, d] and proj [d, k])"
        )
    return proj.contiguous()


def _nonfinite_message(scale: torch.Tensor) -> str:
    bad = (~torch.isfinite(scale)).nonzero().flatten().tolist()
    nan = [b for b in bad if bool(torch.isnan(scale[b]))]
    if nan:
        return (f"grads: the projection of example {nan[0]} is not finite ({len(nan)} example(s)): the gradients "
                "contain NaN or Inf, or their product with proj overflows proj's dtype")
    return (f"grads: the projection of example {bad[0]} exceeds 2^127·2^E, past the largest float32 scale "
            f"({len(bad)} example(s)); scale the gradients down")


def project(grads: torch.Tensor, proj: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The projected gradients grads @ proj.

    grads: [B, r, d], float16/bfloat16/float32/float64, any strides (read in place where the backend can).
    proj: [d, k], float32 or float64 (a non-contiguous proj is copied once).  Returns [B, r, k] in proj's
    dtype: the grads are converted to it (exactly, except float64 grads into a float32 proj, which are
    rounded) and the d products of each entry summed in it.  ValueError naming the argument for a wrong
    rank, dtype, d or device, and when the result is not finite (NaN/Inf gradients, or an overflow).
    """
    proj = _check(grads, proj)
    _, impl = backends.select(backend, grads.device, op="project")
    y = impl.project(grads, proj)
    if y.numel() and not bool(torch.isfinite(y.sum())) and not bool(torch.isfinite(y).all()):
        # The sum test is the cheap one (a finite sum proves every entry finite); the exact test runs
        # only when the sum is not (which finite entries can also cause, by overflowing the sum).
        raise ValueError("grads: the projection is not finite: the gradients contain NaN or Inf, or their product "
                         "with proj overflows proj's dtype")
    return y


def project_quantize(
    grads: torch.Tensor,
    proj: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float16,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection grads @ proj stored compactly: (values, scale) with grads @ proj ≈ values·scale[b].

    grads: [B, r, d] any float dtype and strides; proj: [d, k] float32/float64 (as :func:`project`, whose
    product in proj's dtype is the y quantised here).  out_dtype: float16 (default), bfloat16 or float32.

    Returns values [B, r, k] out_dtype and scale [B] float32.  Each example b gets the power of two
    scale[b] = 2^(e_b − E) where max |y_b| = m·2^e_b (m in [1/2, 1)) and E = TOP_EXPONENT[out_dtype]
    (14 for float16, 1 for bfloat16/float32; the comment there says why), so every |value| < 2^E and the
    row maximum lies in [2^(E−1), 2^E); an all-zero example gets scale 1 and zeros; scales stay normal
    float32 (at least 2^-126).  values = y_b / scale[b] rounded to nearest: dividing by a power of two
    is exact, so the rounding to out_dtype (half an ulp relative, or half its smallest subnormal times
    the scale) adds the only error to the GEMM's.  Reconstruct with ``values.float() * scale[:, None, None]``.
    ValueError naming the argument for bad input, a non-finite projection, or a projection beyond 2^127·2^E
    (possible with a float64 proj only).
    """
    proj = _check(grads, proj)
    _check_out_dtype(out_dtype)
    _, impl = backends.select(backend, grads.device, op="project_quantize")
    return _checked(*impl.project_quantize(grads, proj, out_dtype, TOP_EXPONENT[out_dtype]))


def quantize(
    grads: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float16,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``project_quantize(grads, I)`` without the identity: (values [B, r, d] out_dtype, scale [B] float32).

    grads: [B, r, d] any float dtype and strides, converted to float64 when float64, else to float32 (as
    the identity's dtype would be), exactly; the scale rule and the rounding are ``project_quantize``'s,
    so the result equals it with ``proj = torch.eye(d)`` of that dtype, value for value (a zero keeps its
    sign here, where the GEMM's sum gives +0).  ValueError for bad input and for NaN/Inf gradients.
    """
    check_tensor("grads", grads, (3,))
    _check_out_dtype(out_dtype)
    _, impl = backends.select(backend, grads.device, op="quantize")
    work = torch.float64 if grads.dtype == torch.float64 else torch.float32
    return _checked(*impl.quantize(grads.to(work), out_dtype, TOP_EXPONENT[out_dtype]))


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in QUANT_DTYPES:
        raise ValueError(f"out_dtype: expected one of {list(QUANT_DTYPES)}, got {out_dtype!r}")


def _checked(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scale.numel() and not bool(torch.isfinite(scale).all()):
        # O(B): the backends mark a non-finite row with a NaN scale and one past float32's scales with inf.
        raise ValueError(_nonfinite_message(scale.cpu()))
    return values, scale
