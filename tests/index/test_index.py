"""The gradient index against float64 brute force on a tiny BERT-LoRA classifier.

Tolerances: an exact index (``proj_dim=0``, float32 store) differs from ``HyperINF.scores`` only by the
rounding of each stored gradient to float32, so |Δscore| ≤ 2⁻²⁴·‖q̃‖·‖g‖ per pair (Cauchy–Schwarz;
asserted with a factor 4 for the float64 sums).  A projected float16 index is compared with the
brute-force projected product −⟨q̃P, gP⟩: each stored entry is rounded once (power-of-two scales are
exact), so |Δ| ≤ 2⁻¹¹·‖q̃P‖·‖gP‖ (factor 2 slack).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext import persistence  # noqa: E402
from hyperinf_ext.index import Index, IndexConfig  # noqa: E402
from tiny_bert import DATA_VOCAB, batches, make_data, tiny_bert_lora  # noqa: E402

N_TRAIN, N_QUERY, B = 23, 5, 4


def model_(seed: int = 0):
    return tiny_bert_lora(vocab=DATA_VOCAB, layers=2, rank=3, seed=seed).eval()


@pytest.fixture(scope="module")
def data():
    return make_data(N_TRAIN, 1), make_data(N_QUERY, 2)


@pytest.fixture(scope="module")
def reference(data):
    """HyperINF's exact scores, the preconditioned queries and the exact training gradients (float64)."""
    train, query = data
    attr = HyperINF(model_(), progress=False).fit(batches(train, B))
    S = attr.scores(batches(query, B))
    _, qt = attr.precondition(batches(query, B))
    g = attr.query_gradients(batches(train, B))
    order = g.index.argsort()
    grads = {n: t[order] for n, t in g.grads.items()}
    return {"S": S, "qt": qt, "g": grads, "self": attr.self_scores(), "mean": attr.mean_scores(batches(query, B))}


def _norms(x: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.reshape(t.shape[0], -1).pow(2).sum(1) for t in x.values()))


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory, data):
    train, _ = data
    return Index.build(model_(), batches(train, B), tmp_path_factory.mktemp("idx") / "exact",
                       config=IndexConfig(proj_dim=0), progress=False)


@pytest.fixture(scope="module")
def projected_index(tmp_path_factory, data):
    train, _ = data
    return Index.build(model_(), batches(train, B), tmp_path_factory.mktemp("idx") / "proj",
                       config=IndexConfig(proj_dim=24, rows_per_shard=7), progress=False)


def test_exact_index_equals_hyperinf_scores(exact_index, reference, data):
    _, query = data
    S = exact_index.scores(batches(query, B))
    bound = 4 * 2.0 ** -24 * _norms(reference["qt"])[:, None] * _norms(reference["g"])[None, :]
    assert S.dtype == torch.float64 and S.shape == (N_QUERY, N_TRAIN)
    assert ((S - reference["S"]).abs() <= bound).all()
    assert exact_index.config.dtype == "float32" and all(p.exact for p in exact_index.plans)


def test_projected_index_equals_the_projected_product(projected_index, reference, data):
    _, query = data
    idx = projected_index
    idx.estimator = "unbiased"
    # 24 // r of d: 8 of 16 on the LoRA layers (r=3), 12 of 17 on the classifier head (r=2)
    assert [p.columns for p in idx.plans] == [8] * 8 + [12] and not any(p.exact for p in idx.plans)
    S = idx.scores(batches(query, B))
    qp = {n: reference["qt"][n] @ idx.matrices[n].double() for n in reference["qt"]}
    gp = {n: reference["g"][n] @ idx.matrices[n].double() for n in reference["g"]}
    brute = -sum(torch.einsum("qrk,nrk->qn", qp[n], gp[n]) for n in qp)
    bound = 2 * 2.0 ** -11 * _norms(qp)[:, None] * _norms(gp)[None, :] + 1e-6 * brute.abs()
    assert ((S.double() - brute).abs() <= bound).all()
    assert len(idx.shards) >= 3  # rows_per_shard=7 with batches of 4: shards of 8 rows
    idx.estimator = "regression"


