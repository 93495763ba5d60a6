"""The default loss against a float64 brute force: each example alone, unpadded, batch size 1, its loss
written out by hand with torch and differentiated with ``torch.autograd.grad``.

Covers the model kinds and batch layouts where the default loss used to give silently wrong numbers:
token classification (was shifted like a causal LM), encoder-decoder models (decoder inputs dropped),
left padding on absolute position embeddings (GPT-2, BERT: positions not counted from the mask),
right-padded ``labels = input_ids`` (the first pad token scored) and classification label shapes.

Tolerance: everything is float64 and the batched pass differs from the loop only in summation order,
so the per-example gradients and losses agree to a few units of roundoff (observed ≤ 1e-15 relative);
``TOL = 1e-12`` relative to each layer's largest reference entry leaves a wide margin while every
defect above is an O(0.01–1) relative error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peft
import transformers
from lora_models import lora_llama, make_data, rank_first  # noqa: E402

from hyperinf_ext.capture import PerSampleGradients, find_gradient_layers
from hyperinf_ext.capture.losses import ExampleError, _forward_inputs, causal_lm_loss, default_loss_fn

TOL = 1e-12


def _random_lora(model, seed=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
    return model.eval()


def brute(model, examples, loss_one):
    """{layer: [n, rank, dim]} gradients and [n] losses, one unpadded example at a time."""
    layers = find_gradient_layers(model)
    params = [p for layer in layers for p in layer.parameters]
    for p in params:
        p.requires_grad_(True)
    out, losses = {layer.name: [] for layer in layers}, []
    for ex in examples:
        loss = loss_one(model, ex)
        losses.append(loss.detach())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        it = iter([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        for layer in layers:
            out[layer.name].append(rank_first(layer, [next(it) for _ in layer.parameters]).detach())
    return {k: torch.stack(v) for k, v in out.items()}, torch.stack(losses)


def default_grads(model, batch):
    layers = find_gradient_layers(model)
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(batch)  # loss_fn=None: default_loss_fn, as HyperINF(model) uses
    return got, psg.last_losses


def assert_match(got, got_losses, ref, ref_losses):
    assert list(got) == list(ref)
    for name, r in ref.items():
        scale = r.abs().max().item()
        assert scale > 0, name
        err = (got[name] - r).abs().max().item() / scale
        assert err <= TOL, f"{name}: relative error {err:.2e}"
    torch.testing.assert_close(got_losses, ref_losses, rtol=TOL, atol=0)


def pad(rows, width, value, left=False):
    """Rows padded with ``value`` to ``width`` on the right (on the left with ``left=True``), as int64."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, cols] = r.long()
    return out


# ----------------------------------------------------------------------------- token classification


def seeded_lora(cls, cfg, targets, task=None, **lora):
    """A float64 ``cls(cfg)`` drawn from seed 0 (the global RNG left as it was), with a rank-2 LoRA on
    ``targets`` whose B matrices are non-zero (every LoRA gradient then non-zero)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = cls(cfg).double()
    return _random_lora(peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                  task_type=task, **lora)))


def tiny_token_bert(num_labels=5):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    return seeded_lora(transformers.BertForTokenClassification, cfg, ["query", "value"], "TOKEN_CLS")


def test_token_classification_scores_each_token_against_its_own_label():
    model = tiny_token_bert()
    g = torch.Generator().manual_seed(1)
    lengths = [7, 4, 6, 3]
    ids = [torch.randint(1, 50, (L,), generator=g) for L in lengths]
    labels = [torch.randint(0, 5, (L,), generator=g) for L in lengths]
    labels[0][2] = -100  # an unlabelled sub-word
    batch = {"input_ids": pad(ids, 7, 0), "attention_mask": pad([torch.ones(L) for L in lengths], 7, 0),
             "labels": pad(labels, 7, 0)}  # padding labelled 0 (not -100): attention_mask 0 must drop it

    def alone(m, ex):  # the token-classification loss: token t's logits vs label t, no shift
        logits = m(input_ids=ex[0][None]).logits[0].double()
        return F.cross_entropy(logits, ex[1], ignore_index=-100)

    ref, ref_losses = brute(model, list(zip(ids, labels)), alone)
    got, losses = default_grads(model, batch)
    assert_match(got, losses, ref, ref_losses)

    empty = dict(batch, labels=batch["labels"].clone())
    empty["labels"][2] = -100
    with pytest.raises(ExampleError, match=r"batch rows \[2\]: no labelled token") as info:
        default_loss_fn(model, empty)
    assert info.value.rows == [2]


# ----------------------------------------------------------------------------- encoder-decoder

BART_PAD, BART_START = 1, 2


def tiny_bart():
    cfg = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                  decoder_ffn_dim=24, max_position_embeddings=32, dropout=0.0,
                                  attention_dropout=0.0, pad_token_id=BART_PAD, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=BART_START, forced_eos_token_id=None)
    return seeded_lora(transformers.BartForConditionalGeneration, cfg, ["q_proj", "v_proj"], "SEQ_2_SEQ_LM")


def test_encoder_decoder_loss_uses_the_labels_as_decoder_targets():
    model = tiny_bart()
    g = torch.Generator().manual_seed(2)
    src = [torch.randint(3, 50, (L,), generator=g) for L in (6, 3, 5)]
    tgt = [torch.randint(3, 50, (L,), generator=g) for L in (4, 6, 2)]
    labels = pad(tgt, 6, -100)
    labels[2, 2:] = BART_PAD  # targets padded with the pad token (no decoder_attention_mask): not scored
    batch = {"input_ids": pad(src, 6, BART_PAD), "attention_mask": pad([torch.ones(len(s)) for s in src], 6, 0),
             "labels": labels}

    def alone(m, ex):  # decoder input: the start token, then the targets shifted right; no shift of the logits
        s, t = ex
        dec = torch.cat([torch.tensor([BART_START]), t[:-1]])
        logits = m(input_ids=s[None], decoder_input_ids=dec[None]).logits[0].double()
        return F.cross_entropy(logits, t)

    ref, ref_losses = brute(model, list(zip(src, tgt)), alone)
    got, losses = default_grads(model, batch)
    assert_match(got, losses, ref, ref_losses)

    # decoder inputs given by the batch are used as they are, with their mask
    dec = pad([torch.cat([torch.tensor([BART_START]), t[:-1]]) for t in tgt], 6, BART_PAD)
    given = dict(batch, labels=pad(tgt, 6, 7), decoder_input_ids=dec,
                 decoder_attention_mask=pad([torch.ones(len(t)) for t in tgt], 6, 0))
    got, losses = default_grads(model, given)
    assert_match(got, losses, ref, ref_losses)


# ----------------------------------------------------------------------------- left padding, absolute positions


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return seeded_lora(transformers.GPT2LMHeadModel, cfg, ["c_attn"], fan_in_fan_out=True)


def left_pad(data):
    """``make_data``'s right-padded rows moved to the right end (left padding)."""
    out = {k: v.clone() for k, v in data.items()}
    for i in range(data["input_ids"].shape[0]):
        L = int(data["attention_mask"][i].sum())
        for k in ("input_ids", "attention_mask", "labels"):
            out[k][i] = torch.roll(data[k][i], data[k].shape[1] - L)
    return out


