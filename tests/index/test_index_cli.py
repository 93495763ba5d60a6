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
    assert "(hyperinf, damping spectral:1)" in printed  # what --damping auto meant, not "auto"
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
    assert summary["damping"] == "spectral:1"


def test_projected_index_with_exact_rerank_equals_attribute(files, capsys):
    root, folder, train, query, expected = files
    assert _build(root, folder, train, "proj", "--proj-dim", "4") == 0, capsys.readouterr().err
    out = root / "q-proj"
    # --index IDX, as audit, select and attribute spell it, is the positional IDX
    assert main(["index", "query", "--index", str(root / "proj"), "--query", str(query), "--top-k", "3",
                 "--exact-rerank", "14", "--out", str(out), "--no-progress", "--threads", "1"]) == 0, \
        capsys.readouterr().err
    for g, e in zip(_records(out), expected):
        for side in ("helpful", "harmful"):
            assert [x["train_line"] for x in g[side]] == [x["train_line"] for x in e[side]]
            for x, y in zip(g[side], e[side]):
                assert x["score"] == pytest.approx(y["score"], rel=1e-6)
    assert json.loads((out / "summary.json").read_text())["scores"] == "exact (re-ranked)"
    # one query re-ranked from 3 candidates a side (at most 6 of the 14 rows) with --per-token: every kept
    # pair has its token record (the re-ranked result speaks of all 14 rows, not of the candidates)
    one, out1 = write_instructions(root / "one.jsonl", sentiment_rows(1, seed=2)), root / "q-proj-one"
    assert main(["index", "query", str(root / "proj"), "--query", str(one), "--top-k", "2", "--exact-rerank", "3",
                 "--per-token", "--out", str(out1), "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
    kept = {e["train_line"] for r in _records(out1) for side in ("helpful", "harmful") for e in r[side]}
    tokens = [json.loads(x) for x in (out1 / "tokens.jsonl").read_text().splitlines()]
    assert len(kept) == 4 and {t["train_line"] for t in tokens} == kept



def test_index_cli_errors(files, tmp_path, capsys):
    root, folder, train, query, _ = files
    code = main(["index", "query", str(tmp_path), "--query", str(query), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "not an index built by `hyperinf-ext index build`" in err and err.count("\n") == 1
    for argv, message in (([], "name the index folder (IDX or --index IDX)"),
                          ([str(tmp_path), "--index", str(root)], f"two index folders given, {tmp_path} and --index")):
        code = main(["index", "query", *argv, "--query", str(query), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
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


def test_a_resumed_build_keeps_its_adapter_and_refuses_another(files, capsys, monkeypatch):
    """IDX/adapter is written whole before the fit; a build killed after it resumes only with the same
    adapter weights (another adapter would make factors and stored rows that no query's model matches)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hyperinf_ext.index import Index

    root, folder, train, query, expected = files
    other = root / "adapter-other"
    shutil.copytree(root / "adapter", other, dirs_exist_ok=True)
    w = load_file(str(other / "adapter_model.safetensors"))
    w = {k: (v * 1.5 if i == 0 else v) for i, (k, v) in enumerate(sorted(w.items()))}
    save_file(w, str(other / "adapter_model.safetensors"))

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    out = root / "resumed"
    (out / ".adapter-tmp").mkdir(parents=True)  # what a save killed half-way left
    (out / ".adapter-tmp" / "adapter_model.safetensors").write_bytes(b"half")
    with monkeypatch.context() as m:
        m.setattr(Index, "build", killed)
        assert _build(root, folder, train, "resumed", "--proj-dim", "0") == 130  # the CLI's "interrupted"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / ".adapter-tmp").exists()
    code = main(["index", "build", "--model", str(folder), "--adapter", str(other), "--train", str(train),
                 "--out", str(out), "--no-progress", "--threads", "1", "--proj-dim", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "an interrupted build of another adapter" in err, err
    assert _build(root, folder, train, "resumed", "--proj-dim", "0") == 0, capsys.readouterr().err
    q = root / "q-resumed"
    assert main(["index", "query", str(out), "--query", str(query), "--top-k", "3", "--out", str(q),
                 "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
    assert [[x["train_line"] for x in r["helpful"]] for r in _records(q)] == \
        [[x["train_line"] for x in r["helpful"]] for r in expected]


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


REL_SHARE = 1e-5  # of the largest |share|: float32 per-token backward passes (tests/app/test_per_token_cli.py)


def _shares_sum(side: dict, score: float) -> None:
    shares = [s for s in side["shares"] if s is not None]
    top = max(abs(s) for s in shares)
    assert abs(sum(shares) - score) <= REL_SHARE * top, (sum(shares), score, top)


@pytest.mark.parametrize("name, proj", [("exact", "0"), ("proj", "4")])
def test_attribute_index_per_token_splits_the_exact_scores(files, capsys, name, proj):
    """``attribute --index --per-token``: the index picks the pairs, the pairs re-run token by token from the
    index's training file; their shares sum to the exact score (``token_score``), which an exact index also
    lists as ``score`` and a projected one only approximates."""
    root, folder, train, query, expected = files
    if not (root / name).exists():
        assert _build(root, folder, train, name, "--proj-dim", proj) == 0, capsys.readouterr().err
    out = root / f"attr-idx-tokens-{name}"
    assert main(["attribute", "--index", str(root / name), "--query", str(query), "--top-k", "3", "--per-token",
                 "--no-verify", "--out", str(out), "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
    records = _records(out)
    listed = {(r["query_line"], e["train_line"]): e["score"] for r in records for side in ("helpful", "harmful")
              for e in r[side]}
    tokens = [json.loads(x) for x in (out / "tokens.jsonl").read_text().splitlines()]
    assert {(t["query_line"], t["train_line"]) for t in tokens} == set(listed)
    exact = {(r["query_line"], e["train_line"]): e["score"] for r in expected for side in ("helpful", "harmful")
             for e in r[side]}
    for t in tokens:
        assert t["score"] == listed[(t["query_line"], t["train_line"])]
        for side in ("train", "query"):
            _shares_sum(t[side], t["token_score"])
        if (t["query_line"], t["train_line"]) in exact:  # `attribute` without an index scored this pair exactly
            assert t["token_score"] == pytest.approx(exact[(t["query_line"], t["train_line"])], rel=1e-4)
        if proj == "0":
            assert t["token_score"] == pytest.approx(t["score"], rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_token"]["pairs"] == len(tokens)
    assert summary["scores"] == "index approximation"  # --per-token re-runs the pairs; it does not re-rank
    assert ("approximate score" in summary["per_token"]["check"]) == (proj != "0")
    assert summary["settings"]["verify"] == "False" and "per-token:" in capsys.readouterr().out


def test_mixed_attribute_from_an_exact_index_equals_the_mixed_attribute(files, capsys):
    """``--mix-queries 99`` with and without an exact index: the same kept examples and scores (1e-5 relative,
    the float32 store), and with ``--per-token`` shares that sum to the mixed score on both paths."""
    root, folder, train, query, expected = files
    if not (root / "exact").exists():
        assert _build(root, folder, train, "exact", "--proj-dim", "0") == 0
    runs = {}
    for name, source in (("fit", ["--model", str(folder), "--adapter", str(root / "adapter"), "--train", str(train)]),
                         ("index", ["--index", str(root / "exact")])):
        out = root / f"mixed-{name}"
        assert main(["attribute", *source, "--query", str(query), "--top-k", "3", "--mix-queries", "99",
                     "--per-token", "--out", str(out), "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
        tokens = [json.loads(x) for x in (out / "tokens.jsonl").read_text().splitlines()]
        for t in tokens:
            for side in ("train", "query"):
                _shares_sum(t[side], t["token_score"])
            assert t["token_score"] == pytest.approx(t["score"], rel=1e-4)
        runs[name] = _records(out)
    plain = [x["score"] for r in expected for x in r["harmful"]]
    assert [x["score"] for r in runs["fit"] for x in r["harmful"]] != pytest.approx(plain, rel=1e-3)  # it mixed
    for g, e in zip(runs["index"], runs["fit"]):
        for side in ("helpful", "harmful"):
            assert [x["train_line"] for x in g[side]] == [x["train_line"] for x in e[side]]
            assert [x["score"] for x in g[side]] == pytest.approx([x["score"] for x in e[side]], rel=1e-5)


def test_index_reading_options_need_an_index(files, tmp_path, capsys, monkeypatch):
    root, folder, train, query, _ = files
    from hyperinf_ext.app.tasks import index_task

    monkeypatch.setattr(index_task, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "source.json").write_text(json.dumps({"causal": False, "model": "minilm"}))
    cases = [
        (["attribute", "--model", str(folder), "--train", str(train), "--query", str(query), "--no-verify"],
         "--no-verify: only with --index"),
        (["audit", "--model", str(folder), "--train", str(train), "--estimator", "unbiased"],
         "--estimator: only with --index"),
        (["attribute", "--index", str(tmp_path / "cls"), "--query", str(query), "--per-token"],
         "--per-token: needs a causal LM"),
        (["index", "query", str(tmp_path / "cls"), "--query", str(query), "--per-token"],
         "--per-token: needs a causal LM"),
    ]
    for argv, message in cases:
        code = main([*argv, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("proj_dim, dtype, exact_layers, projected, starts", [
    (0, "float32", [True, True], False, "from the index, exact (no layer projected"),
    (0, "float16", [True, True], False, "from the index, approximate (no layer projected, but the training "
                                        "gradients are stored rounded to float16)"),
    (4096, "float32", [True, True], False, "from the index, exact"),  # k ≥ every d: nothing was projected
    (4, "float32", [True, False], True, "from the index, approximate (proj_dim 4"),
])
def test_the_index_summary_says_what_was_stored(proj_dim, dtype, exact_layers, projected, starts):
    """summary.json's ``index`` entry follows what the store holds (projected layers, store dtype), not
    proj_dim alone: a float16 store is not exact, and proj_dim ≥ every layer's d projects nothing."""
    from types import SimpleNamespace as NS

    from hyperinf_ext.app.tasks.user_index import index_summary

    idx = NS(config=NS(proj_dim=proj_dim, dtype=dtype), plans=[NS(exact=e) for e in exact_layers],
             estimator="regression", attributor=NS(config=NS(method="hyperinf", damping="auto", damping_scale=1.0)))
    run = NS(idx=idx, cfg=NS(index="IDX", index_verify=True), source={"train": "t.jsonl"}, open_seconds=0.0,
             train_path="t.jsonl")
    s = index_summary(run, "self_influence")
    assert s["projected"] is projected and s["store_dtype"] == dtype and s["scores"].startswith(starts), s["scores"]
    assert ("sketched through the projection" in s["scores"]) == projected
    assert s["damping"] == "spectral:1"  # what "auto" meant, as audit and select report it
