"""Tests for hyperinf_ext.app.models.training on the bundled all-MiniLM-L6-v2 (kept short: ~48 examples)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hyperinf_ext.app.data import DataError, load_rotten_tomatoes, make_loader, split_dataset
from hyperinf_ext.app.models.training import MODEL_INPUT_KEYS, evaluate, finetune, load_lora_model, load_tokenizer

MAX_LEN = 32


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return split_dataset(load_rotten_tomatoes(), 48, 32, seed=0)


@pytest.fixture(scope="module")
def fresh():
    """(model, initial trainable params) -- tests must not train this model in place."""
    model = load_lora_model(seed=0)
    return model, _trainable(model)


@pytest.fixture(scope="module")
def trained(fresh, tokenizer, splits):
    model = copy.deepcopy(fresh[0])
    loader = make_loader(splits[0], tokenizer, batch_size=16, shuffle=True, sort_by_length=True, max_length=MAX_LEN)
    lines = []
    history = finetune(model, loader, epochs=1, progress=False, log=lines.append)
    return model, history, lines


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}).logits


def test_lora_model_structure(fresh):
    model, init = fresh
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    assert sum(p.numel() for p in init.values()) == 74_498
    assert any("classifier" in n for n in init)
    assert not model.training
    assert model.config.num_labels == 2


def test_init_is_seeded_and_leaves_global_rng(fresh):
    state = torch.get_rng_state()
    again = load_lora_model(seed=0)
    assert torch.equal(state, torch.get_rng_state())
    for n, p in _trainable(again).items():
        assert torch.equal(p, fresh[1][n]), n


def test_finetune_one_epoch(fresh, trained):
    model, history, lines = trained
    assert len(history) == 1
    rec = history[0]
    assert rec["epoch"] == 1 and math.isfinite(rec["loss"]) and rec["seconds"] > 0
    assert len(lines) == 1 and "loss" in lines[0]
    assert not model.training
    after = _trainable(model)
    assert any(not torch.equal(after[n], fresh[1][n]) for n in after)
    # The base weights are frozen: compare one against the untouched fresh model.
    frozen = dict(fresh[0].named_parameters())
    for n, p in model.named_parameters():
        if not p.requires_grad and "query" in n and "base_layer.weight" in n:
            assert torch.equal(p, frozen[n])
            break
    else:
        pytest.fail("no frozen query weight found")


def test_finetune_deterministic(fresh, tokenizer, splits, trained):
    model = copy.deepcopy(fresh[0])
    loader = make_loader(splits[0], tokenizer, batch_size=16, shuffle=True, sort_by_length=True, max_length=MAX_LEN)
    history = finetune(model, loader, epochs=1, progress=False)
    # bit-equal: the same float ops in the same order in one process (same seed, same batches, same
    # thread count), so the same roundings
    assert history[0]["loss"] == trained[1][0]["loss"]
    ref = _trainable(trained[0])
    for n, p in _trainable(model).items():
        assert torch.equal(p, ref[n]), n


def test_evaluate(trained, tokenizer, splits):
    model = trained[0]
    model.train()
    out = evaluate(model, make_loader(splits[1], tokenizer, batch_size=16, max_length=MAX_LEN))
    assert model.training  # previous mode restored
    model.eval()
    assert set(out) == {"accuracy", "loss"}
    assert 0.0 <= out["accuracy"] <= 1.0
    assert math.isfinite(out["loss"]) and out["loss"] > 0


def test_adapter_round_trip(trained, tokenizer, splits, tmp_path):
    model = trained[0]
    model.save_pretrained(tmp_path)
    reloaded = load_lora_model(adapter=tmp_path)
    assert sum(p.numel() for p in reloaded.parameters() if p.requires_grad) == 74_498
    batch = next(iter(make_loader(splits[1], tokenizer, batch_size=32, max_length=MAX_LEN)))
    # the adapter round-trips its float32 bytes, and both forwards run the same ops on the same batch
    assert torch.equal(_logits(model, batch), _logits(reloaded, batch))


def test_not_a_model_folder(tmp_path):
    for fn in (load_lora_model, load_tokenizer):
        with pytest.raises(DataError) as info:
            fn(tmp_path)
        assert "config.json" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_lora_model(tmp_path / "missing")
    with pytest.raises(DataError, match="adapter_config.json"):
        load_lora_model(adapter=tmp_path)


def _labelled(splits, tokenizer, labels):
    batch = next(iter(make_loader(splits[1], tokenizer, batch_size=4, max_length=MAX_LEN)))
    return [{**batch, "labels": torch.tensor(labels)}]


@pytest.mark.parametrize("labels, shown", [([0, 2, 1, 0], r"\[2\]"), ([0, 1, -1, 0], r"\[-1\]")])
def test_label_out_of_range(fresh, tokenizer, splits, labels, shown):
    model = copy.deepcopy(fresh[0])
    loader = _labelled(splits, tokenizer, labels)
    for run in (lambda: finetune(model, loader, epochs=1, progress=False), lambda: evaluate(model, loader)):
        with pytest.raises(DataError, match=rf"labels: class label\(s\) {shown} outside \[0, 2\) of the model's 2"):
            run()
    assert all(torch.equal(p, fresh[1][n]) for n, p in _trainable(model).items())  # refused before any step


def test_head_with_other_label_count(tmp_path):
    """A folder whose saved classifier has 2 labels cannot serve 3 classes: say so before loading."""
    import json

    from hyperinf_ext.app.data import default_model_path

    config = json.loads((default_model_path() / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "a", "1": "b"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"classification head has 2 labels but 3 are needed"):
        load_lora_model(tmp_path, num_labels=3)
    del config["id2label"]
    config["num_labels"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"head has 4 labels but 2 are needed"):
        load_lora_model(tmp_path, num_labels=2)


def test_adapter_with_other_label_count(fresh, tmp_path):
    fresh[0].save_pretrained(tmp_path)  # a 2-label classifier in modules_to_save
    with pytest.raises(DataError, match=r"adapter's classification head has 2 labels but 3 are needed"):
        load_lora_model(adapter=tmp_path, num_labels=3)


def test_adapter_of_another_base_says_so(fresh, tmp_path):
    """Same label count, another hidden size: the message names the base, not a label count."""
    import transformers

    fresh[0].save_pretrained(tmp_path / "adapter")  # trained on the embedded MiniLM (hidden 384)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    with pytest.raises(DataError, match=r"trained on another base model \(its classification head reads 384 "
                                        r"features, this model's 32\)"):
        load_lora_model(tmp_path / "base", adapter=tmp_path / "adapter", num_labels=2)
