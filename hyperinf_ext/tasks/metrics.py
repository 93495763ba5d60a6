"""Ranking metrics for influence scores: ROC-AUC and detection curves.

Convention: a HIGHER score means "more suspicious" (ranked earlier).  ``positives`` marks the
examples one wants to find (e.g. the flipped labels).  Ties are handled by their expected value
under a uniformly random order of the tied examples, so a constant score gives exactly the random
baseline (AUC 0.5, the diagonal detection curve) whatever the input order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["roc_auc", "detection_curve", "found_at"]

ArrayLike = Sequence[float] | np.ndarray


def _check(scores: ArrayLike, positives: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
    p = np.asarray(_to_numpy(positives)).reshape(-1).astype(bool)
    if s.shape != p.shape:
        raise ValueError(f"scores and positives differ in length ({s.size} vs {p.size})")
    if s.size == 0:
        raise ValueError("scores: empty")
    if not np.isfinite(s).all():
        raise ValueError("scores: contain NaN or infinite values")
    return s, p


def _to_numpy(x):
    # torch tensors convert through .numpy(); avoids importing torch here
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks in ascending order, tied values sharing the mean of their ranks."""
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # group boundaries of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` separating ``positives`` from the rest.

    Equals P(score of a random positive > score of a random negative) + ½·P(tie) (the
    Mann–Whitney U statistic over n_pos·n_neg), computed from average ranks in O(n log n).

    Raises:
        ValueError: lengths differ, non-finite scores, or no positives / no negatives.
    """
    s, p = _check(scores, positives)
    n_pos = int(p.sum())
    n_neg = p.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes (got {n_pos} positives, {n_neg} negatives)")
    ranks = _average_ranks(s)
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection_curve(scores: ArrayLike, positives: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of positives found against the fraction of examples inspected, highest scores first.

    Returns ``(fraction_inspected, fraction_found)``, both of length n + 1, starting at (0, 0) and
    ending at (1, 1); ``fraction_found`` is non-decreasing.  Within a group of tied scores the
    found count grows linearly (its expectation under a random order of the group).

    Raises:
        ValueError: lengths differ, non-finite scores, or no positives.
    """
    s, p = _check(scores, positives)
    n = s.size
    n_pos = int(p.sum())
    if n_pos == 0:
        raise ValueError("detection_curve: no positives to find")
    order = np.argsort(-s, kind="stable")
    sorted_s = s[order]
    cum = np.r_[0, np.cumsum(p[order])].astype(np.float64)  # cum[k] = found in the first k
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], n]
    found = cum.copy()
    for a, b in zip(starts, ends):
        if b - a > 1:
            k = np.arange(a + 1, b + 1)
            found[a + 1 : b + 1] = cum[a] + (cum[b] - cum[a]) * (k - a) / (b - a)
    x = np.arange(n + 1, dtype=np.float64) / n
    return x, found / n_pos


def found_at(scores: ArrayLike, positives: ArrayLike, fraction: float) -> float:
    """Fraction of positives among the top ``round(fraction·n)`` examples by score.

    Raises:
        ValueError: ``fraction`` outside [0, 1], or as :func:`detection_curve`.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"found_at: fraction must be in [0, 1], got {fraction}")
    x, y = detection_curve(scores, positives)
    k = int(round(fraction * (x.size - 1)))
    return float(y[k])