def test_regression_estimator_equals_its_formula_and_beats_unbiased(projected_index, reference, data):
    """q̃·G·P·(PᵀGP)⁻¹ dotted with the stored g·P, against a float64 brute force; and closer to the exact
    scores than q̃·P on this model (Spearman per query, averaged)."""
    from hyperinf_ext.app.tasks.metrics import spearman

    _, query = data
    idx = projected_index
    attr = idx.attributor
    S = idx.scores(batches(query, B))
    brute = torch.zeros_like(reference["S"])
    for p in idx.plans:
        P = idx.matrices[p.name].double()
        G = attr.factors[p.name].gfim_sum / attr.factors[p.name].count
        W = G @ P @ torch.linalg.inv(P.T @ G @ P)
        brute -= torch.einsum("qrk,nrk->qn", reference["qt"][p.name] @ W, reference["g"][p.name] @ P)
    qw = torch.sqrt(sum((reference["qt"][n] @ (attr.factors[n].gfim_sum / attr.factors[n].count) @ idx.matrices[n].double()
                         @ torch.linalg.inv(idx.matrices[n].double().T @ (attr.factors[n].gfim_sum / attr.factors[n].count)
                                            @ idx.matrices[n].double())).pow(2).sum((1, 2)) for n in reference["qt"]))
    gp = _norms({n: reference["g"][n] @ idx.matrices[n].double() for n in reference["g"]})
    assert ((S.double() - brute).abs() <= 2 * 2.0 ** -11 * qw[:, None] * gp[None, :] + 1e-6 * brute.abs()).all()
    idx.estimator = "unbiased"
    U = idx.scores(batches(query, B))
    idx.estimator = "regression"
    rho = lambda A: sum(spearman(A[q].numpy(), reference["S"][q].numpy()) for q in range(N_QUERY)) / N_QUERY  # noqa: E731
    assert rho(S) > rho(U)


def test_top_k_and_exact_rerank(projected_index, reference, data):
    train, query = data
    top = projected_index.query(batches(query, B), top_k=3)
    S = projected_index.scores(batches(query, B))
    assert torch.equal(top.positive_index, S.topk(3, dim=1).indices)
    subset = lambda rows: batches({k: v[rows] for k, v in train.items()}, 3)  # noqa: E731
    exact = projected_index.query(batches(query, B), top_k=3, exact_rerank=N_TRAIN, train_subset=subset)
    ref = reference["S"]
    assert torch.equal(exact.positive_index, ref.topk(3, dim=1).indices)
    assert torch.equal(exact.negative_index, (-ref).topk(3, dim=1).indices)
    torch.testing.assert_close(exact.positive_values, ref.topk(3, dim=1).values, rtol=1e-10, atol=0)
    # fewer candidates than rows: the result still speaks of the whole training set (per-token and the
    # reports keep only pairs with an index below n_train)
    one = batches({k: v[:1] for k, v in query.items()}, B)  # one query: at most 6 of the 23 rows are candidates
    few = projected_index.query(one, top_k=2, exact_rerank=3, train_subset=subset)
    assert few.n_train == N_TRAIN == exact.n_train == top.n_train and few.positive_index.shape == (1, 2)


def test_mean_and_self_scores(exact_index, projected_index, reference, data):
    _, query = data
    g_norm2 = _norms(reference["g"]) ** 2
    mean = exact_index.mean_scores(batches(query, B))
    torch.testing.assert_close(mean, reference["mean"], rtol=1e-5, atol=1e-6 * float(reference["mean"].abs().max()))
    s = exact_index.self_scores()
    # H⁻¹'s largest eigenvalue ≤ 1/λ_min: bound the float32 rounding of g by 4·2⁻²⁴·‖g‖²·‖H⁻¹‖ via the exact values
    torch.testing.assert_close(s, reference["self"], rtol=1e-5, atol=0)
    # projected: ĝ (Pᵀ H⁻¹ P) ĝᵀ, brute force from the exact gradients and an exact solve
    attr = projected_index.attributor
    brute = torch.zeros(N_TRAIN, dtype=torch.float64)
    for p in projected_index.plans:
        f = attr.factors[p.name]
        H = f.gfim_sum / f.count + f.damping * torch.eye(p.dim, dtype=torch.float64)
        P = projected_index.matrices[p.name].double()
        M = P.T @ torch.linalg.solve(H, P)
        gh = reference["g"][p.name] @ P
        brute += ((gh @ M) * gh).sum(dim=(1, 2))
    got = projected_index.self_scores()
    assert ((got - brute).abs() <= 4 * 2.0 ** -11 * brute.abs() + 1e-4 * float(brute.abs().max())).all()
    assert g_norm2.numel() == N_TRAIN


