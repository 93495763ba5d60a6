"""``attribute`` end to end on a tiny random Llama, and the streaming top-k against full sorts."""
from __future__ import annotations

import json

import pytest
import torch

from hyperinf_ext.attributor.topk import TopKSide, merge_topk, side_of_matrix

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from tiny_llm import make_tiny_adapter, make_tiny_llama, sentiment_rows, write_instructions  # noqa: E402


def brute_topk(row: list[float], k: int, largest: bool) -> list[int]:
    """Column indices of the k best values, ties to the smaller index (a plain Python sort)."""
    return sorted(range(len(row)), key=lambda j: (-row[j] if largest else row[j], j))[:k]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("largest", [True, False])
def test_streaming_topk_equals_full_sort_with_ties(seed, largest):
    g = torch.Generator().manual_seed(seed)
    Q, N, k = 3, 37, 5
    scores = torch.randint(0, 6, (Q, N), generator=g).double()  # many ties
    perm = torch.randperm(N, generator=g)  # blocks arrive in any column order
    top = TopKSide(k, largest)
    for start in range(0, N, 4 + seed):
        cols = perm[start : start + 4 + seed]
        top.update(scores[:, cols], cols)
    for q in range(Q):
        expected = brute_topk(scores[q].tolist(), k, largest)
        assert top.indices[q].tolist() == expected
        assert top.values[q].tolist() == [scores[q, j].item() for j in expected]
    values, indices = side_of_matrix(scores, k, largest)
    assert torch.equal(indices, top.indices) and torch.equal(values, top.values)


def test_topk_with_fewer_columns_than_k_and_errors():
    v, i = merge_topk(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.long), torch.tensor([[1.0, 3.0], [2.0, 0.0]]),
                      torch.tensor([7, 4]), k=5, largest=True)
    assert i.tolist() == [[4, 7], [7, 4]] and v.tolist() == [[3.0, 1.0], [2.0, 0.0]]
    with pytest.raises(ValueError, match="k must be >= 1"):
        merge_topk(v, i, v, torch.tensor([0, 1]), k=0, largest=True)
    with pytest.raises(ValueError, match=r"block must be \[Q, B\]"):
        merge_topk(v, i, v, torch.tensor([0, 1, 2]), k=2, largest=True)


@pytest.fixture(scope="module")
def llm_files(tmp_path_factory):
    """A tiny Llama folder, an adapter with nonzero LoRA B, and train/query instruction files."""
    root = tmp_path_factory.mktemp("attr")
    folder = make_tiny_llama(root / "model")
    make_tiny_adapter(folder, root / "adapter")
    rows = sentiment_rows(14, seed=1)
    rows[3]["response"] = "negative" if rows[3]["response"] == "positive" else "positive"  # one flipped answer
    train = write_instructions(root / "train.jsonl", rows)
    query = write_instructions(root / "query.jsonl", sentiment_rows(3, seed=2))
    return folder, root / "adapter", train, query


def full_matrix(folder, adapter, train, query, method, **options):
    """Every pairwise score by HyperINF.scores over loaders built here (the reference for the top-k)."""
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.models.causal import load_causal_lora_model
    from hyperinf_ext.app.data import make_loader
    from hyperinf_ext.app.data.instruction import encode_instructions, load_instruction_file
    from hyperinf_ext.app.models.training import load_tokenizer

    tok = load_tokenizer(folder)
    model = load_causal_lora_model(folder, adapter=adapter)
    loaders = []
    for path in (train, query):
        ds = load_instruction_file(path)
        loaders.append(make_loader(ds, tok, batch_size=5, max_length=128, sort_by_length=True,
                                   encodings=encode_instructions(ds, tok, 128).encodings))
    attr = HyperINF(model, method=method, progress=False).fit(loaders[0])
    return attr.scores(loaders[1], **options)


