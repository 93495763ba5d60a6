"""``mix_queries`` (the query set's GFIM mixed into G) and ``normalize`` (cosine influence) against a float64
brute force on a tiny float64 LoRA BERT.

Per-example gradients come from a batch-size-1 autograd loop with the loss written out here; G, the query
GFIM, the damping rules and the solves are written out in float64 (dense ``torch.linalg.solve``).
Tolerances: 1e-8 relative for the Cholesky methods (exact, kronecker), 1e-6 for hyperinf's verified solver.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from tiny_bert import batches, make_data, tiny_bert_lora  # noqa: E402

N, M, W = 12, 5, 3.0
TOL = {"exact": 1e-8, "hyperinf": 1e-6, "kronecker": 1e-8, "paper": None}


@pytest.fixture(scope="module")
def setup():
    model = tiny_bert_lora(vocab=50, layers=1, rank=2, seed=3).eval()
    train, query = make_data(N, seed=1), make_data(M, seed=2)
    layers = HyperINF(model, method="tracin", include_heads=False, progress=False).layers

    def grads(data):
        out = {l.name: [] for l in layers}
        for i in range(data["labels"].shape[0]):
            logits = model(input_ids=data["input_ids"][i:i + 1], attention_mask=data["attention_mask"][i:i + 1]).logits
            loss = F.cross_entropy(logits, data["labels"][i:i + 1])
            for l in layers:
                gw = torch.autograd.grad(loss, l.module.weight, retain_graph=True)[0]
                out[l.name].append((gw.T if l.kind == "lora_B" else gw).detach())
        return {k: torch.stack(v) for k, v in out.items()}

    return model, train, query, grads(train), grads(query)


def fit(model, train, method="exact", **kw):
    return HyperINF(model, method=method, include_heads=False, progress=False, **kw).fit(batches(train, 5))


# ---------------------------------------------------------------------------------------- the brute force

def gram(g):
    return torch.einsum("nri,nrj->ij", g, g) / g.shape[0]


def rank_gram(g):
    return torch.einsum("nri,nsi->rs", g, g) / g.shape[0]


def solve_right(v, A):
    """v·A⁻¹ for v [..., r, d] (A [d, d] symmetric) or flattened against A [r·d, r·d]."""
    flat = v.reshape(-1, A.shape[0])
    return torch.linalg.solve(A, flat.T).T.reshape(v.shape)


def preconditioned(method, g_train, g_query, q, w, damping="spectral"):
    """{layer: q·H_mix⁻¹}, H from G + w·Q per layer, damped by the rule on the mixed matrix."""
    out = {}
    for n, g in g_train.items():
        G = gram(g) + w * gram(g_query[n])
        r, d = g.shape[1], g.shape[2]
        lam = float(G.trace()) / d if damping == "spectral" else 0.1 * float(G.trace()) / (r * d)
        if method == "kronecker":
            R = rank_gram(g) + w * rank_gram(g_query[n])
            t = float(G.trace())
            a, b = (lam * d / r) ** 0.5, (lam * r / d) ** 0.5
            K = torch.kron(R / t**0.5 + a * torch.eye(r, dtype=G.dtype), G / t**0.5 + b * torch.eye(d, dtype=G.dtype))
            out[n] = solve_right(q[n].reshape(q[n].shape[0], 1, r * d), K).reshape(q[n].shape)
        else:
            out[n] = solve_right(q[n], G + lam * torch.eye(d, dtype=G.dtype))
    return out


def flat(x):
    return torch.cat([v.reshape(v.shape[0], -1) for v in x.values()], dim=1)


def close(a, b, tol):
    assert (a - b).abs().max() <= tol * b.abs().max(), float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------- mix_queries

@pytest.mark.parametrize("method", ["exact", "hyperinf", "kronecker"])
def test_mixed_scores_equal_brute_force(setup, method):
    model, train, query, gt, gq = setup
    attr = fit(model, train, method)
    expected = -flat(preconditioned(method, gt, gq, gq, W)) @ flat(gt).T
    s = attr.scores(batches(query, 2), mix_queries=W)
    close(s, expected, TOL[method])
    assert not torch.allclose(s, attr.scores(batches(query, 2)), rtol=1e-3)  # the mixing changes the scores
    close(attr.mean_scores(batches(query, 3), mix_queries=W), expected.mean(0), TOL[method])
    idx, qt = attr.precondition(batches(query, 4), mix_queries=W)
    close(flat(qt), flat(preconditioned(method, gt, gq, gq, W)), TOL[method])


def test_mixed_damping_rule_sees_the_mixed_matrix(setup):
    model, train, query, gt, gq = setup
    attr = fit(model, train, damping="datainf")
    expected = -flat(preconditioned("exact", gt, gq, gq, W, damping="datainf")) @ flat(gt).T
    close(attr.scores(batches(query, 5), mix_queries=W), expected, 1e-8)
    assert attr.factors[next(iter(attr.factors))].damping == pytest.approx(
        0.1 * float(gram(next(iter(gt.values()))).trace()) / (2 * 16))  # the fitted factors are untouched


def test_zero_weight_is_the_plain_estimator(setup, tmp_path):
    model, train, query, _, _ = setup
    attr = fit(model, train)
    plain = attr.scores(batches(query, 2))
    assert torch.equal(attr.scores(batches(query, 2), mix_queries=0.0), plain)
    assert torch.equal(attr.mean_scores(batches(query, 2), mix_queries=0), attr.mean_scores(batches(query, 2)))
    top = attr.scores(batches(query, 2), mix_queries=0.0, top_k=3)
    assert torch.equal(top.positive_values, attr.scores(batches(query, 2), top_k=3).positive_values)


def test_mixed_top_k_out_batches_and_cache(setup, tmp_path):
    model, train, query, _, _ = setup
    attr = fit(model, train)
    qg = attr.query_gradients(batches(query, 2))
    dense = attr.scores(qg, mix_queries=W)
    method = attr._mixed[2]
    stored = attr.scores(qg, mix_queries=W, out=tmp_path / "s")
    assert attr._mixed[2] is method  # same query set and weight: the mixed inverse is reused
    assert torch.equal(torch.as_tensor(stored[:]), dense)
    top = attr.scores(qg, mix_queries=W, top_k=2)
    assert torch.equal(top.positive_values, dense.topk(2, dim=1).values)
    streamed = torch.zeros_like(dense)
    for index, block in attr.score_batches(qg, mix_queries=W):
        streamed[:, index] = block
    close(streamed, dense, 1e-12)
    attr.scores(qg, mix_queries=2 * W)
    assert attr._mixed[2] is not method  # another weight: another inverse
    sub = attr.query_gradients(batches({k: v[:3] for k, v in query.items()}, 3))
    attr.scores(sub, mix_queries=2 * W)
    assert attr._mixed[1].count == 3  # another query set: another inverse
    mixed = attr._mixed
    attr.use(tol=1e-3)  # another solver setting: the cached mixed inverse was made with the old one
    assert attr._mixed is None
    attr.scores(sub, mix_queries=2 * W)
    assert attr._mixed is not mixed and attr._mixed[2] is not mixed[2]


# --------------------------------------------------------------------------------------------- normalize

def brute_normalized(mode, q, qt, g, gt_pre):
    """−cosines: q, g raw [n, P]; qt = q·H⁻¹; gt_pre = g·H⁻¹."""
    dot = -(qt @ g.T)
    if mode == "unit":
        return dot / q.norm(dim=1)[:, None] / g.norm(dim=1)[None, :]
    if mode == "query":
        return -torch.nn.functional.cosine_similarity(qt[:, None, :], g[None, :, :], dim=2, eps=0)
    return dot / (qt * q).sum(1).sqrt()[:, None] / (gt_pre * g).sum(1).sqrt()[None, :]


@pytest.mark.parametrize("mode", ["unit", "query", "symmetric"])
@pytest.mark.parametrize("w", [0.0, W])
def test_normalized_scores_are_cosines_of_the_brute_force(setup, tmp_path, mode, w):
    model, train, query, gt, gq = setup
    attr = fit(model, train)
    qt, gpre = preconditioned("exact", gt, gq, gq, w), preconditioned("exact", gt, gq, gt, w)
    expected = brute_normalized(mode, flat(gq), flat(qt), flat(gt), flat(gpre))
    assert bool((expected.abs() <= 1 + 1e-12).all()) or mode == "unit"
    s = attr.scores(batches(query, 2), mix_queries=w, normalize=mode)
    close(s, expected, 1e-8)
    close(attr.mean_scores(batches(query, 3), mix_queries=w, normalize=mode), expected.mean(0), 1e-8)
    stored = attr.scores(batches(query, 2), mix_queries=w, normalize=mode, out=tmp_path / "s", top_k=3)
    close(stored.negative_values, s.topk(3, dim=1, largest=False).values, 1e-12)
    close(torch.as_tensor(HyperINF.load_scores(tmp_path / "s")[:]), s, 1e-12)
    streamed = torch.cat([b for _, b in attr.score_batches(batches(query, 2), mix_queries=w, normalize=mode)], 1)
    close(streamed, expected, 1e-8)


def test_true_means_unit_and_normalized_mean_is_mean_of_rows(setup):
    model, train, query, _, _ = setup
    attr = fit(model, train, "hyperinf")
    assert torch.equal(attr.scores(batches(query, 2), normalize=True), attr.scores(batches(query, 2), normalize="unit"))
    qg = attr.query_gradients(batches(query, 2))
    close(attr.mean_scores(qg, normalize="query"), attr.scores(qg, normalize="query").mean(0), 1e-12)


def test_normalize_with_a_train_pass_method(setup):
    """datainf: 'unit'/'query' are the plain scores divided by the norms; 'symmetric' is refused."""
    model, train, query, gt, gq = setup
    attr = fit(model, train, "datainf", damping="datainf")
    plain = attr.scores(batches(query, 5))
    qn, gn = flat(gq).norm(dim=1), flat(gt).norm(dim=1)
    close(attr.scores(batches(query, 5), normalize="unit"), plain / qn[:, None] / gn[None, :], 1e-10)
    with pytest.raises(ValueError, match="normalize: 'symmetric'"):
        attr.scores(batches(query, 5), normalize="symmetric")


def test_normalized_self_scores(setup):
    model, train, query, gt, gq = setup
    attr = fit(model, train)
    g, gpre = flat(gt), flat(preconditioned("exact", gt, gq, gt, 0.0))
    close(attr.self_scores(normalize="unit"), (gpre * g).sum(1) / g.norm(dim=1) ** 2, 1e-8)
    close(attr.self_scores(normalize="query"), torch.nn.functional.cosine_similarity(gpre, g, dim=1, eps=0), 1e-8)
    with pytest.raises(ValueError, match="normalize: 'symmetric' self-influence"):
        attr.self_scores(normalize="symmetric")
    tracin = fit(model, train, method="tracin")  # H = I: ‖g‖²/‖g‖² and cos(g, g) are 1 for every example
    for mode in ("unit", "query"):
        with pytest.raises(ValueError, match="normalised self-influence of method 'tracin' .* is 1 for every"):
            tracin.self_scores(normalize=mode)


def test_options_are_checked_before_the_query_gradients(setup, tmp_path):
    model, train, _, _, _ = setup
    attr = fit(model, train)
    with pytest.raises(ValueError, match="top_k"):
        attr.scores(Untouchable(), top_k=0)
    (tmp_path / "f").write_text("a file, not a score store")
    with pytest.raises(ValueError, match="out"):
        attr.scores(Untouchable(), out=tmp_path / "f")
    # the streamed form checks at the call, not at the first next() (a generator would only then)
    with pytest.raises(ValueError, match="normalize"):
        attr.score_batches(Untouchable(), normalize="bogus")
    with pytest.raises(ValueError, match="mix_queries"):
        attr.score_batches(Untouchable(), mix_queries=-1.0)
    with pytest.raises(RuntimeError, match="call fit"):
        HyperINF(model, progress=False).score_batches(Untouchable())


def test_a_diverged_inverse_is_an_error_not_nan_scores(setup, monkeypatch):
    """Non-finite preconditioned queries (the paper's fixed schedule diverges past λmax > 4·10⁴) raise,
    naming the method: a NaN would rank first among the harmful examples."""
    model, train, query, _, _ = setup
    attr = fit(model, train)
    real = type(attr.method).precondition

    def diverged(self, q, factors, source):
        out = real(self, q, factors, source)
        name = next(iter(out))
        out[name] = out[name] * float("inf")
        return out

    monkeypatch.setattr(type(attr.method), "precondition", diverged)
    for call in (lambda: attr.scores(batches(query, 2)), lambda: attr.scores(batches(query, 2), top_k=2),
                 lambda: attr.mean_scores(batches(query, 2))):
        with pytest.raises(ValueError, match="method 'exact': the preconditioned queries of layer .* not finite"):
            call()


# ------------------------------------------------------------------------------------------- bad input

class Untouchable:
    """A loader that fails the test if it is read: options are checked before any gradient."""

    def __iter__(self):
        raise AssertionError("the loader was read before the options were checked")


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), True, "1", None])
def test_bad_weight_names_the_option(setup, weight):
    model, train, _, _, _ = setup
    attr = fit(model, train)
    for call in (lambda: attr.scores(Untouchable(), mix_queries=weight),
                 lambda: attr.mean_scores(Untouchable(), mix_queries=weight),
                 lambda: attr.precondition(Untouchable(), mix_queries=weight)):
        with pytest.raises(ValueError, match="mix_queries"):
            call()


@pytest.mark.parametrize("mode", ["cosine", 1, 0.5, "UNIT"])
def test_bad_normalize_names_the_option(setup, mode):
    model, train, _, _, _ = setup
    attr = fit(model, train)
    with pytest.raises(ValueError, match="normalize"):
        attr.scores(Untouchable(), normalize=mode)
    with pytest.raises(ValueError, match="normalize"):
        attr.self_scores(normalize=mode)


@pytest.mark.parametrize("method", ["tracin", "datainf", "lissa"])
def test_mixing_refused_for_methods_without_a_fitted_gfim(setup, method):
    model, train, _, _, _ = setup
    attr = fit(model, train, method, damping="datainf", lissa_depth=2)
    with pytest.raises(ValueError, match=f"mix_queries: method '{method}'"):
        attr.scores(Untouchable(), mix_queries=1.0)
    attr.scores(batches(make_data(2, seed=5), 2), mix_queries=0.0)  # off: every method


# ------------------------------------------------------------------------------ the eigen-corrected GFIM

def eigen_preconditioned(g_train, q):
    """q·H⁻¹ with H = (I_r ⊗ U)·diag(Λ + λ)·(I_r ⊗ U)ᵀ, Λ the training gradients' second moments in that basis."""
    out = {}
    for n, g in g_train.items():
        N_, r, d = g.shape
        _, U = torch.linalg.eigh(gram(g))
        B = torch.kron(torch.eye(r, dtype=torch.float64), U.contiguous())
        Lam = ((g.reshape(N_, r * d) @ B) ** 2).mean(0)
        lam = float(gram(g).trace()) / (r * d)  # "auto": 1 × the mean of Λ
        out[n] = solve_right(q[n].reshape(q[n].shape[0], 1, r * d), B @ torch.diag(Lam + lam) @ B.T).reshape(q[n].shape)
    return out


def test_eigen_method_scores_and_self_scores_equal_brute_force(setup):
    model, train, query, gt, gq = setup
    attr = fit(model, train, "eigen")
    close(attr.scores(batches(query, 5)), -flat(eigen_preconditioned(gt, gq)) @ flat(gt).T, 1e-8)
    close(attr.self_scores(chunk_size=5), (flat(eigen_preconditioned(gt, gt)) * flat(gt)).sum(1), 1e-8)
    with pytest.raises(ValueError, match="mix_queries: method 'eigen'"):
        attr.scores(Untouchable(), mix_queries=1.0)
