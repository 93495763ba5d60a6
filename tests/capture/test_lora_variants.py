"""The LoRA setups people tune, on tiny random Llamas, against a batch-size-1 float64 brute force.

DoRA (lora_A, lora_B and the magnitude vector, with and without base biases), rsLoRA, LoRA on the
embedding (padding_idx included) and on the LM head: per-example gradients to 1e-10 and
``HyperINF(method="exact").scores`` to 1e-8 of the brute force (lora_models.py).

Half-precision bases (bfloat16, float16) with float32 LoRA (PEFT's autocast_adapter_dtype): the
gradient is the float32 LoRA gradient of the half-precision forward and backward. Checked three ways,
u the unit roundoff of the base dtype (2⁻⁸ bfloat16, 2⁻¹¹ float16):
(1) against autograd of the same batched forward, one example's loss at a time — the same arithmetic,
    so to float32 roundoff (1e-5 of the largest entry);
(2) against the batch-size-1 brute force on the same half-precision model: its forward may round
    differently (other shapes, no padding), each half-precision op by at most u relative, a handful of
    them on every path of this 2-layer model: to 8·u of the largest entry (measured: bitwise equal on
    CPU, whose kernels round each row the same way whatever the batch);
(3) against the float64 brute force of the same weights (the model cast to float64): what the
    half-precision arithmetic costs, to 16·u of the largest entry (measured ≤ 6.3·u).
"""
from __future__ import annotations

import copy
import types

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_models import rms_norm_exact, batches, brute_gradients, exact_scores, lora_llama, make_data  # noqa: E402

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.capture import PerSampleGradients, causal_lm_loss, find_gradient_layers  # noqa: E402

VARIANTS = {
    "dora": dict(use_dora=True),
    "dora_bias": dict(use_dora=True, bias=True, target_modules=["q_proj", "v_proj", "o_proj"]),
    "rslora": dict(use_rslora=True, r=4, lora_alpha=4),
    "embedding_lm_head": dict(target_modules=["embed_tokens", "lm_head", "q_proj"]),
}
KINDS = {
    "dora": {"lora_A", "lora_B", "magnitude"},
    "dora_bias": {"lora_A", "lora_B", "magnitude"},
    "rslora": {"lora_A", "lora_B"},
    "embedding_lm_head": {"embedding_A", "embedding_B", "lora_A", "lora_B"},
}


def captured(model, layers, data, size, **kw):
    got = {l.name: [] for l in layers}
    with PerSampleGradients(model, layers, **kw) as psg:
        for batch in batches(data, size):
            for name, g in psg.compute(batch).items():
                got[name].append(g)
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param, lora_llama(**VARIANTS[request.param])


def test_per_example_gradients_equal_brute_force(variant):
    name, model = variant
    layers = find_gradient_layers(model)
    assert {l.kind for l in layers} == KINDS[name]
    if name == "rslora":
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        assert q.scaling["default"] == pytest.approx(4 / 4 ** 0.5)
    if name == "embedding_lm_head":
        assert any(l.name.endswith("lm_head.lora_A") for l in layers)
        assert model.base_model.model.model.embed_tokens.get_base_layer().padding_idx == 0
    data = make_data()
    if name == "embedding_lm_head":
        assert bool((data["input_ids"][data["attention_mask"] == 1] == 0).any())  # padding_idx inside examples
    ref = brute_gradients(model, layers, data)
    got = captured(model, layers, data, size=3)
    for l in layers:
        r = ref[l.name]
        assert r.abs().max() > 0, l.name
        assert got[l.name].shape == (data["input_ids"].shape[0], l.rank, l.dim)
        assert (got[l.name] - r).abs().max() <= 1e-10 * r.abs().max(), (name, l.name)


