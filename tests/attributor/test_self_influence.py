"""Self-influence g_kᵀ·H⁻¹·g_k for every curvature method, on a tiny float64 LoRA Llama, against loops here.

Per-example gradients come from a batch-size-1 autograd loop with the loss written out by hand (mean
next-token cross-entropy over the labelled tokens); each method's curvature is applied by a direct
float64 solve.  Tolerances: 1e-8 relative for the direct methods, 1e-5 for hyperinf (Schulz, float64
tolerance), 1e-6 for LiSSA run to convergence.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from _numerics import ref_solve

N, T, VOCAB = 11, 9, 40


def tiny_lora_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM", lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # PEFT starts B at zero; nonzero B makes every layer's gradient informative
    return model.eval()


def make_data():
    """Right-padded prompts+responses: labels −100 on the prompt (2–4 tokens) and on padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(N, T, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.long)
    labels = torch.full((N, T), -100, dtype=torch.long)
    for i in range(N):
        L, P = int(torch.randint(5, T + 1, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        ids[i, :L] = torch.randint(1, VOCAB, (L,), generator=g)
        mask[i, :L] = 1
        labels[i, P:L] = ids[i, P:L]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(N)}


def batches(data, size):
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, N, size)]


@pytest.fixture(scope="module")
def setup():
    model, data = tiny_lora_llama(), make_data()
    layers = HyperINF(model, method="tracin", progress=False).layers
    grads = {l.name: [] for l in layers}
    for i in range(N):
        L = int(data["attention_mask"][i].sum())
        logits = model(input_ids=data["input_ids"][i : i + 1, :L]).logits[0]
        target = data["labels"][i, 1:L]
        keep = target != -100
        loss = F.cross_entropy(logits[:-1][keep], target[keep])  # float64, mean over response tokens
        for l in layers:
            gw = torch.autograd.grad(loss, l.module.weight, retain_graph=True)[0]
            grads[l.name].append((gw.T if l.kind == "lora_B" else gw).detach())
    return model, data, layers, {k: torch.stack(v) for k, v in grads.items()}


def lam(g):
    return 0.1 * float((g**2).mean())  # the "datainf" damping rule


def solve_right(g, A):
    return ref_solve(A, g.reshape(-1, A.shape[0]).T).T.reshape(g.shape)


def ref_exact(g):
    G = torch.einsum("nri,nrj->ij", g, g) / g.shape[0]
    return solve_right(g, G + lam(g) * torch.eye(G.shape[0], dtype=torch.float64))


def ref_datainf(g):
    gf = g.reshape(g.shape[0], -1)
    acc = torch.zeros_like(gf)
    for i in range(gf.shape[0]):  # Sherman–Morrison per training example
        acc += (gf @ gf[i])[:, None] * gf[i] / (lam(g) + gf[i] @ gf[i])
    return ((gf - acc / gf.shape[0]) / lam(g)).reshape(g.shape)


def ref_kronecker(g):
    n, r, d = g.shape
    G_d, G_r = torch.einsum("nri,nrj->ij", g, g) / n, torch.einsum("nri,nsi->rs", g, g) / n
    t = float(G_d.trace())
    a, b = (lam(g) * d / r) ** 0.5, (lam(g) * r / d) ** 0.5
    K = torch.kron(G_r / t**0.5 + a * torch.eye(r, dtype=torch.float64), G_d / t**0.5 + b * torch.eye(d, dtype=torch.float64))
    return solve_right(g.reshape(n, 1, r * d), K).reshape(g.shape)


REFERENCES = {"exact": (ref_exact, 1e-8), "hyperinf": (ref_exact, 1e-5), "datainf": (ref_datainf, 1e-8),
              "kronecker": (ref_kronecker, 1e-7), "tracin": (lambda g: g, 1e-10)}


def brute_self(grads, precondition):
    return sum((precondition(g) * g).sum(dim=(1, 2)) for g in grads.values())


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_self_scores_equal_brute_force(setup, method):
    model, data, _, grads = setup
    reference, tol = REFERENCES[method]
    ref = brute_self(grads, reference)
    assert bool((ref > 0).all())  # positive-definite curvatures
    attr = HyperINF(model, method=method, damping="datainf", progress=False).fit(batches(data, 4))
    for chunk in (3, 256):  # chunks across and within training batches
        s = attr.self_scores(chunk_size=chunk)
        assert s.shape == (N,) and s.dtype == torch.float64
        assert (s - ref).abs().max() <= tol * ref.abs().max(), (method, chunk)


@pytest.mark.parametrize("method", ["datainf", "hyperinf", "lissa"])
def test_self_scores_from_a_loader_and_minus_diagonal_of_scores(setup, method):
    """Without a cache (a second pass; datainf/lissa spill it to disk) and as −diag(scores(train, train))."""
    model, data, _, _ = setup
    cached = HyperINF(model, method=method, damping="datainf", lissa_depth=6, progress=False).fit(batches(data, 4))
    expected = -torch.diagonal(cached.scores(batches(data, 5)))
    s = cached.self_scores(chunk_size=4)
    assert (s - expected).abs().max() <= 1e-10 * expected.abs().max()
    uncached = HyperINF(model, method=method, damping="datainf", lissa_depth=6, cache="none", progress=False)
    uncached.fit(batches(data, 4))
    s2 = uncached.self_scores(batches(data, 4), chunk_size=5)
    assert (s2 - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_lissa_self_scores_converge_to_flattened_fisher(setup):
    model, data, layers, grads = setup
    attr = HyperINF(model, method="lissa", lissa_depth=400, damping="spectral", damping_scale=10.0, progress=False)
    attr.fit(batches(data, N))

    def solve(name):
        g = grads[name]
        gf = g.reshape(N, -1)
        Fm = gf.T @ gf / N + attr.factors[name].damping * torch.eye(gf.shape[1], dtype=torch.float64)
        return (ref_solve(Fm, gf.T).T * gf).sum(1)

    ref = sum(solve(l.name) for l in layers)
    s = attr.self_scores()
    assert (s - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_self_scores_errors(setup):
    model, data, _, _ = setup
    with pytest.raises(RuntimeError, match="call fit"):
        HyperINF(model, progress=False).self_scores()
    attr = HyperINF(model, method="exact", cache="none", progress=False).fit(batches(data, 4))
    with pytest.raises(ValueError, match="train_loader: required"):
        attr.self_scores()
    with pytest.raises(ValueError, match=r"no gradient for training examples \[8, 9, 10\]"):
        attr.self_scores(batches(data, 4)[:2])
