"""The HyperINF engine on a tiny PEFT model, in float64, against brute-force loops written here.

Tolerances: "exact" vs the brute force 1e-8 (relative to the largest score); "hyperinf" vs "exact"
1e-5 relative; datainf/lissa/tracin vs their reference loops 1e-8; streaming/persistence 1e-10.
"""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.attributor.hyperinf import SIGN_CONVENTION  # noqa: E402
from hyperinf_ext.backends import cpp as cpp_backend  # noqa: E402
from hyperinf_ext.capture import classification_loss  # noqa: E402
from _numerics import ref_inv, ref_solve
from tiny_bert import batches, make_data, tiny_bert_lora, tiny_model  # noqa: F401  (tests import them from here too)

N_TRAIN, N_QUERY = 14, 5
VOCAB = 50


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    train, query = make_data(N_TRAIN, 1), make_data(N_QUERY, 2)
    return model, train, query


def per_sample_loop(model, data, layers):
    """{layer: [n, r, d]} by a batch-size-1 autograd loop over unpadded examples (rank-first)."""
    out = {l.name: [] for l in layers}
    model.eval()
    for i in range(data["labels"].shape[0]):
        L = int(data["attention_mask"][i].sum())
        ex = {"input_ids": data["input_ids"][i : i + 1, :L], "attention_mask": data["attention_mask"][i : i + 1, :L],
              "labels": data["labels"][i : i + 1]}
        loss = classification_loss(model, ex).sum()
        for l in layers:
            w = l.module.weight
            gw = torch.autograd.grad(loss, w, retain_graph=True)[0]
            if l.kind == "lora_B":
                gw = gw.T
            if l.kind == "head" and l.module.bias is not None:
                gb = torch.autograd.grad(loss, l.module.bias, retain_graph=True)[0]
                gw = torch.cat([gw, gb[:, None]], 1)
            out[l.name].append(gw.detach())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def brute(setup):
    model, train, query = setup
    attr = HyperINF(model, method="exact", progress=False)
    gtr = per_sample_loop(model, train, attr.layers)
    gq = per_sample_loop(model, query, attr.layers)
    return attr.layers, gtr, gq


def brute_scores(layers, gtr, gq, precond):
    total = 0
    for l in layers:
        qt = precond(l, gq[l.name], gtr[l.name])
        total = total - torch.einsum("qrd,nrd->qn", qt, gtr[l.name])
    return total


def datainf_lambda(g):
    return 0.1 * float((g**2).mean())


def test_exact_equals_brute_force(setup, brute):
    model, train, query = setup
    layers, gtr, gq = brute

    def exact(l, q, g):
        G = torch.einsum("nri,nrj->ij", g, g) / g.shape[0]
        A = G + datainf_lambda(g) * torch.eye(G.shape[0], dtype=torch.float64)
        return ref_solve(A, q.reshape(-1, A.shape[0]).T).T.reshape(q.shape)

    ref = brute_scores(layers, gtr, gq, exact)
    s = HyperINF(model, method="exact", damping="datainf", progress=False).fit(batches(train, 4)).scores(batches(query, 2))
    assert s.shape == (N_QUERY, N_TRAIN) and s.dtype == torch.float64
    assert (s - ref).abs().max() <= 1e-8 * ref.abs().max()


def test_hyperinf_equals_exact(setup):
    model, train, query = setup
    attr = HyperINF(model, progress=False, damping="datainf").fit(batches(train, 5))
    s_hyp = attr.scores(batches(query, 5))
    s_ex = attr.use("exact").scores(batches(query, 5))
    assert (s_hyp - s_ex).abs().max() <= 1e-5 * s_ex.abs().max()
    assert all(v["residual"] <= 1e-8 for v in attr.use("hyperinf").method.info.values())


