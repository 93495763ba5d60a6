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
only; "symmetric" makes every self score 1, so such a variant has no self signal of its own).  A variant
without a self signal of its own (mixed-only and "symmetric" ones) takes its damping's, plain hyperinf at
the same damping, for the combined signal (amendment 4 of bench/defaults_rule.py).
The variants above are measured at spectral × 1 (the damping they would join as default).  ``DAMPED`` adds
two at spectral × 0.1 (amendment 3 of bench/defaults_rule.py, rule 1d): with the query set mixed in, the
damping is relative to the MIXED matrix, whose mean eigenvalue the query part dominates at w = 99, so × 1
damps the training curvature far more than it does unmixed (an offline ablation on the LLM's detection
configurations 1 and 6 ranked flipped rows higher at × 0.1).  Their labels name the damping:
"hyperinf, spectral 0.1, mixed 99".
"""
from __future__ import annotations

from typing import Any, Callable

SELF = "self: "  # the label prefix of a self-influence signal in the detection records
COMBINED = "combined: "  # ... of the combined signal (validation and self ranks averaged)

VARIANTS: dict[str, dict[str, Any]] = {
    "mixed 1": {"mix_queries": 1.0},
    "mixed 99": {"mix_queries": 99.0},
    "unit": {"normalize": "unit"},
    "symmetric": {"normalize": "symmetric"},
    "mixed 99, symmetric": {"mix_queries": 99.0, "normalize": "symmetric"},
}


# (variant name, spectral damping scale) of the variants measured at a damping other than the default's
DAMPED: list[tuple[str, float]] = [("mixed 99", 0.1), ("mixed 99, symmetric", 0.1)]


def base_label(scale: float = 1.0) -> str:
    """The label of plain hyperinf at spectral × ``scale`` (the LDS and detection studies' name for it)."""
    return f"hyperinf, spectral {scale:g}"


def label(name: str, scale: float = 1.0) -> str:
    """The candidate label of variant ``name`` at spectral × ``scale`` (e.g. "hyperinf, spectral 1, mixed 99")."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} (known: {list(VARIANTS)})")
    return f"{base_label(scale)}, {name}"


LABELS = [label(n) for n in VARIANTS]  # at the default's damping (spectral × 1)
DAMPED_LABELS = [label(n, s) for n, s in DAMPED]
OPTIONS: dict[str, dict[str, Any]] = {label(n): dict(o) for n, o in VARIANTS.items()}
OPTIONS.update({label(n, s): dict(VARIANTS[n]) for n, s in DAMPED})
SCALES: dict[str, float] = {label(n): 1.0 for n in VARIANTS}
SCALES.update({label(n, s): s for n, s in DAMPED})
"""The spectral damping scale of every variant label (OPTIONS' keys)."""


def self_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """The options of ``self_scores`` for a variant's self-influence signal; None when it has none."""
    if options.get("normalize") == "symmetric":
        return None
    return {k: v for k, v in options.items() if k == "normalize"}


def self_source(label: str, have: set[str], prefix: str = "self: ") -> str | None:
    """The self-influence entry that goes with candidate ``label``'s validation signal (for the combined
    signal): its own when scored (in ``have``); for a variant without one of its own (mixed-only or
    "symmetric"; amendment 4) its damping's, plain hyperinf at the variant's damping; None when that is not
    in ``have`` either (a "unit" variant whose own self signal is missing gets none)."""
    if prefix + label in have:
        return prefix + label
    if label in OPTIONS and not self_options(OPTIONS[label]) and prefix + base_label(SCALES[label]) in have:
        return prefix + base_label(SCALES[label])
    return None


def signal_jobs(attr: Any, queries: Any, label: str, options: dict[str, Any]) -> list[tuple[str, Callable]]:
    """(record key, call) of a candidate's validation signal (``mean_scores`` with its options) and, where it
    has one of its own (plain settings and "unit"), its self-influence signal; ``attr`` already switched to
    the candidate's method and damping."""
    jobs: list[tuple[str, Callable]] = [(label, lambda: attr.mean_scores(queries, **options))]
    own = self_options(options)
    if own is not None and (not options or "normalize" in options):
        jobs.append((SELF + label, lambda: attr.self_scores(**own)))
    return jobs


def combined_signals(raw: dict[str, Any]) -> dict[str, Any]:
    """{"combined: " + label: the ranks of its validation signal and its self signal averaged} for every
    validation signal in ``raw`` ({record key: scores [n]}) whose self signal is there too."""
    from hyperinf_ext.app.tasks.metrics import rank_average

    out = {}
    for label in [l for l in raw if not l.startswith(SELF)]:
        src = self_source(label, set(raw), SELF)
        if src is not None:
            out[COMBINED + label] = rank_average(raw[label], raw[src])
    return out


def detection_metrics(scores: Any, flipped: Any, seconds: float) -> dict[str, float]:
    """ROC-AUC of ``flipped`` [n] bool under ``scores`` [n] and the share of flipped rows in the top 10%/20%;
    ArithmeticError unless there are n finite scores."""
    import numpy as np

    from hyperinf_ext.app.tasks.metrics import found_at, roc_auc

    s = np.asarray(scores.detach().cpu().double() if hasattr(scores, "detach") else scores, dtype=np.float64)
    s = s.reshape(-1)
    if s.shape[0] != len(flipped) or not np.isfinite(s).all():
        raise ArithmeticError(f"scores: expected {len(flipped)} finite values, got shape {s.shape}")
    return {"auc": roc_auc(s, flipped), "top10": found_at(s, flipped, 0.1), "top20": found_at(s, flipped, 0.2),
            "seconds": seconds}
