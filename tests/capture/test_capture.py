"""Per-sample gradients from hooks vs. a batch-size-1 autograd loop (float64)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from hyperinf_ext.capture import (  # noqa: E402
    ExampleError,
    GradientLayer,
    PerSampleGradients,
    causal_lm_loss,
    classification_loss,
    default_loss_fn,
    find_gradient_layers,
    model_inputs,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ATOL = 1e-8
RTOL = 1e-6


# --------------------------------------------------------------------------- helpers


def randomize_lora_B(model: nn.Module, std: float = 0.2) -> None:
    # PEFT zero-initialises lora_B, which would make every lora_A gradient zero
    # and the lora_A comparison vacuous.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)


def reference_grads(model, layers, examples, loss_fn):
    """Batch-size-1 loop: rank-first gradients [n, r, d] and losses [n]."""
    was_training = model.training
    model.eval()
    params = [p for layer in layers for p in (layer.module.weight, layer.module.bias) if p is not None]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out = {layer.name: [] for layer in layers}
    losses = []
    for ex in examples:
        loss = loss_fn(model, ex)
        assert loss.shape == (1,)
        losses.append(loss.detach()[0])
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        i = 0
        for layer in layers:
            gw = grads[i]
            i += 1
            if layer.module.bias is not None:
                gb = grads[i]
                i += 1
                if layer.kind == "lora_B":
                    full = torch.cat([gw.T, gb[None, :]], dim=0)
                else:
                    full = torch.cat([gw, gb[:, None]], dim=1)
            else:
                full = gw.T if layer.kind == "lora_B" else gw
            out[layer.name].append(full)
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    model.train(was_training)
    return {k: torch.stack(v) for k, v in out.items()}, torch.stack(losses)


def assert_grads_match(got, expected, layers, n):
    assert list(got) == [layer.name for layer in layers]
    for layer in layers:
        g = got[layer.name]
        assert g.shape == (n, layer.rank, layer.dim), layer.name
        assert not g.requires_grad
        torch.testing.assert_close(g, expected[layer.name], rtol=RTOL, atol=ATOL, msg=layer.name)


def pad_batch(seqs, pad_id=0, left=False, labels=None):
    n, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    lab = torch.full((n, T), -100, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
        if labels is not None:
            lab[i, sl] = torch.tensor(labels[i])
    return ids, mask, lab


# --------------------------------------------------------------------------- models


def tiny_bert(use_rslora=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=2, max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    base = transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager").double()
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=["query", "value"],
                   task_type="SEQ_CLS", lora_dropout=0.1),
    )
    randomize_lora_B(model)
    return model


def bert_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 9, 4]
    seqs = [torch.randint(1, 100, (L,), generator=g).tolist() for L in lengths]
    ids, mask, _ = pad_batch(seqs)
    labels = torch.tensor([0, 1, 1, 0, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": labels, "index": torch.arange(5)}
    examples = [
        {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long),
         "token_type_ids": torch.zeros(1, len(s), dtype=torch.long), "labels": labels[i:i + 1]}
        for i, s in enumerate(seqs)
    ]
    return batch, examples


def lm_batch(left: bool, vocab: int, seed=2):
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 3, 8, 5]
    seqs = [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lengths]
    labels = [list(s) for s in seqs]
    labels[0][:2] = [-100, -100]      # prompt tokens not scored
    labels[2][1:4] = [-100] * 3
    labels[3] = [-100] * (len(labels[3]) - 1) + labels[3][-1:]  # only the last token is scored
    ids, mask, lab = pad_batch(seqs, left=left, labels=labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    if left:
        # Left padding shifts positions; explicit ids keep them equal to the unpadded run.
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    examples = [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long),
                 "labels": torch.tensor([labels[i]])} for i, s in enumerate(seqs)]
    return batch, examples


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    # eager Llama takes its softmax in float32, where float64's mask minimum becomes -inf and
    # fully padded (left-padding) query rows turn into NaN; sdpa has no such problem.
    base = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").double()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", lora_dropout=0.05))
    randomize_lora_B(model)
    return model


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    base = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").double()
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True,
                                            task_type="CAUSAL_LM", lora_dropout=0.1))
    randomize_lora_B(model)
    return model


class TwiceNet(nn.Module):
    """Calls `proj` twice per forward; 2-D inputs (no token axis)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.proj(torch.tanh(self.proj(x)))))