def test_tracin_and_datainf_and_lissa_equal_reference_loops(setup, brute):
    model, train, query = setup
    layers, gtr, gq = brute
    attr = HyperINF(model, method="tracin", progress=False).fit(batches(train, 4))
    qb = batches(query, 5)
    ref_tracin = brute_scores(layers, gtr, gq, lambda l, q, g: q)
    assert (attr.scores(qb) - ref_tracin).abs().max() <= 1e-8 * ref_tracin.abs().max()

    def datainf(l, q, g):
        lam = datainf_lambda(g)
        qf, gf = q.reshape(q.shape[0], -1), g.reshape(g.shape[0], -1)
        acc = torch.zeros_like(qf)
        for i in range(gf.shape[0]):  # Sherman–Morrison, one training example at a time
            acc += (qf @ gf[i])[:, None] * gf[i] / (lam + gf[i] @ gf[i])
        return ((qf - acc / gf.shape[0]) / lam).reshape(q.shape)

    ref_datainf = brute_scores(layers, gtr, gq, datainf)
    s = attr.use("datainf").scores(qb)
    assert (s - ref_datainf).abs().max() <= 1e-8 * ref_datainf.abs().max()

    depth = 7
    attr.use("lissa", lissa_depth=depth)

    def lissa(l, q, g):
        lam = datainf_lambda(g)
        qf, gf = q.reshape(q.shape[0], -1), g.reshape(g.shape[0], -1)
        scale = attr.method.scale[l.name]
        u = qf.clone()
        step = 0
        while step < depth:  # mini-batches of 4 in fit order, cycling
            for b in range(0, gf.shape[0], 4):
                gb = gf[b : b + 4]
                u = qf + u - ((u @ gb.T) @ gb / gb.shape[0] + lam * u) / scale
                step += 1
                if step == depth:
                    break
        return (u / scale).reshape(q.shape)

    ref_lissa = brute_scores(layers, gtr, gq, lissa)
    s = attr.scores(qb)
    assert (s - ref_lissa).abs().max() <= 1e-8 * ref_lissa.abs().max()


def test_lissa_converges_to_flattened_fisher_solve(setup, brute):
    """With one full batch the recursion is deterministic; deep enough it solves (F + λI)·x = q."""
    model, train, query = setup
    layers, gtr, gq = brute
    # strong damping keeps s/λ small, so a few hundred steps converge to 1e-6
    attr = HyperINF(model, method="lissa", lissa_depth=300, damping="spectral", damping_scale=10.0, progress=False)
    attr.fit(batches(train, N_TRAIN))

    def solve(l, q, g):
        gf = g.reshape(g.shape[0], -1)
        lam = attr.factors[l.name].damping
        F = gf.T @ gf / gf.shape[0] + lam * torch.eye(gf.shape[1], dtype=torch.float64)
        assert attr.method.scale[l.name] > float(torch.linalg.eigvalsh(F).max())  # convergent scale
        return ref_solve(F, q.reshape(q.shape[0], -1).T).T.reshape(q.shape)

    ref = brute_scores(layers, gtr, gq, solve)
    s = attr.scores(batches(query, 5))
    assert (s - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("method", ["hyperinf", "datainf", "tracin"])
def test_streaming_equivalence(setup, method):
    """Scores do not depend on the batch size, the order, or the split of the train loader."""
    model, train, query = setup
    qb = batches(query, 5)
    a = HyperINF(model, method=method, progress=False).fit(batches(train, N_TRAIN)).scores(qb)
    perm = torch.randperm(N_TRAIN)
    b = HyperINF(model, method=method, progress=False).fit(batches(train, 3, order=perm)).scores(qb)
    c = HyperINF(model, method=method, progress=False, cache="none").fit(batches(train, 2))
    c = c.scores(qb, train_loader=batches(train, 6, order=perm))
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * a.abs().max())
    assert torch.allclose(a, c, rtol=1e-10, atol=1e-12 * a.abs().max())


def test_mean_scores_is_mean_of_pairwise(setup):
    model, train, query = setup
    attr = HyperINF(model, progress=False).fit(batches(train, 4))
    pair = attr.scores(batches(query, 2))
    mean = attr.mean_scores(batches(query, 3))
    assert mean.shape == (N_TRAIN,)
    assert torch.allclose(mean, pair.mean(0), rtol=1e-9, atol=1e-12 * pair.abs().max())
    # precomputed query gradients give the same numbers without another forward/backward
    qg = attr.query_gradients(batches(query, 2))
    assert torch.allclose(attr.mean_scores(qg), mean, rtol=1e-12, atol=1e-14 * mean.abs().max())
    assert torch.equal(attr.scores(qg), pair)


