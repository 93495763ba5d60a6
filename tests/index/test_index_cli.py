"""``hyperinf-ext index build|query`` end to end on a tiny random Llama (the LoRA adapter as the user brings it).

An exact index (``--proj-dim 0``, float32 store) must give the top-k that ``attribute`` gives (scores to
float32 rounding of the stored gradients, 1e-5 relative); a projected index re-ranked over every
training row must give the same examples with exact scores.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from tiny_llm import make_tiny_adapter, make_tiny_llama, sentiment_rows, write_instructions  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("idxcli")
    folder = make_tiny_llama(root / "model")
    make_tiny_adapter(folder, root / "adapter")
    train = write_instructions(root / "train.jsonl", sentiment_rows(14, seed=1))
    query = write_instructions(root / "query.jsonl", sentiment_rows(3, seed=2))
    attr_out = root / "attribute"
    assert main(["attribute", "--model", str(folder), "--adapter", str(root / "adapter"), "--train", str(train),
                 "--query", str(query), "--top-k", "3", "--out", str(attr_out), "--no-progress", "--threads", "1"]) == 0
    return root, folder, train, query, [json.loads(x) for x in (attr_out / "attribution.jsonl").read_text().splitlines()]


def _records(out):
    return [json.loads(x) for x in (out / "attribution.jsonl").read_text().splitlines()]


def _build(root, folder, train, name, *extra):
    return main(["index", "build", "--model", str(folder), "--adapter", str(root / "adapter"), "--train", str(train),
                 "--out", str(root / name), "--no-progress", "--threads", "1", *extra])


def test_exact_index_query_equals_attribute(files, capsys):
    root, folder, train, query, expected = files
    assert _build(root, folder, train, "exact", "--proj-dim", "0") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "index build: 14 training examples" in printed and "float32" in printed
    out = root / "q-exact"
    assert main(["index", "query", str(root / "exact"), "--query", str(query), "--top-k", "3", "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
    got = _records(out)
    for g, e in zip(got, expected):
        for side in ("helpful", "harmful"):
            assert [x["train_line"] for x in g[side]] == [x["train_line"] for x in e[side]]
            for x, y in zip(g[side], e[side]):
                assert x["score"] == pytest.approx(y["score"], rel=1e-5)
                assert x["prompt"] == y["prompt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"] == "index approximation" and summary["n_train"] == 14


def test_projected_index_with_exact_rerank_equals_attribute(files, capsys):
    root, folder, train, query, expected = files
    assert _build(root, folder, train, "proj", "--proj-dim", "4") == 0, capsys.readouterr().err
    out = root / "q-proj"
    assert main(["index", "query", str(root / "proj"), "--query", str(query), "--top-k", "3", "--exact-rerank", "14",
                 "--out", str(out), "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
    for g, e in zip(_records(out), expected):
        for side in ("helpful", "harmful"):
            assert [x["train_line"] for x in g[side]] == [x["train_line"] for x in e[side]]
            for x, y in zip(g[side], e[side]):
                assert x["score"] == pytest.approx(y["score"], rel=1e-6)


def test_index_cli_errors(files, tmp_path, capsys):
    root, folder, train, query, _ = files
    code = main(["index", "query", str(tmp_path), "--query", str(query), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "not an index built by `hyperinf-ext index build`" in err and err.count("\n") == 1
    code = main(["index", "build", "--model", str(folder), "--train", str(train), "--proj-dim", "-1",
                 "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "proj_dim" in err
    assert _build(root, folder, train, "exact2", "--proj-dim", "0") == 0
    changed = tmp_path / "train.jsonl"
    changed.write_text(train.read_text().replace("positive", "negative", 1))
    code = main(["index", "build", "--model", str(folder), "--adapter", str(root / "adapter"), "--train", str(changed),
                 "--out", str(root / "exact2"), "--no-progress", "--proj-dim", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "other data or settings" in err


def test_attribute_with_index_equals_index_query(files, capsys):
    root, folder, train, query, expected = files
    if not (root / "exact").exists():
        assert _build(root, folder, train, "exact", "--proj-dim", "0") == 0
    out = root / "attr-idx"
    assert main(["attribute", "--index", str(root / "exact"), "--train", str(train), "--query", str(query),
                 "--top-k", "3", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert [[x["train_line"] for x in r["helpful"]] for r in _records(out)] == \
        [[x["train_line"] for x in r["helpful"]] for r in expected]
    code = main(["attribute", "--index", str(root / "exact"), "--train", str(query), "--query", str(query),
                 "--out", str(root / "x"), "--no-progress"])
    assert code == 2 and "not the file the index" in capsys.readouterr().err
    code = main(["attribute", "--index", str(root / "exact"), "--adapter", str(root / "adapter"), "--query", str(query),
                 "--out", str(root / "x"), "--no-progress"])
    assert code == 2 and "--adapter: not with --index" in capsys.readouterr().err