def test_exact_scores_equal_brute_force(variant):
    name, model = variant
    train, query = make_data(7, seed=2), make_data(3, seed=3)
    attr = HyperINF(model, method="exact", damping="datainf", progress=False).fit(batches(train, 4))
    layers = attr.layers
    ref = exact_scores(brute_gradients(model, layers, train), brute_gradients(model, layers, query))
    s = attr.scores(batches(query, 2))
    assert s.shape == ref.shape and s.dtype == torch.float64
    assert (s - ref).abs().max() <= 1e-8 * ref.abs().max(), name


def test_dora_magnitude_of_every_layer_and_lora_gradients_unchanged_by_it():
    """DoRA's lora_A/lora_B gradients come through the same hooks; excluding the magnitude leaves them as they were."""
    model = lora_llama(use_dora=True)
    layers = find_gradient_layers(model)
    mags = [l for l in layers if l.kind == "magnitude"]
    assert len(mags) == 4 and all((l.rank, l.dim) == (1, 16) for l in mags)  # q_proj and v_proj: d_out 16
    only_ab = find_gradient_layers(model, layers=["lora_A", "lora_B"])
    data = make_data(4)
    full, ab = captured(model, layers, data, 4), captured(model, only_ab, data, 4)
    for l in only_ab:
        assert torch.equal(full[l.name], ab[l.name])


UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# a half-precision LoRA gradient against the float64 one, in units of the base dtype's roundoff: the rounding of
# a two-layer stack's forward and backward (a few u per layer and pass) carried back to layer 0
HALF_SLACK = 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_float32_lora(dtype):
    model = lora_llama(dtype, target_modules=["q_proj", "v_proj", "lm_head"])
    layers = find_gradient_layers(model)
    assert all(l.module.weight.dtype == torch.float32 for l in layers)  # PEFT's autocast_adapter_dtype
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype
    data = make_data()
    batch = {k: v for k, v in data.items()}
    with PerSampleGradients(model, layers) as psg:
        got = psg.compute(batch)
    assert all(g.dtype == torch.float32 for g in got.values())
    # (1) autograd of the same batched forward, one example's loss at a time
    params = [p for l in layers for p in l.parameters]
    losses = causal_lm_loss(model, batch)
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], params, retain_graph=True)
        for l, g in zip(layers, gs):
            r = g.T if l.transposed else g
            assert (got[l.name][i] - r).abs().max() <= 1e-5 * r.abs().max(), (dtype, l.name, i)
    # (2) the batch-size-1 brute force on the same half-precision model.  Both paths round on their own (other
    # kernels and blockings for one row than for a padded batch, and MKL's differ between CPUs); each is within
    # HALF_SLACK of the float64 gradient (3), so they differ by at most twice that (observed up to 9 u on an
    # AMD EPYC under float16, which an 8 u bound failed).
    u = UNIT_ROUNDOFF[dtype]
    ref = brute_gradients(model, layers, data)
    for l in layers:
        r = ref[l.name]
        err = float((got[l.name].double() - r).abs().max() / r.abs().max())
        assert err <= 2 * HALF_SLACK * u, (dtype, l.name, err / u)
    # (3) the float64 brute force of the same weights
    exact = copy.deepcopy(model).double()
    for m in exact.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(rms_norm_exact, m)
    ref64 = brute_gradients(exact, find_gradient_layers(exact), data)
    for l in layers:
        r = ref64[l.name]
        err = float((got[l.name].double() - r).abs().max() / r.abs().max())
        assert err <= HALF_SLACK * u, (dtype, l.name, err / u)


def test_half_precision_exact_scores():
    """Scores of a bfloat16 base: equal to the float64 solve over the same (batched) gradients."""
    model = lora_llama(torch.bfloat16)
    train, query = make_data(7, seed=2), make_data(3, seed=3)
    attr = HyperINF(model, method="exact", damping="datainf", progress=False).fit(batches(train, 7))
    layers = attr.layers
    gt, gq = captured(model, layers, train, 7), captured(model, layers, query, 3)
    ref = exact_scores(gt, gq)
    s = attr.scores(batches(query, 3))
    assert (s - ref).abs().max() <= 1e-5 * ref.abs().max()
