"""The query-side curvature options of issue #25 item 2, as candidates of every quality study.

Each variant is ``method="hyperinf"`` at the library's default damping (spectral × 1) with the options of
``HyperINF.scores`` / ``mean_scores`` named below (hyperinf_ext/curvature/mixing.py, normalize.py):

* ``mixed 1``  — ``mix_queries=1``: the query set's GFIM joins the training set's with equal weight per example.
* ``mixed 99`` — ``mix_queries=99``: TrackStar's and bergson's mixing coefficient c = 0.99 (c·H_query +
  (1 − c)·H_train), which is w = c/(1 − c) = 99 at a damping relative to the mixed matrix.
* ``unit``     — ``normalize="unit"``: the score divided by ‖q‖·‖g‖ (cosine of the raw gradients, scaled by H⁻¹).
* ``symmetric`` — ``normalize="symmetric"``: the cosine in the H⁻¹ inner product (TrackStar's form).
* ``mixed 99, symmetric`` — both: TrackStar's estimator in HyperINF's d×d form.

Self-influence has no query set: ``self_options`` gives the options a variant keeps there (its ``normalize``
only; "symmetric" makes every self score 1, so such a variant has no self signal of its own).
The variants are measured at spectral × 1 only (the damping they would join as default); their interplay
with other dampings is not measured.
"""
from __future__ import annotations

from typing import Any

BASE_LABEL = "hyperinf, spectral 1"
BASE = ("hyperinf", "spectral", 1.0)  # method, damping rule, scale

VARIANTS: dict[str, dict[str, Any]] = {
    "mixed 1": {"mix_queries": 1.0},
    "mixed 99": {"mix_queries": 99.0},
    "unit": {"normalize": "unit"},
    "symmetric": {"normalize": "symmetric"},
    "mixed 99, symmetric": {"mix_queries": 99.0, "normalize": "symmetric"},
}


def label(name: str) -> str:
    """The candidate label of variant ``name`` (e.g. "hyperinf, spectral 1, mixed 99")."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} (known: {list(VARIANTS)})")
    return f"{BASE_LABEL}, {name}"


LABELS = [label(n) for n in VARIANTS]
OPTIONS: dict[str, dict[str, Any]] = {label(n): dict(o) for n, o in VARIANTS.items()}


def self_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """The options of ``self_scores`` for a variant's self-influence signal; None when it has none."""
    if options.get("normalize") == "symmetric":
        return None
    return {k: v for k, v in options.items() if k == "normalize"}


def self_source(label: str, have: set[str], prefix: str = "self: ") -> str | None:
    """The self-influence entry that goes with candidate ``label``'s validation signal (for the combined
    signal): its own when scored (in ``have``), a mixed-only variant's base, None for "symmetric" ones."""
    if prefix + label in have:
        return prefix + label
    if label in OPTIONS and self_options(OPTIONS[label]) == {} and prefix + BASE_LABEL in have:
        return prefix + BASE_LABEL
    return None
