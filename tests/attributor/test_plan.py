"""``HyperINF.plan``: the bytes it counts equal those the run then holds, it leaves the attributor untouched,
and its predicted peak tracks the measured one (issue #23 item 3).

The counted components (factors, inverses, gradient cache, query gradients, score matrix or top-k) are
shapes × element sizes, so they must equal the tensors' ``nbytes`` exactly.  The peak check runs the plan
and the fit in two fresh processes (as bench/plan_accuracy.py does on the embedded models) on a tiny model
whose gradient cache (≈ 120 MB) dominates what varies; the band is wide (0.75–1.33 of what the run held
above its baseline) because RSS also holds allocator slack and pages the probe's batch left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_bert import DATA_VOCAB, batches, make_data, tiny_bert_lora  # noqa: E402

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.attributor.plan import Plan, format_bytes, parse_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def setup():
    model = tiny_bert_lora(vocab=DATA_VOCAB, hidden=32, layers=2, seed=0)
    train = batches(make_data(70, 1), 16)  # 5 batches, the last one short
    queries = batches(make_data(6, 2, index_offset=0), 4)
    return model, train, queries


def test_counted_bytes_equal_the_run(setup):
    model, train, queries = setup
    attr = HyperINF(model, progress=False, cache="memory")
    plan = attr.plan(train, n_queries=6)
    assert isinstance(plan, Plan) and attr.factors == {} and attr.n_train == 0  # nothing fitted
    assert (plan.n_train, plan.n_batches, plan.train_tokens) == (70, 5, 70 * 8)
    assert plan.gradient_numbers == sum(l.rank * l.dim for l in attr.layers)
    attr.fit(train)
    c = plan.components
    assert c["factors"] == _nbytes([f.gfim_sum for f in attr.factors.values()]
                                   + [f.rank_sum for f in attr.factors.values()])
    assert c["method_state"] == _nbytes(attr.method.state.values()) > 0
    assert c["gradient_cache"] == attr.cache.nbytes() > 0
    q = attr.query_gradients(queries)
    assert c["queries"] == _nbytes(q.grads.values())
    _, qt = attr.precondition(q)
    assert c["preconditioned"] == _nbytes(qt.values())
    S = attr.scores(q)
    assert c["scores"] == S.numel() * S.element_size()
    top = attr.scores(q, top_k=3)
    k_plan = attr.plan(train, n_queries=6, top_k=3)
    assert k_plan.components["scores"] == _nbytes([top.positive_values, top.positive_index, top.negative_values,
                                                   top.negative_index])
    m_plan = attr.plan(train, n_queries=6, mean=True)
    m = attr.mean_scores(q)
    assert m_plan.components["scores"] == m.numel() * m.element_size()
    assert m_plan.components["preconditioned"] == plan.components["preconditioned"] // 6
    disk = HyperINF(model, progress=False, cache="disk").plan(train)
    assert disk.components["gradient_cache"] == 0 and disk.components["scores"] == 0


def test_plan_changes_nothing(setup):
    model, train, queries = setup
    ref = HyperINF(model, progress=False).fit(train).scores(queries)
    attr = HyperINF(model, progress=False)
    plan = attr.plan(train, n_queries=6)
    assert attr.timings == {} and attr.batches_done == 0
    # the same model, loader and settings give the same scores after a plan (bit for bit: same order of work)
    assert torch.equal(attr.fit(train).scores(queries), ref)
    assert plan.probe.batches == 4 and plan.probe.largest_batch["examples"] == 16
    assert plan.seconds["fit"] > 0 and plan.probe.seconds_per_token > 0
    text = plan.table()
    assert "predicted peak" in text and format_bytes(plan.peak_bytes) in text


def test_savings_and_advice(setup):
    model, _, _ = setup
    train = batches(make_data(400, 3), 50)
    plan = HyperINF(model, progress=False, cache="memory").plan(train, n_queries=300)
    saved = plan.savings()
    assert set(saved) >= {"cache_disk", "float32"}  # the cache and the factors are in every phase
    for name, (_, peak) in saved.items():
        assert peak < plan.peak_bytes, name
    assert plan.advice(plan.peak_bytes) == []
    best = min(p for _, p in saved.values())
    lines = plan.advice(best, {"cache_disk": "--cache disk"})
    assert lines and all("peak about" in l for l in lines)
    assert any(l.startswith("--cache disk") for l in lines) == (saved["cache_disk"][1] <= best)
    lines = plan.advice(1, {})
    assert lines[-1].startswith("none of these alone is enough")


def test_bad_arguments(setup):
    model, train, _ = setup
    attr = HyperINF(model, progress=False)
    for kwargs, message in (({"probe_batches": 1}, "probe_batches"), ({"n_queries": -1}, "n_queries"),
                            ({"top_k": 0}, "top_k"), ({"top_k": 3, "mean": True}, "not with mean")):
        with pytest.raises(ValueError, match=message):
            attr.plan(train, **kwargs)
    with pytest.raises(ValueError, match="yielded no batches"):
        attr.plan([])
    with pytest.raises(ValueError, match="without tensors"):
        attr.plan([{"labels": [1, 2]}])


def test_parse_bytes():
    assert parse_bytes("8G") == 8 * 2 ** 30 and parse_bytes("512M") == 512 * 2 ** 20
    assert parse_bytes("1.5GiB") == int(1.5 * 2 ** 30) and parse_bytes("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from tiny_bert import DATA_VOCAB, batches, make_data, tiny_bert_lora
from hyperinf_ext import HyperINF
from hyperinf_ext.attributor.plan_probe import peak_rss_bytes, reset_peak_rss, rss_bytes
model = tiny_bert_lora(vocab=DATA_VOCAB, hidden=64, layers=2, seed=0)
train = batches(make_data(9000, 1), 64)
queries = batches(make_data(40, 2), 20)
attr = HyperINF(model, progress=False, cache="memory")
if sys.argv[1] == "plan":
    p = attr.plan(train, n_queries=40)
    print(json.dumps({{"above": p.phases[p.peak_phase], "peak": p.peak_bytes, "cache": p.components["gradient_cache"]}}))
else:
    ok = reset_peak_rss()
    base = rss_bytes()
    attr.fit(train).scores(queries)
    print(json.dumps({{"ok": ok, "above": peak_rss_bytes() - base, "cache": attr.cache.nbytes()}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_predicted_peak_tracks_the_measured_one(tmp_path):
    script = tmp_path / "plan_child"
    script.write_text(_CHILD.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = {}
    for role in ("plan", "run"):
        proc = subprocess.run([sys.executable, str(script), role], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[role] = json.loads(proc.stdout.strip().splitlines()[-1])
    plan, run = out["plan"], out["run"]
    assert run["ok"] and plan["cache"] == run["cache"] > 100 * 2 ** 20
    ratio = plan["above"] / run["above"]
    assert 0.75 <= ratio <= 1.33, (plan, run, ratio)