def test_self_scores_in_chunks_equal_the_whole(exact_index, projected_index, monkeypatch):
    """The sketch's padded queries are preconditioned a chunk at a time (their memory on an exact index of a
    large model was layers × d²): chunks of 1 and of 4 queries (not dividing the count) give the same
    self-influence as one chunk, up to the float64 rounding of differently blocked products."""
    from hyperinf_ext.index import search

    for index in (exact_index, projected_index):
        whole = index.self_scores()
        per_query = sum(p.rank * p.dim for p in index.plans)
        Q = max(-(-p.columns // p.rank) for p in index.plans)
        assert Q > 4 and Q % 4  # the chunks below really split, unevenly
        for chunk in (1, 4):
            monkeypatch.setattr(search, "SKETCH_CHUNK_VALUES", per_query * chunk)
            torch.testing.assert_close(index.self_scores(), whole, rtol=1e-12, atol=0)
        monkeypatch.undo()


@pytest.mark.parametrize("w", [1.0, 99.0])
def test_mixed_queries_equal_hyperinf_mixed_scores(exact_index, projected_index, data, w):
    """The query side of an index is exact, so ``mix_queries`` mixes exactly as ``HyperINF.scores`` does:
    the same float32-storage bound as the unmixed test, with the mixed preconditioned queries' norms."""
    train, query = data
    attr = HyperINF(model_(), progress=False).fit(batches(train, B))
    ref = attr.scores(batches(query, B), mix_queries=w)
    _, qt = attr.precondition(batches(query, B), mix_queries=w)
    g = attr.query_gradients(batches(train, B))
    order = g.index.argsort()
    g_norms = _norms({n: t[order] for n, t in g.grads.items()})
    S = exact_index.scores(batches(query, B), mix_queries=w)
    assert ((S - ref).abs() <= 4 * 2.0 ** -24 * _norms(qt)[:, None] * g_norms[None, :]).all()
    assert not torch.allclose(S, exact_index.scores(batches(query, B)), rtol=1e-3)  # the mixing changed them
    mean_ref = attr.mean_scores(batches(query, B), mix_queries=w)
    mean = exact_index.mean_scores(batches(query, B), mix_queries=w)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6 * float(mean_ref.abs().max()))
    # a projected index: the top-k of its mixed scores, and exact re-ranking gives the exact mixed top-k
    subset = lambda rows: batches({k: v[rows] for k, v in train.items()}, 3)  # noqa: E731
    top = projected_index.query(batches(query, B), top_k=3, exact_rerank=N_TRAIN, train_subset=subset, mix_queries=w)
    assert torch.equal(top.positive_index, ref.topk(3, dim=1).indices)
    torch.testing.assert_close(top.positive_values, ref.topk(3, dim=1).values, rtol=1e-10, atol=0)


def test_an_interrupted_build_resumes_to_the_same_index(tmp_path, data, monkeypatch, projected_index):
    train, query = data
    cfg = IndexConfig(proj_dim=24, rows_per_shard=7)
    calls = {"n": 0}
    real = persistence.files.crash_point

    def crash(step: str) -> None:
        if step == "index_shard_written":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed")
        real(step)

    monkeypatch.setattr(persistence.files, "crash_point", crash)
    with pytest.raises(KeyboardInterrupt):
        Index.build(model_(), batches(train, B), tmp_path / "i", config=cfg, checkpoint_every=2, progress=False)
    with pytest.raises(ValueError, match="did not complete"):
        Index.open(tmp_path / "i", model_())
    monkeypatch.setattr(persistence.files, "crash_point", real)
    seen = []

    def counting():
        for b in batches(train, B):
            seen.append(int(b["index"][0]))
            yield b

    idx = Index.build(model_(), counting(), tmp_path / "i", config=cfg, checkpoint_every=2, progress=False)
    assert torch.equal(idx.scores(batches(query, B)), projected_index.scores(batches(query, B)))
    assert not (tmp_path / "i" / "fit").exists()
    with pytest.raises(ValueError, match="already holds a complete index"):
        Index.build(model_(), batches(train, B), tmp_path / "i", config=cfg, progress=False)


def test_an_interrupted_build_with_other_settings_is_refused(tmp_path, data, monkeypatch):
    train, _ = data
    monkeypatch.setattr(persistence.files, "crash_point",
                        lambda step: (_ for _ in ()).throw(KeyboardInterrupt()) if step == "index_shard_written" else None)
    with pytest.raises(KeyboardInterrupt):
        Index.build(model_(), batches(train, B), tmp_path / "i", config=IndexConfig(proj_dim=24, rows_per_shard=4),
                    progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other settings.*config"):
        Index.build(model_(), batches(train, B), tmp_path / "i", config=IndexConfig(proj_dim=12), progress=False)


def test_corrupt_truncated_and_missing_shards_are_named(tmp_path, data):
    train, _ = data
    Index.build(model_(), batches(train, B), tmp_path / "i", config=IndexConfig(proj_dim=24, rows_per_shard=8),
                progress=False)
    # the projection matrices, read by every query: a flipped byte in a value is caught by the checksum
    P_path = tmp_path / "i" / "projection.safetensors"
    good = P_path.read_bytes()
    raw = bytearray(good)
    raw[-5] ^= 0x40
    P_path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="projection.safetensors: SHA-256 differs"):
        Index.open(tmp_path / "i", model_())
    P_path.write_bytes(good)
    folder = tmp_path / "i" / "shards" / "rank-000"
    manifest = json.loads((folder / "shards.json").read_text())
    name = manifest["shards"][1]["name"]
    values = folder / f"{name}.values.npy"
    raw = bytearray(values.read_bytes())
    raw[-3] ^= 0xFF
    values.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{name}.values.npy: checksum mismatch"):
        Index.open(tmp_path / "i", model_())
    Index.open(tmp_path / "i", model_(), verify=False)  # sizes still agree
    values.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ValueError, match=f"{name}.values.npy: .* bytes, the manifest records"):
        Index.open(tmp_path / "i", model_(), verify=False)
    values.unlink()
    with pytest.raises(ValueError, match=f"{name}.values.npy: missing"):
        Index.open(tmp_path / "i", model_())