@pytest.mark.parametrize("method, flags, options", [
    ("hyperinf", [], {}), ("datainf", [], {}),
    # the query-side options (TrackStar's estimator in the GFIM form): the library's scores with the same options
    ("hyperinf", ["--mix-queries", "99", "--normalize", "symmetric"], {"mix_queries": 99.0, "normalize": "symmetric"}),
    ("datainf", ["--normalize", "unit"], {"normalize": "unit"}),
    ("hyperinf", ["--normalize", "none"], {}),  # the value the reports' Settings show for raw scores
])
def test_attribute_top_k_equals_full_matrix(llm_files, tmp_path, method, flags, options, capsys):
    folder, adapter, train, query = llm_files
    out = tmp_path / "out"
    code = main(["attribute", "--model", str(folder), "--adapter", str(adapter), "--train", str(train),
                 "--query", str(query), "--top-k", "4", "--method", method, "--out", str(out), "--no-progress",
                 "--threads", "1", *flags])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "attribution.jsonl").read_text().splitlines()]
    assert [r["query_line"] for r in records] == [1, 2, 3]  # file lines (JSONL: one example per line)
    S = full_matrix(folder, adapter, train, query, method, **options)
    if options:
        assert not torch.allclose(S, full_matrix(folder, adapter, train, query, method), rtol=1e-3)
        settings = json.loads((out / "summary.json").read_text())["settings"]
        assert settings["mix_queries"] == options.get("mix_queries", 0.0)
        assert settings["normalize"] == options.get("normalize")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for q, rec in enumerate(records):
        for side, largest in (("helpful", False), ("harmful", True)):
            expected = brute_topk(S[q].tolist(), 4, largest)
            assert [e["train_line"] - 1 for e in rec[side]] == expected
            for e in rec[side]:
                assert e["score"] == pytest.approx(float(S[q, e["train_line"] - 1]), rel=1e-6)  # fp32 gradients, other batches
                assert e["prompt"] == rows[e["train_line"] - 1]["prompt"]
                assert e["response"] == rows[e["train_line"] - 1]["response"]
        assert [e["rank"] for e in rec["helpful"]] == [1, 2, 3, 4]
    report = (out / "report.md").read_text()
    assert "## Query (line 3)" in report and "**Most harmful**" in report and rows[records[0]["helpful"][0]["train_line"] - 1]["prompt"][:40] in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 14 and summary["causal_lm"] and summary["finetune"]["epochs"] == 0


