"""Per-method scoring of a fitted run: the influence scores of one method/damping and the time its own work took.

The shared fit and the validation gradients are timed apart (``pipeline.fit_and_query``); what is
timed here is only what the method adds: prepare + preconditioning + dot products.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...curvature.methods import Damping, split_damping

__all__ = ["score_method", "self_score_method"]

_SCORING_STAGES = ("prepare", "precondition", "dot")


def score_method(attr: Any, queries: Any, method: str, damping: Damping) -> tuple[np.ndarray, dict[str, float]]:
    """Mean-validation-loss influence of every training example under one method/damping.

    ``queries`` comes from :func:`.pipeline.validation_gradients`.  Returns (scores [n_train] float64, timing)
    where ``timing["seconds"]`` is the method's own work: prepare + preconditioning + dot products
    with the cached training gradients (from ``attr.timings``).
    """
    from ...distributed import is_active

    # under torchrun every rank goes on with the scores
    kw = {"all_ranks": True} if is_active() else {}
    return _timed_scores(attr, method, damping, lambda: attr.mean_scores(queries, **kw))


def _timed_scores(attr: Any, method: str, damping: Damping, compute: Callable[[], Any]) -> tuple[np.ndarray, dict]:
    before = dict(attr.timings)
    rule, scale = split_damping(damping)
    cfg = getattr(attr, "config", None)
    if cfg is None or getattr(attr, "method", None) is None or (cfg.method, cfg.damping, cfg.damping_scale) != (
            method, rule, scale):
        # without an explicit damping_scale, use() resets it to the rule's default; when the attributor
        # is already set up this way (the second signal of a run), use() would redo the same inverses
        attr.use(method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
    scores = compute()
    after = attr.timings
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _SCORING_STAGES}
    timing = {"seconds": sum(delta.values()), **{f"{k}_seconds": v for k, v in delta.items()}}
    return scores.detach().cpu().double().numpy(), timing


def self_score_method(attr: Any, method: str, damping: Damping) -> tuple[np.ndarray, dict[str, float]]:
    """Self-influence ``g_kᵀH⁻¹g_k`` of every training example under one method/damping (``attr.self_scores``).

    Returns (scores [n_train] float64, timing) as :func:`score_method`; high = suspicious.
    """
    from ...distributed import is_active

    kw = {"all_ranks": True} if is_active() else {}
    return _timed_scores(attr, method, damping, lambda: attr.self_scores(**kw))