def test_another_model_or_adapter_is_refused_naming_both(exact_index):
    other_adapter = model_()
    with torch.no_grad():
        next(p for n, p in other_adapter.named_parameters() if "lora_A" in n).add_(0.1)
    with pytest.raises(ValueError, match="adapter") as e:
        Index.open(exact_index.directory, other_adapter)
    assert str(exact_index.directory) in str(e.value)
    other_base = model_()
    with torch.no_grad():
        next(p for n, p in other_base.named_parameters() if not p.requires_grad and p.dim() == 2).add_(0.1)
    with pytest.raises(ValueError, match="other base weights \\(base_sha256 [0-9a-f]+\\) than the model's "
                                         "\\([0-9a-f]+\\)") as e:
        Index.open(exact_index.directory, other_base)
    assert str(exact_index.directory) in str(e.value)


def test_bad_settings_and_folders(tmp_path, data, exact_index):
    train, _ = data
    with pytest.raises(ValueError, match="proj_dim"):
        IndexConfig(proj_dim=-1)
    with pytest.raises(ValueError, match="store_dtype"):
        IndexConfig(store_dtype="int8")
    with pytest.raises(ValueError, match="method 'lissa'"):
        Index.build(model_(), batches(train, B), tmp_path / "l", method="lissa", progress=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="a file"):
        Index.build(model_(), batches(train, B), tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match="not a gradient index"):
        Index.open(exact_index.directory / "factors", model_())
    with pytest.raises(ValueError, match="exact_rerank: 2 candidates cannot re-rank a top 3"):
        exact_index.query(batches(make_data(2, 5), B), top_k=3, exact_rerank=2, train_subset=lambda r: [])


def test_training_indices_other_than_0_to_n_minus_1_are_refused_before_the_index_is_complete(tmp_path, data):
    """Dataset ids 5..27 would make a 'complete' index that no open accepts and no build can redo: the build
    names the problem and leaves the manifest incomplete (a repeated id the fit refuses itself)."""
    train, _ = data
    shifted = [{**b, "index": b["index"] + 5} for b in batches(train, B)]
    with pytest.raises(ValueError, match=r"train_loader: .*0\.\.n-1, each once \(training examples \[0, 1, 2, 3, 4\] "
                                         r"are stored nowhere \(5 of 0\.\.27\)\)"):
        Index.build(model_(), shifted, tmp_path / "shifted", config=IndexConfig(proj_dim=0), progress=False)
    assert json.loads((tmp_path / "shifted" / persistence.kinds.MANIFEST).read_text())["complete"] is False
    with pytest.raises(ValueError, match="did not complete"):
        Index.open(tmp_path / "shifted", model_())
    twice = batches(train, B)
    twice[-1] = {**twice[-1], "index": twice[0]["index"][: twice[-1]["index"].numel()]}
    with pytest.raises(ValueError, match=r"index \[0, 1, 2\] already used by an earlier batch"):  # the fit's own check
        Index.build(model_(), twice, tmp_path / "twice", config=IndexConfig(proj_dim=0), progress=False)


