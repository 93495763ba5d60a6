"""``audit`` (issue #22): the user's rows come back unchanged in rank order with their scores, the scores are
HyperINF's own (mean_scores on the target, or self-influence), bad input fails in one line naming file, line
and column before any model is loaded, and an interrupted fit resumes to the same scores.  Tiny models only."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from test_html_report import parse, sections_by_title  # noqa: E402
from tiny_llm import make_tiny_adapter, make_tiny_llama, make_tokenizer, sentiment_rows, write_instructions  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]
TOL = dict(rel=1e-9, abs=1e-12)  # float64 factors and scores, the same float32 gradients on both sides


def flip(row: dict) -> dict:
    return {**row, "response": "negative" if row["response"] == "positive" else "positive"}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny Llama, an adapter with nonzero LoRA B, a training file with extra keys (one flipped answer) and a
    target file."""
    root = tmp_path_factory.mktemp("audit")
    folder = make_tiny_llama(root / "model")
    make_tiny_adapter(folder, root / "adapter")
    rows = [{**r, "id": f"ex{i}", "meta": {"source": "web", "tags": [i, "ü"]}}
            for i, r in enumerate(sentiment_rows(24, seed=1))]
    rows[3] = flip(rows[3])
    train = write_instructions(root / "train.jsonl", rows)
    target = write_instructions(root / "target.jsonl", sentiment_rows(4, seed=2))
    return folder, root / "adapter", train, target


def fitted_here(folder, adapter, train):
    """(HyperINF fitted on ``train`` from the files here, as the command fits it; loader(path) for other files).
    Fit and score under ``one_thread()``: the command ran with --threads 1, so the float32 gradients match."""
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import make_loader
    from hyperinf_ext.app.data.instruction import encode_instructions, ensure_pad_token, load_instruction_file
    from hyperinf_ext.app.models.causal import load_causal_lora_model
    from hyperinf_ext.app.models.training import load_tokenizer

    tok = load_tokenizer(folder)
    ensure_pad_token(tok)

    def loader(path):
        ds = load_instruction_file(path)
        return make_loader(ds, tok, batch_size=8, max_length=128, sort_by_length=True,
                           encodings=encode_instructions(ds, tok, 128).encodings)

    return HyperINF(load_causal_lora_model(folder, adapter=adapter), progress=False).fit(loader(train)), loader


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def direct_scores(folder, adapter, train, target, mix=0.0, scale=None, normalize=False):
    """HyperINF.mean_scores on the target (mixed with weight ``mix``, normalised as ``normalize``, at spectral ×
    ``scale``, default the method's own; or self_scores without one), computed here from the files."""
    with one_thread():
        attr, loader = fitted_here(folder, adapter, train)
        if scale is not None:
            attr.use("hyperinf", damping="spectral", damping_scale=scale)
        scores = (attr.mean_scores(loader(target), mix_queries=mix, normalize=normalize) if target is not None
                  else attr.self_scores())
    return scores.double().tolist()


def direct_columns(folder, adapter, train, target, detection=True):
    """The three columns of the default audit with a target: influence mixed with weight 99, self-influence,
    their rank average; ``detection``: with a fit of its own, hyperinf's 1d setting (audit.DETECTION_DAMPING,
    the influence the "symmetric" cosine, the self-influence raw at the same damping); else (an index) at the
    method's own damping, raw."""
    from hyperinf_ext.app.tasks.metrics import rank_average

    with one_thread():
        attr, loader = fitted_here(folder, adapter, train)
        if detection:
            attr.use("hyperinf", damping="spectral", damping_scale=0.1)
        influence = attr.mean_scores(loader(target), mix_queries=99.0,
                                     normalize="symmetric" if detection else False).double()
        self_ = attr.self_scores().double()
    return {"influence_score": influence.tolist(), "self_influence": self_.tolist(),
            "combined_score": rank_average(influence, self_).tolist()}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("case", ["default", "combined", "influence", "self"])
def test_audit_writes_the_users_rows_in_rank_order_with_hyperinf_scores(llm, tmp_path, capsys, case):
    """default with --target: the influence on the target (mixed with weight 99, the symmetric cosine at spectral
    × 0.1); combined: --signal combined (that influence, self-influence at the same damping, their rank
    average); influence: --signal influence --mix-queries 0, the unmixed cosine at spectral × 0.1; self: no
    --target, the method's own damping."""
    folder, adapter, train, target = llm
    out = tmp_path / "out"
    flags = {"default": ["--target", str(target)], "combined": ["--target", str(target), "--signal", "combined"],
             "self": [], "influence": ["--target", str(target), "--signal", "influence", "--mix-queries", "0"]}[case]
    argv = ["audit", "--model", str(folder), "--adapter", str(adapter), "--train", str(train), "--out", str(out),
            *flags, *FAST]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    signal = {"combined": "combined_score", "influence": "influence_score", "default": "influence_score",
              "self": "self_influence"}[case]
    with_target = case != "self"
    mixed = case in ("default", "combined")
    assert f"ranked by {signal}" in printed and ("--target" in printed if with_target else "without --target" in printed)
    assert ("mixed in with weight 99 (the default of --mix-queries)" in printed) == mixed
    ranked = read_jsonl(out / "ranked.jsonl")
    original = read_jsonl(train)
    assert [r["rank"] for r in ranked] == list(range(1, 25))
    columns = ["influence_score", "self_influence", "combined_score"] if case == "combined" else [signal]
    # every original key and value, unchanged; rank and the score columns added, nothing else
    by_id = {r["id"]: r for r in original}
    for r in ranked:
        assert list(r) == [*by_id[r["id"]], "rank", *columns]
        assert {k: v for k, v in r.items() if k not in ("rank", *columns)} == by_id[r["id"]]
    assert sorted(r["id"] for r in ranked) == sorted(by_id)
    scores = [r[signal] for r in ranked]
    assert scores == sorted(scores, reverse=True)  # rank 1 = the highest score
    expected = (direct_columns(folder, adapter, train, target) if case == "combined" else
                {signal: direct_scores(folder, adapter, train, target if with_target else None,
                                       mix=99.0 if mixed else 0.0, scale=0.1 if with_target else None,
                                       normalize="symmetric" if with_target else False)})
    for r in ranked:
        for c in columns:
            assert r[c] == pytest.approx(expected[c][int(r["id"][2:])], **TOL), c
    summary = json.loads((out / "summary.json").read_text())
    assert summary["signal"] == signal and "rank 1 = the highest score" in summary["sign_convention"]
    assert summary["columns"] == columns and summary["mix_queries"] == {"combined": 99.0, "default": 99.0,
                                                                         "influence": 0.0, "self": None}[case]
    assert ("POSITIVE" in summary["sign_convention"]) == (signal == "influence_score")
    assert summary["damping"] == ("spectral:0.1" if with_target else "spectral:1")
    assert summary["settings"]["normalize"] == ("symmetric" if with_target else "none")
    assert summary["settings"]["mix_queries"] == (summary["mix_queries"] or 0.0)
    assert ("unit-normalised (symmetric)" in summary["signal_meaning"]) == with_target
    assert summary["finetune"]["epochs"] == 0 and not (out / ".checkpoint").exists()
    assert "# Training-data audit" in (out / "report.md").read_text()
    check_report_html(out, summary, ranked, by_id, signal, printed)


