"""``--per-token`` on ``attribute`` and ``audit`` (issue #22 item 3) on a tiny random Llama.

The shares in tokens.jsonl must add up to the scores the other outputs list (attribution.jsonl, ranked.jsonl):
the model is float32, so each per-token backward pass rounds on its own and the sums match to ~1e-5 of the
largest share (docs/api.md, precision note).  Only the kept pairs are written, every token is a string, the
report draws a heatmap per pair, and a classifier is refused before any work.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from test_html_report import parse, sections_by_title  # noqa: E402
from tiny_llm import make_tiny_adapter, make_tiny_llama, make_tokenizer, sentiment_rows, write_instructions  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]
REL = 1e-5  # of the largest |share|: float32 per-token passes


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-token")
    folder = make_tiny_llama(root / "model")
    make_tiny_adapter(folder, root / "adapter")
    rows = sentiment_rows(12, seed=1)
    rows[3]["response"] = "negative awful" if rows[3]["response"] == "positive" else "positive great"  # 2 words
    train = write_instructions(root / "train.jsonl", rows)
    query = write_instructions(root / "query.jsonl", sentiment_rows(3, seed=2))
    return folder, root / "adapter", train, query


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_sum(side: dict, score: float) -> None:
    """The side's shares (None for tokens the loss does not predict) sum to ``score``."""
    assert len(side["tokens"]) == len(side["shares"]) and all(isinstance(t, str) for t in side["tokens"])
    shares = [s for s in side["shares"] if s is not None]
    assert shares and side["shares"][0] is None  # the prompt's first token is never predicted
    top = max(abs(s) for s in shares)
    assert abs(sum(shares) - score) <= REL * top, (sum(shares), score, top)


def test_attribute_per_token_covers_the_kept_pairs_on_both_sides(llm, tmp_path, capsys):
    folder, adapter, train, query = llm
    out = tmp_path / "out"
    assert main(["attribute", "--model", str(folder), "--adapter", str(adapter), "--train", str(train), "--query",
                 str(query), "--top-k", "6", "--per-token", "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    records = read_jsonl(out / "attribution.jsonl")
    listed = {(r["query_line"], e["train_line"]): e["score"] for r in records for side in ("helpful", "harmful")
              for e in r[side]}
    tokens = read_jsonl(out / "tokens.jsonl")
    assert {(t["query_line"], t["train_line"]) for t in tokens} == set(listed) and len(tokens) == len(listed)
    for t in tokens:
        assert t["score"] == listed[(t["query_line"], t["train_line"])]
        for side in ("train", "query"):
            check_sum(t[side], t["score"])
    response = json.loads(train.read_text().splitlines()[3])["response"]
    two_words = [t for t in tokens if t["train_line"] == 4]
    assert len(two_words) == 3  # top 6 of each side of 12: every training example, for every query
    for t in two_words:  # the two-word response: its words and the end-of-turn token carry the shares
        predicted = [tok for tok, s in zip(t["train"]["tokens"], t["train"]["shares"]) if s is not None]
        assert "".join(predicted).split() == [*response.split(), "<|im_end|>"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"]["tokens"] == str(out / "tokens.jsonl") and summary["per_token"]["pairs"] == len(tokens)
    doc = parse((out / "report.html").read_text(encoding="utf-8"))
    groups = [s for t, s in sections_by_title(doc).items() if t.startswith("Query (line")]
    assert len(groups) == 3
    for group, rec in zip(groups, records):
        mine = [t for t in tokens if t["query_line"] == rec["query_line"]]
        rows = group.all("div", "heatrow")
        assert len(rows) == 2 * len(mine)  # the training example's tokens, then the query's, per pair
        for row, (t, side) in zip(rows, [(t, s) for t in mine for s in ("train", "query")]):
            assert [s.content() for s in row.all("span", "tok")] == t[side]["tokens"]


@pytest.mark.parametrize("with_target", [True, False])
def test_audit_per_token_shares_sum_to_the_ranked_scores(llm, tmp_path, capsys, with_target):
    folder, adapter, train, query = llm
    out = tmp_path / "out"
    assert main(["audit", "--model", str(folder), "--adapter", str(adapter), "--train", str(train),
                 *(["--target", str(query)] if with_target else []), "--per-token", "--per-token-count", "5",
                 "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    signal = "influence_score" if with_target else "self_influence"
    ranked = read_jsonl(out / "ranked.jsonl")
    tokens = read_jsonl(out / "tokens.jsonl")
    assert [t["rank"] for t in tokens] == [1, 2, 3, 4, 5]
    for t, r in zip(tokens, ranked):
        assert t["score"] == r[signal] and "query" not in t
        # with --target: the mean over the target queries of the per-query shares sums to the influence on
        # the target's mean loss; without: the self-influence, g·H⁻¹·g > 0 (token_scores' sign negated)
        check_sum(t["train"], r[signal])
        assert t["against"] == ("the mean loss of the 3 target examples" if with_target else "itself (self-influence)")
    if not with_target:
        assert all(t["score"] > 0 for t in tokens)
    doc = parse((out / "report.html").read_text(encoding="utf-8"))
    (heat,) = [s for t, s in sections_by_title(doc).items() if t.startswith("Per-token shares of the 5")]
    assert len(heat.all("div", "heatrow")) == 5
    assert str(out / "tokens.jsonl") in capsys.readouterr().out


def _bert(path):
    tok = make_tokenizer(chat_template=False)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_per_token_refusals_come_before_any_work(llm, tmp_path, capsys, monkeypatch):
    from hyperinf_ext.app.tasks import attribute, user_run

    monkeypatch.setattr(user_run, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    monkeypatch.setattr(attribute, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    bert = _bert(tmp_path / "bert")
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\na great film,positive\na dull film,negative\n")
    folder, _, train, query = llm
    cases = [
        (["audit", "--model", str(bert), "--train", str(csv), "--per-token"], "--per-token: needs a causal LM"),
        (["attribute", "--model", str(bert), "--train", str(csv), "--query", str(csv), "--per-token"],
         "--per-token: needs a causal LM"),
        (["audit", "--model", str(folder), "--train", str(train), "--per-token", "--per-token-count", "0"],
         "--per-token-count must be >= 1"),
    ]
    capsys.readouterr()  # the set-up's own output
    for argv, message in cases:
        code = main([*argv, "--out", str(tmp_path / "o"), *FAST])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