def test_save_load_and_resume(setup, tmp_path):
    model, train, query = setup
    tb, qb = batches(train, 3), batches(query, 5)
    attr = HyperINF(model, progress=False).fit(tb)
    ref = attr.scores(qb)
    attr.save(tmp_path / "f")
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["n_train"] == N_TRAIN and meta["config"]["method"] == "hyperinf"
    loaded = HyperINF.load(tmp_path / "f", model, progress=False)
    assert torch.equal(loaded.scores(qb, train_loader=tb), ref)
    with pytest.raises(ValueError, match="train_loader: required"):
        loaded.scores(qb)

    # interrupted fit: a loader that dies after 3 batches, checkpointing every 2
    def dying():
        for i, b in enumerate(tb):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        HyperINF(model, progress=False).fit(dying(), checkpoint_dir=ck, checkpoint_every=2)
    assert json.loads((ck / "meta.json").read_text())["batches_done"] == 2
    resumed = HyperINF(model, progress=False).fit(tb, checkpoint_dir=ck, checkpoint_every=2)
    for n, f in attr.factors.items():
        assert torch.allclose(resumed.factors[n].gfim_sum, f.gfim_sum, rtol=1e-12, atol=0)
        assert resumed.factors[n].count == N_TRAIN
    assert torch.allclose(resumed.scores(qb), ref, rtol=1e-10, atol=1e-12 * ref.abs().max())

    HyperINF.save_scores(tmp_path / "s.safetensors", ref)
    assert torch.equal(HyperINF.load_scores(tmp_path / "s.safetensors"), ref)


def test_damping_rules_and_timings(setup):
    model, train, query = setup
    attr = HyperINF(model, progress=False, damping="spectral").fit(batches(train, 7))
    for f in attr.factors.values():
        assert abs(f.damping - 0.1 * float(f.gfim.trace()) / f.dim) <= 1e-12 * f.damping
    attr.use(damping=0.5)
    assert all(f.damping == 0.5 for f in attr.factors.values())
    attr.use(damping="paper")
    for f in attr.factors.values():
        assert abs(f.damping - (0.1 * float(f.gfim.trace()) / (f.rank * f.dim) + 1e-3)) <= 1e-12
    attr.use(damping="auto")  # hyperinf's default: spectral ×1
    for f in attr.factors.values():
        assert abs(f.damping - 1.0 * float(f.gfim.trace()) / f.dim) <= 1e-12 * f.damping
    attr.use("datainf")  # "auto" for datainf is its own paper's rule
    for f in attr.factors.values():
        assert abs(f.damping - 0.1 * float(f.gfim.trace()) / (f.rank * f.dim)) <= 1e-12 * f.damping
    attr.mean_scores(batches(query, 5))
    assert {"gradients", "gfim", "prepare", "dot"} <= set(attr.timings)


def test_errors(setup):
    model, train, query = setup
    with pytest.raises(ValueError, match="method: unknown method"):
        HyperINF(model, method="magic")
    with pytest.raises(ValueError, match="damping: unknown rule"):
        HyperINF(model, damping="lots")
    with pytest.raises(ValueError, match="damping: must be finite"):
        HyperINF(model, damping=-1.0)
    with pytest.raises(RuntimeError, match="call fit"):
        HyperINF(model, progress=False).scores(batches(query, 5))
    with pytest.raises(ValueError, match="yielded no batches"):
        HyperINF(model, progress=False).fit([])
    attr = HyperINF(model, progress=False, cache="none").fit(batches(train, 7))
    with pytest.raises(ValueError, match="train_loader: required"):
        attr.mean_scores(batches(query, 5))
    with pytest.raises(ValueError, match="no gradient for training examples"):
        attr.mean_scores(batches(query, 5), train_loader=batches(train, 7)[:1])


def test_sign_convention_documented():
    assert "POSITIVE means example k INCREASES the query loss" in SIGN_CONVENTION


def test_kronecker_equals_explicit_kronecker_solve(setup, brute):
    model, train, query = setup
    layers, gtr, gq = brute
    attr = HyperINF(model, method="kronecker", damping="datainf", progress=False).fit(batches(train, 4))

    def kron(l, q, g):
        n, r, d = g.shape
        G_d = torch.einsum("nri,nrj->ij", g, g) / n
        G_r = torch.einsum("nri,nsi->rs", g, g) / n
        t = float(G_d.trace())
        lam = datainf_lambda(g)
        a, b = (lam * d / r) ** 0.5, (lam * r / d) ** 0.5
        K = torch.kron(G_r / t**0.5 + a * torch.eye(r, dtype=torch.float64), G_d / t**0.5 + b * torch.eye(d, dtype=torch.float64))
        return ref_solve(K, q.reshape(q.shape[0], -1).T).T.reshape(q.shape)

    ref = brute_scores(layers, gtr, gq, kron)
    s = attr.scores(batches(query, 5))
    assert (s - ref).abs().max() <= 1e-7 * ref.abs().max()


