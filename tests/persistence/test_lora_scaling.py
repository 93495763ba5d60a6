"""Saved factors record the LoRA scaling of every attributed LoRA matrix: the adapter fingerprint hashes
weights only, and the same weights with another lora_alpha or use_rslora give other gradients (scores off
by a few percent). ``HyperINF.load`` refuses a mismatch naming the layer and both scalings, unless
``allow_other_weights=True``; saves without the key load as before; the fingerprint itself is unchanged."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.persistence import META  # noqa: E402
from tiny_bert import tiny_bert_lora  # noqa: E402

VOCAB = 30


def model(**lora):
    # rank 2: alpha 4 → scaling 2 (alpha_pattern sets another lora_alpha); rsLoRA → 4/√2; same seed, so the same weights whatever the scaling
    return tiny_bert_lora(vocab=VOCAB, hidden=12, intermediate=16, max_positions=16, rank=2, seed=0, **lora)


def batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (n, 5), generator=g),
             "attention_mask": torch.ones(n, 5, dtype=torch.long),
             "labels": torch.randint(0, 2, (n,), generator=g), "index": torch.arange(n)}]


@pytest.fixture
def saved(tmp_path):
    attr = HyperINF(model(), method="exact", damping=0.05, progress=False).fit(batches())
    attr.save(tmp_path)
    return tmp_path, attr


def test_save_records_the_scaling_and_keeps_the_fingerprint(saved):
    directory, attr = saved
    meta = json.loads((directory / META).read_text())
    lora = [l.name for l in attr.layers if l.kind != "head"]
    assert meta["lora_scaling"] == {name: 2.0 for name in lora}  # heads have no scaling
    assert meta["adapter_sha256"] == attr._adapter_digest()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fingerprint warning
        loaded = HyperINF.load(directory, model(), progress=False)
    q = batches(3, seed=1)
    torch.testing.assert_close(loaded.scores(q, batches()), attr.scores(q), rtol=1e-10, atol=0)


@pytest.mark.parametrize("other, now", [(dict(alpha_pattern={"query": 8, "value": 8}), "4.0"), (dict(use_rslora=True), "2.828")])
def test_load_refuses_another_scaling_of_the_same_weights(saved, other, now):
    directory, attr = saved
    m = model(**other)
    assert HyperINF(m, progress=False)._adapter_digest() == attr._adapter_digest()  # weights alone agree
    with pytest.raises(ValueError, match=rf"layer '.*lora_A' was fitted with LoRA scaling 2.0, but the model's is {now}"
                                         r".*allow_other_weights=True"):
        HyperINF.load(directory, m, progress=False)
    assert HyperINF.load(directory, m, progress=False, allow_other_weights=True).n_train == attr.n_train


def test_saves_without_the_key_load_as_before(saved):
    directory, attr = saved
    meta = json.loads((directory / META).read_text())
    del meta["lora_scaling"]
    (directory / META).write_text(json.dumps(meta))
    assert HyperINF.load(directory, model(alpha_pattern={"query": 8, "value": 8}), progress=False).n_train == attr.n_train


def test_a_malformed_key_is_refused(saved):
    directory, _ = saved
    meta = json.loads((directory / META).read_text())
    meta["lora_scaling"] = ["2.0"]
    (directory / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'lora_scaling' must be an object"):
        HyperINF.load(directory, model(), progress=False)


def test_a_fit_checkpoint_resumed_with_another_scaling_is_refused(tmp_path):
    """A checkpoint's model fingerprint hashes parameters, and the LoRA scaling is none: a resume with another
    lora_alpha or use_rslora would add the new scaling's gradients to the old sums.  The checkpoint records
    the scaling and the resume refuses another; the same configuration resumes (here: the finished fit)."""
    ck = tmp_path / "ck"
    first = HyperINF(model(), method="exact", damping=0.05, progress=False).fit(batches(), checkpoint_dir=ck)
    assert json.loads((ck / META).read_text())["lora_scaling"] == first._lora_scalings()
    for other in (dict(use_rslora=True), dict(alpha_pattern={"query": 8, "value": 8})):
        with pytest.raises(ValueError, match=f"checkpoint_dir {ck}: fitted with another LoRA scaling"):
            HyperINF(model(**other), method="exact", damping=0.05, progress=False).fit(batches(), checkpoint_dir=ck)
    again = HyperINF(model(), method="exact", damping=0.05, progress=False).fit(batches(), checkpoint_dir=ck)
    for name, f in first.factors.items():
        assert torch.equal(again.factors[name].gfim_sum, f.gfim_sum)
