"""Per-token attribution (attr.token_scores) on the tiny Llama of tiny_llm.py in float64.

Tolerances:
- shares vs ``attr.scores``: 1e-6 relative (the issue's bound).  Both are float64 sums of the same
  terms in other orders — per-token gradients (one forward per kept token) summed afterwards against the
  batch gradient of the fit cache — so only float64 rounding (~1e-15 per operation, amplified by the
  cancellation between shares of opposite signs) separates them: 1e-6 is a wide margin.
- vs the brute force below (autograd of (1/T)·ℓ_t from log-softmax by hand, a dense float64 solve):
  1e-8 relative to the pair's largest |share| or |score|; method "exact" (Cholesky) so the attributor's
  inverse is exact to rounding too (the Schulz inverse of "hyperinf" is exact only to its tolerance).
- padded vs unpadded batches: 1e-8 (the same rows, other shapes: BLAS reduction orders differ).
"""
from __future__ import annotations


import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.capture import default_loss_fn  # noqa: E402
from _numerics import float64_rms_norms  # noqa: E402
from tiny_llm import make_tokenizer  # noqa: E402


_H = HyperINF  # token_scores is HyperINF's (the TokenScoring mixin)


PROMPTS = ["is the sentiment of this review positive or negative review a great film",
           "what colour is the sky", "review a dull boring plot", "answer with one word what colour is grass",
           "is this movie review positive", "review superb acting", "what is the plot", "review a lovely film",
           "what colour is the sky answer with one word", "is the acting bad"]
RESPONSES = ["positive", "blue sky", "negative boring dull plot", "green", "positive great fun", "positive superb",
             "a boring plot", "lovely", "blue", "negative bad acting awful"]