def test_gfim_batch_dtype_float32_vs_float64_and_rank_factor():
    """fp32 gradients: per-batch fp32 GFIM sums (default) agree with exact fp64 products to 1e-5
    relative (fp32 rounding of each batch's sum); gfim_dtype="float64" matches a float64 reference
    from the cached gradients to 1e-12; the r×r factor matches its einsum definition."""
    model = tiny_model(3).float()
    train = make_data(N_TRAIN, 4)
    fits = {gd: HyperINF(model, progress=False, gfim_dtype=gd).fit(batches(train, 4)) for gd in ("float32", "float64")}
    exact = fits["float64"]
    cached = {}
    for _, grads in exact.cache:
        for n, g in grads.items():
            assert g.dtype == torch.float32
            cached.setdefault(n, []).append(g.double())
    for n, parts in cached.items():
        g = torch.cat(parts)
        ref = torch.einsum("nri,nrj->ij", g, g)
        ref_r = torch.einsum("nrd,nsd->rs", g, g)
        scale = float(ref.abs().max())
        assert float((exact.factors[n].gfim_sum - ref).abs().max()) <= 1e-12 * scale, n
        assert float((fits["float32"].factors[n].gfim_sum - ref).abs().max()) <= 1e-5 * scale, n
        assert torch.equal(fits["float32"].factors[n].gfim_sum, fits["float32"].factors[n].gfim_sum.T)
        for f in fits.values():
            assert f.factors[n].gfim_sum.dtype == torch.float64
            assert float((f.factors[n].rank_sum - ref_r).abs().max()) <= 1e-5 * float(ref_r.abs().max()), n
            # kronecker's Schulz refuses asymmetric input: the r×r sum must be bit-symmetric
            assert torch.equal(f.factors[n].rank_sum, f.factors[n].rank_sum.T), n
    with pytest.raises(ValueError, match="gfim_dtype"):
        HyperINF(model, progress=False, gfim_dtype="bfloat16")


def test_layers_of_equal_dim_and_different_rank():
    """PEFT's rank_pattern gives layers of the same d different ranks: fit groups them by (d, r)."""
    model = tiny_bert_lora(vocab=VOCAB, dropout=0.1, seed=5, rank_pattern={"query": 2})  # BertConfig's dropout
    train, query = make_data(9, 6), make_data(3, 7)
    attr = HyperINF(model, progress=False, damping="datainf").fit(batches(train, 4))
    ranks = {l.rank for l in attr.layers if l.kind == "lora_A"}
    assert ranks == {2, 3}
    gtr = per_sample_loop(model, train, attr.layers)
    for l in attr.layers:
        g = gtr[l.name]
        ref = torch.einsum("nri,nrj->ij", g, g)
        assert float((attr.factors[l.name].gfim_sum - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), l.name
    s_hyp = attr.scores(batches(query, 3))
    s_ex = attr.use("exact").scores(batches(query, 3))
    assert (s_hyp - s_ex).abs().max() <= 1e-5 * s_ex.abs().max()


@pytest.mark.skipif(not cpp_backend.is_available(), reason="hyperinf_ext._C is not built")
def test_hyperinf_float32_warm_start_then_float64_polish():
    """float64 factors of d ≥ 128: float32 Schulz + float64 polish meets the float64 residual test and
    matches torch.linalg.inv; a too-ill-conditioned layer takes the all-float64 path; same inverses
    (to the tolerance) as warm_start=False."""
    from hyperinf_ext.curvature.methods import HyperINFMethod, LayerFactor

    g = torch.Generator().manual_seed(11)
    factors = {}
    for i, (d, n, lam) in enumerate([(200, 900, 1.0), (200, 900, 0.05), (129, 400, 1e-7), (64, 300, 1.0)]):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
        G = x.T @ x / n
        lam_abs = lam * float(G.diagonal().mean())
        factors[f"l{i}"] = LayerFactor(f"l{i}", 1, d, x.T @ x, n, damping=lam_abs)
    warm = HyperINFMethod(backend="cpp")
    warm.prepare(factors)
    cold = HyperINFMethod(backend="cpp", warm_start=False)
    cold.prepare(factors)
    for name, f in factors.items():
        A = f.gfim + f.damping * torch.eye(f.dim, dtype=torch.float64)
        ref = ref_inv(A)
        err = float((warm.state[name] - ref).norm() / ref.norm())
        assert err <= 1e-7, (name, err)
        assert warm.info[name]["residual"] <= 1e-8
        assert float((warm.state[name] - cold.state[name]).norm() / ref.norm()) <= 2e-8
        assert not cold.info[name]["warm_start"]
    # d = 200 and well conditioned: warm path; κ ~ 1e7 (tiny damping): float64 path; d = 64: float64 path
    assert warm.info["l0"]["warm_start"] and warm.info["l1"]["warm_start"]
    assert not warm.info["l2"]["warm_start"] and not warm.info["l3"]["warm_start"]
