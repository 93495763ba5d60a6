"""Selection rules (hyperinf_ext.app.tasks.selection_rules) on hand-made inputs: sizes, order, balance, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from hyperinf_ext.app.tasks.selection_rules import (
    RULES,
    class_balanced,
    class_quotas,
    drop_harmful,
    keep_most_helpful,
    query_round_robin,
    random_subset,
    rule_effect,
    select,
)


def test_keep_most_helpful_order_and_ties():
    s = [0.3, -1.0, -0.5, -1.0, 2.0]
    assert keep_most_helpful(s, 3).tolist() == [1, 3, 2]  # tie -1.0: lower index first
    assert keep_most_helpful(s, 5).tolist() == [1, 3, 2, 0, 4]
    for bad in (0, 6):
        with pytest.raises(ValueError, match="k must be"):
            keep_most_helpful(s, bad)


def test_drop_harmful_removes_only_harm_then_draws():
    s = np.array([0.5, -0.1, 0.2, -0.3, 0.0, -0.2, 0.9, -0.4])  # harmful (> 0): 0, 2, 6
    kept = drop_harmful(s, 4, seed=0)
    assert len(kept) == 4 and len(set(kept.tolist())) == 4
    assert not set(kept.tolist()) & {0, 2, 6}
    assert drop_harmful(s, 4, seed=0).tolist() == kept.tolist()  # deterministic for a seed
    draws = {tuple(sorted(drop_harmful(s, 4, seed=k).tolist())) for k in range(20)}
    assert len(draws) > 1  # random among the 5 harmless ones, not the 4 most helpful each time
    # more harmful examples than n − k: drops the n − k most harmful = keeps the rest
    assert sorted(drop_harmful(s, 7, seed=0).tolist()) == [0, 1, 2, 3, 4, 5, 7]
    assert sorted(drop_harmful(s, 2, seed=5).tolist()) != [0, 2]


def test_class_quotas_and_balance():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    assert class_quotas(labels, 5) == {0: 3, 1: 2, 2: 0}  # exact 3, 1.5, 0.5: the tied remainder goes to class 1
    assert class_quotas(labels, 4) == {0: 2, 1: 1, 2: 1}  # exact 2.4, 1.2, 0.4: largest remainder (class 2)
    assert class_quotas(labels, 10) == {0: 6, 1: 3, 2: 1}
    assert sum(class_quotas(labels, 7).values()) == 7
    # scores that favour class 0 entirely: top keeps only class 0, the balanced rule keeps proportions
    s = np.where(labels == 0, -1.0, 1.0) + np.arange(10) * 1e-3
    assert set(labels[keep_most_helpful(s, 5)]) == {0}
    kept = class_balanced(s, labels, 5)
    assert np.bincount(labels[kept], minlength=3).tolist() == [3, 2, 0]
    assert kept.tolist() == [0, 1, 2, 6, 7]  # best within each class, ordered by score
    with pytest.raises(ValueError, match="labels"):
        class_balanced(s, labels[:5], 3)
    # equal remainders go to the class with the more helpful next candidate, not to the first class name:
    # 51 "yes" and 49 one-off answers at k = 20 (remainder 0.2 for each one-off class)
    many = np.array([0] * 51 + list(range(1, 50)))
    score = np.zeros(100)
    score[51:] = np.linspace(1.0, -1.0, 49)  # the later one-off answers are the more helpful
    q = class_quotas(many, 20, score)
    assert q[0] == 10 and sum(q.values()) == 20
    assert sorted(c for c, n in q.items() if c and n) == list(range(40, 50))  # the 10 most helpful one-offs
    assert sorted(c for c, n in class_quotas(many, 20).items() if c and n) == list(range(1, 11))  # no scores: ids
    kept = class_balanced(score, many, 20)
    assert sorted(many[kept][many[kept] > 0].tolist()) == list(range(40, 50))


def test_query_round_robin_takes_turns():
    qs = np.array([
        [-5.0, -4.0, 0.0, 0.0, 1.0],   # query 0 prefers 0, 1, ...
        [-5.0, 0.0, -3.0, -2.0, 1.0],  # query 1 prefers 0, 2, 3, ...
    ])
    assert query_round_robin(qs, 1).tolist() == [0]
    assert query_round_robin(qs, 3).tolist() == [0, 2, 1]  # query 1's first choice is taken: its next
    assert query_round_robin(qs, 5).tolist() == [0, 2, 1, 3, 4]
    # the mean would keep 0 and 1 first; a single dominating query cannot take every slot
    assert select("query-round-robin", 4, query_scores=qs).tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_exact_size_distinct_deterministic(rule):
    rng = np.random.default_rng(0)
    qs = rng.normal(size=(7, 50))
    labels = rng.integers(0, 2, 50)
    for k in (1, 10, 25, 50):
        a = select(rule, k, query_scores=qs, labels=labels, seed=3)
        b = select(rule, k, query_scores=qs, labels=labels, seed=3)
        assert a.tolist() == b.tolist() and len(a) == k and len(set(a.tolist())) == k
        assert a.min() >= 0 and a.max() < 50


def test_select_errors_and_random_subset():
    with pytest.raises(ValueError, match="unknown selection rule"):
        select("best", 3, scores=np.zeros(5))
    with pytest.raises(ValueError, match="per-query"):
        select("query-round-robin", 3, scores=np.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        select("class-balanced", 3, scores=np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        select("top", 3, scores=np.array([0.0, np.nan, 1.0]))
    r = random_subset(10, 4, seed=1)
    assert len(set(r.tolist())) == 4 and r.tolist() == random_subset(10, 4, seed=1).tolist()


def test_rule_effect_says_what_the_rule_did():
    """The sentence the select report shows: counts that follow from the scores, and a plain warning when
    drop-harmful had nothing to drop (its kept rows are then a random draw)."""
    s = np.array([0.5, -0.1, 0.2, -0.3, 0.0, -0.2, 0.9, -0.4])  # harmful (> 0): 0, 2, 6
    assert rule_effect("drop-harmful", s, drop_harmful(s, 4, seed=0)).startswith(
        "dropped 3 of the 3 harmful examples (score > 0), most harmful first, and kept a seeded random 4 of the other 5")
    text = rule_effect("drop-harmful", s, drop_harmful(s, 7, seed=0))
    assert "dropped 1 of the 3 harmful" in text and "2 harmful examples remain among them" in text
    calm = -np.abs(s) - 0.1
    assert rule_effect("drop-harmful", calm, drop_harmful(calm, 4, seed=0)).startswith(
        "no example scored harmful (score > 0), so none was dropped: the 4 kept are a seeded random draw of the 8")
    assert rule_effect("top", s, keep_most_helpful(s, 5)) == RULES["top"]
    assert rule_effect("top", s, keep_most_helpful(s, 7)).endswith("; 2 of the 7 kept scored harmful (score > 0)")
