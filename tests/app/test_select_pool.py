"""``select`` (issue #22): exactly the requested count or fraction of the pool, the user's rows unchanged in pool
order, class balance where labels exist, scores equal to HyperINF.mean_scores on the target, the warm-up on
a seeded random part of the pool, and --evaluate against a random subset.  Tiny models only."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from test_html_report import parse, sections_by_title  # noqa: E402
from tiny_llm import make_tiny_llama, make_tokenizer, sentiment_rows, write_instructions  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    folder = make_tiny_llama(root / "model")
    rows = [{**r, "id": i} for i, r in enumerate(sentiment_rows(40, seed=3))]
    rows[5] = {**rows[5], "response": "negative" if rows[5]["response"] == "positive" else "positive"}
    pool = root / "pool.jsonl"
    # spacing and key order as a user wrote them: the selection must keep each line byte for byte
    pool.write_text("".join(json.dumps(r, indent=None, separators=(", ", ":")) + "\n" for r in rows), encoding="utf-8")
    target = write_instructions(root / "target.jsonl", sentiment_rows(4, seed=4))
    return folder, pool, target


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT, an adapter with a 2-class head, and a CSV pool (extra columns, 3:1 class imbalance)."""
    root = tmp_path_factory.mktemp("select-bert")
    tok = make_tokenizer(chat_template=False)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(root / "bert"))
    tok.save_pretrained(str(root / "bert"))
    from hyperinf_ext.app.models.training import load_lora_model
    from tiny_bert import nonzero_lora_b

    torch.manual_seed(1)
    nonzero_lora_b(load_lora_model(root / "bert", num_labels=2, rank=2)).save_pretrained(str(root / "adapter"))
    pool = root / "pool.csv"
    with open(pool, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "source"])
        for i, r in enumerate(sentiment_rows(32, seed=5)):
            w.writerow([r["prompt"], "positive" if i % 4 else "negative", f"site {i}, page {i // 3}"])
    target = root / "target.csv"
    target.write_text("text,label\na great fun film,positive\na dull film,negative\na superb film,positive\n")
    return root / "bert", root / "adapter", pool, target


def direct_mean_scores(folder, adapter, pool, target):
    """HyperINF.mean_scores of the pool on the target, computed here (one thread, as the command ran)."""
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import load_text_file, make_loader
    from hyperinf_ext.app.models.training import load_lora_model, load_tokenizer

    tok = load_tokenizer(folder)
    train = load_text_file(pool)
    tgt = load_text_file(target, min_classes=1)
    assert tgt.label_names == train.label_names
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_lora_model(folder, num_labels=2, adapter=adapter)
        attr = HyperINF(model, progress=False).fit(make_loader(train, tok, batch_size=32, sort_by_length=True))
        return attr.mean_scores(make_loader(tgt, tok, batch_size=32, sort_by_length=True)).double().numpy()
    finally:
        torch.set_num_threads(threads)


