"""Data-selection rules: influence scores in, indices of the training examples to keep out.

Pure functions (numpy only, no model): each takes the influence of every training example on the
validation loss — ``scores`` [n_train] on the mean validation loss and/or ``query_scores`` [Q, n_train]
per validation example, sign as ``attributor.SIGN_CONVENTION`` (negative = up-weighting the example
LOWERS the loss = helpful) — and a budget ``k``, and returns ``k`` distinct indices, most wanted first.
Ties are broken by index (stable sorts), so a rule is deterministic; the rules that draw at random take
a ``seed``.

Rules (``RULES``; compared against a random subset of the same size by ``python -m bench.selection``):

* ``top``            keep the k most helpful (most negative mean score): select-data's first rule.
* ``drop-harmful``   drop the examples that hurt (mean score > 0), at most n − k of them, most harmful
                     first, then keep a uniformly random k of the rest.  (Dropping the n − k most
                     harmful and keeping the rest would be ``top`` again at a fixed size: this rule only
                     removes harm and otherwise keeps the training distribution.)
* ``class-balanced`` ``top`` within each class, with per-class quotas proportional to the class counts
                     of the full training set (``top`` kept 339 fresh / 161 rotten of 1,000).  The default.
* ``query-round-robin``  as LESS (Xia et al., 2024): every validation query ranks the training set by
                     its own score; queries take turns adding their most helpful example not yet
                     kept until k are kept, so no single query (or the mean) dominates.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["RULES", "DEFAULT_RULE", "select", "random_subset", "keep_most_helpful", "drop_harmful",
           "class_balanced", "query_round_robin", "class_quotas", "rule_effect"]

DEFAULT_RULE = "class-balanced"
"""The rule of ``select-data``: the one that beat a random subset most reliably in bench/SELECTION.md
(6 of 9 seed × fraction pairs, every pair at fractions 0.5 and 0.8; ``top`` 3 of 9: it keeps one class)."""


def _vector(scores: Sequence[float] | np.ndarray, what: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{what}: expected a non-empty vector [n_train], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return s


def _budget(k: int, n: int) -> int:
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"selection: k must be in [1, {n}] (the training set's size), got {k}")
    return k


def random_subset(n: int, k: int, seed: int | Sequence[int]) -> np.ndarray:
    """k distinct indices of range(n), uniformly at random (the baseline every rule is compared with)."""
    k = _budget(k, n)
    return np.random.default_rng(seed).permutation(n)[:k]


def keep_most_helpful(scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    """Rule ``top``: the k most negative scores, most negative first (ties: lower index first)."""
    s = _vector(scores)
    return np.argsort(s, kind="stable")[: _budget(k, s.size)]


def drop_harmful(scores: Sequence[float] | np.ndarray, k: int, seed: int) -> np.ndarray:
    """Rule ``drop-harmful``: drop up to n − k examples with a positive score (most harmful first), then
    keep k of the remaining ones uniformly at random (seeded)."""
    s = _vector(scores)
    n, k = s.size, _budget(k, s.size)
    harmful_first = np.argsort(-s, kind="stable")
    n_drop = min(n - k, int((s > 0).sum()))
    rest = np.sort(harmful_first[n_drop:])  # index order, so the draw depends on the seed only
    return rest[np.random.default_rng(seed).permutation(rest.size)[:k]]


def class_quotas(labels: Sequence[int] | np.ndarray, k: int,
                 scores: Sequence[float] | np.ndarray | None = None) -> dict[int, int]:
    """Per-class budgets summing to k, proportional to the class counts (largest remainder), never above a
    class's count.  Equal remainders go to the class whose next candidate is the more helpful (the lower
    score of its (quota+1)-th best example) when ``scores`` are given, else — and on equal scores — to the
    smaller class id."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    k = _budget(k, y.size)
    classes, counts = np.unique(y, return_counts=True)
    exact = k * counts / y.size
    quota = np.floor(exact).astype(np.int64)
    nxt = np.zeros(classes.size)
    if scores is not None:
        s = _vector(scores)
        for i, c in enumerate(classes):
            member = np.sort(s[y == c])
            nxt[i] = member[quota[i]] if quota[i] < member.size else np.inf
    order = np.lexsort((classes, nxt, -(exact - quota)))  # largest remainder first, then the better candidate
    for i in order[: k - int(quota.sum())]:
        quota[i] += 1
    return {int(c): int(q) for c, q in zip(classes, quota)}


