"""Layers that see the batch's tokens flattened to [n·T, d] rows (capture/rows.py).

* Rows in batch-major order inside a mixture-of-experts block (Qwen2-MoE's shared expert: the block's
  ``h.view(-1, d)``): per-example gradients at several examples per batch equal the batch-size-1 brute
  force.  Outside an MoE block a 2-D input of n·T rows is not taken as tokens (it could be time-major).
* A routed expert (``experts.<i>.``) sees the tokens routed to it in the router's order: even when it gets
  all n·T of them its rows are not batch-major, so several examples per batch are refused naming the
  cause; one example per batch is exact.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_models import VOCAB, brute_gradients, make_data, rank_first  # noqa: E402

from hyperinf_ext.capture import PerSampleGradients, find_gradient_layers  # noqa: E402
from hyperinf_ext.capture.rows import ROUTED_EXPERT  # noqa: E402


def _randomise_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def _close(got, ref, rel):
    scale = ref.abs().max()
    return bool(scale > 0) and bool((got - ref).abs().max() <= rel * scale)


def test_qwen2_moe_shared_expert_is_exact_at_several_examples_per_batch():
    """The shared expert gets [n·T, d] (the MoE block's view(-1, d)); float32 throughout: transformers' grouped
    expert matmul has no float64.  Tolerance: sums of at most 9 tokens of O(1) float32 products, 1e-4 of the
    largest entry (about 800 ulps)."""
    cfg = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = _randomise_lora_b(peft.get_peft_model(transformers.Qwen2MoeForCausalLM(cfg), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])))
    # from peft 0.22 these names also put LoRA on the fused routed experts (target_parameters), which no hook
    # can attribute: refused unless layers= chooses the others, then named in a warning (test_unsupported_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layers = find_gradient_layers(model, layers=["q_proj", "shared_expert"])
    assert sum("shared_expert" in l.name for l in layers) == 6
    data = make_data(5)  # right-padded, 5–9 tokens each
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(data)
    ref = brute_gradients(model, layers, data)
    for l in layers:
        assert _close(got[l.name], ref[l.name], 1e-4), l.name


class _ToyMoE(nn.Module):
    """Embedding → a shared linear on the flattened tokens + one routed expert that receives every token in
    reversed order (n·T rows, not batch-major) → head.  ``forward`` returns logits [n, T, V]."""

    def __init__(self, d=8, shared="shared_expert"):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.shared_name = shared
        setattr(self, shared, nn.Linear(d, d))
        self.experts = nn.ModuleList([nn.Linear(d, d)])
        self.head = nn.Linear(d, VOCAB)
        self.config = types.SimpleNamespace(use_return_dict=True, model_type="toy")

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.emb(input_ids)
        n, T, d = h.shape
        flat = h.reshape(-1, d)
        order = torch.arange(n * T - 1, -1, -1)
        routed = torch.zeros_like(flat).index_copy(0, order, self.experts[0](flat[order]))
        return types.SimpleNamespace(logits=self.head(torch.tanh(getattr(self, self.shared_name)(flat) + routed)).reshape(n, T, -1))


def _token_loss(model, batch):
    """Mean cross-entropy of every token against its own id ([n], no shift: the toy has no attention)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.transpose(1, 2), batch["input_ids"], reduction="none").mean(1)


def _loop(model, layers, batch):
    params = [p for l in layers for p in l.parameters]
    out = {l.name: [] for l in layers}
    for i in range(batch["input_ids"].shape[0]):
        grads = iter(torch.autograd.grad(_token_loss(model, {"input_ids": batch["input_ids"][i: i + 1]})[0], params))
        for l in layers:
            out[l.name].append(rank_first(l, [next(grads) for _ in l.parameters]))
    return {k: torch.stack(v) for k, v in out.items()}


def test_a_routed_expert_is_refused_at_several_examples_and_exact_at_one():
    torch.manual_seed(1)
    model = _randomise_lora_b(peft.get_peft_model(_ToyMoE().double(), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["shared_expert", "experts.0"])))
    layers = find_gradient_layers(model)
    routed = [l.name for l in layers if ROUTED_EXPERT.search(l.name)]
    assert len(routed) == 2 and len(layers) == 4
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    with PerSampleGradients(model, layers) as psg:
        with pytest.raises(RuntimeError, match=r"experts\.0.*a routed expert sees only those routed to it"):
            psg.compute({"input_ids": ids}, loss_fn=_token_loss)
        one = [psg.compute({"input_ids": ids[i: i + 1]}, loss_fn=_token_loss) for i in range(3)]
        only_shared = PerSampleGradients(model, [l for l in layers if l.name not in routed])
    ref = _loop(model, layers, {"input_ids": ids})
    for l in layers:  # float64: the same sums in another order, 1e-12 of the largest entry
        assert _close(torch.cat([o[l.name] for o in one]), ref[l.name], 1e-12), l.name
    with only_shared as psg:  # without the routed expert, the flattened shared layer works batched
        got = psg.compute({"input_ids": ids}, loss_fn=_token_loss)
    for name, g in got.items():
        assert _close(g, ref[name], 1e-12), name


def test_flattened_rows_outside_an_moe_block_stay_refused():
    """A 2-D input of n·T rows outside an MoE block could be time-major: not taken as tokens, refused as
    before at several examples per batch."""
    torch.manual_seed(1)
    model = _randomise_lora_b(peft.get_peft_model(_ToyMoE(shared="proj").double(), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"])))
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    with PerSampleGradients(model, find_gradient_layers(model)) as psg:
        with pytest.raises(RuntimeError, match=r"proj.*per-sample gradient has shape \(15, 2, 8\), expected \(3, 2, 8\)"):
            psg.compute({"input_ids": ids}, loss_fn=_token_loss)