QUERIES = [("review a fun film", "positive great film"), ("what colour is grass", "green grass"),
           ("review awful acting", "negative")]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def tiny_llama_lora(tok, seed: int = 0):
    """The tiny 2-layer Llama of tiny_llm.py in float64 with LoRA (r=2) on q/v, lora_B drawn nonzero.

    Float64 end to end: SDPA attention (eager attention takes its softmax in float32) and RMSNorm in the
    input dtype (below).  Otherwise the float32 rounding of the backward pass (~1e-7 of each per-token
    term, and the terms of one example cancel) would separate the shares' sum from the score by more
    than the float64 tolerances measure."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = LlamaForCausalLM(cfg).double()
        model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    float64_rms_norms(model)
    return model.eval()


def encode(tok, pairs):
    """Prompt/response pairs → {input_ids, attention_mask, labels} lists (labels −100 on the prompt)."""
    from hyperinf_ext.app.data.instruction import InstructionDataset, encode_instructions

    ds = InstructionDataset.from_pairs([[{"role": "user", "content": p}] for p, _ in pairs], [r for _, r in pairs])
    return encode_instructions(ds, tok, 64).encodings


def batches(encs, size, side="right", pad_id=0, index=None):
    """Padded batches of ``size`` examples ('left' or 'right' padding) with their ``index``."""
    index = list(range(len(encs))) if index is None else index
    out = []
    for s in range(0, len(encs), size):
        part, idx = encs[s:s + size], index[s:s + size]
        width = max(len(e["input_ids"]) for e in part)
        b = {k: torch.full((len(part), width), v, dtype=torch.long)
             for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100))}
        for r, e in enumerate(part):
            sl = slice(width - len(e["input_ids"]), width) if side == "left" else slice(0, len(e["input_ids"]))
            for k in b:
                b[k][r, sl] = torch.tensor(e[k])
        if side == "left":  # positions counted from each example's first token, as generate() does
            b["position_ids"] = (b["attention_mask"].cumsum(1) - 1).clamp(min=0)
        b["index"] = torch.tensor(idx, dtype=torch.long)
        out.append(b)
    return out


@pytest.fixture(scope="module")
def data(tok):
    train = encode(tok, list(zip(PROMPTS, RESPONSES)))
    query = encode(tok, QUERIES)
    return train, query


@pytest.fixture(scope="module")
def fitted(tok, data):
    """{method: attributor} fitted on right-padded batches of 3 (uneven lengths in every batch)."""
    train, _ = data
    model = tiny_llama_lora(tok)
    return model, {m: _H(model, method=m, progress=False).fit(batches(train, 3, pad_id=tok.pad_token_id))
                   for m in ("hyperinf", "exact", "datainf")}


@pytest.mark.parametrize("method", ["hyperinf", "exact", "datainf"])
def test_shares_sum_to_the_scores(tok, data, fitted, method):
    train, query = data
    attr = fitted[1][method]
    qb = batches(query, 2, pad_id=tok.pad_token_id)
    S = attr.scores(qb)
    res = attr.token_scores(qb, batches(train, 4, pad_id=tok.pad_token_id), side="both", batch_size=5)
    assert [(a.query_index, a.train_index) for a in res] == [(q, k) for q in range(3) for k in range(10)]
    for a in res:
        s = float(S[a.query_index, a.train_index])
        assert abs(a.score - s) <= 1e-6 * abs(s)
        for part in (a.train, a.query):
            assert part.shares.dtype == torch.float64 and part.shares.shape == part.positions.shape
            assert abs(float(part.shares.sum()) - s) <= 1e-6 * abs(s), (a.query_index, a.train_index)
            # the labelled tokens are the response's: their ids sit at their positions in input_ids
            assert torch.equal(part.input_ids[part.positions], part.token_ids)
        assert a.train.positions.numel() > 1 or a.train.index in (3, 7, 8)  # multi-token responses mostly


@pytest.mark.parametrize("method", ["hyperinf", "exact"])
def test_mixed_shares_sum_to_the_mixed_scores(tok, data, fitted, method):
    """With ``mix_queries`` the shares split ``scores(..., mix_queries=w)``, even when only some queries are
    kept: the curvature mixes the GFIM of the whole set ``mix_with`` (1e-6 relative, as above)."""
    train, query = data
    attr = fitted[1][method]
    qb = batches(query, 2, pad_id=tok.pad_token_id)
    S = attr.scores(qb, mix_queries=99.0)
    assert not torch.allclose(S, attr.scores(qb), rtol=1e-3)
    pairs = [(2, 4), (0, 1), (2, 9)]  # queries 0 and 2 of 3 kept
    res = attr.token_scores(qb, batches(train, 4, pad_id=tok.pad_token_id), pairs=pairs, side="both",
                            batch_size=5, mix_queries=99.0, mix_with=qb)
    assert [(a.query_index, a.train_index) for a in res] == pairs
    for a in res:
        s = float(S[a.query_index, a.train_index])
        assert abs(a.score - s) <= 1e-6 * abs(s)
        for part in (a.train, a.query):
            assert abs(float(part.shares.sum()) - s) <= 1e-6 * abs(s), (a.query_index, a.train_index)
    for kw in ({"mix_queries": 99.0}, {"mix_with": qb}):
        with pytest.raises(ValueError, match="mix_with"):
            attr.token_scores(qb, batches(train, 4, pad_id=tok.pad_token_id), pairs=pairs, **kw)


def brute_token_grads(model, layers, enc):
    """[(position, {layer: [r, d]} gradient of (1/T)·ℓ_t)] for one unpadded example, ℓ_t by hand from logits."""
    ids = torch.tensor([enc["input_ids"]])
    labels = enc["labels"]
    targets = [p for p in range(1, len(labels)) if labels[p] != -100]
    params = [l.module.weight for l in layers]
    logits = model(input_ids=ids).logits[0]  # [L, V] float64
    out = []
    for p in targets:
        lp = logits[p - 1] - torch.logsumexp(logits[p - 1], dim=0)
        loss = -lp[labels[p]] / len(targets)
        gs = torch.autograd.grad(loss, params, retain_graph=True)
        out.append((p, {l.name: (g.T if l.kind == "lora_B" else g).detach() for l, g in zip(layers, gs)}))
    return out


def test_against_brute_force(tok, data, fitted):
    train, query = data
    model, attrs = fitted
    attr = attrs["exact"]
    A = {n: f.gfim_sum / f.count + f.damping * torch.eye(f.dim, dtype=torch.float64) for n, f in attr.factors.items()}

    def pre(g):  # q·(G + λI)⁻¹ per layer (A symmetric), dense float64 solve
        return {n: torch.linalg.solve(A[n], v.T).T for n, v in g.items()}

    def dot(a, b):
        return -sum(float((a[n] * b[n]).sum()) for n in a)

    def total(tokens):
        return {n: sum(g[n] for _, g in tokens) for n in tokens[0][1]}

    for p in model.parameters():
        p.requires_grad_(False)
    for l in attr.layers:
        l.module.weight.requires_grad_(True)
    qtok = [brute_token_grads(model, attr.layers, e) for e in query]
    ttok = [brute_token_grads(model, attr.layers, e) for e in train]
    pairs = [(0, 2), (1, 1), (2, 9), (0, 4)]
    res = attr.token_scores(batches(query, 3, pad_id=tok.pad_token_id), batches(train, 10, pad_id=tok.pad_token_id),
                            pairs=pairs, batch_size=4)
    assert [(a.query_index, a.train_index) for a in res] == pairs
    for a in res:
        q, k = a.query_index, a.train_index
        qt = pre(total(qtok[q]))
        train_sh = torch.tensor([dot(qt, g) for _, g in ttok[k]], dtype=torch.float64)
        query_sh = torch.tensor([dot(pre(g), total(ttok[k])) for _, g in qtok[q]], dtype=torch.float64)
        score = dot(qt, total(ttok[k]))
        scale = max(abs(score), float(train_sh.abs().max()), float(query_sh.abs().max()))
        assert abs(a.score - score) <= 1e-8 * scale
        assert torch.allclose(a.train.shares, train_sh, rtol=0, atol=1e-8 * scale)
        assert torch.allclose(a.query.shares, query_sh, rtol=0, atol=1e-8 * scale)
        # positions: the brute force's target positions in the unpadded example
        assert a.train.positions.tolist() == [p for p, _ in ttok[k]]
        assert a.query.positions.tolist() == [p for p, _ in qtok[q]]
        assert a.train.input_ids.tolist() == train[k]["input_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_the_shares(tok, data, fitted, side):
    """Examples of different lengths in one batch, left or right padded, against one example per batch.

    Left-padded batches carry ``position_ids`` counted from each example's first token: RoPE is
    invariant to a shift of all positions only in exact arithmetic (transformers computes cos/sin in
    float32), so without them left padding itself would change the scores by ~1e-7."""
    train, query = data
    attr = fitted[1]["hyperinf"]
    pad = tok.pad_token_id
    ref = attr.token_scores(batches(query, 1, pad_id=pad), batches(train, 1, pad_id=pad), batch_size=3)
    got = attr.token_scores(batches(query, 3, side, pad), batches(train, 5, side, pad), batch_size=7)
    assert [(a.query_index, a.train_index) for a in got] == [(a.query_index, a.train_index) for a in ref]
    for a, b in zip(got, ref):
        scale = max(abs(b.score), float(b.train.shares.abs().max()), float(b.query.shares.abs().max()))
        assert abs(a.score - b.score) <= 1e-8 * scale
        for x, y in ((a.train, b.train), (a.query, b.query)):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.positions, y.positions)
            assert torch.equal(x.token_ids, y.token_ids)
            assert torch.allclose(x.shares, y.shares, rtol=0, atol=1e-8 * scale)


def test_sides_and_top_k_pairs(tok, data, fitted):
    train, query = data
    attr = fitted[1]["hyperinf"]
    pad = tok.pad_token_id
    qb, tb = batches(query, 3, pad_id=pad), batches(train, 4, pad_id=pad)
    top = attr.scores(qb, top_k=2)
    res = attr.token_scores(qb, tb, pairs=top, side="train")
    expected = [(q, int(k)) for q in range(3) for ks in (top.positive_index[q], top.negative_index[q]) for k in ks]
    assert [(a.query_index, a.train_index) for a in res] == expected
    values = {(q, int(k)): float(v) for q in range(3) for vs, ks in ((top.positive_values[q], top.positive_index[q]),
              (top.negative_values[q], top.negative_index[q])) for v, k in zip(vs, ks)}
    for a in res:
        assert a.query.shares is None and a.train.shares is not None
        assert float(a.train.shares.sum()) == pytest.approx(values[(a.query_index, a.train_index)], rel=1e-6)
    q_only = attr.token_scores(qb, tb, pairs={1: [5, 0]}, side="query")
    assert [(a.query_index, a.train_index) for a in q_only] == [(1, 5), (1, 0)]
    assert all(a.train.shares is None and a.query.shares is not None for a in q_only)
    one = attr.token_scores(qb[0], tb, pairs=[(2, 3)])  # a single batch is accepted as is
    assert len(one) == 1 and one[0].score == pytest.approx(values.get((2, 3), one[0].score))
    with pytest.raises(ValueError, match=r"train examples \[42\] \(index\) were not in the train batches"):
        attr.token_scores(qb, tb, pairs=[(0, 42)])
    with pytest.raises(ValueError, match="side: expected one of"):
        attr.token_scores(qb, tb, side="prompt")


def test_only_the_kept_examples_are_run(tok, data):
    """Given the whole training loader and two pairs, the forward passes see only the kept examples'
    rows — their full row and one copy per labelled token, ≤ batch_size rows a pass — never n_train × length."""
    train, query = data
    calls: list[list[int]] = []

    def counting_loss(model, batch):
        calls.append(batch["index"].tolist())
        return default_loss_fn(model, batch)

    attr = _H(tiny_llama_lora(tok), loss_fn=counting_loss, progress=False)
    pad = tok.pad_token_id
    attr.fit(batches(train, 5, pad_id=pad))
    calls.clear()
    res = attr.token_scores(batches(query, 3, pad_id=pad), batches(train, 5, pad_id=pad), pairs=[(1, 6), (2, 6)],
                            batch_size=3)
    T = {k: sum(1 for p in range(1, len(e["labels"])) if e["labels"][p] != -100) for k, e in
         enumerate(train + query)}
    tq = {1: T[10 + 1], 2: T[10 + 2]}
    # queries: full rows, then (query side) one row per token; train: example 6's full row and its tokens
    expected_rows = 2 + (1 + T[6]) + sum(tq.values())
    assert sum(len(c) for c in calls) == expected_rows
    assert max(len(c) for c in calls) <= 3
    assert {i for c in calls for i in c} == {1, 2, 6}
    assert [a.train.positions.numel() for a in res] == [T[6], T[6]]


def test_an_example_without_labels_is_named(tok, data, fitted):
    train, query = data
    attr = fitted[1]["hyperinf"]
    pad = tok.pad_token_id
    qb = batches(query, 3, pad_id=pad)
    qb[0]["labels"][1] = -100
    with pytest.raises(ValueError, match=r"query example 1 \(index\): no labelled token"):
        attr.token_scores(qb, batches(train, 5, pad_id=pad))
    qb = batches(query, 3, pad_id=pad)
    qb[0]["labels"][2, 1:] = -100  # only position 0 labelled: nothing predicts it
    qb[0]["labels"][2, 0] = 5
    with pytest.raises(ValueError, match=r"query example 2 \(index\): no labelled token"):
        attr.token_scores(qb, batches(train, 5, pad_id=pad))
    tb = batches(train, 5, pad_id=pad)
    tb[1]["labels"][0] = -100  # train example 5
    with pytest.raises(ValueError, match=r"train example 5 \(index\): no labelled token"):
        attr.token_scores(batches(query, 3, pad_id=pad), tb, pairs=[(0, 5)])


def test_a_loss_that_is_not_the_token_mean_is_refused(tok, data):
    train, query = data
    pad = tok.pad_token_id

    def token_sum(model, batch):  # a sum over tokens: the mean of the per-token losses is not the loss
        return default_loss_fn(model, batch) * (batch["labels"][:, 1:] != -100).sum(1)

    attr = _H(tiny_llama_lora(tok), loss_fn=token_sum, progress=False).fit(batches(train, 5, pad_id=pad))
    with pytest.raises(ValueError, match=r"train example 2 \(index\): its loss .* is not the mean of its"):
        attr.token_scores(batches(query, 3, pad_id=pad), batches(train, 5, pad_id=pad), pairs=[(0, 2)], side="train")


def test_a_classifier_is_refused():
    from tiny_bert import make_data, tiny_bert_lora

    model = tiny_bert_lora(vocab=50)
    data = make_data(6, 1)
    attr = _H(model, progress=False).fit([data])
    with pytest.raises(ValueError, match="per-token attribution needs a causal LM with token labels"):
        attr.token_scores([data], [data])


def test_token_view(tok, data, fitted):
    from hyperinf_ext.app.tasks.token_view import token_texts, token_view, views

    train, query = data
    attr = fitted[1]["hyperinf"]
    pad = tok.pad_token_id
    a, = attr.token_scores(batches(query, 3, pad_id=pad), batches(train, 5, pad_id=pad), pairs=[(0, 2)])
    v = token_view(a, tok, "train")
    assert "".join(v.tokens) == tok.decode(train[2]["input_ids"], skip_special_tokens=False)
    labelled = [s for s in v.shares if s is not None]
    assert len(labelled) == a.train.positions.numel() and sum(labelled) == pytest.approx(a.score, rel=1e-6)
    assert [v.tokens[p].strip() for p in a.train.positions.tolist()] == ["negative", "boring", "dull", "plot",
                                                                         "<|im_end|>"]
    assert all(s is None for s in v.shares[: int(a.train.positions[0])])  # the prompt has no share
    assert set(views(a, tok)) == {"train", "query"} and views(a, tok)["query"].as_dict()["side"] == "query"
    assert token_texts([], tok) == []
    b, = attr.token_scores(batches(query, 3, pad_id=pad), batches(train, 5, pad_id=pad), pairs=[(0, 2)], side="train")
    with pytest.raises(ValueError, match="no query-side shares"):
        token_view(b, tok, "query")
