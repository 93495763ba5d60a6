"""bench/quality_llm.py (the LLM detection study) and the variants' scoring in the classifier's study, on a
tiny float64 BERT: every signal it records is the ROC-AUC of the library call it names, the parts of one
configuration merge, a resumed run scores only the missing parts, and the report reads the records."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import quality_llm as ql
from bench import defaults_rule as rule
from bench import variants
from bench.defaults_rule import Setting, detection_auc
from hyperinf_ext import HyperINF
from hyperinf_ext.app.tasks.metrics import rank_average, roc_auc
from tiny_bert import batches, make_data, tiny_model


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model(seed=3)
    model.eval()
    train, val = make_data(24, seed=1), make_data(6, seed=2, index_offset=100)
    attr = HyperINF(model, dtype=torch.float64).fit(batches(train, 8))
    queries = attr.query_gradients(batches(val, 3))
    flipped = np.zeros(24, dtype=bool)
    flipped[[1, 4, 7, 11, 17, 20]] = True
    return attr, queries, flipped


def test_library_part_scores_only_the_labels_asked_for(fitted, monkeypatch):
    """A rerun for candidates added later (bench/variants.py DAMPED) records those alone, with the values a
    full run gives them; a variant without a self signal of its own (mixed-only, "symmetric") has a combined
    signal with its damping's self signal, computed but not recorded again (amendment 4)."""
    attr, queries, flipped = fitted
    rows = [("hyperinf, spectral 0.1", "hyperinf", "spectral:0.1", {}), ("hyperinf, spectral 1", "hyperinf", "spectral:1", {})]
    rows += [(l, "hyperinf", "spectral:0.1", dict(variants.OPTIONS[l])) for l in variants.DAMPED_LABELS]
    monkeypatch.setattr(ql, "library_candidates", lambda: rows)
    run = SimpleNamespace(attr=attr, queries=queries)
    full = ql._library_part(run, flipped)
    part = ql._library_part(run, flipped, set(variants.DAMPED_LABELS))
    mixed, sym = variants.DAMPED_LABELS
    assert set(part) == {mixed, sym, ql.COMBINED + mixed, ql.COMBINED + sym}
    for key, v in part.items():
        assert v["auc"] == pytest.approx(full[key]["auc"], abs=1e-12), key
    attr.use("hyperinf", damping="spectral", damping_scale=0.1)
    val = attr.mean_scores(queries, mix_queries=99.0).double().numpy()
    assert part[mixed]["auc"] == pytest.approx(roc_auc(val, flipped), abs=1e-12)
    base_self = attr.self_scores().double().numpy()
    assert part[ql.COMBINED + mixed]["auc"] == pytest.approx(roc_auc(rank_average(val, base_self), flipped), abs=1e-12)
    sym_val = attr.mean_scores(queries, mix_queries=99.0, normalize="symmetric").double().numpy()
    assert part[ql.COMBINED + sym]["auc"] == pytest.approx(roc_auc(rank_average(sym_val, base_self), flipped),
                                                           abs=1e-12)
    # the damping is the variant's own: at spectral × 1 the same option scores differently
    attr.use("hyperinf", damping="spectral", damping_scale=1.0)
    assert not np.allclose(attr.mean_scores(queries, mix_queries=99.0).double().numpy(), val, rtol=1e-6)


def test_missing_library_labels_names_the_candidates_a_record_lacks(monkeypatch):
    rows = [("a", "hyperinf", "spectral:1", {}), ("b", "hyperinf", "spectral:0.1", {})]
    monkeypatch.setattr(ql, "library_candidates", lambda: rows)
    assert ql.missing_library_labels(None) == ["a", "b"]
    assert ql.missing_library_labels({"results": {"a": {"auc": 0.5}, "self: a": {}, "combined: a": {}}}) == ["b"]
    assert ql.missing_library_labels({"results": {"a": {"auc": 0.5}, "self: a": {}}}) == ["a", "b"]
    assert ql.missing_library_labels({"results": {"a": {}, "b": {}}}) == []