def twice_loss(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("use_rslora", [False, True])
def test_bert_classifier_matches_loop(use_rslora):
    model = tiny_bert(use_rslora=use_rslora)
    scale = 8 / 4 ** 0.5 if use_rslora else 8 / 4
    assert model.base_model.model.bert.encoder.layer[0].attention.self.query.scaling["default"] == pytest.approx(scale)
    layers = find_gradient_layers(model, include_heads=True)
    batch, examples = bert_batch()
    model.train()
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(batch, classification_loss)
    expected, exp_losses = reference_grads(model, layers, examples, classification_loss)
    assert_grads_match(got, expected, layers, n=5)
    torch.testing.assert_close(psg.last_losses, exp_losses, rtol=RTOL, atol=ATOL)
    assert all(got[layer.name].dtype == torch.float64 for layer in layers)
    assert any(got[layer.name].abs().max() > 0 for layer in layers if layer.kind == "lora_A")


def test_bert_layer_shapes_and_order():
    model = tiny_bert()
    layers = find_gradient_layers(model, include_heads=True)
    prefix = "base_model.model.bert.encoder.layer"
    assert [layer.name for layer in layers] == [
        f"{prefix}.0.attention.self.query.lora_A", f"{prefix}.0.attention.self.query.lora_B",
        f"{prefix}.0.attention.self.value.lora_A", f"{prefix}.0.attention.self.value.lora_B",
        f"{prefix}.1.attention.self.query.lora_A", f"{prefix}.1.attention.self.query.lora_B",
        f"{prefix}.1.attention.self.value.lora_A", f"{prefix}.1.attention.self.value.lora_B",
        "base_model.model.classifier.head",
    ]
    assert [(layer.kind, layer.rank, layer.dim) for layer in layers[:2]] == [("lora_A", 4, 32), ("lora_B", 4, 32)]
    head = layers[-1]
    assert (head.kind, head.rank, head.dim) == ("head", 2, 33)
    assert head.module is model.base_model.model.classifier.modules_to_save["default"]
    assert len(find_gradient_layers(model)) == 8  # heads off by default
    # GradientLayer compares/prints without the module
    assert "module" not in repr(head)
    assert head == GradientLayer(head.name, "head", 2, 33, nn.Linear(1, 1))


def test_layers_filter_and_errors():
    model = tiny_bert()
    sel = find_gradient_layers(model, include_heads=True, layers=["layer.1.attention.self.value", "classifier.head"])
    assert [layer.name for layer in sel] == [
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A",
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B",
        "base_model.model.classifier.head",
    ]
    exact = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B"
    assert [layer.name for layer in find_gradient_layers(model, layers=[exact])] == [exact]
    with pytest.raises(ValueError, match="no_such_layer"):
        find_gradient_layers(model, layers=["query", "no_such_layer"])
    with pytest.raises(ValueError, match="no active LoRA"):
        find_gradient_layers(TwiceNet())
    with pytest.raises(ValueError, match="no active LoRA"):
        find_gradient_layers(model.base_model.model.classifier)
    with model.disable_adapter():
        with pytest.raises(ValueError, match="no active LoRA"):
            find_gradient_layers(model)


def test_unsupported_lora_kinds_raise():
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 4)

    model = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["conv", "lin"]))
    with pytest.raises(ValueError, match=r"\bconv\b"):
        find_gradient_layers(model)
    # embedding LoRA and DoRA are captured (tests/capture/test_lora_variants.py checks them exactly)
    emb = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["emb", "lin"]))
    assert [layer.kind for layer in find_gradient_layers(emb)] == ["embedding_A", "embedding_B", "lora_A", "lora_B"]
    dora = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    assert [layer.kind for layer in find_gradient_layers(dora)] == ["lora_A", "lora_B", "magnitude"]
    dora_emb = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["emb"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        find_gradient_layers(dora_emb)


@pytest.mark.parametrize("arch,left", [("llama", True), ("llama", False), ("gpt2", False)])
def test_causal_lm_matches_loop(arch, left):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    batch, examples = lm_batch(left=left, vocab=64)
    layers = find_gradient_layers(model)
    assert {layer.kind for layer in layers} == {"lora_A", "lora_B"}
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(batch)  # default_loss_fn must pick the causal LM loss
    expected, exp_losses = reference_grads(model, layers, examples, causal_lm_loss)
    assert_grads_match(got, expected, layers, n=4)
    torch.testing.assert_close(psg.last_losses, exp_losses, rtol=RTOL, atol=ATOL)
    if arch == "gpt2":
        assert (layers[0].rank, layers[0].dim, layers[1].rank, layers[1].dim) == (3, 32, 3, 96)


def test_causal_lm_loss_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 4], [-100, -100, -100, -100]])

    class Out:
        def __init__(self, logits):
            self.logits = logits

    model = lambda **kw: Out(logits)  # noqa: E731
    with pytest.raises(ExampleError, match=r"batch rows \[1\]: no labelled token") as info:
        causal_lm_loss(model, {"input_ids": labels.clamp(min=0), "labels": labels})
    assert info.value.rows == [1]
    labels[1, 3] = 0  # one scored token
    loss = causal_lm_loss(model, {"input_ids": labels.clamp(min=0), "labels": labels})
    lp = logits.log_softmax(-1)
    expected0 = -(lp[0, 0, 2] + lp[0, 2, 4]) / 2
    torch.testing.assert_close(loss, torch.stack([expected0, -lp[1, 2, 0]]))
    # a target predicted from a padded position (left padding) is not scored
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    loss = causal_lm_loss(model, {"input_ids": labels.clamp(min=0), "attention_mask": mask, "labels": labels})
    torch.testing.assert_close(loss[0], -lp[0, 2, 4])
    # the only labelled target of row 0 sits behind padding: nothing left to score
    mask = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    with pytest.raises(ExampleError, match=r"batch rows \[0\]"):
        causal_lm_loss(model, {"input_ids": labels.clamp(min=0), "attention_mask": mask, "labels": labels})
    beyond_vocab = labels.clone()
    beyond_vocab[0, 1] = 7
    with pytest.raises(ExampleError, match=r"batch rows \[0\]: token labels \[7\] outside \[0, 5\)"):
        causal_lm_loss(model, {"input_ids": labels.clamp(min=0), "labels": beyond_vocab})
    cls = default_loss_fn(lambda **kw: Out(logits[:, 0]), {"input_ids": labels, "labels": torch.tensor([3, 0])})
    torch.testing.assert_close(cls, -torch.stack([lp[0, 0, 3], lp[1, 0, 0]]))


