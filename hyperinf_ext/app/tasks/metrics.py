"""Ranking metrics for influence scores: ROC-AUC, detection curves, Spearman, LDS and bootstrap intervals.

Convention: a HIGHER score means "more suspicious" (ranked earlier).  ``positives`` marks the
examples one wants to find (e.g. the flipped labels).  Ties are handled by their expected value
under a uniformly random order of the tied examples, so a constant score gives exactly the random
baseline (AUC 0.5, the diagonal detection curve) whatever the input order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["roc_auc", "detection_curve", "found_at", "spearman", "column_spearman", "lds_per_query", "lds",
           "bootstrap_ci", "lds_interval", "rank_average"]

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


def rank_average(*signals: ArrayLike) -> np.ndarray:
    """The mean of the signals' ranks, each scaled to (0, 1] (ties share their mean rank): one score per
    example that weighs the signals alike whatever their units, e.g. validation influence and
    self-influence.  float64 [n]; ValueError on differing lengths, no signal or non-finite values."""
    if not signals:
        raise ValueError("rank_average: no signal")
    arrays = [np.asarray(_to_numpy(x), dtype=np.float64).reshape(-1) for x in signals]
    if len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
        raise ValueError(f"rank_average: signals differ in length or are empty ({[a.size for a in arrays]})")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("rank_average: a signal contains NaN or infinite values")
    n = arrays[0].size
    return np.mean([_average_ranks(a) / n for a in arrays], axis=0)


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


# ------------------------------------------------------------------------------ rank correlation and LDS


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation of ``x`` and ``y`` (Pearson correlation of their average ranks).

    Ties share the mean of their ranks (as scipy.stats.spearmanr).  Returns NaN when either input is
    constant (the correlation is undefined there, not 0).

    Raises:
        ValueError: lengths differ, fewer than 2 values, or non-finite values.
    """
    a = np.asarray(_to_numpy(x), dtype=np.float64).reshape(-1)
    b = np.asarray(_to_numpy(y), dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman: needs two equal-length inputs of >= 2 values, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("spearman: inputs contain NaN or infinite values")
    return _pearson(_average_ranks(a), _average_ranks(b))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _column_ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks down each column of ``a`` [M, Q] (ties share their mean rank).

    rank_i = #{j: a_j < a_i} + (#{j: a_j = a_i} + 1) / 2, computed for all columns at once in O(M²·Q):
    the LDS has few subsets (M ~ 32–256) and many queries, and the bootstrap calls this thousands of times.
    """
    less = (a[None, :, :] < a[:, None, :]).sum(axis=1)
    equal = (a[None, :, :] == a[:, None, :]).sum(axis=1)
    return less + (equal + 1) / 2.0


def column_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of every column pair of ``x`` and ``y`` [M, Q] → [Q] (NaN where a column is constant)."""
    rx, ry = _column_ranks(x), _column_ranks(y)
    rx = rx - rx.mean(axis=0)
    ry = ry - ry.mean(axis=0)
    den = np.sqrt((rx * rx).sum(axis=0) * (ry * ry).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)


def _check_lds(predicted: ArrayLike, measured: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(_to_numpy(predicted), dtype=np.float64)
    m = np.asarray(_to_numpy(measured), dtype=np.float64)
    if p.ndim != 2 or p.shape != m.shape or p.shape[0] < 2:
        raise ValueError(f"lds: predicted and measured must both be [subsets >= 2, queries], got "
                         f"{p.shape} and {m.shape}")
    if not (np.isfinite(p).all() and np.isfinite(m).all()):
        raise ValueError("lds: inputs contain NaN or infinite values")
    return p, m


def lds_per_query(predicted: ArrayLike, measured: ArrayLike) -> np.ndarray:
    """Linear datamodeling score of each query: Spearman across subsets of predicted vs measured loss.

    ``predicted[s, q]`` = the sum of the scores of subset s's members on query q (the linear datamodel);
    ``measured[s, q]`` = the loss on query q of the model trained on subset s.  Both [M, Q]; returns [Q]
    (NaN for a query whose predicted or measured losses are all equal).
    """
    p, m = _check_lds(predicted, measured)
    return column_spearman(p, m)


def lds(predicted: ArrayLike, measured: ArrayLike) -> float:
    """LDS averaged over the queries that have one (NaN when none has)."""
    per = lds_per_query(predicted, measured)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


def bootstrap_ci(
    statistic: Callable[..., float],
    sizes: Sequence[int],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*indices)``.

    Each resample draws, for every axis k, ``sizes[k]`` indices uniformly with replacement from
    ``range(sizes[k])`` (axes independently: e.g. subsets and queries), and evaluates
    ``statistic(idx_0, idx_1, ...)``.  Returns the (1−level)/2 and (1+level)/2 quantiles of the finite
    values (NaN, NaN when none is finite).  Deterministic for a given ``seed``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if n_boot < 1 or any(int(n) < 1 for n in sizes):
        raise ValueError(f"bootstrap_ci: needs n_boot >= 1 and sizes >= 1, got {n_boot}, {list(sizes)}")
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        values[b] = statistic(*(rng.integers(0, int(n), size=int(n)) for n in sizes))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def lds_interval(
    predicted: ArrayLike, measured: ArrayLike, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of :func:`lds`, resampling subsets and queries (both are samples)."""
    p, m = _check_lds(predicted, measured)
    return bootstrap_ci(lambda s, q: lds(p[np.ix_(s, q)], m[np.ix_(s, q)]), p.shape,
                        n_boot=n_boot, level=level, seed=seed)
