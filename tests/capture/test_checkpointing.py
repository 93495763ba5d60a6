"""Gradient checkpointing: the hooks see each per-example input and output gradient once.

* transformers' ``gradient_checkpointing_enable`` (use_reentrant False and True) on a model left in
  training mode: ``compute`` runs in eval mode, where transformers does not checkpoint, so nothing is
  recomputed (one forward call per LoRA matrix, counted) and the gradients equal the float64 brute force.
* A model that checkpoints on its own in any mode (``torch.utils.checkpoint``, non-reentrant) recomputes
  its block during backward, calling the forward hooks a second time: nothing is double counted.
  Reentrant checkpointing in eval mode runs the block without grad, out of torch.autograd.grad's reach
  (the LoRA gradients would be zeros): a clear error.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_models import brute_gradients, lora_llama, make_data  # noqa: E402

from hyperinf_ext.capture import PerSampleGradients, causal_lm_loss, find_gradient_layers  # noqa: E402


def count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda m, a, o: calls.append(1))


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing(reentrant):
    model = lora_llama()
    layers = find_gradient_layers(model)
    data = make_data(5)
    ref = brute_gradients(model, layers, data)  # eval mode, no checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    calls, handle = count_calls(layers[0].module)
    # checkpointing is really on in training: a training step runs lora_A's forward twice
    causal_lm_loss(model, data).sum().backward()
    assert len(calls) == 2
    model.zero_grad(set_to_none=True)
    calls.clear()
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(data)
    handle.remove()
    assert len(calls) == 1 and model.training
    for l in layers:
        assert (got[l.name] - ref[l.name]).abs().max() <= 1e-10 * ref[l.name].abs().max(), l.name


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class SelfCheckpointing(nn.Module):
    """Runs its block twice per forward, each through torch.utils.checkpoint (in every mode)."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(6, 3)
        self.mode: bool | None = False  # use_reentrant, or None: no checkpointing

    def forward(self, x):
        for _ in range(2):
            x = self.block(x) if self.mode is None else checkpoint(self.block, x, use_reentrant=self.mode)
        return self.fc(x)


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def self_checkpointing():
    torch.manual_seed(0)
    model = peft.get_peft_model(SelfCheckpointing().double(),
                                peft.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], modules_to_save=["fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    x = torch.randn(5, 6, dtype=torch.float64)
    return model, {"x": x, "y": torch.tensor([0, 1, 2, 0, 1])}


def test_recomputed_block_is_not_double_counted():
    model, batch = self_checkpointing()
    layers = find_gradient_layers(model, include_heads=True)
    inner = model.base_model.model
    inner.mode = None
    with PerSampleGradients(model, layers) as psg:
        ref = psg.compute(batch, loss_fn)
    inner.mode = False
    calls, handle = count_calls(layers[0].module)
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(batch, loss_fn)
    handle.remove()
    assert len(calls) == 4  # two uses, each recomputed during backward
    for l in layers:
        assert ref[l.name].abs().max() > 0
        assert (got[l.name] - ref[l.name]).abs().max() <= 1e-12 * ref[l.name].abs().max(), l.name


def test_reentrant_checkpoint_in_eval_mode_is_a_clear_error():
    """Reentrant checkpointing runs the block without grad; torch.autograd.grad w.r.t. the LoRA parameters
    never reaches it (its node leads only to the block's input), which would leave zeros: refused."""
    model, batch = self_checkpointing()
    model.base_model.model.mode = True
    batch["x"].requires_grad_(True)  # as transformers' enable_input_require_grads does
    layers = find_gradient_layers(model, include_heads=True)
    with PerSampleGradients(model, layers) as psg:
        with pytest.raises(RuntimeError, match=r"block\.proj\.lora_A .*without gradient.*use_reentrant=False"):
            psg.compute(batch, loss_fn)
        model.base_model.model.mode = False  # the same context works once the model stops
        assert psg.compute({"x": batch["x"].detach(), "y": batch["y"]}, loss_fn)[layers[0].name].abs().max() > 0
