"""Spearman, LDS and bootstrap intervals (hyperinf_ext.app.tasks.metrics) against float64 brute force."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hyperinf_ext.app.tasks.metrics import bootstrap_ci, column_spearman, lds, lds_interval, lds_per_query, spearman


def brute_ranks(x: list[float]) -> list[float]:
    """Average 1-based ranks by counting: #smaller + (#equal + 1)/2."""
    return [sum(1 for b in x if b < a) + (sum(1 for b in x if b == a) + 1) / 2 for a in x]


def brute_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = brute_ranks(x), brute_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else float("nan")


@pytest.mark.parametrize("seed", range(8))
def test_spearman_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 30))
    x = rng.integers(0, 3 + seed, n).astype(float)  # few distinct values: many ties
    y = (x + rng.integers(0, 4, n)).astype(float) if seed % 2 else rng.normal(size=n)
    # both compute ρ from (mid)ranks ≤ 30 in float64: O(n) roundings of values ≤ n³, ≤ n·u·|ρ| ≈ 1e-14
    assert spearman(x, y) == pytest.approx(brute_spearman(list(x), list(y)), abs=1e-12)


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 9, 4, 16]) == pytest.approx(0.8)  # one swapped pair: 1 − 6·2/60
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        spearman([1, float("nan")], [1, 2])


def test_column_spearman_and_lds_per_query():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 5, (9, 6)).astype(float)
    m = rng.integers(0, 5, (9, 6)).astype(float)
    m[:, 2] = 1.0  # constant measured loss: undefined for that query
    want = np.array([brute_spearman(list(p[:, q]), list(m[:, q])) for q in range(6)])
    got = lds_per_query(p, m)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.isnan(got[2]) and np.allclose(column_spearman(p, m), got, equal_nan=True)
    assert lds(p, m) == pytest.approx(np.nanmean(want), abs=1e-12)
    with pytest.raises(ValueError):
        lds(p[:1], m[:1])  # one subset: no correlation


def test_bootstrap_ci_matches_enumerated_distribution():
    """Mean of 3 values: the bootstrap distribution is 27 equally likely resamples; its quantiles are exact."""
    x = np.array([0.0, 1.0, 5.0])
    means = sorted(sum(c) / 3 for c in itertools.product(x, repeat=3))
    cdf = {v: sum(m <= v for m in means) / 27 for v in means}

    def exact_quantile(p: float) -> float:
        return min(v for v in means if cdf[v] >= p)

    # level 0.6: the 20% and 80% quantiles sit inside steps of the CDF (not on a step edge), so 20,000
    # resamples land on the same atom
    for p in (0.2, 0.8):
        v = exact_quantile(p)
        below = max([cdf[u] for u in means if u < v], default=0.0)
        assert cdf[v] - p > 0.02 and p - below > 0.02
    lo, hi = bootstrap_ci(lambda i: float(x[i].mean()), [3], n_boot=20000, level=0.6, seed=1)
    assert (lo, hi) == (pytest.approx(exact_quantile(0.2)), pytest.approx(exact_quantile(0.8)))
    assert exact_quantile(0.2) < exact_quantile(0.8)
    assert bootstrap_ci(lambda i: float(x[i].mean()), [3], n_boot=50, seed=3) == \
        bootstrap_ci(lambda i: float(x[i].mean()), [3], n_boot=50, seed=3)


def test_lds_interval_brackets_and_degenerates():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(20, 15))
    meas = pred + rng.normal(size=(20, 15))  # correlated, noisy
    lo, hi = lds_interval(pred, meas, n_boot=200, seed=0)
    assert lo < lds(pred, meas) < hi and 0.0 < lo and hi < 1.0
    # perfectly monotone in every query: every resample with >= 2 distinct subsets gives 1
    lo, hi = lds_interval(pred, 3 * pred + 1, n_boot=100, seed=0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_rank_average_weighs_signals_alike_whatever_their_units():
    from hyperinf_ext.app.tasks.metrics import rank_average

    a = np.array([0.1, 5.0, 2.0, 2.0])       # ranks 1, 4, 2.5, 2.5
    b = np.array([1e9, -1e9, 0.0, 3.0])      # ranks 4, 1, 2, 3
    out = rank_average(a, b * 1e-30)         # a monotone rescaling changes nothing
    assert np.allclose(out, (np.array([1, 4, 2.5, 2.5]) + np.array([4, 1, 2, 3])) / 8, rtol=0, atol=1e-15)
    assert np.array_equal(rank_average(a), np.array([1, 4, 2.5, 2.5]) / 4)
    with pytest.raises(ValueError, match="differ in length"):
        rank_average(a, b[:3])
    with pytest.raises(ValueError, match="NaN or infinite"):
        rank_average(a, np.array([1.0, np.inf, 0.0, 0.0]))
    with pytest.raises(ValueError, match="no signal"):
        rank_average()
