"""The query set's curvature mixed into the fitted GFIM (TrackStar's idea, in HyperINF's d×d form).

Per layer, with n training and m query examples and a weight w ≥ 0:

    G_mix = (1/n)·Σ_i g_iᵀg_i + w·(1/m)·Σ_j q_jᵀq_j          (d×d; the r×r side factor likewise)

then damped by the configured rule **on G_mix** (the rule is relative to the matrix that is inverted, so
a "spectral" λ stays 1 × G_mix's mean eigenvalue whatever w is) and inverted by the method's own solver.
w = 0 gives G exactly (and so the plain method).  TrackStar (Chang et al., 2024) and bergson mix
c·H_query + (1 − c)·H_train with c = 0.99 by default; at a damping relative to the matrix that is
w = c/(1 − c) = 99 here, up to an overall scale that rescales every score alike.

What mixes: a method whose curvature is built from the fitted statistics alone (it has a curvature and
does not stream the training gradients while preconditioning: ``hyperinf``, ``exact``, ``paper``,
``kronecker``); ``datainf``/``lissa`` (their Fisher is the training gradients themselves) and ``tracin``
(no curvature) are refused with a ValueError naming ``mix_queries``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from .. import ops
from .base import LayerFactor, Method

OPTION = "mix_queries"


def check_weight(weight: object) -> float:
    """The mixing weight as a float; ValueError naming ``mix_queries`` unless finite and ≥ 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{OPTION}: expected a finite weight ≥ 0 (0 = no mixing), got {weight!r}")
    return float(weight)


def can_mix(method: type[Method] | Method) -> bool:
    """Whether ``method``'s curvature comes from the fitted statistics alone (so a query GFIM can join them)."""
    return method.damping_default is not None and not method.needs_train_pass


def check_method(method: type[Method] | Method) -> None:
    if not can_mix(method):
        why = ("has no curvature" if method.damping_default is None
               else "builds its curvature from the training gradients while preconditioning")
        raise ValueError(f"{OPTION}: method {method.name!r} {why}; mixing the query curvature needs a method "
                         "whose curvature is the fitted GFIM (hyperinf, exact, paper, kronecker)")


@dataclass
class QueryMoments:
    """Σ_j q_jᵀq_j [d, d] and Σ_j q_j·q_jᵀ [r, r] per layer over the m query examples, on the CPU in ``dtype``."""

    dtype: torch.dtype
    gfim_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, grads: Mapping[str, torch.Tensor]) -> "QueryMoments":
        """Add one batch {layer: [B, r, d]} (rank-first, as the scoring computes them); returns self."""
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise ValueError(f"{OPTION}: the query layers hold different numbers of examples {sorted(sizes)}")
        for n, g in grads.items():
            g = g.to(self.dtype)
            acc = torch.zeros(g.shape[-1], g.shape[-1], dtype=self.dtype, device=g.device)
            ops.gfim_accumulate_(acc, g)  # refuses NaN/Inf (the scoring's own checks come first)
            racc = torch.zeros(1, g.shape[-2], g.shape[-2], dtype=self.dtype, device=g.device)
            ops.rank_gram_accumulate_(racc, g.unsqueeze(0))
            self.gfim_sum[n] = self.gfim_sum[n] + acc.cpu() if n in self.gfim_sum else acc.cpu()
            self.rank_sum[n] = self.rank_sum[n] + racc[0].cpu() if n in self.rank_sum else racc[0].cpu()
        self.count += sizes.pop()
        return self

    def same_as(self, other: "QueryMoments | None") -> bool:
        """Bitwise the same sums (the cache test: the inverse of equal moments is the same)."""
        return (other is not None and other.count == self.count and other.dtype == self.dtype
                and set(other.gfim_sum) == set(self.gfim_sum)
                and all(torch.equal(other.gfim_sum[n], t) for n, t in self.gfim_sum.items())
                and all(torch.equal(other.rank_sum[n], t) for n, t in self.rank_sum.items()))


def mixed_factors(factors: Mapping[str, LayerFactor], moments: QueryMoments, weight: float) -> dict[str, LayerFactor]:
    """New factors whose ``gfim`` is G + w·(1/m)·Σ q_jᵀq_j (and ``rank_sum``/n likewise); damping not yet set.

    The fitted factors are not touched.  The sums keep the training count n, so ``f.gfim`` is the mixed
    matrix exactly; a layer missing from ``moments`` raises ValueError naming it."""
    weight = check_weight(weight)
    if moments.count == 0:
        raise ValueError(f"{OPTION}: the query set has no examples")
    out = {}
    for name, f in factors.items():
        if name not in moments.gfim_sum:
            raise ValueError(f"{OPTION}: no query gradients for layer {name!r}")
        k = weight * max(f.count, 1) / moments.count
        Q = moments.gfim_sum[name].to(f.gfim_sum)
        G_sum = f.gfim_sum + k * Q if weight else f.gfim_sum.clone()
        R_sum = f.rank_sum
        if R_sum is not None:
            R_sum = R_sum + k * moments.rank_sum[name].to(R_sum) if weight else R_sum.clone()
        out[name] = replace(f, gfim_sum=G_sum, rank_sum=R_sum, damping=0.0)
    return out
