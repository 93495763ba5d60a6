"""What the hooks cannot attribute is refused or named with its share, never silently left out.

* An active LoRA layer the hooks cannot capture exactly — fused MoE experts (PEFT ``target_parameters``
  on Mixtral's experts: ``ParamWrapper``), ``nn.MultiheadAttention``, convolutions, an unknown LoRA
  layer class (a quantised look-alike named ``Linear4bit``) — is a ``ValueError`` naming the module, why,
  its parameter count and share; with ``layers=`` chosen it is a warning instead.
* Other trainable parameters (a transformers ``Conv1D`` kept by ``modules_to_save``, PEFT's trainable
  tokens, base biases made trainable by ``bias="all"``) give a warning with their share.
* LoRA on GPT-2's ``Conv1D`` (``fan_in_fan_out``) is supported: its lora_A/lora_B are ``nn.Linear``;
  per-example gradients equal the batch-size-1 brute force.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_models import VOCAB, brute_gradients, make_data, tiny_llama  # noqa: E402

from hyperinf_ext.capture import PerSampleGradients, find_gradient_layers  # noqa: E402


def tiny_gpt2(**lora):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = transformers.GPT2LMHeadModel(cfg).double()
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **lora))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    return model.eval()


def tiny_mixtral_experts():
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return peft.get_peft_model(transformers.MixtralForCausalLM(cfg),
                               peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"]))


def record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                 and "influence" in str(w.message)]


def share_in(text, path):
    line = next(l for l in text.splitlines() if path in l)
    n, pct, total = re.search(r"\(([\d,]+) parameters = ([\d.]+)% of the ([\d,]+)", line).groups()
    return int(n.replace(",", "")), float(pct), int(total.replace(",", ""))


def test_gpt2_conv1d_lora_is_exact():
    model = tiny_gpt2(target_modules=["c_attn"], fan_in_fan_out=True)
    layers, msgs = record(lambda: find_gradient_layers(model))
    assert not msgs and len(layers) == 4
    assert type(model.base_model.model.transformer.h[0].attn.c_attn.base_layer).__name__ == "Conv1D"
    data = make_data(5)
    ref = brute_gradients(model, layers, data)
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(data)
    for l in layers:
        assert ref[l.name].abs().max() > 0
        assert (got[l.name] - ref[l.name]).abs().max() <= 1e-10 * ref[l.name].abs().max()


def test_fused_moe_experts_refused_with_share_or_named_when_layers_chosen():
    model = tiny_mixtral_experts()
    with pytest.raises(ValueError, match="target_parameters") as info:
        find_gradient_layers(model)
    text = str(info.value)
    path = "base_model.model.model.layers.0.mlp.experts"
    experts = model.base_model.model.model.layers[0].mlp.experts
    n_experts = sum(p.numel() for n, p in experts.named_parameters() if "lora_" in n)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    n_q = q.lora_A["default"].weight.numel() + q.lora_B["default"].weight.numel()
    n, pct, total = share_in(text, path)
    assert (n, total) == (n_experts, n_experts + n_q) and pct == pytest.approx(100 * n / total, abs=0.05)
    assert "ParamWrapper" in text and "layers=" in text
    layers, msgs = record(lambda: find_gradient_layers(model, layers=["q_proj"]))
    assert [l.kind for l in layers] == ["lora_A", "lora_B"]
    assert len(msgs) == 1 and path in msgs[0] and share_in(msgs[0], path) == (n, pct, total)


def test_multihead_attention_and_conv_lora_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.conv = nn.Conv1d(8, 8, 1)
            self.lin = nn.Linear(8, 8)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["mha", "conv", "lin"]))
    with pytest.raises(ValueError) as info:
        find_gradient_layers(model)
    text = str(info.value)
    assert "2 LoRA layer(s)" in text and "MultiheadAttention" in text and "convolution" in text
    assert re.search(r"\bmha\b", text) and re.search(r"\bconv\b", text)


def test_unknown_lora_layer_class_refused():
    """A LoRA layer class whose forward the hooks do not know (here a quantised look-alike, by its name)."""
    from peft.tuners.lora.layer import Linear

    class Linear4bit(Linear):  # e.g. a third-party quantised linear that computes its LoRA path itself
        def forward(self, x, *args, **kwargs):
            return self.base_layer(x) + x @ (self.lora_B["default"].weight @ self.lora_A["default"].weight).T

    model = peft.get_peft_model(tiny_llama(torch.float32), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.model.layers[1].self_attn.v_proj.__class__ = Linear4bit
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj: Linear4bit: .*not verified"):
        find_gradient_layers(model)


def test_other_trainable_parameters_named_in_a_warning():
    # a transformers Conv1D kept by modules_to_save (attributed only when it is nn.Linear)
    model = tiny_gpt2(target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["h.1.mlp.c_proj"])
    layers, msgs = record(lambda: find_gradient_layers(model, include_heads=True))
    assert len(layers) == 4 and len(msgs) == 1 and "Conv1D" in msgs[0] and "h.1.mlp.c_proj" in msgs[0]
    n, _, total = share_in(msgs[0], "c_proj")
    assert n == 16 * 64 + 16 and total == n + sum(p.numel() for l in layers for p in l.parameters)
    _, msgs = record(lambda: find_gradient_layers(model, include_heads=False))  # heads left out on purpose
    assert not msgs
    # PEFT's trainable tokens and base biases made trainable by bias="all"
    model = peft.get_peft_model(tiny_llama(torch.float32, bias=True),
                                peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2],
                                                bias="all"))
    _, msgs = record(lambda: find_gradient_layers(model))
    assert len(msgs) == 1 and "trainable_tokens_delta" in msgs[0] and "k_proj" in msgs[0]
