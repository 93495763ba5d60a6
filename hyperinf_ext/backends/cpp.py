"""The "cpp" backend: C++ CPU kernels of the extension ``hyperinf_ext._C`` (``torch.ops.hyperinf.*``).

Loading ``_C`` registers the operator library ``hyperinf`` with its CPU kernels; this module adds
the fake (meta) kernels that let ``torch.compile`` trace the ops, and exposes the two backend
functions of the layouts documented in ``backends/torch.py``.  When ``_C`` was not built this module
still imports, and :func:`is_available` returns False.

Ops (CPU tensors):

* ``torch.ops.hyperinf.gfim_accumulate_(acc, grads) -> None``: acc [L, d, d] float32/float64
  contiguous, grads [L, m, d] float16/bfloat16/float32/float64 with any strides;
  ``acc[l] += grads[l]ᵀ·grads[l]`` accumulated in acc's dtype (exactly symmetric when acc was).
* ``torch.ops.hyperinf.schulz_inverse(A, lower, upper, tol, max_iter) -> (X, iterations, residual, status)``:
  A [B, d, d] float32/float64, lower/upper [B] float64; X like A, iterations/status int64 [B],
  residual float64 [B]; the decisions and status codes of ``reference.SchulzSchedule``.
* ``torch.ops.hyperinf.project(grads, proj) -> y``: grads [B, r, d] any float dtype and strides, proj
  [d, k] float32/float64 → y [B, r, k] in proj's dtype.
* ``torch.ops.hyperinf.project_quantize(grads, proj, out_dtype, top_exponent) -> (values, scale)``: the
  same y as values [B, r, k] out_dtype (float16/bfloat16/float32) times scale float32 [B] (powers of two,
  the rule of ``backends.torch.pow2_scale``).
* ``torch.ops.hyperinf.schulz_step_(X_new, R, A, X, beta) -> float``: one Schulz step on [d, d]
  matrices for benchmarks (eager only): R = I − A·X, X_new = β(2−β)·X + β²·X·R, returns ‖R‖_F.
"""
from __future__ import annotations

import torch

try:
    from .. import _C  # noqa: F401  (loading the shared object registers torch.ops.hyperinf.*)
except (ImportError, OSError):
    _C = None


def is_available() -> bool:
    """True when the extension was built and its ops are registered."""
    return _C is not None


if _C is not None:

    @torch.library.register_fake("hyperinf::gfim_accumulate_")
    def _gfim_accumulate_fake(acc: torch.Tensor, grads: torch.Tensor) -> None:
        torch._check(acc.dim() == 3 and grads.dim() == 3, lambda: "gfim_accumulate_: expected acc [L,d,d], grads [L,m,d]")
        torch._check(grads.shape[0] == acc.shape[0], lambda: "gfim_accumulate_: layer counts differ")
        torch._check(grads.shape[2] == acc.shape[2], lambda: "gfim_accumulate_: d differs")
        return None

    @torch.library.register_fake("hyperinf::schulz_inverse")
    def _schulz_inverse_fake(A: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, tol: float, max_iter: int):
        torch._check(A.dim() == 3, lambda: "schulz_inverse: expected A [B, d, d]")
        B = A.shape[0]
        return (
            A.new_empty(A.shape),
            A.new_empty((B,), dtype=torch.int64),
            A.new_empty((B,), dtype=torch.float64),
            A.new_empty((B,), dtype=torch.int64),
        )


def has_op(name: str) -> bool:
    """Whether the built extension registers ``torch.ops.hyperinf.<name>`` (a stale build may predate it)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.hyperinf, name)
    except (AttributeError, RuntimeError):
        return False
    return True


if has_op("project"):
    # Only when the build has them: an extension built before the projection ops lacks their schemas.

    @torch.library.register_fake("hyperinf::project")
    def _project_fake(grads: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        torch._check(grads.dim() == 3 and proj.dim() == 2, lambda: "project: expected grads [B, r, d], proj [d, k]")
        torch._check(grads.shape[2] == proj.shape[0], lambda: "project: d differs")
        return grads.new_empty((grads.shape[0], grads.shape[1], proj.shape[1]), dtype=proj.dtype)

    @torch.library.register_fake("hyperinf::project_quantize")
    def _project_quantize_fake(grads: torch.Tensor, proj: torch.Tensor, out_dtype: torch.dtype, top_exponent: int):
        torch._check(grads.dim() == 3 and proj.dim() == 2,
                     lambda: "project_quantize: expected grads [B, r, d], proj [d, k]")
        torch._check(grads.shape[2] == proj.shape[0], lambda: "project_quantize: d differs")
        B = grads.shape[0]
        return (grads.new_empty((B, grads.shape[1], proj.shape[1]), dtype=out_dtype),
                grads.new_empty((B,), dtype=torch.float32))


def gfim_accumulate_(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """acc[l] += grads[l]ᵀ·grads[l].  acc: [L, d, d] fp32/fp64 contiguous; grads: [L, m, d]. Returns acc."""
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    return acc


def schulz_inverse(
    A: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled Schulz inverse of each matrix of A [B, d, d] (fp32/fp64); lower/upper: [B] spectral bounds.

    Returns (X [B, d, d] like A, iterations int64 [B], residual float64 [B], status int64 [B]).
    """
    lower = torch.as_tensor(lower, dtype=torch.float64, device="cpu")
    upper = torch.as_tensor(upper, dtype=torch.float64, device="cpu")
    return tuple(torch.ops.hyperinf.schulz_inverse(A.contiguous(), lower, upper, float(tol), int(max_iter)))


def project(grads: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """grads [B, r, d] (any float dtype and strides) · proj [d, k] (float32/float64) → [B, r, k] in proj's dtype."""
    return torch.ops.hyperinf.project(grads, proj)


def project_quantize(grads: torch.Tensor, proj: torch.Tensor, out_dtype: torch.dtype,
                     top_exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, r, k] out_dtype, scale float32 [B]) with grads·proj ≈ values·scale[b] (csrc/project.cpp)."""
    return tuple(torch.ops.hyperinf.project_quantize(grads, proj, out_dtype, int(top_exponent)))
