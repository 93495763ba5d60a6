"""The per-layer projections of a gradient index: seeded Gaussian matrices on the d side of each layer.

Layer l (in the attributor's layer order) gets P_l [d_l, k_l] float32 with entries N(0, 1/k_l) drawn
from a CPU generator seeded with (seed, l), so ⟨q P, g P⟩ estimates ⟨q, g⟩ without bias; a layer kept
exact (k_l = d_l) gets no matrix and is stored as it is.  The matrices are saved with the index (a torch
release could change the generator's stream), and a resumed build checks it draws the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops, persistence
from .config import IndexConfig


@dataclass(frozen=True)
class LayerPlan:
    """One LoRA layer of the index: its gradient is [r, d]; stored as [r, k] at ``offset`` in a row."""

    name: str
    rank: int
    dim: int
    columns: int
    offset: int

    @property
    def exact(self) -> bool:
        return self.columns == self.dim

    @property
    def width(self) -> int:
        """Numbers this layer adds to a stored row (r·k)."""
        return self.rank * self.columns


def plan_layers(shapes: list[tuple[str, int, int]], config: IndexConfig) -> list[LayerPlan]:
    """Where each layer (name, r, d) goes in a stored row, in the given order."""
    plans, offset = [], 0
    for name, rank, dim in shapes:
        k = config.columns(rank, dim)
        plans.append(LayerPlan(name, rank, dim, k, offset))
        offset += rank * k
    return plans


def draw(plans: list[LayerPlan], seed: int) -> dict[str, torch.Tensor]:
    """P_l [d, k] float32 ~ N(0, 1/k) for every projected layer (exact layers have none)."""
    out = {}
    for position, p in enumerate(plans):
        if p.exact:
            continue
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + position)
        out[p.name] = torch.randn(p.dim, p.columns, generator=gen, dtype=torch.float32) / p.columns ** 0.5
    return out


def save(path: Path, matrices: dict[str, torch.Tensor]) -> None:
    persistence.save_tensors_atomic(path, {f"P.{n}": m.contiguous() for n, m in matrices.items()},
                                    {"kind": "hyperinf-ext/index-projection"})


def load(path: Path, plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """The saved matrices, checked against the layer plan (a ValueError names the file and layer)."""
    tensors, meta = persistence.read_tensors(path, "index projections")
    out = {}
    for p in plans:
        if p.exact:
            continue
        m = tensors.get(f"P.{p.name}")
        if m is None or tuple(m.shape) != (p.dim, p.columns):
            got = None if m is None else tuple(m.shape)
            raise ValueError(f"{path}: projection of layer {p.name} is {got}, expected ({p.dim}, {p.columns}); "
                             "the index is corrupt or was built for another model")
        out[p.name] = m
    return out


ESTIMATORS = ("regression", "unbiased")


def regression_map(P: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """W = G·P·(Pᵀ·G·P)⁺ [d, k] float64: the query-side map of the least-squares estimator.

    Among all z, ``⟨z, g·P⟩`` with z = q̃·W has the least mean squared error against ``⟨q̃, g⟩`` over
    gradients g whose second moment is G (the training gradients' own GFIM, (1/n)·Σ gᵀg), for every query
    q̃: minimising (zPᵀ − q̃)·G·(zPᵀ − q̃)ᵀ gives z = q̃·G·P·(PᵀGP)⁻¹.  Its error is the part of G that
    span(P) misses, (q̃)(G − GP(PᵀGP)⁻¹PᵀG)(q̃)ᵀ, which is small when the gradients concentrate in
    fewer than k directions; the unbiased map P has error ∝ ‖q̃‖²·tr(G)/k whatever the spectrum.
    A rank-deficient PᵀGP (fewer training gradients than k, or a low-rank G) is inverted on its range only.
    """
    P64, G64 = P.to(torch.float64), G.to(torch.float64)
    GP = G64 @ P64
    A = P64.T @ GP
    s, V = torch.linalg.eigh((A + A.T) / 2)
    # G is often rank-deficient (n·r < d, or gradients in few directions): directions of span(P) that G does not
    # reach carry no training gradient, so the minimum-norm least-squares map (pseudo-inverse) is the estimator;
    # eigenvalues below the rounding of A (k·eps·max) count as zero
    keep = s > s.abs().max() * A.shape[0] * torch.finfo(torch.float64).eps
    inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    return GP @ (V * inv) @ V.T


def project_rows(plans: list[LayerPlan], maps: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> torch.Tensor:
    """The stored-row form of preconditioned query gradients: [Q, Σ r·k] in ``dtype`` (float32/64): each
    layer's q̃ [Q, r, d] times its query map [d, k] (P for the unbiased estimator, :func:`regression_map`
    for the least-squares one; none for an exact layer), never quantized."""
    parts = []
    for p in plans:
        g = grads[p.name]
        if p.exact:
            parts.append(g.to(dtype).reshape(g.shape[0], -1))
            continue
        parts.append(ops.project(g, maps[p.name].to(dtype=dtype, device=g.device)).reshape(g.shape[0], -1))
    return torch.cat(parts, dim=1)


def quantize_rows(plans: list[LayerPlan], matrices: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                  store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Training gradients → (values [B, Σ r·k] ``store`` dtype, scales [B, L] float32): layer l of example
    b is ``values[b, seg_l] · scales[b, l]`` up to one rounding to ``store``."""
    values, scales = [], []
    for p in plans:
        g = grads[p.name]
        if p.exact:  # stored whole: no d×d identity and GEMM per batch (equal to projecting with one)
            v, s = ops.quantize(g, out_dtype=store)
        else:
            work = torch.float64 if g.dtype == torch.float64 else torch.float32
            v, s = ops.project_quantize(g, matrices[p.name].to(dtype=work, device=g.device), out_dtype=store)
        values.append(v.reshape(g.shape[0], -1))
        scales.append(s.reshape(-1, 1))
    return torch.cat(values, dim=1), torch.cat(scales, dim=1).to(torch.float32)