def test_select_on_a_classifier_keeps_the_fraction_class_balanced_in_pool_order(bert, tmp_path, capsys):
    from hyperinf_ext.app.tasks.selection_rules import class_quotas

    folder, adapter, pool, target = bert
    out = tmp_path / "out"
    assert main(["select", "--model", str(folder), "--adapter", str(adapter), "--pool", str(pool), "--target",
                 str(target), "--fraction", "0.25", "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    assert "rule class-balanced" in capsys.readouterr().out
    with open(pool, newline="", encoding="utf-8") as f:
        original = list(csv.DictReader(f))
    with open(out / "selected.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "label", "source"]
        selected = list(reader)
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        scores = list(csv.DictReader(f))
    assert [int(s["line"]) for s in scores] == list(range(2, 34))  # every pool row by file line (header = 1)
    kept = [int(s["line"]) - 2 for s in scores if s["selected"] == "1"]
    assert len(selected) == 8 and selected == [original[i] for i in kept]  # the rows as written, pool order
    labels = np.array([1 if r["label"] == "positive" else 0 for r in original])
    expected_quota = class_quotas(labels, 8)
    assert {c: int((labels[kept] == c).sum()) for c in (0, 1)} == expected_quota
    s = np.array([float(x["influence_score"]) for x in scores])
    for c in (0, 1):  # within each class the kept examples are the most helpful (most negative)
        members = np.flatnonzero(labels == c)
        assert set(np.array(kept)[labels[kept] == c]) == set(members[np.argsort(s[members], kind="stable")[:expected_quota[c]]])
    np.testing.assert_allclose(s, direct_mean_scores(folder, adapter, pool, target), rtol=1e-9, atol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_selected"] == 8 and summary["rule"] == "class-balanced" and summary["warmup"]["n_examples"] == 0
    assert "NEGATIVE = helpful" in summary["signal"] and not (out / ".checkpoint").exists()
    # what the scores used ("auto" resolved to hyperinf's own default), in the summary and its settings
    assert summary["damping"] == summary["settings"]["damping"] == "spectral:1"
    assert (summary["settings"]["mix_queries"], summary["settings"]["normalize"]) == (0.0, "none")
    check_report_html(out, summary, scores, original, text_key="text", answer_key="label")


def check_report_html(out, summary, scores, original, *, text_key, answer_key):
    """report.html: settings, the rule and count, every pool row by score with its selected flag, the evaluation."""
    assert summary["outputs"]["html"] == str(out / "report.html")
    doc = parse((out / "report.html").read_text(encoding="utf-8"))
    sections = sections_by_title(doc)
    assert list(sections)[:3] == ["Settings", "Rule", "Every pool example, most helpful first"]
    assert summary["rule"] in sections["Rule"].content()
    assert f"{summary['n_selected']} of {summary['n_pool']} kept" in sections["Rule"].content()
    table = sections["Every pool example, most helpful first"].all("table")[0]
    assert [h.content() for h in table.all("th")] == ["line", text_key, answer_key, "influence_score", "selected"]
    rows = [r.all("td") for r in table.all("tbody")[0].all("tr")]
    by_line = {int(s["line"]): s for s in scores}
    assert len(rows) == len(scores) and len(table.all("span", "bar")) == len(scores)
    shown = [float(r[3].attrs["data-v"]) for r in rows]
    assert shown == sorted(shown)  # most helpful (most negative) first
    for r in rows:
        line = int(r[0].content())
        assert float(r[3].attrs["data-v"]) == float(by_line[line]["influence_score"])
        assert (r[4].content() == "selected") == (by_line[line]["selected"] == "1")
        assert r[1].content() == original[line - 2 if text_key == "text" else line - 1][text_key]
    evaluation = [s for t, s in sections.items() if t.startswith("Evaluation")]
    assert len(evaluation) == (1 if summary["evaluation"] else 0)
    if evaluation:
        cells = [r.all("td") for r in evaluation[0].all("tbody")[0].all("tr")]
        assert [c[0].content() for c in cells] == ["selected (influence)", "random subset"]
        assert [float(c[2].attrs["data-v"]) for c in cells] == [summary["evaluation"][k]["val_loss"]
                                                                for k in ("selected", "random")]


def test_select_warms_up_on_part_of_the_pool_and_keeps_lines_byte_for_byte(llm, tmp_path, capsys):
    folder, pool, target = llm
    out = tmp_path / "out"
    assert main(["select", "--model", str(folder), "--pool", str(pool), "--target", str(target), "--count", "7",
                 "--warmup-fraction", "0.1", "--epochs", "1", "--lr", "1e-2", "--evaluate", "--out", str(out),
                 *FAST]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "warm-up: 32 random pool examples" in printed and "target loss" in printed
    lines = pool.read_text(encoding="utf-8").splitlines()
    with open(out / "scores.csv", newline="") as f:
        kept = [int(r["line"]) for r in csv.DictReader(f) if r["selected"] == "1"]
    assert (out / "selected.jsonl").read_text(encoding="utf-8").splitlines() == [lines[i - 1] for i in kept]
    assert len(kept) == 7 and kept == sorted(kept)
    summary = json.loads((out / "summary.json").read_text())
    warm = summary["warmup"]
    assert warm["n_examples"] == 32 and len(set(warm["lines"])) == 32 and set(warm["lines"]) <= set(range(1, 41))
    assert summary["rule"] == "class-balanced"  # two distinct answers: labels
    ev = summary["evaluation"]
    assert ev["n_examples"] == 7 and all(ev[k]["val_loss"] > 0 for k in ("selected", "random"))
    with open(out / "scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    original = [json.loads(line) for line in lines]
    check_report_html(out, summary, scores, original, text_key="prompt", answer_key="response")


def test_select_without_labels_uses_the_measured_rule(llm, tmp_path, capsys):
    from hyperinf_ext.app.tasks.select_pool import NO_LABEL_RULE

    folder, _, target = llm
    rows = [{"prompt": f"what colour sky {i}", "response": " ".join(["blue", "green", "red"][j % 3] for j in range(i + 1))}
            for i in range(12)]
    pool = write_instructions(tmp_path / "free.jsonl", rows)
    out = tmp_path / "out"
    assert main(["select", "--model", str(folder), "--pool", str(pool), "--target", str(target), "--fraction", "0.5",
                 "--epochs", "1", "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == NO_LABEL_RULE == "drop-harmful" and summary["n_selected"] == 6
    assert len((out / "selected.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("argv, words", [
    (["--fraction", "0.5", "--count", "3"], ["not allowed with argument"]),
    (["--count", "41"], ["--count 41", "has only 40 examples"]),
    (["--fraction", "0"], ["--fraction must be in (0, 1]"]),
    (["--count", "3", "--warmup-fraction", "2"], ["--warmup-fraction must be in (0, 1]"]),
    (["--count", "3", "--rule", "best"], ["--rule: unknown selection rule 'best'"]),
])
def test_select_bad_sizes_are_refused_before_any_work(llm, tmp_path, capsys, monkeypatch, argv, words):
    from hyperinf_ext.app.tasks import user_run

    monkeypatch.setattr(user_run, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    folder, pool, target = llm
    code = main(["select", "--model", str(folder), "--pool", str(pool), "--target", str(target), *argv,
                 "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err


# ------------------------------------------------------------------------------ --index


@pytest.fixture(scope="module")
def bert_index(bert):
    folder, adapter, pool, _ = bert
    idx = pool.parent / "index-exact"
    assert main(["index", "build", "--model", str(folder), "--adapter", str(adapter), "--train", str(pool),
                 "--proj-dim", "0", "--out", str(idx), *FAST]) == 0
    return idx


def _scores(out):
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mix", [[], ["--mix-queries", "99"]])
def test_select_from_an_exact_index_equals_the_select_without(bert, bert_index, tmp_path, capsys, mix):
    folder, adapter, pool, target = bert
    plain, indexed = tmp_path / "plain", tmp_path / "indexed"
    assert main(["select", "--model", str(folder), "--adapter", str(adapter), "--pool", str(pool), "--target",
                 str(target), "--fraction", "0.25", "--out", str(plain), *mix, *FAST]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["select", "--index", str(bert_index), "--target", str(target), "--fraction", "0.25", "--evaluate",
                 "--epochs", "1", "--out", str(indexed), *mix, *FAST]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"index {bert_index}: scores from the index, exact" in printed and "evaluation: fresh LoRA" in printed
    a, b = _scores(plain), _scores(indexed)
    assert [r["line"] for r in a] == [r["line"] for r in b]
    assert [r["selected"] for r in a] == [r["selected"] for r in b]  # the same selection
    top = max(abs(float(r["influence_score"])) for r in a)
    for x, y in zip(a, b):
        assert float(y["influence_score"]) == pytest.approx(float(x["influence_score"]), rel=1e-5, abs=1e-6 * top)
    assert (indexed / "selected.csv").read_bytes() == (plain / "selected.csv").read_bytes()
    summary = json.loads((indexed / "summary.json").read_text())
    assert summary["index"]["proj_dim"] == 0 and summary["index"]["projected"] is False
    # the damping the index scores at, as the run without it reports it (not the stored "auto")
    plain_summary = json.loads((plain / "summary.json").read_text())
    assert summary["damping"] == summary["index"]["damping"] == plain_summary["damping"] == "spectral:1"
    assert summary["warmup"]["n_examples"] == 0 and summary["pool"] == str(pool.resolve())
    assert summary["evaluation"]["n_examples"] == 8 and summary["evaluation"]["epochs"] == 1
    with open(pool, newline="", encoding="utf-8") as f:
        original = list(csv.DictReader(f))
    check_report_html(indexed, summary, b, original, text_key="text", answer_key="label")


def test_select_index_refusals(bert, bert_index, tmp_path, capsys, monkeypatch):
    from hyperinf_ext.app.tasks import user_run

    monkeypatch.setattr(user_run, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    folder, adapter, pool, target = bert
    base = ["select", "--index", str(bert_index), "--target", str(target), "--out", str(tmp_path / "o"), *FAST]
    cases = [
        (["--count", "3", "--model", str(folder)], "--model: not with --index"),
        (["--count", "3", "--adapter", str(adapter)], "--adapter: not with --index"),
        (["--count", "3", "--pool", str(target)], f"--pool {target}: not the file the index"),
        (["--count", "3", "--epochs", "2"], "--epochs: with --index only for --evaluate"),
        (["--count", "33"], "--count 33: the pool of the index"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        code = main([*base, *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_fraction_budget_rounds_halves_up_and_keeps_at_least_one():
    from hyperinf_ext.app.tasks.select_pool import SelectPoolConfig

    def keep(fraction, n):
        return SelectPoolConfig(pool="p.csv", target="t.csv", fraction=fraction).budget(n)

    assert [keep(0.5, 5), keep(0.5, 7), keep(0.25, 10), keep(0.3, 10), keep(0.01, 10), keep(1.0, 9)] == [3, 4, 3, 3, 1, 9]
    assert SelectPoolConfig(pool="p.csv", target="t.csv", count=4).budget(10) == 4


def test_auto_rule_takes_answers_given_once_for_free_form_text():
    """A few stock replies plus many one-off answers were taken for labels (at most 50 distinct, at most half
    the pool) and class-balanced then gave every one-off answer a class of one; over 5 % one-off answers is
    free-form text now (drop-harmful), while a classifier and label-like answers keep class-balanced."""
    from types import SimpleNamespace

    from hyperinf_ext.app.tasks.select_pool import NO_LABEL_RULE, auto_rule

    class Pool(list):
        def __init__(self, answers):
            super().__init__(answers)
            self.labels, self.num_classes = list(answers), len(set(answers))

    def rule(answers, causal=True):
        return auto_rule(SimpleNamespace(train=Pool(answers), causal=causal))

    stock = ["yes"] * 45 + ["no"] * 45
    assert rule(stock + [f"a{i}" for i in range(4)])[0] == "class-balanced"  # 4 of 94 given once: ≤ 5 %
    assert rule(stock + [f"a{i}" for i in range(5)])[0] == NO_LABEL_RULE  # 5 of 95: over
    chosen, why = rule(stock + [f"a{i}" for i in range(10)])  # 10 of 100
    assert chosen == NO_LABEL_RULE and "12 distinct answers of 100, 10 of them given once" in why
    assert rule(stock + [f"a{i}" for i in range(10)], causal=False)[0] == "class-balanced"  # a classifier's classes
    assert rule(["a", "b"] * 40 + ["c"] * 2)[0] == "class-balanced"
    assert "are 12 distinct answers of 12, not labels" in rule([f"x{i}" for i in range(12)])[1]  # too many distinct