def class_balanced(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Rule ``class-balanced``: ``top`` within each class under :func:`class_quotas`; the result is
    ordered by score (most helpful first)."""
    s = _vector(scores)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels: expected {s.size} labels (one per training example), got {y.size}")
    kept = []
    for c, q in class_quotas(y, k, s).items():
        members = np.flatnonzero(y == c)
        kept.append(members[np.argsort(s[members], kind="stable")[:q]])
    out = np.concatenate(kept)
    return out[np.argsort(s[out], kind="stable")]


def query_round_robin(query_scores: np.ndarray, k: int) -> np.ndarray:
    """Rule ``query-round-robin`` (LESS): queries 0, 1, …, Q−1, 0, 1, … each add their most helpful
    example (most negative score in their row) not kept yet, until k are kept; in the order kept."""
    qs = np.asarray(query_scores, dtype=np.float64)
    if qs.ndim != 2 or qs.size == 0:
        raise ValueError(f"query_scores: expected [n_queries, n_train], got shape {qs.shape}")
    if not np.isfinite(qs).all():
        raise ValueError("query_scores: contains NaN or infinite values")
    n_q, n = qs.shape
    k = _budget(k, n)
    ranked = np.argsort(qs, axis=1, kind="stable")  # each query's preference order
    pos = np.zeros(n_q, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    out: list[int] = []
    while len(out) < k:
        for q in range(n_q):
            while taken[ranked[q, pos[q]]]:  # skip what other queries took; some example is always left
                pos[q] += 1
            i = int(ranked[q, pos[q]])
            taken[i] = True
            out.append(i)
            if len(out) == k:
                break
    return np.asarray(out, dtype=np.int64)


Rule = Callable[..., np.ndarray]
RULES: dict[str, str] = {
    "top": "keep the k most helpful (most negative mean score)",
    "drop-harmful": "drop harmful examples (score > 0, up to n − k), keep a random k of the rest",
    "class-balanced": "most helpful within each class, class proportions of the full set",
    "query-round-robin": "LESS: validation queries take turns keeping their most helpful example",
}


def select(
    rule: str,
    k: int,
    *,
    scores: np.ndarray | None = None,
    query_scores: np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices kept by ``rule`` (a key of ``RULES``); ``scores`` defaults to ``query_scores.mean(0)``.

    Raises:
        ValueError: unknown rule, or an input the rule needs is missing or malformed.
    """
    if rule not in RULES:
        raise ValueError(f"rule: unknown selection rule {rule!r}; expected one of {', '.join(RULES)}")
    if rule == "query-round-robin":
        if query_scores is None:
            raise ValueError("rule query-round-robin: needs the per-query scores [n_queries, n_train]")
        return query_round_robin(query_scores, k)
    if scores is None:
        if query_scores is None:
            raise ValueError(f"rule {rule}: needs scores [n_train] (or query_scores)")
        scores = np.asarray(query_scores, dtype=np.float64).mean(axis=0)
    if rule == "top":
        return keep_most_helpful(scores, k)
    if rule == "drop-harmful":
        return drop_harmful(scores, k, seed)
    if labels is None:
        raise ValueError("rule class-balanced: needs the training labels")
    return class_balanced(scores, labels, k)


def rule_effect(rule: str, scores: Sequence[float] | np.ndarray, chosen: Sequence[int] | np.ndarray) -> str:
    """One sentence on what ``rule`` did with these mean ``scores`` [n_train] (float64; negative = helpful)
    and the kept indices ``chosen``: above all when ``drop-harmful`` found nothing harmful to drop, which
    leaves a plain random draw that a reader of the kept rows would not guess."""
    s = _vector(scores)
    kept = np.asarray(chosen, dtype=np.int64)
    n, k = s.size, kept.size
    n_helpful_kept = int((s[kept] <= 0).sum())
    if rule == "drop-harmful":
        n_pos = int((s > 0).sum())
        n_drop = min(n - k, n_pos)
        if n_pos == 0:
            return (f"no example scored harmful (score > 0), so none was dropped: the {k} kept are a seeded random "
                    f"draw of the {n} (--rule top keeps the most helpful instead)")
        text = (f"dropped {n_drop} of the {n_pos} harmful examples (score > 0), most harmful first, and kept a "
                f"seeded random {k} of the other {n - n_drop}")
        if n_pos > n_drop:
            text += f"; {n_pos - n_drop} harmful examples remain among them (the budget keeps more than the rest)"
        return text
    text = RULES[rule]
    harmful = k - n_helpful_kept
    return text + (f"; {harmful} of the {k} kept scored harmful (score > 0)" if harmful else "")