def test_model_inputs_drops_labels_and_index():
    batch = {"input_ids": 1, "attention_mask": 2, "token_type_ids": 3, "position_ids": 4, "inputs_embeds": None,
             "labels": 5, "index": 6, "other": 7}
    assert model_inputs(batch) == {"input_ids": 1, "attention_mask": 2, "token_type_ids": 3, "position_ids": 4}


def test_multiple_adapters_only_active_captured():
    model = tiny_bert()
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=6, target_modules=["query"], task_type="SEQ_CLS"))
    model.set_adapter("second")
    randomize_lora_B(model)
    layers = find_gradient_layers(model, include_heads=True)
    assert [layer.name.split("encoder.")[-1] for layer in layers] == [
        "layer.0.attention.self.query.lora_A", "layer.0.attention.self.query.lora_B",
        "layer.1.attention.self.query.lora_A", "layer.1.attention.self.query.lora_B",
        "base_model.model.classifier.head",
    ]
    lq = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layers[0].module is lq.lora_A["second"] and layers[0].rank == 3
    assert layers[-1].module is model.base_model.model.classifier.modules_to_save["second"]
    batch, examples = bert_batch()
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(batch)
    expected, _ = reference_grads(model, layers, examples, classification_loss)
    assert_grads_match(got, expected, layers, n=5)
    # several adapters active in the same module are ambiguous
    lq.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several active adapters"):
        find_gradient_layers(model)


