"""``datainf``: Kwon et al.'s closed form for the flattened per-layer Fisher (1/n)Σ vec(g_i)vec(g_i)ᵀ + λI:
q̃ = (1/λ)·(q − (1/n)·Σ_i ⟨q, g_i⟩/(λ + ‖g_i‖²)·g_i)."""
from __future__ import annotations

import torch

from ... import solvers
from ..base import Method, flat


class DataInf(Method):
    """Kwon et al. (2024): Sherman–Morrison per sample on the flattened per-layer Fisher, averaged."""

    name = "datainf"
    needs_train_pass = True

    def prepare(self, factors):
        # (F + λI)⁻¹ ≈ (1/n)Σ_i (I − g_i g_iᵀ/(λ + ‖g_i‖²))/λ has no finite limit as λ → 0 (the
        # component of v outside the gradients' span is divided by λ), so λ = 0 has no answer.
        zero = [n for n, f in factors.items() if not f.damping > 0]
        if zero:
            raise ValueError(
                f"damping: DataInf's closed form needs λ > 0, got {factors[zero[0]].damping} for "
                f"{len(zero)} layer(s) (e.g. {zero[0]}); use a positive damping or damping_scale"
            )

    def precondition(self, q, factors, train_batches):
        qf = {n: flat(v).to(torch.float64) for n, v in q.items()}  # [Q, r·d]
        batches = ({n: flat(grads[n]).to(torch.float64) for n in qf} for grads in train_batches())
        out = solvers.datainf(qf, batches, {n: factors[n].damping for n in qf}, {n: factors[n].count for n in qf})
        return {n: out[n].reshape(q[n].shape) for n in q}