def check_report_html(out, summary, ranked, by_id, signal, printed):
    """report.html: the settings, the signal, every example in rank order with its file line, texts and a score bar."""
    assert summary["outputs"]["html"] == str(out / "report.html") and str(out / "report.html") in printed
    doc = parse((out / "report.html").read_text(encoding="utf-8"))
    sections = sections_by_title(doc)
    assert list(sections)[:3] == ["Settings", "Signal", "Training examples, most suspicious first"]
    assert signal in sections["Signal"].content() and summary["signal_meaning"] in sections["Signal"].content()
    shown = {dt.content(): dd.content() for dt, dd in zip(sections["Settings"].all("dt"), sections["Settings"].all("dd"))}
    # the Settings table shows what the scores used, not the arguments that defer to a default ("auto", None)
    assert shown["damping"] == summary["damping"] == summary["settings"]["damping"] != "auto"
    assert shown["normalize"] == summary["settings"]["normalize"] and shown["method"] == summary["method"]
    table = sections["Training examples, most suspicious first"].all("table")[0]
    assert "sortable" in table.attrs["class"]
    parts = [c for c in summary["columns"] if c != signal]  # combined: its two parts beside it
    assert [h.content() for h in table.all("th")] == ["rank", "line", "prompt", "response", signal, *parts]
    rows = table.all("tbody")[0].all("tr")
    assert len(rows) == len(ranked) and len(table.all("span", "bar")) == len(ranked) * (1 + len(parts))
    lines = {r["id"]: i + 1 for i, r in enumerate(by_id.values())}  # JSONL: the file line
    for row, r in zip(rows, ranked):
        cells = row.all("td")
        assert [int(cells[0].content()), int(cells[1].content())] == [r["rank"], lines[r["id"]]]
        assert cells[2].content() == r["prompt"] and cells[3].content() == r["response"]
        assert [float(c.attrs["data-v"]) for c in cells[4:]] == [r[signal], *(r[c] for c in parts)]