def test_module_called_twice_accumulates_2d_inputs():
    torch.manual_seed(0)
    model = get_peft_model(TwiceNet().double(), LoraConfig(r=2, lora_alpha=3, target_modules=["proj"],
                                                           modules_to_save=["fc"]))
    randomize_lora_B(model)
    layers = find_gradient_layers(model, include_heads=True)
    assert [(layer.kind, layer.rank, layer.dim) for layer in layers] == [("lora_A", 2, 6), ("lora_B", 2, 6),
                                                                         ("head", 3, 7)]
    x = torch.randn(6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with PerSampleGradients(model, layers, dtype=torch.float32) as psg:
        got = psg.compute({"x": x, "y": y}, twice_loss)
    assert all(g.dtype == torch.float32 for g in got.values())
    expected, _ = reference_grads(model, layers, [{"x": x[i:i + 1], "y": y[i:i + 1]} for i in range(6)], twice_loss)
    for layer in layers:
        torch.testing.assert_close(got[layer.name], expected[layer.name].float(), rtol=1e-5, atol=1e-6)


def test_hooks_removed_state_restored_no_grad_side_effects():
    model = tiny_bert()
    layers = find_gradient_layers(model, include_heads=True)
    batch, examples = bert_batch()
    model.train()
    model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_dropout["default"].eval()  # mixed modes
    modes = {name: m.training for name, m in model.named_modules()}
    sentinel = torch.full_like(layers[0].module.weight, 3.0)
    layers[0].module.weight.grad = sentinel.clone()
    # frozen adapters (inference-mode loading) must still get gradients, then stay frozen
    layers[2].module.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}

    with PerSampleGradients(model, layers) as psg:
        assert all(len(layer.module._forward_hooks) == 1 for layer in layers)
        model(**model_inputs(batch))  # ordinary use inside the context records nothing
        assert all(cap.calls == 0 for cap in psg._captures)
        got = psg.compute(batch)
        with pytest.raises(RuntimeError):
            psg.compute(batch, lambda m, b: (_ for _ in ()).throw(RuntimeError("boom")))
        refs = []

        def tracked_loss(m, b):
            losses = classification_loss(m, b)
            refs.append(weakref.ref(losses))
            return losses

        with torch.no_grad():  # compute needs no grad mode from the caller
            got2 = psg.compute(batch, tracked_loss)  # still works after a failed call
        gc.collect()
        assert refs[0]() is None  # the autograd graph (and the inputs its hooks hold) is gone
    assert all(len(layer.module._forward_hooks) == 0 for layer in layers)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    torch.testing.assert_close(layers[0].module.weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if p is not layers[0].module.weight)
    for name in got:
        torch.testing.assert_close(got[name], got2[name])
    expected, _ = reference_grads(model, layers, examples, classification_loss)
    torch.testing.assert_close(got[layers[2].name], expected[layers[2].name], rtol=RTOL, atol=ATOL)

    # hooks also go away when the block raises
    with pytest.raises(KeyError):
        with PerSampleGradients(model, layers) as psg:
            raise KeyError("x")
    assert all(len(layer.module._forward_hooks) == 0 for layer in layers)
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        psg.compute(batch)


def test_bad_loss_shape_and_foreign_layers():
    model = tiny_bert()
    layers = find_gradient_layers(model)
    batch, _ = bert_batch()
    with PerSampleGradients(model, layers) as psg:
        with pytest.raises(ValueError, match=r"shape \[n\]"):
            psg.compute(batch, lambda m, b: classification_loss(m, b).sum())
    other = tiny_bert(seed=1)
    with pytest.raises(ValueError, match="not part of the model"):
        PerSampleGradients(other, layers)
    with pytest.raises(ValueError, match="duplicate"):
        PerSampleGradients(model, layers + layers[:1])


def test_out_buffers_receive_the_gradients():
    """compute(out=...) writes into caller buffers (slices of one stacked tensor, also for a module
    called twice and for a head with bias) with the same values as without them; bad buffers raise."""
    torch.manual_seed(0)
    model = get_peft_model(TwiceNet().double(), LoraConfig(r=2, lora_alpha=3, target_modules=["proj"],
                                                           modules_to_save=["fc"]))
    randomize_lora_B(model)
    layers = find_gradient_layers(model, include_heads=True)
    batch = {"x": torch.randn(5, 6, dtype=torch.float64), "y": torch.tensor([0, 1, 2, 0, 1])}
    with PerSampleGradients(model, layers) as psg:
        plain = {k: v.clone() for k, v in psg.compute(batch, twice_loss).items()}
        lora = [l for l in layers if l.kind != "head"]
        stacked = torch.full((len(lora), 5, 2, 6), float("nan"), dtype=torch.float64)
        head = torch.full((5, 3, 7), float("nan"), dtype=torch.float64)[:, :, :]
        out = {l.name: stacked[i] for i, l in enumerate(lora)}
        out[layers[-1].name] = head
        got = psg.compute(batch, twice_loss, out=out)
        for layer in layers:
            assert got[layer.name] is out[layer.name]
            torch.testing.assert_close(got[layer.name], plain[layer.name], rtol=1e-12, atol=0)
        with pytest.raises(ValueError, match="expected shape"):
            psg.compute(batch, twice_loss, out={lora[0].name: torch.zeros(5, 3, 6, dtype=torch.float64)})
        with pytest.raises(ValueError, match="expected dtype"):
            psg.compute(batch, twice_loss, out={lora[0].name: torch.zeros(5, 2, 6)})
        with pytest.raises(ValueError, match="no captured layer"):
            psg.compute(batch, twice_loss, out={"nope": torch.zeros(5, 2, 6, dtype=torch.float64)})
