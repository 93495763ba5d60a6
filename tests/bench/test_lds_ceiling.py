"""Issue #25's additions to the LDS benchmark on synthetic data: retrained subset models (noise ceiling),
shared-structure baselines and mean-removed LDS, margin, pooled paired intervals over seeds, and the
frozen selection rule of bench/defaults_rule.py.

The runner is driven by a ridge-regression "experiment" whose retrains add weight noise drawn from the
training seed (noise 0: a retrain is the same model), so the answers are known: identical retrains give a
test-retest correlation of exactly 1, noisy ones less.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench import defaults_rule as rule
from bench.lds import LdsConfig, _round, matrices, run, subset_table, train_seed
from bench.lds_baselines import (ceiling_section, label_averaged, loo_subset_mean, mean_removed, pooled_paired,
                                 query_averaged, retrain_losses, same_label_prediction, sections, shared_section,
                                 retest_correlation, retest_per_query)
from bench.lds_report import write_report
from bench.records import load as load_records
from hyperinf_ext.app.tasks.metrics import lds

RIDGE = 0.05
LABELS = ["exact", "random"]


class Interrupted(Exception):
    pass


class NoisyLinearExperiment:
    """y = x·w* + noise; a subset model = ridge on its members plus ``noise``·N(0, I) drawn from the training
    seed (the data seed's when none is given); loss ½(x·w − y)² per query; labels = sign of y."""

    def __init__(self, seed: int = 0, n: int = 40, q: int = 12, d: int = 4, noise: float = 0.0,
                 stop_after: int | None = None, margin: bool = False):
        rng = np.random.default_rng(seed)
        w = rng.normal(size=d)
        self.X, self.Xq = rng.normal(size=(n, d)), rng.normal(size=(q, d))
        self.y = self.X @ w + rng.normal(scale=1.0, size=n)
        self.yq = self.Xq @ w + rng.normal(scale=1.0, size=q)
        self.seed, self.noise, self.calls, self.stop_after, self.margin = seed, noise, 0, stop_after, margin
        self.seeds_seen: list[int] = []

    def _fit(self, idx: np.ndarray) -> np.ndarray:
        X, y = self.X[idx], self.y[idx]
        return np.linalg.solve(X.T @ X / len(idx) + RIDGE * np.eye(X.shape[1]), X.T @ y / len(idx))

    def split_labels(self):
        return (self.y > 0).astype(int).tolist(), (self.yq > 0).astype(int).tolist()

    def subset_losses(self, members: np.ndarray, train_seed: int | None = None) -> dict:
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise Interrupted
        self.calls += 1
        t = self.seed if train_seed is None else train_seed
        self.seeds_seen.append(t)
        w = self._fit(members) + self.noise * np.random.default_rng([t, int(members.sum())]).normal(size=self.X.shape[1])
        loss = 0.5 * (self.Xq @ w - self.yq) ** 2
        out = {"val_loss": loss.tolist(), "val_accuracy": 1.0}
        if self.margin:
            out["val_margin"] = (-loss).tolist()  # a margin that moves exactly against the loss
        return out

    def score_sets(self, labels):
        n = len(self.y)
        w = self._fit(np.arange(n))
        H = self.X.T @ self.X / n + RIDGE * np.eye(self.X.shape[1])
        g_train = self.X * (self.X @ w - self.y)[:, None]
        g_query = self.Xq * (self.Xq @ w - self.yq)[:, None]
        sets = {"exact": -g_query @ np.linalg.solve(H, g_train.T),
                "random": np.random.default_rng(self.seed + 99).normal(size=(len(self.yq), n))}
        for label in (l for l in LABELS if l in labels):
            yield label, sets[label], {"method": label}


CFG = LdsConfig(seed=0, n_train=40, n_val=12, epochs=0)
KEY = json.loads(CFG.key())
QUIET = dict(log=lambda s: None)


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_train_seed_keeps_retrain_zero_and_separates_the_others():
    assert train_seed(3, 0) == 3 and train_seed(0, 0) == 0
    seeds = {train_seed(s, t) for s in range(4) for t in range(1, 4)}
    assert len(seeds) == 12 and not seeds & set(range(4))  # no retrain repeats another seed's schedule
    assert train_seed(2, 1) == train_seed(2, 1)


def test_retrain_records_are_written_resumed_and_kept_apart(tmp_path):
    whole = tmp_path / "whole.jsonl"
    exp = NoisyLinearExperiment(noise=0.3)
    run(exp, CFG, whole, 6, LABELS, retrains=(0, 1, 2), **QUIET)
    recs = load_records(whole)
    subs = [r for r in recs if r["kind"] == "subset"]
    assert len(subs) == 18 and sum(r["kind"] == "split" for r in recs) == 1
    for r in subs:  # retrain 0 is today's record, untouched; the others say which seed they trained with
        if "retrain" in r:
            assert r["retrain"] in (1, 2) and r["train_seed"] == train_seed(0, r["retrain"])
        else:
            assert "train_seed" not in r
    assert sorted(set(exp.seeds_seen)) == sorted({0, train_seed(0, 1), train_seed(0, 2)})
    # the LDS reads retrain 0 only: the same matrices as a run without retrains
    plain = tmp_path / "plain.jsonl"
    run(NoisyLinearExperiment(noise=0.3), CFG, plain, 6, LABELS, **QUIET)
    assert not any("retrain" in r for r in load_records(plain))
    for label in LABELS:
        for a, b in zip(matrices(recs, KEY, label), matrices(load_records(plain), KEY, label)):
            assert np.array_equal(a, b)
    assert subset_table(recs, KEY, retrain=2) != subset_table(recs, KEY, retrain=0)
    # interrupted after 7 models, then resumed: the same records, nothing measured twice
    parts = tmp_path / "parts.jsonl"
    with pytest.raises(Interrupted):
        run(NoisyLinearExperiment(noise=0.3, stop_after=7), CFG, parts, 6, LABELS, retrains=(0, 1, 2), **QUIET)
    resumed = NoisyLinearExperiment(noise=0.3)
    run(resumed, CFG, parts, 6, LABELS, retrains=(0, 1, 2), **QUIET)
    assert resumed.calls == 11 and _strip(load_records(parts)) == _strip(recs)
    # retrains added later to a run of today's kind: only the missing models are trained
    again = NoisyLinearExperiment(noise=0.3)
    run(again, CFG, plain, 6, LABELS, retrains=(0, 1), **QUIET)
    assert again.calls == 6 and sum(r.get("retrain") == 1 for r in load_records(plain)) == 6


def test_lanes_on_copies_merged_give_the_records_of_one_run(tmp_path):
    """Two lanes (subsets j mod 2) on copies of the records, merged, then a run without a lane for the score
    sets: the same records as one process, and no model is measured twice."""
    from bench.records import merge

    whole = tmp_path / "whole.jsonl"
    run(NoisyLinearExperiment(noise=0.3), CFG, whole, 5, LABELS, retrains=(0, 1), **QUIET)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lanes = [NoisyLinearExperiment(noise=0.3), NoisyLinearExperiment(noise=0.3)]
    run(lanes[0], CFG, a, 5, LABELS, retrains=(0, 1), lane=(0, 2), **QUIET)
    run(lanes[1], CFG, b, 5, LABELS, retrains=(0, 1), lane=(1, 2), **QUIET)
    assert [l.calls for l in lanes] == [6, 4]  # subsets 0, 2, 4 and 1, 3, each twice
    assert not any(r["kind"] == "scores" for r in load_records(a) + load_records(b))
    merge(b, a)
    last = NoisyLinearExperiment(noise=0.3)
    run(last, CFG, a, 5, LABELS, retrains=(0, 1), **QUIET)
    assert last.calls == 0

    def key(r):
        return json.dumps(r, sort_keys=True)

    assert sorted(map(key, _strip(load_records(a)))) == sorted(map(key, _strip(load_records(whole))))
    with pytest.raises(ValueError, match="lane: expected k/n"):
        run(last, CFG, a, 5, LABELS, lane=(2, 2), **QUIET)


def test_noise_ceiling_is_one_for_identical_retrains_and_lower_with_noise(tmp_path):
    same, noisy = tmp_path / "same.jsonl", tmp_path / "noisy.jsonl"
    run(NoisyLinearExperiment(noise=0.0), CFG, same, 16, LABELS, retrains=(0, 1, 2), **QUIET)
    run(NoisyLinearExperiment(noise=0.4), CFG, noisy, 16, LABELS, retrains=(0, 1, 2), **QUIET)
    ids, subs, L = retrain_losses(load_records(same), KEY)
    assert ids == [0, 1, 2] and subs == list(range(16)) and L.shape == (3, 16, 12)
    assert retest_correlation(L) == pytest.approx(1.0)
    _, _, Ln = retrain_losses(load_records(noisy), KEY)
    rho = retest_correlation(Ln)
    assert 0.0 < rho < 0.9, rho
    assert np.all(retest_per_query(Ln) <= 1.0)
    text = "\n".join(ceiling_section(load_records(same), LABELS, None, 50))
    assert "test-retest ρ = 1.000" in text and "| exact |" in text
    text = "\n".join(ceiling_section(load_records(noisy), LABELS, None, 50))
    assert f"test-retest ρ = {rho:.3f}" in text and "exact − method" not in text
    # with a reference: reference − method against the retrain mean, paired; exact beats random outside it
    text = "\n".join(ceiling_section(load_records(noisy), LABELS, None, 200, ref="exact"))
    row = {line.split(" | ")[0]: line.rstrip(" |").split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert "exact − method, vs the retrain mean" in text and row["| exact"][-1] == "—"
    recs = load_records(noisy)
    pe, pr = matrices(recs, KEY, "exact")[0], matrices(recs, KEY, "random")[0]
    avg = retrain_losses(recs, KEY)[2].mean(axis=0)
    cell = re.fullmatch(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", row["| random"][-1])
    diff, lo, hi = (float(x) for x in cell.groups())
    assert diff == pytest.approx(lds(pe, avg) - lds(pr, avg), abs=5e-4)  # printed to 3 decimals
    assert 0 < lo <= diff <= hi
    # one retrain only: the section says what fills it
    plain = tmp_path / "plain.jsonl"
    run(NoisyLinearExperiment(), CFG, plain, 4, LABELS, **QUIET)
    text = "\n".join(ceiling_section(load_records(plain), LABELS, None, 50))
    assert "No seed has retrained subset models yet" in text and "--retrain-seeds 0,1,2" in text
    assert "44 models" in text  # 16 subsets × 3 retrains, less the 4 of retrain 0 already recorded
    # retrains of only the leading subsets (a run still filling it): no ceiling from 2 subsets, it says so
    run(NoisyLinearExperiment(), CFG, plain, 2, LABELS, retrains=(0, 1, 2), **QUIET)
    text = "\n".join(ceiling_section(load_records(plain), LABELS, None, 50))
    assert "in progress" in text and "cover the leading 2 subsets" in text and "test-retest" not in text
    assert "--retrain-seeds 0,1,2" in text and "40 models" in text


def test_averaging_retrains_helps_a_good_predictor(tmp_path):
    noisy = tmp_path / "noisy.jsonl"
    run(NoisyLinearExperiment(noise=0.4), CFG, noisy, 16, LABELS, retrains=(0, 1, 2), **QUIET)
    recs = load_records(noisy)
    _, _, L = retrain_losses(recs, KEY)
    p, _ = matrices(recs, KEY, "exact")
    single = np.mean([lds(p, L[i]) for i in range(3)])
    assert lds(p, L.mean(axis=0)) > single


def test_query_averaged_and_mean_removed_on_shared_plus_specific_losses():
    rng = np.random.default_rng(0)
    M, Q = 40, 30
    shared, specific = rng.normal(size=(M, 1)), rng.normal(size=(M, Q))
    measured = 5.0 * shared + specific  # the shared subset effect dominates
    only_shared = np.repeat(shared, Q, axis=1) + 1e-9 * rng.normal(size=(M, Q))
    only_specific = specific.copy()
    # knowing only which subsets train better already scores high; the query-specific part scores ~0
    assert lds(only_shared, measured) > 0.9
    assert abs(lds(only_shared, mean_removed(measured))) < 0.15
    assert abs(lds(only_shared, mean_removed(measured, standardize=True))) < 0.15
    # the query-specific prediction: low LDS, high once the subset mean is removed
    assert lds(only_specific, measured) < 0.4
    assert lds(only_specific, mean_removed(measured)) > 0.9
    # query-averaging keeps the shared part of a prediction and drops the rest
    assert lds(query_averaged(only_shared + only_specific), measured) > 0.9
    assert abs(lds(query_averaged(only_specific), mean_removed(measured))) < 0.15
    assert query_averaged(only_specific).shape == (M, Q) and np.ptp(query_averaged(only_specific), axis=1).max() == 0
    # the oracle of the shared part (other queries only) sees it too
    assert lds(loo_subset_mean(measured), measured) > 0.9


def test_same_label_count_and_within_label_removal():
    train_labels = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    members = [np.array([0, 1, 2]), np.array([3, 5, 6]), np.array([1, 2, 4, 7])]
    val_labels = np.array([1, 0, 1])
    pred = same_label_prediction(members, train_labels, val_labels)
    assert pred.tolist() == [[-2, -1, -2], [-1, -2, -1], [-4, -0, -4]]
    # losses that depend only on the subset's label balance: the same-label count predicts them perfectly,
    # and removing each subset's mean within the label leaves nothing to predict
    rng = np.random.default_rng(1)
    labs = rng.integers(0, 2, size=200)
    subsets = [rng.choice(200, size=100, replace=False) for _ in range(30)]
    vlab = np.array([0, 1] * 10)
    sl = same_label_prediction(subsets, labs, vlab)
    measured = sl + 1e-6 * rng.normal(size=sl.shape)
    assert lds(sl, measured) > 0.99
    assert abs(lds(sl, mean_removed(measured, standardize=True, groups=vlab))) < 0.2
    assert lds(loo_subset_mean(measured, groups=vlab), measured) > 0.95
    assert np.allclose(label_averaged(sl, vlab), sl)  # constant within a label already


def test_pooled_paired_interval_zero_for_equals_and_clear_for_a_better_method():
    rng = np.random.default_rng(0)
    items_same, items_better, items_equal = [], [], []
    for _ in range(2):  # two seeds
        truth = rng.normal(size=(24, 20))
        m = truth + 0.5 * rng.normal(size=truth.shape)
        a = truth + 0.3 * rng.normal(size=truth.shape)
        b = truth + 3.0 * rng.normal(size=truth.shape)
        c = truth + 0.3 * rng.normal(size=truth.shape)
        items_same.append((a, a.copy(), m))
        items_better.append((a, b, m))
        items_equal.append((a, c, m))
    same = pooled_paired(items_same, n_boot=200)
    assert same["diff"] == 0 and same["lo"] <= 0 <= same["hi"] and same["p"] == 1.0
    better = pooled_paired(items_better, n_boot=200)
    assert better["lo"] > 0 and better["p"] < 0.05 and len(better["per_seed"]) == 2
    assert better["diff"] == pytest.approx(np.mean([lds(a, m) - lds(b, m) for a, b, m in items_better]))
    equal = pooled_paired(items_equal, n_boot=200)
    assert equal["lo"] < 0 < equal["hi"]  # equally good, differently noisy: not told apart


def test_shared_section_and_margin_from_records(tmp_path):
    runs = tmp_path / "runs.jsonl"
    llm = LdsConfig(seed=0, n_train=40, n_val=12, epochs=0, model="smollm2")
    run(NoisyLinearExperiment(noise=0.2, margin=True), llm, runs, 8, LABELS, retrains=(0, 1), **QUIET)
    recs = load_records(runs)
    assert all("val_margin" in r for r in recs if r["kind"] == "subset")
    key = json.loads(llm.key())
    text = "\n".join(shared_section(recs, LABELS, None, 50, "exact"))
    assert "| exact (default) |" in text and "same-label member count (split record)" in text
    assert "oracle: subset mean (z) over the other queries of the same label" in text
    text = "\n".join(sections(recs, LABELS, n_boot=50, ref="exact", rule=False))
    # margin = −loss here, so LDS on −margin equals LDS on loss
    p, m = matrices(recs, key, "exact")
    assert f"| exact | {lds(p, m):.3f} | {lds(p, m):.3f} |" in text
    assert "## Noise ceiling: subset models retrained (margin)" in text and "test-retest ρ" in text
    # a records file of the classifier: no margin section
    cls = tmp_path / "cls.jsonl"
    run(NoisyLinearExperiment(), CFG, cls, 4, LABELS, **QUIET)
    assert "## Margin" not in "\n".join(sections(load_records(cls), LABELS, n_boot=20, ref="exact", rule=False))


def test_write_report_without_new_data_says_what_fills_each_section(tmp_path):
    runs = tmp_path / "runs.jsonl"
    run(NoisyLinearExperiment(), CFG, runs, 6, LABELS, **QUIET)
    recs = [r for r in load_records(runs) if r["kind"] != "split"]  # records from before split records
    text = write_report(recs, tmp_path / "LDS.md", "test", n_boot=30, labels=LABELS, ref="exact", quality=([], []))
    assert "No seed has retrained subset models yet" in text
    assert "no split record: `python -m bench.lds --seeds 0 --split-only`" in text
    assert "## Pooled paired differences over seeds: exact − method" in text and "| random |" in text
    assert "## Pre-registered default and tuned peers" in text and "No choice yet" in text


# ------------------------------------------------------------------------------ the frozen rule


def _scores(seed: int, label: str, method: str, damping, predicted: np.ndarray) -> dict:
    return {"kind": "scores", "config": {**KEY, "seed": seed}, "label": label, "n_subsets": predicted.shape[0],
            "predicted": [[_round(v) for v in row] for row in predicted], "method": method,
            "damping": damping}


# (label, method, damping, noise of its prediction): less noise, higher LDS
GRID = [("hyperinf, datainf damping", "hyperinf", ["datainf", 0.1], 0.8),
        ("hyperinf, spectral 1", "hyperinf", ["spectral", 1.0], 0.3),
        ("hyperinf, spectral 3", "hyperinf", ["spectral", 3.0], 0.5),
        ("hyperinf, paper damping", "hyperinf", ["paper", 0.1], 0.05),
        ("lissa", "lissa", ["datainf", 0.1], 1.5),
        ("lissa, spectral 3", "lissa", ["spectral", 3.0], 0.6),
        ("tracin", "tracin", None, 2.0)]


def _constructed_records(seeds=(0, 1), noise_of=None, M=20, Q=15) -> list[dict]:
    recs = []
    for s in seeds:
        rng = np.random.default_rng(100 + s)
        m = rng.normal(size=(M, Q))
        for j in range(M):
            recs.append({"kind": "subset", "config": {**KEY, "seed": s}, "subset": j, "val_loss": m[j].tolist(),
                         "val_accuracy": 1.0})
        for label, method, damping, noise in GRID:
            noise = (noise_of or {}).get(label, noise)
            recs.append(_scores(s, label, method, damping, m + noise * rng.normal(size=m.shape)))
    return recs


QC = [("hyperinf, datainf damping", "hyperinf", "datainf", 0.1), ("hyperinf, spectral 1", "hyperinf", "spectral", 1.0),
      ("hyperinf, spectral 3", "hyperinf", "spectral", 3.0), ("hyperinf, paper damping", "hyperinf", "paper", 0.1),
      ("lissa", "lissa", "datainf", 0.1), ("tracin", "tracin", "datainf", 0.1)]


def _quality(auc: dict[str, float], seeds=(0, 1, 2)) -> list[dict]:
    return [{"config": {"seed": s}, "results": {l: {"auc": v} for l, v in auc.items()}} for s in seeds]


def test_frozen_rule_picks_by_the_combined_score_on_selection_seeds_only():
    recs = _constructed_records()
    auc = {"hyperinf, datainf damping": 0.70, "hyperinf, spectral 1": 0.70, "hyperinf, spectral 3": 0.71,
           "hyperinf, paper damping": 0.80, "lissa": 0.6, "tracin": 0.55}
    choice = rule.choose_default(recs, _quality(auc), QC)
    lds_ = choice.lds
    s1, s3 = rule.Setting("hyperinf", "spectral", 1.0), rule.Setting("hyperinf", "spectral", 3.0)
    paper = rule.Setting("hyperinf", "paper", 0.1)
    assert lds_[paper] > lds_[s1] > lds_[s3]  # as constructed
    assert paper not in choice.eligible  # units: never the default, however good
    top_l, top_a = max(lds_[c] for c in choice.eligible), 0.71
    expect = max(choice.eligible, key=lambda c: lds_[c] / top_l + (auc[f"hyperinf, {c.rule} damping" if c.rule ==
                 "datainf" else f"hyperinf, spectral {c.scale:g}"] - 0.5) / (top_a - 0.5))
    assert choice.setting == expect == s1
    # detection much better for spectral 3: it wins
    auc3 = {**auc, "hyperinf, spectral 1": 0.55}
    assert rule.choose_default(recs, _quality(auc3), QC).setting == s3
    # a reporting seed (2) and the detection configs of seed 2 are never read: change them, same choice
    wild = recs + _constructed_records(seeds=(2,), noise_of={"hyperinf, spectral 3": 0.0, "hyperinf, spectral 1": 9})
    runs = _quality(auc, seeds=(0, 1)) + [{"config": {"seed": 2}, "results": {"hyperinf, spectral 3": {"auc": 1.0}}}]
    assert rule.choose_default(wild, runs, QC).setting == s1
    # ties: equal score, LDS and AUC -> the smaller damping
    tied = _constructed_records(noise_of={"hyperinf, spectral 3": 0.3})
    for r in tied:  # identical predictions for spectral 1 and 3
        if r["kind"] == "scores" and r["label"] == "hyperinf, spectral 3":
            r["predicted"] = next(x["predicted"] for x in tied if x["kind"] == "scores" and x["config"] == r["config"]
                                  and x["label"] == "hyperinf, spectral 1")
    assert rule.choose_default(tied, _quality({**auc, "hyperinf, spectral 3": 0.70}), QC).setting == s1
    # without both studies on the selection seeds: no choice
    assert rule.choose_default(_constructed_records(seeds=(0,)), _quality(auc), QC).setting is None
    assert rule.choose_default(recs, _quality(auc, seeds=(2,)), QC).setting is None


def test_frozen_rule_tunes_every_peer_on_lds():
    recs = _constructed_records()
    peers = rule.tune_peers(recs, "minilm")
    assert peers["lissa"][0] == rule.Setting("lissa", "spectral", 3.0)  # its better damping, not its default
    assert peers["tracin"][0] == rule.Setting("tracin")
    assert peers["hyperinf"][0] == rule.Setting("hyperinf", "paper", 0.1)  # tuned on LDS alone, any damping
    # a setting scored under two labels (a method's "auto" and its explicit damping) counts once
    dup = recs + [dict(r, label="lissa, datainf damping") for r in recs if r.get("label") == "lissa"]
    assert rule.tune_peers(dup, "minilm") == peers
    assert rule.REPORTING_SEEDS["minilm"] and not set(rule.SELECTION_SEEDS["minilm"]) & set(rule.REPORTING_SEEDS["minilm"])
    assert not set(rule.SELECTION_SEEDS["smollm2"]) & set(rule.REPORTING_SEEDS["smollm2"])


def test_rule_section_reports_the_default_on_reporting_seeds_only(tmp_path):
    from bench.lds_baselines import rule_section

    auc = {"hyperinf, datainf damping": 0.70, "hyperinf, spectral 1": 0.70, "hyperinf, spectral 3": 0.71,
           "hyperinf, paper damping": 0.80, "lissa": 0.6, "tracin": 0.55}
    labels = [g[0] for g in GRID]
    recs = _constructed_records()
    text = "\n".join(rule_section(recs, labels, None, 50, quality=(_quality(auc), QC)))
    assert "**(chosen)**" in text and "hyperinf, spectral × 1 **(chosen)**" in text
    assert "The reporting seeds (2, 3) are not measured yet" in text and "python -m bench.lds --seeds 2,3" in text
    recs += _constructed_records(seeds=(2, 3))
    text = "\n".join(rule_section(recs, labels, None, 50, quality=(_quality(auc), QC)))
    assert "### Reported on seeds 2, 3 (not used by the rule)" in text
    row = next(l for l in text.splitlines() if l.startswith("| default |"))
    key2, key3 = {**KEY, "seed": 2}, {**KEY, "seed": 3}
    want = [lds(*matrices(recs, k, "hyperinf, spectral 1")) for k in (key2, key3)]
    assert row == f"| default | hyperinf, spectral × 1 | {want[0]:.3f}, {want[1]:.3f} | — | — |"
    lissa = next(l for l in text.splitlines() if l.startswith("| lissa |"))
    assert "lissa, spectral × 3" in lissa  # the tuned setting, reported on seeds 2 and 3


def test_report_only_command_line_on_records_with_retrains(tmp_path):
    from bench.lds import main

    runs, out = tmp_path / "runs.jsonl", tmp_path / "LDS.md"
    run(NoisyLinearExperiment(noise=0.3), CFG, runs, 8, LABELS, retrains=(0, 1, 2), **QUIET)  # 8: the ceiling's least
    rename = {"exact": "hyperinf, spectral 1", "random": "tracin"}  # labels of the real grid
    runs.write_text("".join(json.dumps({**r, "label": rename[r["label"]]} if r["kind"] == "scores" else r) + "\n"
                            for r in load_records(runs)))
    assert main(["--report-only", "--seeds", "0", "--runs", str(runs), "--out", str(out), "--n-boot", "20"]) == 0
    text = out.read_text()
    assert "### Seed 0: 3 retrains (0, 1, 2) × 8 subsets × 12 queries" in text
    assert "same-label member count (split record)" in text and "## Pooled paired differences" in text
    assert "| tracin |" in text and "| hyperinf, spectral 1 (default) |" in text


# ------------------------------------------------------------------------------ amendment 1 of the rule

MIX = "hyperinf, spectral 1, mixed 99"
MIX_OPTS = {"mix_queries": 99.0}


def _study_records(seeds, model=None, noise_of=None, variant_noise=None) -> list[dict]:
    """_constructed_records of one study (``model`` None: the classifier), plus the variant MIX when
    ``variant_noise`` is given (its prediction's noise)."""
    recs = _constructed_records(seeds=seeds, noise_of=noise_of)
    for r in recs:
        r["config"] = {**r["config"], **({"model": model} if model else {})}
    if variant_noise is not None:
        for s in seeds:
            key = next(r["config"] for r in recs if r["config"]["seed"] == s)
            m = np.asarray([r["val_loss"] for r in recs if r["kind"] == "subset" and r["config"]["seed"] == s])
            rec = _scores(s, MIX, "hyperinf", ["spectral", 1.0],
                          m + variant_noise * np.random.default_rng(7 + s).normal(size=m.shape))
            recs.append({**rec, "config": key, "options": MIX_OPTS})
    return recs


def _detection(val: dict[str, float], self_: dict[str, float], seeds=(0, 1)) -> list[dict]:
    res = {**{l: {"auc": v} for l, v in val.items()}, **{rule.SELF + l: {"auc": v} for l, v in self_.items()}}
    return [{"config": {"seed": s}, "results": res} for s in seeds]


LLM_TABLE = {"hyperinf, datainf damping": rule.Setting("hyperinf", "datainf", 0.1),
             "hyperinf, spectral 1": rule.Setting("hyperinf", "spectral", 1.0),
             "hyperinf, spectral 3": rule.Setting("hyperinf", "spectral", 3.0),
             MIX: rule.Setting("hyperinf", "spectral", 1.0, rule.options_of(MIX_OPTS))}
QC_MIX = QC + [(MIX, "hyperinf", "spectral", 1.0, MIX_OPTS)]


def _amended(cls_val, cls_self, llm_val, llm_self, variant_noise=0.3, **kw):
    cls = _study_records((0, 1), variant_noise=variant_noise)
    llm = _study_records((0,), model="smollm2", variant_noise=variant_noise, **kw)
    return rule.choose_default_amended(cls, _detection(cls_val, cls_self), QC_MIX, llm,
                                       _detection(llm_val, llm_self), LLM_TABLE), cls, llm


def test_amended_rule_weighs_six_components_and_picks_the_option_on_the_query_ones():
    s1, s3 = rule.Setting("hyperinf", "spectral", 1.0), rule.Setting("hyperinf", "spectral", 3.0)
    di = rule.Setting("hyperinf", "datainf", 0.1)
    mix = rule.Setting("hyperinf", "spectral", 1.0, (("mix_queries", 99.0),))
    val = {"hyperinf, datainf damping": 0.70, "hyperinf, spectral 1": 0.70, "hyperinf, spectral 3": 0.72, MIX: 0.80}
    self_ = {"hyperinf, datainf damping": 0.60, "hyperinf, spectral 1": 0.65, "hyperinf, spectral 3": 0.80}
    choice, cls, llm = _amended(val, self_, val, self_)
    assert set(choice.eligible) == {di, s1, s3}  # no variant and no unit-bearing damping in 1a
    comp = choice.components
    top = {k: max(comp[k][c] for c in choice.eligible) for k, _, _ in rule.COMPONENTS}
    want = {c: sum(w * (comp[k][c] - ch) / (top[k] - ch) for k, w, ch in rule.COMPONENTS) for c in choice.eligible}
    assert choice.score == pytest.approx(want, abs=1e-12)
    assert choice.setting == max(want, key=want.get)
    # self signal much better for spectral 3 here: it outweighs spectral 1's better LDS
    assert choice.setting == s3 and choice.final == s3  # the variant is of spectral 1: no option for spectral 3
    # with the self signal level, spectral 1 wins, and the variant (better AUC, LDS close) becomes the option
    flat = {k: 0.7 for k in self_}
    choice, _, _ = _amended(val, flat, val, flat)
    assert choice.setting == s1 and choice.final == mix
    q = {k: comp_k for k, comp_k in choice.components.items() if k in rule.QUERY_COMPONENTS}
    top = {k: max(q[k][c] for c in (s1, mix)) for k in q}
    want_b = {c: sum(0.5 * (q[k][c] - rule._CHANCE[k]) / (top[k] - rule._CHANCE[k]) for k in q) for c in (s1, mix)}
    assert choice.option_score == pytest.approx(want_b, abs=1e-12)
    # a variant as good as the plain setting on every query component: ties go to no option
    same = {**val, MIX: val["hyperinf, spectral 1"]}
    choice, _, _ = _amended(same, flat, same, flat, variant_noise=0.0)
    cls_copy = _study_records((0, 1), variant_noise=0.0)
    for r in cls_copy:  # the variant's predictions equal spectral 1's
        if r.get("label") == MIX:
            r["predicted"] = next(x["predicted"] for x in cls_copy if x.get("label") == "hyperinf, spectral 1"
                                  and x["config"] == r["config"])
    llm_copy = _study_records((0,), model="smollm2", variant_noise=0.0)
    for r in llm_copy:
        if r.get("label") == MIX:
            r["predicted"] = next(x["predicted"] for x in llm_copy if x.get("label") == "hyperinf, spectral 1"
                                  and x["config"] == r["config"])
    tied = rule.choose_default_amended(cls_copy, _detection(same, flat), QC_MIX, llm_copy, _detection(same, flat),
                                       LLM_TABLE)
    assert tied.setting == s1 and tied.final == s1


def test_amended_rule_needs_every_component_and_reads_selection_data_only():
    val = {"hyperinf, datainf damping": 0.70, "hyperinf, spectral 1": 0.75, "hyperinf, spectral 3": 0.72, MIX: 0.8}
    self_ = {"hyperinf, datainf damping": 0.6, "hyperinf, spectral 1": 0.7, "hyperinf, spectral 3": 0.7}
    base, cls, llm = _amended(val, self_, val, self_)
    assert base.setting is not None
    # no LLM detection self signal: no choice
    missing = rule.choose_default_amended(cls, _detection(val, self_), QC_MIX, llm, _detection(val, {}), LLM_TABLE)
    assert missing.setting is None and missing.final is None
    # part of a detection grid (2 selection configurations recorded of 3 expected): unmeasured, no choice
    part = rule.choose_default_amended(cls, _detection(val, self_), QC_MIX, llm, _detection(val, self_), LLM_TABLE,
                                       {"classifier": 2, "LLM": 3})
    assert part.setting is None and part.components["LLM AUC, validation"] == {}
    full = rule.choose_default_amended(cls, _detection(val, self_), QC_MIX, llm, _detection(val, self_), LLM_TABLE,
                                       {"classifier": 2, "LLM": 2})
    assert (full.setting, full.final) == (base.setting, base.final)
    # no LLM LDS: no choice
    assert rule.choose_default_amended(cls, _detection(val, self_), QC_MIX, [], _detection(val, self_),
                                       LLM_TABLE).setting is None
    # reporting seeds and configurations changed wildly: the same choice
    wild_cls = cls + _study_records((2, 3), noise_of={"hyperinf, spectral 3": 0.0}, variant_noise=0.0)
    wild_llm = llm + _study_records((1, 2), model="smollm2", noise_of={"hyperinf, datainf damping": 0.0})
    wild_q = _detection(val, self_) + _detection({"hyperinf, spectral 3": 1.0}, {"hyperinf, spectral 3": 1.0},
                                                 seeds=(2, 3))
    again = rule.choose_default_amended(wild_cls, wild_q, QC_MIX, wild_llm, wild_q, LLM_TABLE)
    assert (again.setting, again.final) == (base.setting, base.final)
    assert again.score == pytest.approx(base.score, abs=1e-12)


def test_settings_with_options_are_their_own_candidates():
    rec = {"method": "hyperinf", "damping": ["spectral", 1], "options": {"normalize": "unit", "mix_queries": 1}}
    s = rule.setting_of(rec)
    assert s.options == (("mix_queries", 1.0), ("normalize", "unit")) and s.plain() == rule.Setting("hyperinf", "spectral", 1.0)
    assert s != s.plain() and s.plain().sort_key() < s.sort_key()
    assert "mix_queries=1" in str(s) and "normalize=unit" in str(s)
    # tune_peers ignores the options (they are not dampings)
    recs = _study_records((0, 1), variant_noise=0.0)
    assert all(not c.options for c, _ in rule.tune_peers(recs, "minilm").values())


def test_amendment_2_recommends_the_signal_with_the_best_mean_auc_over_both_studies():
    s1 = rule.Setting("hyperinf", "spectral", 1.0)
    mix = rule.Setting("hyperinf", "spectral", 1.0, (("mix_queries", 99.0),))

    def runs(val, self_, comb, seeds=(0, 1)):
        res = {}
        for label, (v, sv, cv) in {"hyperinf, spectral 1": (val, self_, comb), MIX: (val + 0.05, None, comb)}.items():
            res[label] = {"auc": v}
            if sv is not None:
                res[rule.SELF + label] = {"auc": sv}
            res[rule.COMBINED + label] = {"auc": cv}
        return [{"config": {"seed": s}, "results": res} for s in seeds]

    # classifier: validation 0.70, self 0.80, combined 0.78; LLM: 0.80, 0.75, 0.79 -> self 0.775 < combined 0.785
    cls, llm = runs(0.70, 0.80, 0.78), runs(0.80, 0.75, 0.79)
    sig, vals = rule.choose_signal(s1, cls, QC_MIX, llm, LLM_TABLE)
    assert sig == "combined" and vals == pytest.approx({"validation": 0.75, "self": 0.775, "combined": 0.785})
    # the mixed variant: its own validation and combined, its damping's self signal
    sig, vals = rule.choose_signal(mix, cls, QC_MIX, llm, LLM_TABLE)
    assert vals == pytest.approx({"validation": 0.80, "self": 0.775, "combined": 0.785}) and sig == "validation"
    # ties go to validation; a reporting configuration is never read
    tie = runs(0.7, 0.7, 0.7) + runs(0.1, 0.99, 0.99, seeds=(2, 3))
    assert rule.choose_signal(s1, tie, QC_MIX, tie, LLM_TABLE)[0] == "validation"
    # a study without the self signal: no recommendation
    assert rule.choose_signal(s1, cls, QC_MIX, runs(0.8, None, 0.79), LLM_TABLE)[0] is None


def test_amendment_4_reads_a_symmetric_settings_self_signal_from_its_damping():
    from bench import variants

    d_sym = variants.DAMPED_LABELS[1]
    sym = rule.Setting("hyperinf", "spectral", 0.1, rule.options_of(variants.OPTIONS[d_sym]))
    plain = rule.Setting("hyperinf", "spectral", 0.1)
    table = {"hyperinf, spectral 0.1": plain, d_sym: sym}
    qc = [("hyperinf, spectral 0.1", "hyperinf", "spectral", 0.1, {}),
          (d_sym, "hyperinf", "spectral", 0.1, variants.OPTIONS[d_sym])]
    assert rule.has_base_self(sym) and not rule.has_base_self(plain)
    assert not rule.has_base_self(rule.Setting("hyperinf", "spectral", 1.0, (("normalize", "unit"),)))

    def runs(val, self_, comb, seeds=(0, 1)):
        res = {"hyperinf, spectral 0.1": {"auc": 0.5}, rule.SELF + "hyperinf, spectral 0.1": {"auc": self_},
               d_sym: {"auc": val}}
        if comb is not None:
            res[rule.COMBINED + d_sym] = {"auc": comb}
        return [{"config": {"seed": s}, "results": res} for s in seeds]

    # validation 0.80 / 0.86, its damping's self 0.70 / 0.80, combined 0.84 / 0.88 -> combined 0.86 > 0.83
    sig, vals = rule.choose_signal(sym, runs(0.80, 0.70, 0.84), qc, runs(0.86, 0.80, 0.88), table)
    assert sig == "combined" and vals == pytest.approx({"validation": 0.83, "self": 0.75, "combined": 0.86})
    # before its combined signal is recorded: no recommendation
    assert rule.choose_signal(sym, runs(0.80, 0.70, None), qc, runs(0.86, 0.80, 0.88), table)[0] is None
    # the fresh reporting seeds are none of the selection ones
    assert not set(rule.FRESH_DETECTION_SEEDS) & set(rule.DETECTION_SELECTION_SEEDS)


def test_amendment_3_chooses_the_validation_setting_by_its_mean_auc_over_both_studies():
    from bench import variants

    mix = rule.Setting("hyperinf", "spectral", 1.0, rule.options_of(MIX_OPTS))
    d_mix, d_sym = variants.DAMPED_LABELS
    damped = {d_mix: rule.Setting("hyperinf", "spectral", 0.1, rule.options_of(variants.OPTIONS[d_mix])),
              d_sym: rule.Setting("hyperinf", "spectral", 0.1, rule.options_of(variants.OPTIONS[d_sym]))}
    table = {**LLM_TABLE, **damped}
    qc = QC_MIX + [(l, "hyperinf", "spectral", 0.1, variants.OPTIONS[l]) for l in damped]

    def runs(v_mix, v_dmix, v_dsym, seeds=(0, 1)):
        res = {MIX: {"auc": v_mix}, d_mix: {"auc": v_dmix}}
        if v_dsym is not None:
            res[d_sym] = {"auc": v_dsym}
        return [{"config": {"seed": s, "i": s}, "results": res} for s in seeds]

    # classifier: 0.80 / 0.78 / 0.79; LLM: 0.84 / 0.88 / 0.86 -> means 0.82, 0.83, 0.825: the damped mixed one
    best, vals = rule.choose_validation_setting(mix, runs(0.80, 0.78, 0.79), qc, runs(0.84, 0.88, 0.86), table)
    assert best == damped[d_mix] and vals == pytest.approx({mix: 0.82, damped[d_mix]: 0.83, damped[d_sym]: 0.825})
    # ties go to 1a-1b's setting; the reporting configurations (seeds 2, 3) are never read
    tie = runs(0.8, 0.8, 0.8) + runs(0.1, 0.99, 0.99, seeds=(2, 3))
    assert rule.choose_validation_setting(mix, tie, qc, tie, table)[0] == mix
    # a candidate missing from a study's selection configurations: no choice, the others' values shown
    best, vals = rule.choose_validation_setting(mix, runs(0.80, 0.78, None), qc, runs(0.84, 0.88, 0.86), table)
    assert best is None and set(vals) == {mix, damped[d_mix]}
    # fewer selection configurations than the grid has: that study counts as unmeasured
    best, vals = rule.choose_validation_setting(mix, runs(0.80, 0.78, 0.79), qc, runs(0.84, 0.88, 0.86), table,
                                                expected_configs={"classifier": 2, "LLM": 3})
    assert best is None and vals == {}


def test_defaults_report_chooses_on_selection_data_and_reports_on_the_rest():
    from bench.defaults_report import report

    val = {"hyperinf, datainf damping": 0.70, "hyperinf, spectral 1": 0.70, "hyperinf, spectral 3": 0.72, MIX: 0.80,
           "tracin": 0.6}
    flat = {"hyperinf, datainf damping": 0.7, "hyperinf, spectral 1": 0.7, "hyperinf, spectral 3": 0.7, "tracin": 0.6}
    comb = {rule.COMBINED + "hyperinf, spectral 1": {"auc": 0.71}, rule.COMBINED + MIX: {"auc": 0.85}}

    def det(v, seeds):
        runs = _detection(v, flat, seeds)
        for r in runs:
            r["results"].update(comb)
        return runs

    data = {"classifier LDS": _study_records((0, 1), variant_noise=0.3),
            "LLM LDS": _study_records((0,), model="smollm2", variant_noise=0.3),
            "classifier detection": det(val, (0, 1)), "LLM detection": det(val, (0, 1))}
    text = report(data, n_boot=20, expected={"classifier": 2, "LLM": 2})
    assert "| hyperinf, spectral × 1 **(chosen)** |" in text
    assert "| hyperinf, spectral × 1, mix_queries=99 **(chosen)** |" in text  # 1b
    assert "| combined **(chosen)** | 0.850 |" in text and "| self | 0.700 |" in text and "| validation | 0.800 |" in text
    # 1d: the damped variants have no record here, so no choice, and the report names the commands
    assert "## 1d. The setting of the validation signal (amendment 3)" in text
    assert "| hyperinf, spectral × 1, mix_queries=99 | 0.800 | 0.800 | 0.800 |" in text
    assert "No choice yet: a candidate lacks" in text and "--parts library" in text
    assert "python -m bench.lds --seeds 2,3" in text and "python -m bench.lds --model smollm2 --seeds 1,2" in text
    assert text.count("No reporting configuration") == 4
    # reporting data: detection of seed 2 (classifier) and seeds 2-3 (LLM); tracin is the tuned peer there
    rep_val = {**val, MIX: 0.9, "tracin": 0.5}
    data["classifier detection"] += det(rep_val, (2,))
    data["LLM detection"] += det(rep_val, (2, 3))
    data["classifier LDS"] += _study_records((2, 3), variant_noise=0.3)
    text = report(data, n_boot=20, expected={"classifier": 2, "LLM": 2})
    assert "| hyperinf, spectral × 1, mix_queries=99 **(chosen)** |" in text  # unchanged by reporting data
    assert "Default: `hyperinf, spectral 1, mixed 99`, mean AUC 0.900." in text
    assert "| tracin | tracin | 0.500 | +0.400 ± 0.000 | 2/2 |" in text  # LLM: two configurations
    assert "### Reported on seeds 2, 3 (not used by the rule)" in text


def test_detection_peer_measured_on_some_reporting_configurations_is_compared_there_and_says_so():
    from bench.defaults_report import detection_reported

    table = {**LLM_TABLE, "tracin": rule.Setting("tracin", None, None)}
    sel = _detection({MIX: 0.8, "tracin": 0.6, "hyperinf, spectral 1": 0.7}, {}, (0, 1))
    rep = [{**r, "results": dict(r["results"])} for r in _detection({MIX: 0.9, "hyperinf, spectral 1": 0.7}, {}, (2, 3))]
    rep[0]["results"]["tracin"] = {"auc": 0.5}  # the peer on one of the two reporting configurations
    rep[1]["results"][MIX] = {"auc": 0.7}
    lines = detection_reported(sel + rep, table, table[MIX], "validation", (2, 3))
    row = next(l for l in lines if l.startswith("| tracin |"))
    # paired on configuration 2 only: 0.9 - 0.5; the default's mean there (0.9) beside the peer's
    assert row == "| tracin | tracin | 0.500 (on 1 of 2; default there 0.900) | +0.400 | 1/1 |"
    assert "mean AUC 0.800." in lines[0]  # the default's mean over both reporting configurations
    rep[0]["results"].pop("tracin")
    lines = detection_reported(sel + rep, table, table[MIX], "validation", (2, 3))
    assert "| tracin | tracin | not on a reporting configuration yet | — | — |" in lines


def test_detection_peer_with_one_setting_is_reported_without_selection_data_and_a_grid_peer_is_named():
    from bench.defaults_report import detection_reported

    table = {**LLM_TABLE, "tracin": rule.Setting("tracin", None, None), "bergson TrackStar": rule.Setting("bergson TrackStar"),
             "ek 0.1": rule.Setting("ekfac", "kronfluence heuristic", 0.1),
             "ek 1": rule.Setting("ekfac", "kronfluence heuristic", 1.0)}
    sel = _detection({MIX: 0.8, "tracin": 0.6, "hyperinf, spectral 1": 0.7}, {}, (0, 1))
    rep = [{**r, "results": dict(r["results"])} for r in
           _detection({MIX: 0.9, "hyperinf, spectral 1": 0.7, "bergson TrackStar": 0.95, "ek 1": 0.5}, {}, (2, 3))]
    lines = detection_reported(sel + rep, table, table[MIX], "validation", (2, 3))
    assert "| bergson TrackStar | bergson TrackStar (its one setting) | 0.950 | -0.050 ± 0.000 | 0/2 |" in lines
    # a grid without selection data: its best setting on the reporting configurations (ek 1, the one measured)
    assert "| ekfac, best of its grid here | ekfac, kronfluence heuristic × 1 | 0.500 | +0.400 ± 0.000 | 2/2 |" in lines
    assert any(l.startswith("Not measured on every selection configuration") and "ekfac" in l for l in lines)


def test_lds_peers_without_selection_data_one_setting_as_it_is_a_grid_by_its_best(monkeypatch):
    from bench.defaults_report import untuned_peers

    def rec(seed, method, damping):
        return {"kind": "scores", "config": {"seed": seed, "model": "smollm2"}, "label": f"{method} {damping}",
                "method": method, "damping": damping, "predicted": [[0.0]]}

    recs = [rec(0, "hyperinf", ["spectral", 1.0]), rec(1, "hyperinf", ["spectral", 1.0]),
            rec(1, "bergson TrackStar", ["bergson damped_inverse", 0.1]),
            rec(1, "ekfac", ["kronfluence heuristic", 0.1]), rec(1, "ekfac", ["kronfluence heuristic", 1.0]),
            rec(0, "lissa", ["spectral", 10.0]), rec(1, "lissa", ["spectral", 10.0])]
    peers = {"hyperinf": (rule.Setting("hyperinf", "spectral", 1.0), 0.5), "lissa": (rule.Setting("lissa", "spectral", 10.0), 0.5)}
    ek = [rule.Setting("ekfac", "kronfluence heuristic", x) for x in (0.1, 1.0)]
    # the grid's LDS on reporting seed 1 (the records carry no subset models): the larger scale is better
    monkeypatch.setattr(rule, "seed_lds", lambda records, seeds, n_subsets=None: {1: {ek[0]: ("a", 0.6), ek[1]: ("b", 0.7)}})
    rows, grids = untuned_peers(recs, peers)
    assert grids == ["ekfac"]
    assert rows == {"bergson TrackStar": (rule.Setting("bergson TrackStar", "bergson damped_inverse", 0.1), None),
                    "ekfac, best of its grid on these seeds": (ek[1], None)}


def test_audit_defaults_are_what_rules_1c_and_1d_choose_on_the_committed_records():
    """hyperinf_ext/app/tasks/audit.py's DETECTION_* constants are the rule's output on bench/*.jsonl (the
    selection data only), not a hand-picked setting: 1a-1b's setting, then 1d's, then 1c on it."""
    from bench import quality, quality_llm
    from bench.defaults_report import audit_defaults, load_all

    data = load_all()
    cls_rows = list(quality.CANDIDATES) + list(quality.VARIANT_CANDIDATES)
    table = quality_llm.settings_table()
    choice = rule.choose_default_amended(data["classifier LDS"], data["classifier detection"], cls_rows,
                                         data["LLM LDS"], data["LLM detection"], table)
    best, _ = rule.choose_validation_setting(choice.final, data["classifier detection"], cls_rows,
                                             data["LLM detection"], table)
    signal, _ = rule.choose_signal(best, data["classifier detection"], cls_rows, data["LLM detection"], table)
    assert audit_defaults() == (best, signal)