def causal_alone(m, ex):
    ids, labels = ex
    logits = m(input_ids=ids[None]).logits[0].double()
    keep = labels[1:] != -100
    return F.cross_entropy(logits[:-1][keep], labels[1:][keep])


def unpadded(data):
    rows = []
    for i in range(data["input_ids"].shape[0]):
        keep = data["attention_mask"][i] == 1
        rows.append((data["input_ids"][i][keep], data["labels"][i][keep]))
    return rows


@pytest.mark.parametrize("padding", ["left", "right"])
def test_gpt2_loss_is_independent_of_padding(padding):
    model = tiny_gpt2()
    data = make_data(5, seed=2)
    data.pop("index")
    batch = left_pad(data) if padding == "left" else data
    ref, ref_losses = brute(model, unpadded(batch), causal_alone)
    got, losses = default_grads(model, batch)
    assert_match(got, losses, ref, ref_losses)
    with torch.no_grad():  # the documented claim of causal_lm_loss itself
        torch.testing.assert_close(causal_lm_loss(model, batch), ref_losses, rtol=TOL, atol=0)
    # position ids are added for a left-padded batch only; the batch's own are kept
    assert ("position_ids" in _forward_inputs(model, batch)) == (padding == "left")
    assert "position_ids" not in _forward_inputs(model, {k: v[:, :5] for k, v in data.items()})  # unpadded
    own = torch.zeros_like(batch["input_ids"])
    assert _forward_inputs(model, dict(batch, position_ids=own))["position_ids"] is own


def test_bert_token_classifier_with_left_padding():
    # BERT's absolute positions: with the ids counted from the mask a left-padded row is the row alone
    # (a sequence classifier would still pool the pad at position 0, so token classification is the case)
    model = tiny_token_bert()
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(1, 50, (L,), generator=g) for L in (6, 3, 5)]
    labels = [torch.randint(0, 5, (len(i),), generator=g) for i in ids]
    batch = {"input_ids": pad(ids, 6, 0, left=True),
             "attention_mask": pad([torch.ones(len(i)) for i in ids], 6, 0, left=True),
             "token_type_ids": torch.zeros(3, 6, dtype=torch.long), "labels": pad(labels, 6, -100, left=True)}

    def alone(m, ex):
        return F.cross_entropy(m(input_ids=ex[0][None]).logits[0].double(), ex[1])

    ref, ref_losses = brute(model, list(zip(ids, labels)), alone)
    got, losses = default_grads(model, batch)
    assert_match(got, losses, ref, ref_losses)


# ----------------------------------------------------------------------------- labels = input_ids, right padding


def test_right_padded_labels_equal_to_input_ids_do_not_score_padding():
    model = lora_llama()
    data = make_data(5, seed=2)
    data.pop("index")
    data["labels"] = data["input_ids"].clone()  # pad id 0 left in the labels of the padded positions
    assert int(data["attention_mask"].sum(1).min()) < data["input_ids"].shape[1]  # some row is padded
    ref, ref_losses = brute(model, unpadded(data), causal_alone)
    got, losses = default_grads(model, data)
    assert_match(got, losses, ref, ref_losses)


# ----------------------------------------------------------------------------- classification label shapes


def test_classification_label_shapes():
    from tiny_bert import tiny_bert_lora

    model = tiny_bert_lora(vocab=30, layers=1).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 30, (4, 5), generator=g)
    labels = torch.tensor([1, 0, 0, 1])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def alone(m, ex):
        return F.cross_entropy(m(input_ids=ex[0][None]).logits[0].double(), ex[1])

    ref, ref_losses = brute(model, list(zip(ids, labels)), alone)
    got, losses = default_grads(model, dict(batch, labels=labels[:, None]))  # [B, 1] class ids: taken as [B]
    assert_match(got, losses, ref, ref_losses)

    multi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"labels of shape \[4, 2\] \(multi-label.*give a loss_fn"):
        default_loss_fn(model, dict(batch, labels=multi))
    with pytest.raises(ValueError, match=r"labels of shape \[4, 3\] for logits of shape \[4, 2\].*loss_fn"):
        default_loss_fn(model, dict(batch, labels=torch.zeros(4, 3, dtype=torch.long)))