def _bert_folder(path, num_labels=None):
    """A tiny BERT (no head, or a fixed head of ``num_labels``) and its word-level tokenizer."""
    tok = make_tokenizer(chat_template=False)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=64, num_labels=num_labels or 2)
    torch.manual_seed(0)
    model = (transformers.BertForSequenceClassification(cfg) if num_labels else transformers.BertModel(cfg))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_audit_a_classifier_csv_keeps_every_column_and_names_skipped_lines(tmp_path, capsys, monkeypatch):
    """The user's own column names (--text-column/--label-column) name the reports' columns too."""
    from hyperinf_ext.app.tasks import user_report

    monkeypatch.setattr(user_report, "MAX_ROWS", 10)  # report.html shows the first MAX_ROWS (1,000) rows
    folder = _bert_folder(tmp_path / "bert")
    train = tmp_path / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "sentiment", "note"])
        for i, r in enumerate(sentiment_rows(14)):
            w.writerow([f"r{i}", r["prompt"], r["response"], f'said "hi", {i}'])
        w.writerow(["r-empty", "   ", "positive", "skipped"])
    out = tmp_path / "out"
    assert main(["audit", "--model", str(folder), "--train", str(train), "--epochs", "1", "--out", str(out),
                 "--text-column", "review", "--label-column", "sentiment", *FAST]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "skipped 1 row(s) with empty 'review' at line(s) 16" in printed
    with open(train, newline="", encoding="utf-8") as f:
        original = {r["id"]: r for r in csv.DictReader(f)}
    with open(out / "ranked.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["id", "review", "sentiment", "note", "rank", "self_influence"]
        ranked = list(reader)
    assert len(ranked) == 14 and [int(r["rank"]) for r in ranked] == list(range(1, 15))
    assert all({k: r[k] for k in ("id", "review", "sentiment", "note")} == original[r["id"]] for r in ranked)
    scores = [float(r["self_influence"]) for r in ranked]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune"]["epochs"] == 1 and summary["notes"]
    shown = {k: v for k, v in summary["settings"].items() if k.endswith("_column")}
    assert shown == {"text_column": "review", "label_column": "sentiment"}  # a classifier reads no prompt column
    assert "| rank | line | self_influence | review | sentiment |" in (out / "report.md").read_text()
    (table,) = [s for t, s in sections_by_title(parse((out / "report.html").read_text())).items()
                if t.startswith("Training examples")]
    assert "The first 10 of 14 examples are shown; ranked.csv has every one" in table.content()
    rows = table.all("tbody")[0].all("tr")
    assert [r.all("td")[2].content() for r in rows] == [r["review"] for r in ranked[:10]]
    assert [h.content() for h in table.all("th")][2:4] == ["review", "sentiment"]


def test_classifier_texts_cut_at_max_length_are_stated(tmp_path, capsys):
    """A classifier's texts beyond --max-length tokens are cut to their first tokens: the run says how many
    (summary.json notes, the report), as it does for a causal LM's prompts."""
    from hyperinf_ext.app.data.batching import count_truncated, encode_texts
    from hyperinf_ext.app.data.dataset import TextDataset
    from hyperinf_ext.app.models.training import load_tokenizer

    folder = _bert_folder(tmp_path / "bert")
    rows = sentiment_rows(8)
    long = " ".join(["great"] * 40)
    train = tmp_path / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[r["prompt"], r["response"]] for r in rows] + [[long, "positive"], [long + " film", "negative"]])
    tok = load_tokenizer(folder)
    texts = [r["prompt"] for r in rows] + [long, long + " film"]
    ds = TextDataset(texts, [0] * len(texts), ["x"])
    want = sum(len(tok(x)["input_ids"]) > 16 for x in texts)
    assert want >= 2 and count_truncated(ds, encode_texts(ds, tok, 16), tok, 16) == want
    assert count_truncated(ds, encode_texts(ds, tok, 60), tok, 60) == 0
    out = tmp_path / "out"
    assert main(["audit", "--model", str(folder), "--train", str(train), "--epochs", "1", "--max-length", "16",
                 "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    note = f"{want} text(s) longer than --max-length 16 tokens were cut to their first 16"
    assert any(note in n for n in json.loads((out / "summary.json").read_text())["notes"])
    assert note in (out / "report.md").read_text()


def test_an_interrupted_fit_resumes_to_the_same_scores(llm, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the fit keeps OUT/.checkpoint (the fine-tuned adapter, the fit's commits); the rerun loads
    the adapter without training and resumes the fit, and its scores equal an uninterrupted run's."""
    from hyperinf_ext.app.models import training
    from hyperinf_ext.attributor.hyperinf import HyperINF

    folder, _, train, target = llm
    common = ["audit", "--model", str(folder), "--train", str(train), "--target", str(target), "--epochs", "1",
              "--lr", "1e-2", "--checkpoint-every", "1", *FAST]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    fit = HyperINF.fit

    def interrupted_fit(self, loader, **kwargs):
        class Interrupted:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i == 2:
                        raise KeyboardInterrupt
                    yield batch

        return fit(self, Interrupted(), **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(HyperINF, "fit", interrupted_fit)
    assert main([*common, "--out", str(out)]) == 130
    assert (out / ".checkpoint" / "adapter" / "adapter_config.json").is_file()
    assert (out / ".checkpoint" / "fit" / "meta.json").is_file() and not (out / "summary.json").exists()
    monkeypatch.setattr(HyperINF, "fit", fit)

    def no_training(*args, **kwargs):
        raise AssertionError("the resumed run trained again")

    monkeypatch.setattr(training, "finetune", no_training)
    capsys.readouterr()
    assert main([*common[:-3], "--out", str(out), "--threads", "1"]) == 0, capsys.readouterr().err
    log = capsys.readouterr().err
    assert "resume: loading the fine-tune adapter" in log and "resume: the fit continues from its last commit" in log
    whole = {r["id"]: r["influence_score"] for r in read_jsonl(tmp_path / "whole" / "ranked.jsonl")}
    resumed = read_jsonl(out / "ranked.jsonl")
    assert len(resumed) == 24 and all(r["influence_score"] == pytest.approx(whole[r["id"]], **TOL) for r in resumed)
    # finished: the gradient cache goes, the fine-tuned adapter stays for a rerun that asks another question
    assert sorted(p.name for p in (out / ".checkpoint").iterdir()) == ["adapter", "run.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_kept"] == str(out / ".checkpoint" / "adapter") and "reuses it" in summary["checkpoint"]
    assert "Kept: " in (out / "report.md").read_text()
    capsys.readouterr()
    assert main([*common[:-3], "--out", str(out), "--threads", "1", "--signal", "self"]) == 0  # still no training
    assert "resume: loading the fine-tune adapter of an earlier run" in capsys.readouterr().err
    self_scores = {r["id"]: r["self_influence"] for r in read_jsonl(out / "ranked.jsonl")}
    assert set(self_scores) == set(whole) and all(math.isfinite(v) for v in self_scores.values())


# ------------------------------------------------------------------------------ bad input, before any work


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model or training one fails the test: every check must come first."""
    from hyperinf_ext.app.models import training
    from hyperinf_ext.app.tasks import user_run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or trained before the inputs were checked")

    monkeypatch.setattr(user_run, "load_model", refuse)
    monkeypatch.setattr(training, "finetune", refuse)


def _error(capsys, argv):
    capsys.readouterr()  # what the test's own set-up printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_causal_inputs_name_file_line_and_column(llm, tmp_path, capsys, no_model_work):
    folder, adapter, train, target = llm
    base = ["audit", "--model", str(folder), "--out", str(tmp_path / "o"), *FAST]
    rows = read_jsonl(train)
    cases = {
        "missing.jsonl": ([rows[0], {"prompt": "a film"}], ["missing.jsonl", "column 'response' not found", "line 2"]),
        "empty.jsonl": ([], ["empty.jsonl", "file is empty"]),
        "noanswer.jsonl": ([rows[0], {**rows[1], "response": " "}], ["noanswer.jsonl", "empty response (line 2)",
                                                                     "column 'response'"]),
        "clash.jsonl": ([rows[0], {**rows[1], "rank": 3}], ["clash.jsonl", "line 2", "column 'rank'"]),
    }
    for name, (content, words) in cases.items():
        path = write_instructions(tmp_path / name, content)
        err = _error(capsys, [*base, "--train", str(path)])
        assert all(w in err for w in words), (name, err)
    # a target whose response cannot be scored: its response alone exceeds --max-length
    long = write_instructions(tmp_path / "long.jsonl", [rows[0], {**rows[1], "response": "great " * 12}])
    err = _error(capsys, [*base, "--train", str(train), "--target", str(long), "--max-length", "12"])
    assert f"{long}: line 2, column 'response'" in err and "its response alone has" in err
    out_file = tmp_path / "a-file"
    out_file.write_text("x")
    err = _error(capsys, ["audit", "--model", str(folder), "--train", str(train), "--out", str(out_file), *FAST])
    assert "--out" in err and "a-file" in err


def test_truncated_prompts_are_stated_in_the_report_not_only_the_log(llm, tmp_path, capsys):
    """A prompt cut to --max-length is a change to the user's data: summary.json's notes and report.md say so
    (and how many), as they say what the files lost; a run without a cut has no such note."""
    folder, adapter, train, _ = llm
    rows = read_jsonl(train)
    long = write_instructions(tmp_path / "long.jsonl", [*rows[:6], {**rows[6], "prompt": "a quiet film " * 40}])
    base = ["audit", "--model", str(folder), "--adapter", str(adapter), *FAST]
    for name, path, cut in (("cut", long, True), ("whole", train, False)):
        out = tmp_path / name
        assert main([*base, "--train", str(path), "--max-length", "48", "--out", str(out)]) == 0, \
            capsys.readouterr().err
        notes = json.loads((out / "summary.json").read_text())["notes"]
        stated = [n for n in notes if "longer than --max-length 48" in n]
        assert stated == (["1 prompt(s) longer than --max-length 48 lost tokens from their middle (responses are "
                           "never truncated)"] if cut else []), notes
        assert ("Note: 1 prompt(s) longer than --max-length 48" in (out / "report.md").read_text()) == cut


def test_labelled_tokens_are_checked_per_example(tmp_path):
    """An example left without a labelled token is named by file, line and column."""
    from hyperinf_ext.app.data.dataset import DataError
    from hyperinf_ext.app.data.instruction import InstructionDataset
    from hyperinf_ext.app.data.user_rows import read_user_rows
    from hyperinf_ext.app.tasks import user_checks

    path = write_instructions(tmp_path / "t.jsonl", sentiment_rows(2))
    ds = InstructionDataset.from_pairs([[{"role": "user", "content": "a"}]] * 2, ["x", "y"], rows=[1, 2])

    class Encoded:
        encodings = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, 5]},
                     {"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, -100]}]
        truncated = 0

    user_checks.encode_instructions, saved = (lambda *a, **k: Encoded()), user_checks.encode_instructions
    try:
        with pytest.raises(DataError, match=r"t\.jsonl: line 2, column 'response': no token of the response is labelled"):
            user_checks.labelled_encodings(ds, read_user_rows(path), "response", None, 8)
    finally:
        user_checks.encode_instructions = saved


def _other_llama(path, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_an_adapter_of_another_base_model_is_refused(llm, tmp_path, capsys, no_model_work):
    folder, adapter, train, _ = llm
    other = _other_llama(tmp_path / "wide", 48)
    # the folder adapter_config.json names exists here and has another hidden size
    err = _error(capsys, ["audit", "--model", str(other), "--adapter", str(adapter), "--train", str(train),
                          "--out", str(tmp_path / "o"), *FAST])
    assert f"--adapter {adapter}: trained on another base model" in err and "hidden_size 32" in err
    # the named base is not here: the tensor shapes tell
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/elsewhere"}))
    err = _error(capsys, ["audit", "--model", str(other), "--adapter", str(moved), "--train", str(train),
                          "--out", str(tmp_path / "o"), *FAST])
    assert "trained on another base model" in err and "reads 32 features" in err and "hidden size 48" in err


def _head_audit_error(tmp_path, capsys, classes, rows):
    """(folder, head, csv, the one-line error) of `audit` on a CSV of ``rows`` with a tiny BERT and a LoRA
    adapter that saved a classification head of ``classes``."""
    from hyperinf_ext.app.models.training import load_lora_model

    folder, head, path = _bert_folder(tmp_path / "bert"), tmp_path / f"head{classes}", tmp_path / f"train{classes}.csv"
    load_lora_model(folder, num_labels=classes, rank=2).save_pretrained(str(head))
    path.write_text(rows)
    return folder, head, path, _error(capsys, ["audit", "--model", str(folder), "--adapter", str(head), "--train",
                                               str(path), "--out", str(tmp_path / "o"), *FAST])


def test_classifier_labels_outside_the_head_and_unknown_target_labels(tmp_path, capsys, no_model_work):
    folder, head, three, err = _head_audit_error(tmp_path, capsys, 2,
                                                 "text,label\na great film,0\na bad film,1\na dull film,2\n")
    assert f"{three}: line 4, column 'label': label '2'" in err and "outside the 2 classes" in err
    train = tmp_path / "train.csv"
    train.write_text("text,label\na great film,pos\na bad film,neg\n")
    target = tmp_path / "target.csv"
    target.write_text("text,label\na fun film,pos\na dull film,meh\n")
    err = _error(capsys, ["audit", "--model", str(folder), "--train", str(train), "--target", str(target),
                          "--out", str(tmp_path / "o"), *FAST])
    assert f"{target}: line 3, column 'label': label 'meh' does not occur in {train}" in err
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("text,class\na,1\n")
    err = _error(capsys, ["audit", "--model", str(folder), "--train", str(no_label), "--out", str(tmp_path / "o"),
                          *FAST])
    assert "nolabel.csv: column 'label' not found in the header (line 1)" in err
    # a classifier adapter on a causal LM
    llama = make_tiny_llama(tmp_path / "llama")
    jsonl = write_instructions(tmp_path / "i.jsonl", sentiment_rows(4))
    err = _error(capsys, ["audit", "--model", str(llama), "--adapter", str(head), "--train", str(jsonl),
                          "--out", str(tmp_path / "o"), *FAST])
    assert "task_type SEQ_CLS" in err and "causal LM" in err


def test_text_labels_follow_the_heads_own_class_names(tmp_path):
    """A fixed head's outputs are its classes, not the file's sorted names: by id2label when the model folder
    names them (any order); a nameless head takes the sorted names only when the file names all its classes."""
    from hyperinf_ext.app.data.dataset import DataError, TextDataset
    from hyperinf_ext.app.tasks.user_checks import folder_head_label_names, labels_for_head

    f = tmp_path / "t.csv"
    ds = TextDataset(["a", "b", "c"], [1, 0, 1], ["joy", "sadness"], rows=[2, 3, 4])
    mapped, note = labels_for_head(ds, f, "label", 3, ["sadness", "anger", "joy"], "the head")
    assert mapped.labels == [0, 2, 0] and mapped.label_names == ["sadness", "anger", "joy"] and note is None
    assert mapped.texts == ds.texts and mapped.rows == ds.rows
    with pytest.raises(DataError, match=r"t\.csv: line 2, column 'label': label 'sadness' is not a class of the "
                                        r"head \(joy, anger\)"):
        labels_for_head(ds, f, "label", 2, ["joy", "anger"], "the head")
    with pytest.raises(DataError, match=r"names 2 classes \(joy, sadness\), but the head has 3 and names none"):
        labels_for_head(ds, f, "label", 3, None, "the head")
    same, note = labels_for_head(ds, f, "label", 2, None, "the head")
    assert same is ds and "sorted order as its classes 0 = joy, 1 = sadness" in note
    ints = TextDataset(["a", "b"], [0, 1], ["0", "1"], rows=[2, 3])  # class ids: as written, names or not
    assert labels_for_head(ints, f, "label", 2, ["pos", "neg"], "the head") == (ints, None)
    with pytest.raises(DataError, match="label '1' is class 1 of the data's 2 .* outside the 1 classes"):
        labels_for_head(ints, f, "label", 1, None, "the head")
    for id2label, want in (({"0": "pos", "1": "neg"}, ["pos", "neg"]), ({"0": "LABEL_0", "1": "LABEL_1"}, None),
                           ({"0": "pos"}, None), ({"0": "x", "1": "x"}, None)):
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "config.json").write_text(json.dumps({"id2label": id2label}))
        assert folder_head_label_names(tmp_path / "m", 2) == want, id2label


def test_a_file_naming_a_subset_of_a_nameless_heads_classes_is_refused(tmp_path, capsys, no_model_work):
    _, _, two, err = _head_audit_error(tmp_path, capsys, 3, "text,label\na great film,good\na bad film,poor\n")
    assert "names 2 classes (good, poor), but the classification head of --adapter" in err
    assert "write the labels as its class ids 0..2" in err
    named = _bert_folder(tmp_path / "bert-named", num_labels=2)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "id2label": {"0": "poor", "1": "fine"},
                                                   "label2id": {"poor": 0, "fine": 1}}))
    err = _error(capsys, ["audit", "--model", str(named), "--train", str(two), "--out", str(tmp_path / "o2"), *FAST])
    assert f"{two}: line 2, column 'label': label 'good' is not a class of the classification head of --model" in err


# ------------------------------------------------------------------------------ --index


@pytest.fixture(scope="module")
def exact_index(llm):
    """An exact index (--proj-dim 0: float32 gradients) of the training file with the adapter."""
    folder, adapter, train, _ = llm
    idx = train.parent / "index-exact"
    assert main(["index", "build", "--model", str(folder), "--adapter", str(adapter), "--train", str(train),
                 "--proj-dim", "0", "--out", str(idx), *FAST]) == 0
    return idx


@pytest.mark.parametrize("with_target", [True, False])
def test_audit_from_an_exact_index_equals_the_audit_without(llm, exact_index, tmp_path, capsys, with_target):
    """With --target: the default mixing (99) from the index at its own damping, raw, ranked by influence
    (--signal influence) so that the ranking is compared exactly; then the combined signal from the same index."""
    folder, adapter, train, target = llm
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["audit", "--index", str(exact_index),
                 *(["--target", str(target), "--signal", "influence"] if with_target else []),
                 *(["--train", str(train)] if with_target else ["--no-verify", "--estimator", "unbiased"]),
                 "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    assert f"index {exact_index}: scores from the index, exact" in capsys.readouterr().out
    signal = "influence_score" if with_target else "self_influence"
    ranked = read_jsonl(out / "ranked.jsonl")
    expected = direct_scores(folder, adapter, train, target if with_target else None, mix=99.0 if with_target else 0.0)
    # the same ranking as without --index; scores to float32 rounding of the stored gradients
    assert [int(r["id"][2:]) for r in ranked] == sorted(range(24), key=lambda i: (-expected[i], i))
    top = max(abs(v) for v in expected)
    for r in ranked:
        assert r[signal] == pytest.approx(expected[int(r["id"][2:])], rel=1e-5, abs=1e-6 * top)
    assert {k: v for k, v in ranked[0].items() if k not in ("rank", signal)} in read_jsonl(train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mix_queries"] == (99.0 if with_target else None)
    # the index was built at --damping auto: the report names what that meant (hyperinf's spectral × 1)
    assert summary["damping"] == summary["settings"]["damping"] == "spectral:1"
    index = summary["index"]
    assert index["path"] == str(exact_index) and index["proj_dim"] == 0 and index["projected"] is False
    # an exact index has no projected layer, so the estimator changes nothing
    assert (index["verified"], index["estimator"]) == ((True, "regression") if with_target else (False, "unbiased"))
    assert index["scores"].startswith("from the index, exact") and summary["train"] == str(train.resolve())
    assert summary["finetune"]["epochs"] == 0 and summary["finetune"]["adapter"] == str(exact_index / "adapter")
    assert "checkpoint" not in summary and not (out / ".checkpoint").exists()
    assert sections_by_title(parse((out / "report.html").read_text()))["Training examples, most suspicious first"]
    if with_target:
        from hyperinf_ext.app.tasks.metrics import rank_average

        assert main(["audit", "--index", str(exact_index), "--target", str(target), "--signal", "combined",
                     "--out", str(tmp_path / "c"), *FAST]) == 0, capsys.readouterr().err
        combined = read_jsonl(tmp_path / "c" / "ranked.jsonl")
        want = direct_columns(folder, adapter, train, target, detection=False)  # the index's damping, raw
        for r in combined:
            for c in ("influence_score", "self_influence"):
                assert r[c] == pytest.approx(want[c][int(r["id"][2:])], rel=1e-5, abs=1e-6 * max(map(abs, want[c])))
        ranks = rank_average([r["influence_score"] for r in combined], [r["self_influence"] for r in combined])
        assert [r["combined_score"] for r in combined] == pytest.approx(ranks.tolist(), abs=1e-12)


def test_config_damping_names_the_rule_and_scale_an_index_scores_at():
    """An index's attributor config → the damping label its reports show: "auto" resolved to the method's
    default, a rule with its damping_scale, a number as given, a method without curvature as it is."""
    from types import SimpleNamespace as Config

    from hyperinf_ext.app.tasks.pipeline_config import config_damping

    assert config_damping(Config(method="hyperinf", damping="auto", damping_scale=None)) == "spectral:1"
    assert config_damping(Config(method="hyperinf", damping="spectral", damping_scale=3.0)) == "spectral:3"
    assert config_damping(Config(method="datainf", damping="auto", damping_scale=None)) == "datainf:0.1"
    assert config_damping(Config(method="hyperinf", damping="datainf", damping_scale=None)) == "datainf:0.1"
    assert config_damping(Config(method="hyperinf", damping=1e-3, damping_scale=None)) == "0.001"
    assert config_damping(Config(method="tracin", damping="auto", damping_scale=None)) == "auto"


def test_audit_index_refusals(llm, exact_index, tmp_path, capsys, no_model_work):
    folder, adapter, train, target = llm
    base = ["audit", "--out", str(tmp_path / "o"), *FAST]
    other = write_instructions(tmp_path / "other.jsonl", sentiment_rows(5, seed=9))
    cases = [
        (["--index", str(exact_index), "--model", str(folder)], "--model: not with --index"),
        (["--index", str(exact_index), "--adapter", str(adapter)], "--adapter: not with --index"),
        (["--index", str(exact_index), "--epochs", "1"], "--epochs: not with --index"),
        (["--index", str(exact_index), "--method", "datainf"], "--method: not with --index"),
        (["--index", str(exact_index), "--train", str(other)], f"--train {other}: not the file the index"),
        (["--index", str(tmp_path)], f"--index {tmp_path}: not an index built by `hyperinf-ext index build`"),
        ([], "--train: a file is required (or --index IDX)"),
    ]
    for argv, message in cases:
        err = _error(capsys, [*base, *argv])
        assert message in err, (argv, err)


def test_audit_index_reads_the_given_train_file_when_the_built_one_moved(llm, exact_index, tmp_path, capsys):
    """--train FILE with --index: FILE is read when it hashes as the index's, so an index whose data moved (or
    was copied to another machine) still answers; the outputs name the file read."""
    import shutil

    folder, adapter, train, target = llm
    copy = tmp_path / "moved" / "train.jsonl"
    copy.parent.mkdir()
    shutil.copy(train, copy)
    aside = train.with_suffix(".aside")
    train.rename(aside)  # the file the index was built from is gone
    try:
        out = tmp_path / "o"
        assert main(["audit", "--index", str(exact_index), "--train", str(copy), "--target", str(target),
                     "--out", str(out), *FAST]) == 0, capsys.readouterr().err
        err = _error(capsys, ["audit", "--index", str(exact_index), "--target", str(target),
                              "--out", str(tmp_path / "o2"), *FAST])
        assert f"its training file {train} is missing or changed" in err
    finally:
        aside.rename(train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"] == summary["index"]["train"] == str(copy.resolve())
    assert len(read_jsonl(out / "ranked.jsonl")) == len(read_jsonl(train))


def test_audit_with_the_query_side_options_equals_the_library_call(llm, tmp_path, capsys):
    """--mix-queries 99 --normalize symmetric --damping spectral:1 (TrackStar's estimator in the GFIM form at the
    method's own damping): the ranked scores are HyperINF.mean_scores with the same options; --normalize none
    --damping spectral:1: the raw mixed score; --normalize unit without --target is the normalised
    self-influence; --normalize symmetric with the combined signal ranks with the raw self-influence."""
    from hyperinf_ext.app.tasks.metrics import rank_average

    folder, adapter, train, target = llm
    with one_thread():
        attr, loader = fitted_here(folder, adapter, train)
        attr.use("hyperinf", damping="spectral", damping_scale=1.0)
        sym = attr.mean_scores(loader(target), mix_queries=99.0, normalize="symmetric").double()
        want = {"mixed": sym.tolist(), "raw": attr.mean_scores(loader(target), mix_queries=99.0).double().tolist(),
                "unit self": attr.self_scores(normalize="unit").double().tolist(),
                "combined": rank_average(sym, attr.self_scores().double()).tolist()}
        plain = attr.mean_scores(loader(target)).double().tolist()
    assert max(abs(a - b) for a, b in zip(want["mixed"], plain)) > 1e-3 * max(map(abs, plain))  # they differ
    at1 = ["--target", str(target), "--damping", "spectral:1"]
    for name, flags, signal in (("mixed", [*at1, "--signal", "influence", "--normalize", "symmetric"], "influence_score"),
                                ("raw", [*at1, "--signal", "influence", "--normalize", "none"], "influence_score"),
                                ("combined", [*at1, "--signal", "combined", "--normalize", "symmetric"], "combined_score"),
                                ("unit self", ["--normalize", "unit"], "self_influence")):
        out = tmp_path / name.replace(" ", "_")
        argv = ["audit", "--model", str(folder), "--adapter", str(adapter), "--train", str(train), "--out", str(out),
                *flags, *FAST]
        assert main(argv) == 0, capsys.readouterr().err
        for r in read_jsonl(out / "ranked.jsonl"):
            assert r[signal] == pytest.approx(want[name][int(r["id"][2:])], **TOL)
        settings = json.loads((out / "summary.json").read_text())["settings"]
        given = flags[flags.index("--normalize") + 1]
        assert settings["normalize"] == given and settings["damping"] == "spectral:1"  # given, or hyperinf's auto


def test_query_side_option_refusals(llm, exact_index, tmp_path, capsys, no_model_work):
    folder, adapter, train, target = llm
    base = ["audit", "--model", str(folder), "--adapter", str(adapter), "--train", str(train), "--out",
            str(tmp_path / "o"), *FAST]
    assert "--mix-queries: needs --target" in _error(capsys, [*base, "--mix-queries", "1"])
    assert "--normalize symmetric: needs --target" in _error(capsys, [*base, "--normalize", "symmetric"])
    assert "--mix-queries: expected a finite weight" in _error(capsys, [*base, "--target", str(target),
                                                                       "--mix-queries", "-2"])
    assert "--normalize: not with --per-token" in _error(capsys, [*base, "--target", str(target), "--normalize",
                                                                 "unit", "--per-token"])
    assert "--mix-queries: method 'lissa'" in _error(capsys, [*base, "--target", str(target), "--method", "lissa",
                                                             "--mix-queries", "1"])
    assert "--signal combined: needs --target" in _error(capsys, [*base, "--signal", "combined"])
    assert "--signal influence: needs --target" in _error(capsys, [*base, "--signal", "influence"])
    assert "--mix-queries: needs --target and an influence signal" in _error(
        capsys, [*base, "--target", str(target), "--signal", "self", "--mix-queries", "1"])
    assert "--normalize: not with --index" in _error(capsys, ["select", "--index", str(exact_index), "--target",
                                                              str(target), "--fraction", "0.5", "--normalize", "unit",
                                                              "--out", str(tmp_path / "s"), *FAST])


def test_a_method_that_cannot_mix_audits_unmixed_by_default(llm, tmp_path, capsys):
    """The default --mix-queries (99) applies where the method can mix; tracin (no curvature) scores unmixed
    and says so (summary mix_queries 0, no mixing in the signal text), ranked by the default signal; hyperinf's
    damping and normalisation defaults are not tracin's."""
    folder, adapter, train, target = llm
    out = tmp_path / "tracin"
    assert main(["audit", "--model", str(folder), "--adapter", str(adapter), "--train", str(train), "--target",
                 str(target), "--method", "tracin", "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mix_queries"] == 0.0 and summary["signal"] == "influence_score"
    assert "mixed in" not in summary["signal_meaning"] and "mixed in" not in capsys.readouterr().out
    assert summary["damping"] == "auto" and "normalised" not in summary["signal_meaning"]


def test_detection_defaults_apply_to_hyperinf_on_a_target_with_its_own_fit(capsys):
    """1d's setting (bench/DEFAULTS.md): hyperinf's influence on --target at DETECTION_DAMPING as the
    DETECTION_NORMALIZE cosine; an index keeps its own damping and raw scores, --per-token raw scores, another
    method or no target neither; a given --damping / --normalize wins; the CLI help names the constants."""
    from hyperinf_ext.app.cli.args import build_parser
    from hyperinf_ext.app.tasks.audit import DETECTION_DAMPING, DETECTION_NORMALIZE, AuditConfig

    t = Path("target.jsonl")
    cfg = AuditConfig(train=Path("train.jsonl"), target=t)
    assert (cfg.resolved_damping("hyperinf"), cfg.resolved_normalize("hyperinf")) == (DETECTION_DAMPING,
                                                                                      DETECTION_NORMALIZE)
    assert cfg.score_options("hyperinf") == {"mix_queries": 99.0, "normalize": DETECTION_NORMALIZE}
    for other in (AuditConfig(train=Path("x"), target=t, index=Path("idx")), AuditConfig(train=Path("x")),
                  AuditConfig(train=Path("x"), target=t, score_signal="self")):
        assert (other.resolved_damping("hyperinf"), other.resolved_normalize("hyperinf")) == ("auto", None)
    assert (cfg.resolved_damping("exact"), cfg.resolved_normalize("exact")) == ("auto", None)
    tokens = AuditConfig(train=Path("x"), target=t, per_token=True)
    assert (tokens.resolved_damping("hyperinf"), tokens.resolved_normalize("hyperinf")) == (DETECTION_DAMPING, None)
    given = AuditConfig(train=Path("x"), target=t, damping="spectral:1", normalize=False)
    assert (given.resolved_damping("hyperinf"), given.resolved_normalize("hyperinf")) == ("spectral:1", None)
    assert given.score_options("hyperinf")["normalize"] is False
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["audit"]._actions}
    assert DETECTION_DAMPING in helps["damping"] and f"default: {DETECTION_NORMALIZE}" in helps["normalize"]


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    """OUT/.run.lock: a second audit/select on the same --out would delete (or write into) the running one's
    checkpoint; it is refused in one line until the first finishes (or its process ends)."""
    from hyperinf_ext.app.tasks.user_run import RunCheckpoint, UserConfig

    out = tmp_path / "out"
    out.mkdir()
    cfg = UserConfig()
    first, second = RunCheckpoint(out, "audit", cfg, []), RunCheckpoint(out, "audit", cfg, [])
    assert first.start() is False and (out / ".checkpoint" / "run.json").is_file()
    with pytest.raises(ValueError, match=f"--out {out}: in use by another audit or select run"):
        second.start()
    assert (out / ".checkpoint" / "run.json").is_file()  # the first run's checkpoint is untouched
    first.finish()
    assert second.start() is False
    third = RunCheckpoint(out, "audit", cfg, [])
    with pytest.raises(ValueError, match="in use by another"):
        third.start()
    del second  # an object that goes (an interrupted run) releases the lock too
    assert third.start() is True  # the same arguments: resumes the checkpoint the second run started
    third.release()


def test_a_finished_run_keeps_only_its_adapter_and_never_deletes_a_given_one(tmp_path):
    """finish(): with a fine-tuned adapter, run.json and adapter/ stay (the fit's gradient cache goes); without
    one the folder goes.  An --adapter inside OUT/.checkpoint is refused by a run that would replace it."""
    from hyperinf_ext.app.tasks.user_run import RunCheckpoint, UserConfig

    out = tmp_path / "out"
    out.mkdir()
    ckpt = RunCheckpoint(out, "audit", UserConfig(), [])
    assert ckpt.start() is False
    for sub in ("adapter", "fit"):
        (ckpt.root / sub).mkdir()
    (ckpt.adapter_dir / "adapter_config.json").write_text("{}")
    (ckpt.adapter_dir / "training.json").write_text("{}")
    (ckpt.fit_dir / "meta.json").write_text("{}")
    assert "reuses it" in ckpt.kept_note()
    ckpt.finish()
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["adapter", "run.json"]
    again = RunCheckpoint(out, "audit", UserConfig(), [])
    assert again.start() is True and again.has_adapter()  # the same arguments: the adapter is reused
    again.release()
    given = RunCheckpoint(out, "audit", UserConfig(adapter=ckpt.adapter_dir), [])
    with pytest.raises(ValueError, match="lies in .*copy the adapter elsewhere"):
        given.start()
    given.release()
    assert (ckpt.adapter_dir / "adapter_config.json").is_file()  # untouched
    bare = tmp_path / "bare"
    bare.mkdir()
    plain = RunCheckpoint(bare, "audit", UserConfig(), [])
    plain.start()
    assert "removed when the run finished" in plain.kept_note()
    plain.finish()
    assert not plain.root.exists()


def test_a_rerun_that_changes_only_scoring_settings_resumes_the_adapter_and_fit(tmp_path):
    """The fit (always plain gradients: ``fit_attributor`` fits as tracin) and the fine-tune do not depend on
    the method, damping, signal or selection settings, so a run that failed while scoring resumes with them
    changed instead of fine-tuning again; a setting the fine-tune or the fit reads starts afresh."""
    from hyperinf_ext.app.tasks.audit import AuditConfig
    from hyperinf_ext.app.tasks.select_pool import SelectPoolConfig
    from hyperinf_ext.app.tasks.user_run import RunCheckpoint

    def starts(command, before, after):
        out = tmp_path / f"{command}-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        first = RunCheckpoint(out, command, before, [])
        assert first.start() is False
        first.release()
        second = RunCheckpoint(out, command, after, [])
        kept = second.start()
        second.release()
        return kept

    scoring = {"audit": dict(method="exact", damping="spectral:0.5", mix_queries=3.0, normalize="unit",
                             score_signal="self", per_token=True, per_token_count=3),
               "select": dict(method="kronecker", damping="datainf", mix_queries=1.0, normalize="query",
                              fraction=0.3, count=None, rule="top", evaluate=True)}
    fitting = dict(epochs=2, lr=1e-3, rank=4, max_length=32, seed=1, fit_batch_size=4, warmup_fraction=0.2)
    for command, cls in (("audit", AuditConfig), ("select", SelectPoolConfig)):
        assert set(scoring[command]) == set(cls.scoring_only)
        for key, value in scoring[command].items():
            assert starts(command, cls(), cls(**{key: value})) is True, key
        for key, value in fitting.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                assert starts(command, cls(), cls(**{key: value})) is False, key
