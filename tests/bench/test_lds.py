"""The LDS benchmark's runner and report (bench/lds.py, bench/lds_report.py) on a synthetic linear model.

Ridge regression trained in closed form stands in for fine-tuning: exact influence (−∇L_qᵀH⁻¹∇l_k at the
full-data optimum) is a good linear datamodel there, so its LDS must clearly beat random scores; the
runner must resume an interrupted run to the same records.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.lds import LdsConfig, matrices, run, subset_members
from bench.lds_report import damping_choice, quality_auc, seed_rows, write_report
from bench.records import load as load_records
from hyperinf_ext.app.tasks.metrics import lds

RIDGE = 0.05
LABELS = ["exact", "random"]


class Interrupted(Exception):
    pass


class LinearExperiment:
    """y = x·w* + noise; train = ridge on the members; loss = ½(x·w − y)² per query."""

    def __init__(self, seed: int = 0, n: int = 40, q: int = 12, d: int = 4, stop_after: int | None = None,
                 stop_scores_after: int | None = None):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=d)
        self.X, self.Xq = rng.normal(size=(n, d)), rng.normal(size=(q, d))
        self.y = self.X @ w + rng.normal(scale=1.0, size=n)
        self.yq = self.Xq @ w + rng.normal(scale=1.0, size=q)
        self.seed, self.calls, self.stop_after, self.stop_scores_after = seed, 0, stop_after, stop_scores_after

    def _fit(self, idx: np.ndarray) -> np.ndarray:
        X, y = self.X[idx], self.y[idx]
        return np.linalg.solve(X.T @ X / len(idx) + RIDGE * np.eye(X.shape[1]), X.T @ y / len(idx))

    def subset_losses(self, members: np.ndarray) -> dict:
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise Interrupted
        self.calls += 1
        w = self._fit(members)
        return {"val_loss": (0.5 * (self.Xq @ w - self.yq) ** 2).tolist(), "val_accuracy": 1.0}

    def score_sets(self, labels):
        n = len(self.y)
        w = self._fit(np.arange(n))
        H = self.X.T @ self.X / n + RIDGE * np.eye(self.X.shape[1])
        g_train = self.X * (self.X @ w - self.y)[:, None]  # [n, d]
        g_query = self.Xq * (self.Xq @ w - self.yq)[:, None]  # [Q, d]
        sets = {"exact": -g_query @ np.linalg.solve(H, g_train.T),
                "random": np.random.default_rng(self.seed + 99).normal(size=(len(self.yq), n))}
        for i, label in enumerate(l for l in LABELS if l in labels):
            if self.stop_scores_after is not None and i >= self.stop_scores_after:
                raise Interrupted
            yield label, sets[label], {"method": label}


CFG = LdsConfig(seed=0, n_train=40, n_val=12, epochs=0)


def test_subset_members_deterministic_and_extendable():
    a = subset_members(40, 0.5, 3, 7)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and list(a) == sorted(a)
    assert a.tolist() == subset_members(40, 0.5, 3, 7).tolist()
    assert a.tolist() != subset_members(40, 0.5, 4, 7).tolist()


def test_exact_influence_beats_random_on_a_linear_model(tmp_path):
    runs = tmp_path / "runs.jsonl"
    run(LinearExperiment(), CFG, runs, 24, LABELS, log=lambda s: None)
    records = load_records(runs)
    key = json.loads(CFG.key())
    pe, me = matrices(records, key, "exact")
    pr, mr = matrices(records, key, "random")
    # the measured losses are the same stored records read twice: bit-equal by construction
    assert pe.shape == (24, 12) and np.array_equal(me, mr)
    exact, rand = lds(pe, me), lds(pr, mr)
    assert exact > 0.6 and exact > rand + 0.4, (exact, rand)
    rows = seed_rows(records, key, None, 200, LABELS, ref="exact")
    assert rows["exact"]["lo"] > rows["random"]["hi"]  # the intervals separate
    assert rows["random"]["diff_lo"] > 0  # exact − random, paired: above zero
    text = write_report(records, tmp_path / "LDS.md", "test", n_boot=100, labels=LABELS, ref="exact")
    assert "| exact |" in text and "| random |" in text
    assert (tmp_path / "lds.png").read_bytes()[:4] == b"\x89PNG" and "![LDS per method](lds.png)" in text


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_after_interruption_gives_identical_records(tmp_path):
    whole = tmp_path / "whole.jsonl"
    run(LinearExperiment(), CFG, whole, 8, LABELS, log=lambda s: None)
    parts = tmp_path / "parts.jsonl"
    with pytest.raises(Interrupted):  # killed after 3 subset models
        run(LinearExperiment(stop_after=3), CFG, parts, 8, LABELS, log=lambda s: None)
    assert len(load_records(parts)) == 3
    with pytest.raises(Interrupted):  # then after the first score set
        run(LinearExperiment(stop_scores_after=1), CFG, parts, 8, LABELS, log=lambda s: None)
    resumed = LinearExperiment()
    run(resumed, CFG, parts, 8, LABELS, log=lambda s: None)
    assert resumed.calls == 0  # nothing measured twice
    assert _strip(load_records(parts)) == _strip(load_records(whole))
    # more subsets later: the first 8 are reused, the score sets are redone for 12
    run(LinearExperiment(), CFG, parts, 12, LABELS, log=lambda s: None)
    recs = load_records(parts)
    assert sorted(r["subset"] for r in recs if r["kind"] == "subset") == list(range(12))
    p, m = matrices(recs, json.loads(CFG.key()), "exact")
    assert p.shape == (12, 12)


def test_damping_choice_combines_lds_and_auc():
    row = lambda v: {"lds": v, "lo": v, "hi": v}  # noqa: E731
    per_seed = {0: {"hyperinf, spectral 1": row(0.30), "hyperinf, spectral 3": row(0.28),
                    "hyperinf, spectral 10": row(0.10), "hyperinf, paper damping": row(0.5), "tracin": row(0.9)},
                1: {"hyperinf, spectral 1": row(0.32), "hyperinf, spectral 3": row(0.30),
                    "hyperinf, spectral 10": row(0.12), "hyperinf, paper damping": row(0.5), "tracin": row(0.9)}}
    auc = {"hyperinf, spectral 1": 0.70, "hyperinf, spectral 3": 0.72, "hyperinf, spectral 10": 0.73,
           "hyperinf, paper damping": 0.73}
    best, lines = damping_choice(per_seed, auc)
    # scores: spectral 1 = 1 + 0.2/0.23 = 1.870, spectral 3 = 0.29/0.31 + 0.22/0.23 = 1.892,
    # spectral 10 = 0.11/0.31 + 1 = 1.355; paper would top both metrics but carries units (not eligible);
    # tracin is not a hyperinf damping
    assert best == "hyperinf, spectral 3" and any("**hyperinf, spectral 3**" in l for l in lines)
    assert any(l.startswith("| hyperinf, paper damping |") and "no (units)" in l for l in lines)
    auc["hyperinf, spectral 1"] = 0.72  # now 1 + 0.22/0.23 = 1.957 beats spectral 3's 1.892
    assert damping_choice(per_seed, auc)[0] == "hyperinf, spectral 1"
    assert damping_choice({}, auc) == (None, [])
    assert quality_auc()["hyperinf, spectral 3"] > 0.5  # read from the committed bench/quality_runs.jsonl


def test_config_key_keeps_the_minilm_records():
    """The model field joined LdsConfig after the MiniLM records were written: their key must not change,
    and an LLM config must never match them."""
    from pathlib import Path

    plain = json.loads(LdsConfig(seed=0).key())
    assert "model" not in plain and plain["n_train"] == 2000
    llm = json.loads(LdsConfig(seed=0, model="smollm2").key())
    assert llm["model"] == "smollm2" and llm != plain
    committed = load_records(Path(__file__).resolve().parents[2] / "bench" / "lds_runs.jsonl")
    assert any(r["config"] == plain for r in committed)  # seed 0 of bench/LDS.md is still found
