"""The selection study's runner and report (bench/selection.py) on a synthetic experiment.

Each training example has a hidden quality; a "trained" subset's validation loss is 1 − its mean
quality.  The per-query scores are −quality plus noise, so keeping the most helpful beats random.
"""
from __future__ import annotations

import numpy as np
import pytest

from bench.lds import LdsConfig
from bench.records import load as load_records
from bench.selection import RANDOM, best_rule, budget, paired, report, run

N, Q = 40, 6


class Stop(Exception):
    pass


class FakeSelection:
    def __init__(self, seed: int, stop_after: int | None = None):
        rng = np.random.default_rng(seed)
        self.quality = rng.random(N)
        self.qs = -self.quality[None, :] + 0.05 * rng.normal(size=(Q, N))
        self.labels = (np.arange(N) % 2).astype(int)
        self.trained, self.stop_after = 0, stop_after

    def scores(self):
        return self.qs, self.labels, {"method": "fake"}

    def train_eval(self, members):
        if self.stop_after is not None and self.trained >= self.stop_after:
            raise Stop
        self.trained += 1
        return {"val_loss": 1.0 - float(self.quality[members].mean()), "val_accuracy": float(self.quality[members].mean())}


def _go(path, seeds=(0, 1, 2), stop_after=None):
    for s in seeds:
        cfg = LdsConfig(seed=s, n_train=N, n_val=Q, epochs=0)
        run(FakeSelection(s, stop_after), cfg, path, (0.2, 0.5), log=lambda m: None)


def test_runs_every_rule_and_fraction_and_finds_the_winner(tmp_path):
    path = tmp_path / "runs.jsonl"
    _go(path)
    recs = load_records(path)
    trained = [r for r in recs if r["kind"] == "trained"]
    assert len(trained) == 3 * 2 * 5  # seeds × fractions × (4 rules + random)
    assert {r["k"] for r in trained} == {budget(N, 0.2), budget(N, 0.5)} == {8, 20}
    for r in trained:
        assert sum(r["class_counts"]) == r["k"]
    # keeping the highest-quality examples lowers the loss against random on every seed
    assert all(d < 0 for d, _ in paired(recs, "top", 8)) and len(paired(recs, "top", 8)) == 3
    best, stats = best_rule(recs, ["top", "drop-harmful", "class-balanced", "query-round-robin"])
    assert stats["top"][0] == stats["top"][1] == 6 and best in ("top", "class-balanced", "query-round-robin")
    text = report(recs, "test")
    assert "| 0.2 | 8 | top |" in text and f"| 0.5 | 20 | {RANDOM} |" in text and "Most reliable" in text


def test_resume_trains_only_what_is_missing(tmp_path):
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    _go(whole, seeds=(0,))
    with pytest.raises(Stop):
        _go(parts, seeds=(0,), stop_after=4)
    again = FakeSelection(0)
    run(again, LdsConfig(seed=0, n_train=N, n_val=Q, epochs=0), parts, (0.2, 0.5), log=lambda m: None)
    assert again.trained == 10 - 4

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert strip(load_records(parts)) == strip(load_records(whole))
