"""Damping rules: how λ_l is chosen for each layer from its fitted GFIM.

The GFIM is normalised one way everywhere: G = (1/n)·Σ_i g_iᵀg_i, with NO 1/r factor (the paper's
text has one, its code does not; ours follows the code).  Rules, for G of shape d×d and rank r:

* a float            λ = that value for every layer.
* ``"datainf"``       λ = scale·trace(G)/(r·d) = scale·mean_i(mean(g_i²))  (Kwon et al.; scale 0.1).
* ``"spectral"``      λ = scale·trace(G)/d = scale × the mean eigenvalue of G (as EK-FAC libraries do);
                      r times the DataInf value, so independent of how the rank splits the gradient.
* ``"paper"``         the HyperINF paper's code: the DataInf value plus an absolute 1e-3 added inside
                      its Schulz routine.
* ``"auto"``          the method's own default, its ``damping_default`` (``curvature.methods.METHOD_DEFAULTS``
                      lists them): for ``hyperinf``, ``exact`` and ``kronecker`` the rule chosen from LDS
                      (bench/LDS.md) and detection AUC (bench/QUALITY.md); ``paper`` uses "paper"; every
                      other method the DataInf rule of its own paper.

:func:`damp_layers` is the one place that sets every layer's λ from a rule.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..ops import datainf_damping

DAMPING_RULES = ("datainf", "spectral", "paper", "auto")
PAPER_ABSOLUTE = 1e-3
DEFAULT_SCALE = 0.1


def resolve_rule(default: tuple[str, float] | None, rule: float | str, scale: float | None) -> tuple[float | str, float]:
    """The concrete (rule, scale): "auto" becomes ``default`` (a method's ``damping_default``; None = the
    DataInf rule), and a missing scale the rule's default."""
    rule = check_rule(rule)
    if rule == "auto":
        rule, default_scale = default if default is not None else ("datainf", DEFAULT_SCALE)
        return rule, default_scale if scale is None else float(scale)
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
        raise ValueError("damping: resolve 'auto' for a method first (curvature.methods.resolve)")
    if isinstance(rule, float):
        return rule
    if rule == "spectral":
        return datainf_damping(G, 1, scale)  # scale·trace(G)/d
    lam = datainf_damping(G, rank, scale)
    return lam + PAPER_ABSOLUTE if rule == "paper" else lam


def damp_layers(factors: Mapping[str, Any], rule: float | str, scale: float = DEFAULT_SCALE) -> None:
    """Set every layer's ``damping`` from ``rule`` (resolved: no "auto") on its normalised GFIM.

    ``factors``: {layer: ``base.LayerFactor``} (anything with ``gfim``, ``gfim_sum``, ``rank``, ``damping``).

    A layer whose gradients are all zero (e.g. lora_A while lora_B is still 0) adds nothing to any score;
    where the rule gives it λ = 0, it gets λ = 1 so that its (zero) solve stays well posed.
    """
    for f in factors.values():
        f.damping = layer_damping(rule, f.gfim, f.rank, scale)
        if f.damping == 0.0 and not bool(f.gfim_sum.any()):
            f.damping = 1.0
