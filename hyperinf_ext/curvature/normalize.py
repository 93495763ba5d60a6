"""Unit-normalised gradients (cosine influence): the per-example norms the scoring divides by.

A norm is taken over **all layers jointly** (the whole LoRA gradient of an example as one vector), as
TrackStar and bergson normalise the full gradient: per-layer normalisation would give every layer an
equal vote whatever its share of the gradient (a lora_A layer whose gradient is nearly zero would count
as much as the layers that carry the signal) and make the score depend on how the model is cut into
layers.  Modes, for a query gradient q, a training gradient g and the method's preconditioner H⁻¹
(score = −⟨q̃, g̃⟩ with):

* ``"unit"`` (``True``):  q̃ = (q/‖q‖)·H⁻¹, g̃ = g/‖g‖ — both raw gradients unit-normalised before the
  preconditioned dot product, i.e. the plain score / (‖q‖·‖g‖).
* ``"query"``:  q̃ = qH⁻¹/‖qH⁻¹‖, g̃ = g/‖g‖ — the cosine between the preconditioned query and the raw
  training gradient (bergson's order: precondition the query, then unit-normalise both sides).
* ``"symmetric"``:  the cosine in the H⁻¹ inner product, −⟨qH⁻¹, g⟩/(‖q‖_H⁻¹·‖g‖_H⁻¹) with
  ‖x‖²_H⁻¹ = ⟨xH⁻¹, x⟩ — TrackStar's paper form (R^{-1/2} on both sides, then unit norm), computed
  without a matrix square root; the training side costs one preconditioning per training example.

For one query, ``"unit"`` and ``"query"`` differ by a constant factor (same ranking); they differ where
queries are compared or averaged (``mean_scores`` averages the normalised rows).  A zero vector (or a
non-positive H⁻¹-norm) is scaled by 0: its scores are 0.
"""
from __future__ import annotations

from typing import Mapping

import torch

OPTION = "normalize"
MODES = ("unit", "query", "symmetric")


def check_mode(value: object) -> str | None:
    """``False``/``None`` → None (off), ``True`` → "unit", a mode name → itself; ValueError naming ``normalize``."""
    if value is None or value is False:
        return None
    if value is True:
        return "unit"
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(f"{OPTION}: expected False, True (= 'unit') or one of {MODES}, got {value!r}")


def _rows(t: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(n, -1).to(dtype)


def joint_norms(grads: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """‖x_k‖ over all layers jointly, [B] in ``dtype`` (each value [B, ...]).  Each row is scaled by its
    largest entry before squaring: squares of 1e-23 (float32) or 1e-170 (float64) underflow to a norm of 0,
    which scored a non-zero gradient 0."""
    n = next(iter(grads.values())).shape[0]
    rows = [_rows(g, n, dtype) for g in grads.values()]
    peak = torch.stack([r.abs().amax(1) if r.shape[1] else r.new_zeros(n) for r in rows]).amax(0)
    unit = torch.where(peak > 0, peak, torch.ones_like(peak))
    return sum((r / unit[:, None]).pow(2).sum(1) for r in rows).sqrt() * unit


def dual_norms(pre: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """‖x_k‖_H⁻¹ = √⟨x_k·H⁻¹, x_k⟩ over all layers jointly, [B] (``pre`` = the preconditioned ``grads``);
    a non-positive product (an indefinite curvature) gives 0."""
    n = next(iter(grads.values())).shape[0]
    sq = sum((_rows(pre[k], n, dtype) * _rows(g, n, dtype)).sum(1) for k, g in grads.items())
    return sq.clamp_min(0).sqrt()


def reciprocal(norms: torch.Tensor) -> torch.Tensor:
    """1/‖x‖ where ‖x‖ > 0, else 0 (a zero gradient scores 0 instead of NaN)."""
    return torch.where(norms > 0, 1 / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))


def scale_rows(x: Mapping[str, torch.Tensor], factor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each example (row) of every layer times ``factor`` [B]."""
    return {k: v * factor.to(v).reshape(-1, *([1] * (v.dim() - 1))) for k, v in x.items()}
