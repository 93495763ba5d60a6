"""The capture refuses to run when the adapter its layers were found on no longer runs in the forward, and
a loss_fn that does not return one loss per example.

The hooks sit on the LoRA matrices of the adapter active at ``HyperINF(model)`` (find_gradient_layers).
``set_adapter`` to another adapter, ``merge_adapter`` or ``disable_adapter()`` afterwards leaves those
matrices out of the forward: every gradient, every score, would silently be 0 (a GFIM of zeros when it
happens before ``fit``). Restoring the adapter state makes the same attributor work again, with the same
scores. A loss_fn returning a batch mean ([1] for a batch of B > 1) is a ValueError naming loss_fn and [B].
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.capture import PerSampleGradients, find_gradient_layers  # noqa: E402
from lora_models import batches, lora_llama, make_data  # noqa: E402
from tiny_bert import DATA_VOCAB, batches as bert_batches, make_data as bert_data, tiny_bert_lora  # noqa: E402

TRAIN, QUERY = make_data(7, seed=2), make_data(3, seed=3)


def two_adapters():
    model = lora_llama()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n and "second" in n:
                    p.normal_(0, 0.3)
    return model


def fitted(model):
    return HyperINF(model, method="exact", damping=0.05, progress=False).fit(batches(TRAIN, 4))


def test_set_adapter_after_fit_is_refused_at_every_capture():
    model = two_adapters()
    attr = fitted(model)
    before = attr.scores(batches(QUERY, 2))
    assert before.abs().max() > 0
    model.set_adapter("second")
    for call in (lambda: attr.scores(batches(QUERY, 2)), lambda: attr.mean_scores(batches(QUERY, 2)),
                 lambda: attr.self_scores(batches(TRAIN, 4)), lambda: attr.scores(batches(QUERY, 2), batches(TRAIN, 4))):
        with pytest.raises(RuntimeError, match="active adapter changed from 'default' to 'second'.*silently be zero"):
            call()
    model.set_adapter("default")  # back: the same attributor works again, with the same scores
    torch.testing.assert_close(attr.scores(batches(QUERY, 2)), before, rtol=0, atol=0)


def test_set_adapter_between_construction_and_fit_is_refused():
    model = two_adapters()
    attr = HyperINF(model, method="exact", damping=0.05, progress=False)
    model.set_adapter("second")
    with pytest.raises(RuntimeError, match="active adapter changed from 'default' to 'second'"):
        attr.fit(batches(TRAIN, 4))


def test_merged_adapter_is_refused_and_unmerge_restores():
    model = lora_llama()
    attr = fitted(model)
    before = attr.scores(batches(QUERY, 2))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="adapter 'default' was merged into the base weights"):
        attr.scores(batches(QUERY, 2))
    model.unmerge_adapter()
    torch.testing.assert_close(attr.scores(batches(QUERY, 2)), before, rtol=1e-10, atol=1e-12)


def test_merged_adapter_with_a_trainable_head_is_refused():
    # the head still runs after the merge, so the losses keep a gradient: the LoRA layers' would be zeros
    model = tiny_bert_lora(vocab=DATA_VOCAB, layers=1)
    attr = HyperINF(model, method="exact", damping=0.05, progress=False).fit(bert_batches(bert_data(8, 1), 4))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="lora_A.*merged into the base weights"):
        attr.scores(bert_batches(bert_data(3, 2), 3))


def test_disabled_adapters_are_refused():
    model = lora_llama()
    attr = fitted(model)
    with model.disable_adapter():
        with pytest.raises(RuntimeError, match="adapters were disabled"):
            attr.scores(batches(QUERY, 2))
    assert attr.scores(batches(QUERY, 2)).abs().max() > 0


def test_low_level_capture_refuses_a_switched_adapter():
    model = two_adapters()
    layers = find_gradient_layers(model)
    assert {l.adapter for l in layers} == {"default"}
    model.set_adapter("second")
    with PerSampleGradients(model, layers) as psg:
        with pytest.raises(RuntimeError, match="active adapter changed"):
            psg.compute(batches(TRAIN, 4)[0])


def _batch_mean(model, batch):  # transformers' own loss: the batch mean, reshaped to [1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss.reshape(1)


def test_loss_fn_returning_one_loss_for_the_batch_is_refused():
    model = tiny_bert_lora(vocab=DATA_VOCAB, layers=1)
    data = bert_batches(bert_data(8, 1), 4)
    with PerSampleGradients(model, find_gradient_layers(model)) as psg:
        with pytest.raises(ValueError, match=r"loss_fn must return one loss per example, shape \[B\] = \[4\].*got \[1\]"):
            psg.compute(data[0], _batch_mean)
    with pytest.raises(ValueError, match=r"loss_fn .*\[4\].*got \[1\]"):
        HyperINF(model, method="exact", damping=0.05, progress=False, loss_fn=_batch_mean).fit(data)
    # batches of one example are per-example losses: fitted, then refused at a query batch of 4
    attr = HyperINF(model, method="exact", damping=0.05, progress=False, loss_fn=_batch_mean)
    attr.fit(bert_batches(bert_data(8, 1), 1))
    assert attr.scores(bert_batches(bert_data(4, 2), 1)).shape == (4, 8)
    with pytest.raises(ValueError, match=r"loss_fn .*\[4\].*got \[1\]"):
        attr.scores(bert_batches(bert_data(4, 2), 4))


def test_per_example_loss_fn_still_accepted():
    model = tiny_bert_lora(vocab=DATA_VOCAB, layers=1)

    def per_example(m, b):
        return F.cross_entropy(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"],
                               reduction="none")

    with PerSampleGradients(model, find_gradient_layers(model)) as psg:
        got = psg.compute(bert_batches(bert_data(8, 1), 4)[0], per_example)
    assert all(g.shape[0] == 4 for g in got.values())
