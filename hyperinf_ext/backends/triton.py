"""The "triton" backend: host drivers of the Triton kernels (``kernels/``, installed as ``hyperinf_ext.kernels``).

Tensors on CUDA run the compiled kernels; CPU tensors run through the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), with smaller tiles.  The kernels know nothing
of the package: the Schulz decisions are taken here, by ``reference.SchulzSchedule``.
"""
from __future__ import annotations

import torch

from ..kernels import gfim as _gfim
from ..kernels import project as _project
from ..kernels import schulz as _schulz
from .schulz_driver import SchulzDriver
from .torch import pow2_scale

__all__ = ["gfim_accumulate_", "schulz_inverse", "project", "project_quantize"]


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


def project(grads: torch.Tensor, proj: torch.Tensor, *, input_precision: str = "ieee",
            config: _project.ProjectConfig | None = None) -> torch.Tensor:
    """grads [B, r, d] (any float dtype and strides, read in place) · proj [d, k] (float32/float64,
    contiguous) → [B, r, k] in proj's dtype, in one launch; products summed in proj's dtype (fp16/bf16
    grads converted to it in registers).  ``input_precision="tf32"``: TF32 tensor cores for a float32
    proj.  ``config`` overrides the tiles (tests, benchmarks)."""
    B, r, _ = grads.shape
    k = proj.shape[1]
    y = torch.empty(B * r, k, dtype=proj.dtype, device=proj.device)
    cfg = config or _project.config(proj.dtype, _interpret(proj.device))
    _project.launch_project(y, grads, proj, None, cfg, input_precision=input_precision)
    return y.view(B, r, k)


def project_quantize(grads: torch.Tensor, proj: torch.Tensor, out_dtype: torch.dtype, top_exponent: int, *,
                     input_precision: str = "ieee", config: _project.ProjectConfig | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, r, k] out_dtype, scale float32 [B]): the projection with its per-example max |y| folded in
    by the GEMM's epilogue, the scale rule of the reference (``pow2_scale``, B numbers), then one
    scale-and-cast launch.  Arguments as in :func:`project`."""
    B, r, _ = grads.shape
    k = proj.shape[1]
    y = torch.empty(B * r, k, dtype=proj.dtype, device=proj.device)
    bits = torch.zeros(B, dtype=_project.AMAX_INT[proj.dtype], device=proj.device)
    interpret = _interpret(proj.device)
    cfg = config or _project.config(proj.dtype, interpret)
    _project.launch_project(y, grads, proj, bits, cfg, input_precision=input_precision)
    scale = pow2_scale(bits.view(proj.dtype), top_exponent)
    # 1/scale in y's dtype is exact (a power of two); non-finite scales (rows ops/ refuses) divide by 1.
    inv = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale)).to(proj.dtype).reciprocal()
    values = torch.empty(B * r, k, dtype=out_dtype, device=proj.device)
    _project.launch_scale_cast(values, y, inv, r, _project.cast_config(interpret))
    return values.view(B, r, k), scale


class _TritonSteps:
    """The two kernel launches of a Schulz step over the whole batch (``schulz_driver.SchulzSteps``).

    Each iteration is two launches (residual + per-tile norms, then update) and one device→host read
    of the per-tile norms.  ``input_precision="tf32x3"`` runs float32 products on TF32 tensor cores
    with error compensation (close to, but not bit-for-bit, fp32 FMA; iteration counts may then differ
    from the reference by rounding ties); float64 ignores it.  ``config`` overrides the tile sizes
    (tests, benchmarks).
    """

    def __init__(self, A: torch.Tensor, *, input_precision: str = "ieee", config: _schulz.SchulzConfig | None = None):
        if input_precision not in _schulz.INPUT_PRECISIONS:
            raise ValueError(f"input_precision: expected one of {_schulz.INPUT_PRECISIONS}, got {input_precision!r}")
        B, d, _ = A.shape
        self.A, self.cfg = A, config or _schulz.config(A.dtype, _interpret(A.device))
        self.precision = input_precision if A.dtype == torch.float32 else "ieee"
        self.partials = torch.empty(B, _schulz.num_tiles(d, self.cfg), dtype=A.dtype, device=A.device)
        self._active, self._n_active = torch.ones(B, dtype=torch.int32, device=A.device), B

    def _active_mask(self, active: list[bool]) -> torch.Tensor:
        # Matrices only ever leave the active set, so its size tells whether the device copy is current.
        if sum(active) != self._n_active:
            self._active, self._n_active = torch.tensor(active, dtype=torch.int32, device=self.A.device), sum(active)
        return self._active

    def residual(self, X: torch.Tensor, R: torch.Tensor, active: list[bool]) -> list[float]:
        _schulz.launch_residual(self.A, X, R, self.partials, self._active_mask(active), self.cfg, self.precision)
        # The one sync of the iteration; tile sums are added in float64.
        return self.partials.double().sum(1).sqrt().cpu().tolist()

    def update(self, X: torch.Tensor, R: torch.Tensor, out: torch.Tensor, coef: list[tuple[float, float]],
               active: list[bool]) -> None:
        c = torch.tensor(coef, dtype=torch.float64, device="cpu").to(device=self.A.device, dtype=self.A.dtype)
        _schulz.launch_update(X, R, out, c, self._active_mask(active), self.cfg, self.precision)


_DOC = """``schulz_inverse(A, lower, upper, tol, max_iter, *, input_precision="ieee", config=None)``.

Scaled Schulz inverse of each SPD matrix of A, step for step as the torch backend's (the same
``schulz_driver`` loop).  A: [B, d, d] float32/float64 contiguous; lower, upper: [B] float64 (CPU)
spectral bounds. Returns (X [B, d, d] A's dtype and device, iterations [B] int64, residual [B]
float64, status [B] int64), the last three on the CPU.  Options: see ``_TritonSteps``.
"""
schulz_inverse = SchulzDriver(_TritonSteps, doc=_DOC)
