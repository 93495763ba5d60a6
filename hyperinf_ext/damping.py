"""Damping rules: how λ_l is chosen for each layer from its fitted GFIM.

The GFIM is normalised one way everywhere: G = (1/n)·Σ_i g_iᵀg_i, with NO 1/r factor (the paper's
text has one, its code does not; ours follows the code).  Rules, for G of shape d×d and rank r:

* a float            λ = that value for every layer.
* ``"datainf"``       λ = scale·trace(G)/(r·d) = scale·mean_i(mean(g_i²))  (Kwon et al.; scale 0.1).
* ``"spectral"``      λ = scale·trace(G)/d = scale × the mean eigenvalue of G (as EK-FAC libraries do);
                      r times the DataInf value, so independent of how the rank splits the gradient.
* ``"paper"``         the HyperINF paper's code: the DataInf value plus an absolute 1e-3 added inside
                      its Schulz routine.
* ``"auto"``          the method's default (METHOD_DEFAULTS): for ``hyperinf`` and ``kronecker`` the
                      rule chosen from LDS (bench/LDS.md) and detection AUC (bench/QUALITY.md), and
                      ``exact`` (the same estimator as hyperinf) the same; ``paper`` uses "paper"; every other method the
                      DataInf rule of its own paper.
"""
from __future__ import annotations

import math

import torch

from .ops import datainf_damping

DAMPING_RULES = ("datainf", "spectral", "paper", "auto")
PAPER_ABSOLUTE = 1e-3
DEFAULT_SCALE = 0.1
# (rule, scale) used when damping="auto".  hyperinf's: the scale-free rule with the best LDS
# (bench/LDS.md, 2 seeds) and detection AUC (bench/QUALITY.md, 8 models) together; the rule that
# combines them is bench/lds_report.damping_choice.  Spectral ×1 over ×3: LDS 0.455 vs 0.425, AUC 0.717
# vs 0.723.
METHOD_DEFAULTS: dict[str, tuple[str, float]] = {
    "hyperinf": ("spectral", 1.0),
    # exact is hyperinf's estimator solved by Cholesky (its reference): at hyperinf's damping, so the two
    # agree at their defaults instead of reading as if the exact inverse ranked worse (issue #16)
    "exact": ("spectral", 1.0),
    "kronecker": ("spectral", 1.0),
    "paper": ("paper", DEFAULT_SCALE),
}


def resolve(method: str, rule: float | str, scale: float | None) -> tuple[float | str, float]:
    """The concrete (rule, scale) for ``method``: expands "auto" and a missing scale."""
    rule = check_rule(rule)
    if rule == "auto":
        rule, default = METHOD_DEFAULTS.get(method, ("datainf", DEFAULT_SCALE))
        return rule, default if scale is None else float(scale)
    return rule, DEFAULT_SCALE if scale is None else float(scale)


def check_rule(rule: float | str) -> float | str:
    """Validate a damping rule; returns it unchanged (floats as float)."""
    if isinstance(rule, bool):
        raise ValueError(f"damping: expected a float or one of {DAMPING_RULES}, got {rule!r}")
    if isinstance(rule, (int, float)):
        if not math.isfinite(rule) or rule < 0:
            raise ValueError(f"damping: must be finite and non-negative, got {rule!r}")
        return float(rule)
    if rule not in DAMPING_RULES:
        raise ValueError(f"damping: unknown rule {rule!r}; expected a float or one of {DAMPING_RULES}")
    return rule


def layer_damping(rule: float | str, G: torch.Tensor, rank: int, scale: float = DEFAULT_SCALE) -> float:
    """λ for one layer.  G: [d, d] the normalised GFIM (1/n)·Σ g_iᵀg_i; rank: r of the gradient."""
    rule = check_rule(rule)
    if rule == "auto":
        raise ValueError("damping: resolve 'auto' for a method first (damping.resolve)")
    if isinstance(rule, float):
        return rule
    if rule == "spectral":
        return datainf_damping(G, 1, scale)  # scale·trace(G)/d
    lam = datainf_damping(G, rank, scale)
    return lam + PAPER_ABSOLUTE if rule == "paper" else lam