def test_attribute_states_truncated_prompts_in_its_summary(llm_files, tmp_path, capsys):
    """The tokenizer's notes (a prompt cut to --max-length) reach summary.json and report.md, not only the log."""
    folder, adapter, train, query = llm_files
    rows = [json.loads(line) for line in query.read_text().splitlines()]
    long = write_instructions(tmp_path / "q.jsonl", [rows[0], {**rows[1], "prompt": "a quiet film " * 40}])
    out = tmp_path / "out"
    assert main(["attribute", "--model", str(folder), "--adapter", str(adapter), "--train", str(train),
                 "--query", str(long), "--top-k", "2", "--max-length", "48", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0, capsys.readouterr().err
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert "1 prompt(s) longer than --max-length 48 lost tokens from their middle (responses are never truncated)" \
        in notes
    assert "Note: 1 prompt(s) longer than --max-length 48" in (out / "report.md").read_text()


def test_attribute_fine_tunes_when_asked(llm_files, tmp_path):
    folder, _, train, query = llm_files
    out = tmp_path / "ft"
    assert main(["attribute", "--model", str(folder), "--train", str(train), "--query", str(query), "--epochs", "1",
                 "--top-k", "2", "--lr", "1e-2", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["finetune"]["history"]) == 1
    assert all(len(r["harmful"]) == 2 for r in map(json.loads, (out / "attribution.jsonl").read_text().splitlines()))


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--query", "missing.jsonl"], "--query missing.jsonl: file not found"),
    (["--method", "nope"], "--method: unknown method 'nope'"),
    (["--mix-queries", "-1"], "--mix-queries: expected a finite weight"),
    (["--mix-queries", "nan"], "--mix-queries: expected a finite weight"),
    (["--mix-queries", "1", "--method", "datainf"], "--mix-queries: method 'datainf' builds its curvature"),
])
def test_attribute_bad_input_exit_2(llm_files, tmp_path, capsys, argv, message):
    folder, _, train, query = llm_files
    base = {"--model": str(folder), "--train": str(train), "--query": str(query), "--out": str(tmp_path / "o")}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    code = main(["attribute", *[x for kv in base.items() for x in kv], "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_attribute_on_a_classifier_maps_query_labels_to_the_training_classes(tmp_path, capsys):
    """Text/label files with a (tiny, random) BERT classifier; the query file names its classes in another order."""
    from tiny_llm import make_tokenizer

    folder = tmp_path / "bert"
    tok = make_tokenizer(chat_template=False)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(folder))  # no head: a fresh classifier is attached
    tok.save_pretrained(str(folder))
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in sentiment_rows(10)))
    query = tmp_path / "query.csv"
    query.write_text("text,label\na lovely film,positive\na dull film,positive\n")  # one class only: still valid
    out = tmp_path / "out"
    code = main(["attribute", "--model", str(folder), "--train", str(train), "--query", str(query), "--epochs", "1",
                 "--top-k", "3", "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "attribution.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["positive", "positive"] and records[1]["text"] == "a dull film"
    assert all(len(r["helpful"]) == 3 and {"text", "label", "score"} <= set(r["helpful"][0]) for r in records)


def test_the_printed_table_carries_the_input_notes():
    """Rows left out are said on the terminal too (not only in summary.json and report.md), --no-progress or not."""
    from hyperinf_ext.app.tasks.attribute import attribute_table

    summary = {"top_k": 2, "n_train": 7, "n_query": 2, "method": "hyperinf", "damping": "auto",
               "notes": ["train.csv: skipped 1 row(s) with empty 'text' at line(s) 4"],
               "timings": {"fit_seconds": 0.2, "score_seconds": 0.1}, "outputs": {"report": "out/report.md"}}
    lines = attribute_table(summary).splitlines()
    assert "note: train.csv: skipped 1 row(s) with empty 'text' at line(s) 4" in lines
    assert "note:" not in attribute_table({**summary, "notes": []})


def test_attribute_reports_head_the_texts_with_the_users_column_names(tmp_path):
    """A classifier file read with --text-column review --label-column sentiment: both reports say review and
    sentiment (the records keep their own keys, text and label); a causal LM's say its prompt/response names."""
    from hyperinf_ext.app.tasks.attribute_report import write_html, write_markdown

    example = {"rank": 1, "train_line": 3, "score": -1.5}
    for causal, keys, names in ((False, ("text", "label"), ("review", "sentiment")),
                                (True, ("prompt", "response"), ("question", "answer"))):
        settings = {"text_column": "review", "label_column": "sentiment"} if not causal else {
            "prompt_column": "question", "response_column": "answer"}
        rec = {"query_line": 2, keys[0]: "a fine film", keys[1]: "positive",
               "helpful": [{**example, keys[0]: "great", keys[1]: "positive"}], "harmful": []}
        summary = {"n_query": 1, "n_train": 4, "method": "hyperinf", "damping": "spectral:1", "top_k": 1,
                   "settings": settings, "timings": {"open_seconds": 0.1, "query_seconds": 0.1}}
        write_markdown(tmp_path / "report.md", summary, [rec])
        md = (tmp_path / "report.md").read_text()
        assert f"| rank | train line | score | {names[0]} | {names[1]} |" in md and f"**{names[1]}:** positive" in md
        write_html(tmp_path / "report.html", summary, [rec])
        html = (tmp_path / "report.html").read_text()
        assert all(f'scope="col">{n}</th>' in html for n in names), causal
        assert not any(f'scope="col">{k}</th>' in html for k in keys), causal