def test_missing_library_labels_names_a_variant_whose_combined_signal_is_missing(monkeypatch):
    """Amendment 4: a "symmetric" variant recorded before it had a combined signal is scored again, once its
    damping's self signal is in the record; not when that self signal failed, nor once recorded."""
    sym = variants.label("symmetric", 0.1)
    rows = [("hyperinf, spectral 0.1", "hyperinf", "spectral:0.1", {}),
            (sym, "hyperinf", "spectral:0.1", {"normalize": "symmetric"})]
    monkeypatch.setattr(variants, "OPTIONS", {**variants.OPTIONS, sym: {"normalize": "symmetric"}})
    monkeypatch.setattr(variants, "SCALES", {**variants.SCALES, sym: 0.1})
    monkeypatch.setattr(ql, "library_candidates", lambda: rows)
    base = "hyperinf, spectral 0.1"
    rec = {base: {"auc": 0.6}, ql.SELF + base: {"auc": 0.7}, ql.COMBINED + base: {"auc": 0.7}, sym: {"auc": 0.8}}
    assert ql.missing_library_labels({"results": rec}) == [sym]
    assert ql.missing_library_labels({"results": {**rec, ql.COMBINED + sym: {"auc": 0.75}}}) == []
    failed = {**rec, ql.SELF + base: {"error": "ArithmeticError: not finite"}}
    del failed[ql.COMBINED + base]
    assert ql.missing_library_labels({"results": failed}) == []


def test_library_part_records_the_auc_of_each_named_call(fitted, monkeypatch):
    attr, queries, flipped = fitted
    # a small candidate list: the default, a peer, tracin and every variant
    rows = [("hyperinf, spectral 1", "hyperinf", "spectral:1", {}), ("datainf", "datainf", "auto", {}),
            ("tracin", "tracin", "auto", {})]
    rows += [(l, "hyperinf", f"spectral:{variants.SCALES[l]:g}", dict(o)) for l, o in variants.OPTIONS.items()]
    monkeypatch.setattr(ql, "library_candidates", lambda: rows)
    out = ql._library_part(SimpleNamespace(attr=attr, queries=queries), flipped)
    for label, method, damping, options in rows:
        attr.use(method, damping="spectral", damping_scale=float(damping.split(":")[1])) if method == "hyperinf" \
            else attr.use(method, damping="auto")
        want = roc_auc(attr.mean_scores(queries, **options).double().numpy(), flipped)
        assert out[label]["auc"] == pytest.approx(want, abs=1e-12), label
    # self signal: plain settings and "unit" (normalised self-influence); not the mixed-only or symmetric variants
    attr.use("hyperinf", damping="spectral", damping_scale=1.0)
    assert out[ql.SELF + "hyperinf, spectral 1"]["auc"] == pytest.approx(
        roc_auc(attr.self_scores().double().numpy(), flipped), abs=1e-12)
    unit = variants.label("unit")
    assert out[ql.SELF + unit]["auc"] == pytest.approx(
        roc_auc(attr.self_scores(normalize="unit").double().numpy(), flipped), abs=1e-12)
    for name in ("mixed 1", "mixed 99", "symmetric", "mixed 99, symmetric"):
        assert ql.SELF + variants.label(name) not in out
    # combined: the ranks of the validation and self signals averaged; a mixed-only variant takes its base's self
    attr.use("hyperinf", damping="spectral", damping_scale=1.0)
    base_self = attr.self_scores().double().numpy()
    for label, opts in (("hyperinf, spectral 1", {}), (variants.label("mixed 1"), {"mix_queries": 1.0})):
        val = attr.mean_scores(queries, **opts).double().numpy()
        assert out[ql.COMBINED + label]["auc"] == pytest.approx(roc_auc(rank_average(val, base_self), flipped), abs=1e-12)
    # a "symmetric" variant's self scores are all 1: its combined signal takes its damping's (amendment 4)
    sym_val = attr.mean_scores(queries, normalize="symmetric").double().numpy()
    assert out[ql.COMBINED + variants.label("symmetric")]["auc"] == pytest.approx(
        roc_auc(rank_average(sym_val, base_self), flipped), abs=1e-12)
    # the variants differ from the plain score (they are not silently ignored)
    attr.use("hyperinf", damping="spectral", damping_scale=1.0)
    plain = attr.mean_scores(queries).double()
    mixed = attr.mean_scores(queries, mix_queries=99.0).double()
    assert not torch.allclose(plain, mixed, rtol=1e-6, atol=0)


def test_metrics_refuse_a_wrong_length_or_non_finite_scores():
    flipped = np.array([True, False, False, True])
    with pytest.raises(ArithmeticError, match="expected 4 finite values"):
        ql._metrics(np.ones(3), flipped, 0.0)
    with pytest.raises(ArithmeticError):
        ql._metrics(np.array([1.0, np.nan, 0.0, 2.0]), flipped, 0.0)
    m = ql._metrics(np.array([3.0, 0.0, 1.0, 2.0]), flipped, 1.5)
    assert m["auc"] == 1.0 and m["seconds"] == 1.5