def test_the_manifest_records_the_fingerprints(exact_index):
    fp = exact_index.meta["fingerprints"]
    factors = json.loads((exact_index.directory / "factors" / persistence.kinds.MANIFEST).read_text())
    assert fp["adapter"] == factors["adapter_sha256"] and len(fp["adapter"]) == 64
    m = model_()
    lora = [p for l in HyperINF(m, progress=False).layers for p in l.parameters]
    assert fp["base"] == factors["base_sha256"] == persistence.base_fingerprint(m, adapter=lora)
    assert fp["base_rule"] == "all but the adapter"


def test_the_model_loaded_frozen_opens_the_index_it_was_built_with(exact_index, reference, data, tmp_path):
    """The base fingerprint was taken over the weights that did not require grad, so the same model loaded
    for querying with its adapter frozen (PeftModel.from_pretrained's default) was refused as 'another
    base'; it covers every weight outside the attributed layers now.  An index built before keeps its
    check (and its rule)."""
    _, query = data
    frozen = model_()
    for p in frozen.parameters():
        p.requires_grad_(False)
    S = Index.open(exact_index.directory, frozen).scores(batches(query, B))
    bound = 4 * 2.0 ** -24 * _norms(reference["qt"])[:, None] * _norms(reference["g"])[None, :]  # as above
    assert ((S - reference["S"]).abs() <= bound).all()
    # a manifest of the earlier rule: checked as then (trainable model passes, another base is refused)
    old = tmp_path / "old"
    shutil.copytree(exact_index.directory, old)
    meta = json.loads((old / persistence.kinds.MANIFEST).read_text())
    del meta["fingerprints"]["base_rule"]
    meta["fingerprints"]["base"] = persistence.base_fingerprint(model_())
    (old / persistence.kinds.MANIFEST).write_text(json.dumps(meta))
    factors = json.loads((old / "factors" / persistence.kinds.MANIFEST).read_text())
    del factors["base_sha256"]
    (old / "factors" / persistence.kinds.MANIFEST).write_text(json.dumps(factors))
    assert Index.open(old, model_()).n_train == N_TRAIN
    other_base = model_()
    with torch.no_grad():
        next(p for n, p in other_base.named_parameters() if not p.requires_grad and p.dim() == 2).add_(0.1)
    with pytest.raises(ValueError, match="built on the base model with fingerprint"):
        Index.open(old, other_base)


def test_sizes(exact_index, projected_index):
    # values + one float32 scale per layer (9) + the int64 index
    assert exact_index.bytes_per_example == pytest.approx(4 * (8 * 3 * 16 + 2 * 17) + 4 * 9 + 8)
    assert projected_index.bytes_per_example == pytest.approx(2 * (8 * 3 * 8 + 2 * 12) + 4 * 9 + 8)
    assert np.isclose(projected_index.meta["bytes_per_example"], projected_index.bytes_per_example)


def test_regression_map_on_a_rank_deficient_gfim():
    """Fewer training gradients than d (the LLM's case: PᵀGP singular in float64): the map is the pseudo-inverse
    one; gradients in G's range are scored exactly once k ≥ rank G, and a full-rank G gives G·P·(PᵀGP)⁻¹."""
    from hyperinf_ext.index.projection import regression_map

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 64, dtype=torch.float64, generator=g)  # rank 50 < d = 64
    P = torch.randn(64, 60, dtype=torch.float64, generator=g)
    q = torch.randn(3, 64, dtype=torch.float64, generator=g)
    W = regression_map(P, X.T @ X / 50)
    exact = q @ X.T
    assert float(((q @ W) @ (X @ P).T - exact).abs().max()) <= 1e-9 * float(exact.abs().max())
    G = torch.randn(64, 64, dtype=torch.float64, generator=g)
    G = G @ G.T
    P = P[:, :20]
    torch.testing.assert_close(regression_map(P, G), G @ P @ torch.linalg.inv(P.T @ G @ P), rtol=1e-10, atol=1e-12)
