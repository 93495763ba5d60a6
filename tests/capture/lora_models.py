"""Tiny random LoRA Llamas and a batch-size-1 autograd brute force, shared by the LoRA-variant tests.

The brute force runs each example alone (its unpadded tokens), writes the loss out by hand (mean
next-token cross-entropy over the labelled tokens, from float64 logits), differentiates it with
``torch.autograd.grad`` w.r.t. each captured parameter and lays the gradient out rank-first the way the
library documents it per kind. ``exact_scores`` solves each layer's GFIM + damping with
``torch.linalg.solve``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import peft
import transformers

VOCAB, N, T = 40, 7, 9


def rms_norm_exact(self, h):
    # transformers' LlamaRMSNorm computes in float32 and casts back, rounding every backpropagated
    # signal to float32: in a float64 model it would separate the batched pass from the loop by ~1e-7
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def tiny_llama(dtype=torch.float64, *, bias=False, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   attention_bias=bias, pad_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = transformers.LlamaForCausalLM(cfg)
    base = base.to(dtype)
    if dtype == torch.float64:
        for m in base.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(rms_norm_exact, m)
    return base


def lora_llama(dtype=torch.float64, *, bias=False, **lora):
    """A LoRA Llama with every LoRA parameter random (PEFT zero-initialises one factor of each pair)."""
    config = dict(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    config.update(lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = peft.get_peft_model(tiny_llama(dtype, bias=bias), peft.LoraConfig(**config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
                elif "lora_" in name:
                    p.normal_(0, 0.3)
    return model.eval()


def make_data(n=N, seed=2):
    """Right-padded token batches (pad id 0 = the embedding's padding_idx; real tokens may be 0 too),
    labels −100 on a 1–3 token prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    for i in range(n):
        L, P = int(torch.randint(5, T + 1, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        ids[i, :L] = torch.randint(0, VOCAB, (L,), generator=g)
        mask[i, :L] = 1
        labels[i, P:L] = ids[i, P:L]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(n)}


def batches(data, size):
    n = data["input_ids"].shape[0]
    return [{k: v[i: i + size] for k, v in data.items()} for i in range(0, n, size)]


def rank_first(layer, grads):
    """The full gradient(s) of ``layer.parameters`` laid out [rank, dim] as documented per kind."""
    gw = grads[0]
    if layer.kind == "magnitude":
        return gw[None, :]
    if layer.transposed:
        gw = gw.T
    if len(grads) > 1:  # bias: an extra row (lora_B) or column (head)
        gw = torch.cat([gw, grads[1][None, :]], 0) if layer.transposed else torch.cat([gw, grads[1][:, None]], 1)
    return gw


def example_loss(model, ids, labels):
    """Mean next-token cross-entropy over the labelled tokens of one unpadded example, by hand."""
    logits = model(input_ids=ids[None]).logits[0].double()
    target = labels[1:]
    keep = target != -100
    return F.cross_entropy(logits[:-1][keep], target[keep])


def brute_gradients(model, layers, data):
    """{layer name: [n, rank, dim]} from a batch-size-1 autograd loop over unpadded examples."""
    flags = {id(p): p.requires_grad for l in layers for p in l.parameters}
    for l in layers:
        for p in l.parameters:
            p.requires_grad_(True)
    out = {l.name: [] for l in layers}
    for i in range(data["input_ids"].shape[0]):
        L = int(data["attention_mask"][i].sum())
        loss = example_loss(model, data["input_ids"][i, :L], data["labels"][i, :L])
        params = [p for l in layers for p in l.parameters]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = iter([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        for l in layers:
            out[l.name].append(rank_first(l, [next(grads) for _ in l.parameters]).detach())
    for l in layers:
        for p in l.parameters:
            p.requires_grad_(flags[id(p)])
    return {k: torch.stack(v) for k, v in out.items()}


def exact_scores(gt, gq, damping_rule=lambda g: 0.1 * float((g ** 2).mean())):
    """−Σ_l q·(G_l + λ_l I)⁻¹·t with G_l the mean GFIM of the training gradients (the "datainf" damping)."""
    some = next(iter(gt.values()))
    ref = torch.zeros(next(iter(gq.values())).shape[0], some.shape[0], dtype=torch.float64)
    for name, g in gt.items():
        g, q = g.double(), gq[name].double()
        G = torch.einsum("nri,nrj->ij", g, g) / g.shape[0]
        G = G + damping_rule(g) * torch.eye(G.shape[0], dtype=torch.float64)
        pre = torch.linalg.solve(G, q.reshape(-1, G.shape[0]).T).T.reshape(q.shape)
        ref -= torch.einsum("qrd,nrd->qn", pre, g)
    return ref