def test_parts_merge_resume_and_the_rule_reads_them(tmp_path, monkeypatch):
    runs = tmp_path / "runs.jsonl"
    cfg = ql.LlmRunConfig(seed=0, n_train=8, n_val=2)
    calls = []

    cands = [("hyperinf, spectral 1", "hyperinf", "spectral:1", {})]
    labels_asked = []

    def fake_run_config(c, parts, progress=False, library_labels=None):
        calls.append(list(parts))
        labels_asked.append(library_labels)
        for p in parts:
            res = {l: {"auc": 0.7, "top10": 0.5, "top20": 0.5, "seconds": 1.0}
                   for l in (library_labels or [c[0] for c in cands])}
            res = {**res, ql.SELF + "hyperinf, spectral 1": {"auc": 0.8, "top10": 0.5, "top20": 0.5, "seconds": 1.0},
                   ql.COMBINED + "hyperinf, spectral 1": {"auc": 0.75, "top10": 0.5, "top20": 0.5, "seconds": 0.0}} \
                if p == "library" else {f"{p} peer": {"auc": 0.6, "top10": 0.0, "top20": 0.5, "seconds": 2.0}}
            yield {"config": json.loads(c.key()), "val_accuracy": 0.9, "wall_seconds": 60.0, "part": p,
                   "part_seconds": 1.0, "results": res}
            if p == "library" and len(calls) == 1:
                raise KeyboardInterrupt  # killed after the first part

    monkeypatch.setattr(ql, "run_config", fake_run_config)
    monkeypatch.setattr(ql, "library_candidates", lambda: cands)
    monkeypatch.setattr(ql, "available_parts", lambda: ["library", "bergson", "kronfluence"])
    monkeypatch.setattr(ql, "grid", lambda smoke=False: [cfg])
    out = tmp_path / "Q.md"
    with pytest.raises(KeyboardInterrupt):
        ql.main(["--runs", str(runs), "--out", str(out)])
    assert ql.main(["--runs", str(runs), "--out", str(out)]) == 0
    assert calls == [["library", "bergson", "kronfluence"], ["bergson", "kronfluence"]]
    merged = ql.load_runs(runs)
    assert len(merged) == 1 and merged[0]["parts"] == ["library", "bergson", "kronfluence"]
    assert set(merged[0]["results"]) == {"hyperinf, spectral 1", ql.SELF + "hyperinf, spectral 1",
                                         ql.COMBINED + "hyperinf, spectral 1", "bergson peer", "kronfluence peer"}
    assert ql.main(["--runs", str(runs), "--out", str(out)]) == 0 and len(calls) == 2  # nothing left to run
    assert labels_asked == [None, None]
    # a candidate added later: the library part reruns for it alone, the peers are not rerun
    cands.append(("hyperinf, spectral 0.1, mixed 99", "hyperinf", "spectral:0.1", {"mix_queries": 99.0}))
    assert ql.main(["--runs", str(runs), "--out", str(out)]) == 0
    assert calls[2:] == [["library"]] and labels_asked[2:] == [["hyperinf, spectral 0.1, mixed 99"]]
    assert ql.main(["--runs", str(runs), "--out", str(out)]) == 0 and len(calls) == 3
    merged = ql.load_runs(runs)
    assert "hyperinf, spectral 0.1, mixed 99" in merged[0]["results"] and "bergson peer" in merged[0]["results"]
    cands.pop()
    s1 = Setting("hyperinf", "spectral", 1.0)
    table = {"hyperinf, spectral 1": s1}
    assert detection_auc(merged, table, seeds=(0,)) == {s1: 0.7}
    assert detection_auc(merged, table, seeds=(0,), signal="self") == {s1: 0.8}
    text = out.read_text()
    assert "## Selection configurations (seeds 0–1)" in text and "| hyperinf, spectral 1 | 0.700 | 1 | 0.800 | 0.750 |" in text
    assert "## Reporting configurations (seeds 2–3)" in text and "Not measured yet." in text


def test_settings_table_resolves_every_candidate_once():
    table = ql.settings_table()
    labels = [c[0] for c in ql.library_candidates()]
    assert list(table) == labels and len(set(labels)) == len(labels)
    assert table["hyperinf, spectral 1"] == Setting("hyperinf", "spectral", 1.0)
    assert table[variants.label("mixed 99")].options == (("mix_queries", 99.0),)
    assert table["tracin"] == Setting("tracin")
    # the grid: selection configurations (seeds 0-1) first, then reporting ones (2-3), then the fresh ones of
    # amendment 4 (seeds 4-5, the main setting), no repeats
    seeds = [c.seed for c in ql.grid()]
    assert seeds == sorted(seeds, key=lambda s: s > 1) and len({c.key() for c in ql.grid()}) == len(seeds) == 10
    assert tuple(seeds[8:]) == ql.FRESH_SEEDS == rule.FRESH_DETECTION_SEEDS
    assert all(c == ql.LlmRunConfig(seed=c.seed) for c in ql.grid()[8:])
    assert sum(c.seed in ql.ISSUE_SEEDS for c in ql.grid()) == 8
