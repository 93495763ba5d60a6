"""The LDS study's external peers on a causal LM (issue #25): Kronfluence EK-FAC with a causal-LM task
(bench/lds_ekfac.py) and bergson's TrackStar / EK-FAC (bench/lds_bergson.py), against hyperinf.

A tiny random Llama (tests/tiny_llm.py; float32) with a LoRA whose lora_B is random (so every LoRA matrix
has a gradient), 12 training and 3 query sentiment instructions.  Every peer's [Q, n_train] scores must be
in OUR sign (positive = up-weighting the training example raises the query loss) and rank-agree with the
library's scores of the same kind of curvature: a sign flip turns each Spearman below into its negative
and fails.  Spearman is taken pooled over all Q × n_train entries and per query row.

Measured here (2 busy cores, torch 2.13.0+cpu, Kronfluence 1.0.1, bergson 2.5.1; Spearman pooled
[per query]); each threshold sits 0.1–0.2 below the measurement, room for BLAS and sampling differences
across machines while a flipped sign (about −0.9) or scores unrelated to the gradients (about 0) fail:

* Kronfluence EK-FAC, causal-LM task (heuristic damping 0.1·mean eigenvalue; queries in batches of 2, the
  accumulation path the LLM uses) vs HyperINF "kronecker", spectral 0.1: 0.956 [0.909, 0.965, 0.958] →
  thresholds 0.85 pooled, 0.7 per query; vs "exact", spectral 0.1: 0.928 [0.937, 0.846, 0.958] → 0.8 and
  0.7.  EK-FAC approximates a true (sampled) Fisher by Kronecker factors where ours is the empirical
  Fisher of the same per-example gradients: strong agreement, not equality.  At scale 1: 0.954.
* Kronfluence EK-FAC on a tiny BERT classifier (the MiniLM study's path, ekfac_pairwise_grid) vs
  "kronecker", spectral 0.1: 0.962 [0.986, 0.986, 0.881] → 0.85 and 0.7.
* bergson TrackStar without mixing at damping factor 1e6 (H⁻¹ ≈ a constant: the cosine of the per-module
  random projections to 16 of the gradients) vs HyperINF tracin with ``normalize="unit"`` (the cosine of
  the full gradients): 0.895 [0.916, 0.860, 0.951]; mixed: 0.901 [0.916, 0.874, 0.951].  The projection
  is what keeps it below 1 → thresholds 0.75 pooled, 0.6 per query.
* bergson EK-FAC (its damping factor 0.1) vs "kronecker", spectral 0.1: 0.949 [0.811, 0.993, 0.958] →
  0.85 pooled, 0.6 per query (its sampled Fisher draws other targets than Kronfluence's).

CI does not install the peers: each test is skipped, saying why, when its package cannot be imported
(``PYTHONPATH=/tmp/kfsite:/tmp/bgsite``, see bench/lds.py's docstring for the installs).  The label
handling of bench/lds.py is checked without them.
"""
from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_llm import make_tiny_adapter, make_tiny_llama, make_tokenizer, sentiment_rows, write_instructions

from hyperinf_ext.app.tasks.metrics import spearman

HAVE_KF = importlib.util.find_spec("kronfluence") is not None
HAVE_BG = importlib.util.find_spec("bergson") is not None
needs_kf = pytest.mark.skipif(not HAVE_KF, reason="kronfluence is not importable (CI does not install it; PYTHONPATH="
                              "/tmp/kfsite after pip install --no-deps --target /tmp/kfsite kronfluence==1.0.1 ...)")
needs_bg = pytest.mark.skipif(not HAVE_BG, reason="bergson is not importable (CI does not install it; PYTHONPATH="
                              "/tmp/bgsite after pip install --no-deps --target /tmp/bgsite bergson==2.5.1 ...)")

N_TRAIN, N_QUERY, MAX_LEN = 12, 3, 32
SPECTRAL = dict(damping="spectral", damping_scale=0.1)  # our rule with Kronfluence's / bergson's 0.1·mean λ


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders and encodings of the tiny Llama case; ``fresh()`` loads a new copy of the LoRA model
    (Kronfluence wraps the model it is given in place)."""
    from hyperinf_ext.app.data.instruction import encode_instructions, load_instruction_file
    from hyperinf_ext.app.models.causal import load_causal_lora_model

    root = tmp_path_factory.mktemp("peers")
    folder = make_tiny_llama(root / "model")
    adapter = make_tiny_adapter(folder, root / "adapter")
    tok = make_tokenizer()
    train = load_instruction_file(write_instructions(root / "train.jsonl", sentiment_rows(N_TRAIN, seed=0)))
    query = load_instruction_file(write_instructions(root / "query.jsonl", sentiment_rows(N_QUERY, seed=1)))

    def fresh():
        return load_causal_lora_model(folder, rank=2, alpha=4, adapter=adapter, seed=0)

    return SimpleNamespace(fresh=fresh, tok=tok, train=train, query=query,
                           train_enc=encode_instructions(train, tok, MAX_LEN).encodings,
                           query_enc=encode_instructions(query, tok, MAX_LEN).encodings)


def ours(tiny, method: str, normalize: bool | str = False, **damping) -> np.ndarray:
    """HyperINF's [Q, n_train] scores (our sign) on a fresh copy of the model."""
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import make_loader

    train = make_loader(tiny.train, tiny.tok, batch_size=4, encodings=tiny.train_enc, max_length=MAX_LEN)
    query = make_loader(tiny.query, tiny.tok, batch_size=4, encodings=tiny.query_enc, max_length=MAX_LEN)
    attr = HyperINF(tiny.fresh(), method=method, progress=False, **damping).fit(train)
    return attr.scores(query, normalize=normalize).detach().double().numpy()


def agreement(peer: np.ndarray, ref: np.ndarray) -> tuple[float, list[float]]:
    """(pooled Spearman over every entry, Spearman of each query row)."""
    assert peer.shape == ref.shape == (N_QUERY, N_TRAIN)
    assert np.isfinite(peer).all()
    return spearman(peer.ravel(), ref.ravel()), [spearman(peer[q], ref[q]) for q in range(N_QUERY)]


def check(peer: np.ndarray, ref: np.ndarray, pooled_min: float, row_min: float, what: str) -> None:
    """Strong positive rank agreement; the thresholds are positive, so a flipped sign (every Spearman
    negated) fails."""
    assert pooled_min > 0 and row_min > 0
    pooled, rows = agreement(peer, ref)
    print(f"{what}: pooled {pooled:.3f}, per query {[round(r, 3) for r in rows]}")
    assert pooled > pooled_min, f"{what}: pooled Spearman {pooled:.3f} (rows {rows})"
    assert min(rows) > row_min, f"{what}: per-query Spearman {rows}"


# ------------------------------------------------------------------------------ Kronfluence


@needs_kf
def test_kronfluence_causal_ekfac_agrees_with_hyperinf_in_our_sign(tiny, tmp_path):
    from bench.lds_ekfac import ekfac_causal_pairwise_grid

    kron = ours(tiny, "kronecker", **SPECTRAL)
    exact = ours(tiny, "exact", **SPECTRAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid = list(ekfac_causal_pairwise_grid(tiny.fresh(), tiny.tok, tiny.train_enc, tiny.query_enc,
                                               str(tmp_path), [0.1, 1.0], max_length=MAX_LEN, batch_size=2))
    # batch_size 2 < 3 queries: the query gradients accumulate over two batches (as on the LLM, 8 of 60);
    # a row out of place would show in the per-query agreement below
    assert [g[0] for g in grid] == [0.1, 1.0]
    (_, s01, sec), (_, s1, _) = grid
    assert s01.dtype == torch.float64 and sec > 0
    s01, s1 = s01.numpy(), s1.numpy()
    check(s01, kron, 0.85, 0.7, "Kronfluence EK-FAC vs kronecker")
    check(s01, exact, 0.8, 0.7, "Kronfluence EK-FAC vs exact")
    assert not np.allclose(s01, s1)  # the damping scale reaches the scores
    check(s1, kron, 0.85, 0.7, "Kronfluence EK-FAC (scale 1) vs kronecker")


def test_sampled_causal_loss_is_the_fisher_of_the_mean_token_loss():
    """The sampled loss of Kronfluence's true-Fisher factors (bench/lds_ekfac.py; torch only, no Kronfluence):
    targets drawn exactly where the mean-token loss has one, and example k's loss Σ_t CE_t / sqrt(n_k)."""
    from bench.lds_ekfac import sampled_causal_loss
    from hyperinf_ext.capture.losses import causal_from_logits

    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # row 1 left-padded: position 0 predicts nothing
    torch.manual_seed(0)
    loss = sampled_causal_loss(logits, labels, mask)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    (g,) = torch.autograd.grad(loss.sum(), logits)
    (g_mean,) = torch.autograd.grad(causal_from_logits(logits, labels, mask).sum(), logits)
    used = g_mean.abs().sum(-1) > 0
    assert used.tolist() == [[False, True, True, False, False], [False, True, True, True, False]]
    assert (g.abs().sum(-1) > 0).eq(used).all()
    # at a used position the logit gradient is (softmax − onehot(drawn target)) / sqrt(n_k)
    p = torch.softmax(logits.detach(), -1)
    for k, n in ((0, 2), (1, 3)):
        for t in used[k].nonzero().flatten().tolist():
            onehot = p[k, t] - g[k, t] * n ** 0.5
            assert torch.allclose(onehot.sort().values, torch.tensor([0.0] * 6 + [1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ bergson


@needs_bg
def test_bergson_trackstar_at_large_damping_is_the_gradient_cosine_in_our_sign(tiny, tmp_path):
    from bench.lds_bergson import TRACKSTAR, TRACKSTAR_NO_MIX, bergson_score_sets

    cosine = ours(tiny, "tracin", normalize="unit")
    out = {label: (s, extra) for label, s, extra in bergson_score_sets(
        tiny.fresh(), tiny.tok, tiny.train_enc, tiny.query_enc, tmp_path, [TRACKSTAR_NO_MIX, TRACKSTAR],
        damping=1e6)}
    assert list(out) == [TRACKSTAR, TRACKSTAR_NO_MIX]  # LABELS order
    for label, (s, extra) in out.items():
        assert s is not None, extra.get("error")
        assert extra["method"] == label and extra["damping"] == ["bergson damped_inverse", 1e6]
        assert extra["unit_normalize"] is True and extra["projection_dim"] == 16
        check(s, cosine, 0.75, 0.6, f"{label} (damping 1e6) vs tracin, unit")
    assert out[TRACKSTAR][1]["mix_hessians"] and 0.0 <= out[TRACKSTAR][1]["mixing_coefficient"] <= 1.0
    assert not out[TRACKSTAR_NO_MIX][1]["mix_hessians"]
    # unit-normalised on both sides: a score is a cosine
    assert np.abs(out[TRACKSTAR_NO_MIX][0]).max() <= 1 + 1e-5


@needs_bg
def test_bergson_ekfac_agrees_with_hyperinf_in_our_sign(tiny, tmp_path):
    from bench.lds_bergson import EKFAC, bergson_score_sets

    kron = ours(tiny, "kronecker", **SPECTRAL)
    (label, s, extra), = bergson_score_sets(tiny.fresh(), tiny.tok, tiny.train_enc, tiny.query_enc, tmp_path,
                                            [EKFAC])
    assert label == EKFAC and s is not None, extra.get("error")
    assert extra["damping"] == ["bergson damped_inverse", 0.1] and extra["loss_reduction"] == "mean"
    check(s, kron, 0.85, 0.6, "bergson EK-FAC vs kronecker")


@needs_bg
def test_bergson_failure_is_reported_not_raised(tiny, tmp_path, monkeypatch):
    from bench.lds_bergson import EKFAC, bergson_score_sets, import_bergson

    import_bergson()
    import bergson.hessians.pipeline as hp

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(hp, "hessian_pipeline", broken)
    (label, s, extra), = bergson_score_sets(tiny.fresh(), tiny.tok, tiny.train_enc, tiny.query_enc, tmp_path,
                                            [EKFAC])
    assert label == EKFAC and s is None and extra["error"] == "RuntimeError: boom"


@needs_bg
def test_bergson_import_keeps_the_callers_logging():
    import logging

    from bench.lds_bergson import import_bergson

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    import_bergson()
    assert (list(root.handlers), root.level) == before


# ------------------------------------------------------------------------------ bench/lds.py wiring


def test_llm_labels_keep_the_recorded_ones_and_add_the_peers():
    from bench import lds, variants

    before = ["hyperinf, datainf damping", "hyperinf, paper damping", "hyperinf, spectral 0.1", "hyperinf, spectral 1",
              "hyperinf, spectral 3", "hyperinf, spectral 10", "hyperinf, spectral 30", "datainf", "lissa", "tracin",
              "kronecker", "datainf, spectral 1", "datainf, spectral 3", "datainf, spectral 10", "lissa, spectral 1",
              "lissa, spectral 3", "lissa, spectral 10", "kronecker, datainf damping", "kronecker, spectral 1",
              "kronecker, spectral 3", "kronecker, spectral 10"]
    assert lds.LLM_LABELS[:len(before)] == before
    peers = lds.LLM_LABELS[len(before):len(before) + len(lds.LLM_PEER_LABELS)]
    assert peers == list(lds.EKFAC_SCALES) + ["bergson TrackStar", "bergson TrackStar, no mixing", "bergson EK-FAC"]
    # then the query-side variants of the default (bench/variants.py), last
    n = len(before) + len(peers)
    assert lds.LLM_LABELS[n:n + len(variants.LABELS)] == variants.LABELS
    # then the eigenvalue-corrected GFIM at its default and the LLM's damping grid
    eigen = ["eigen", "eigen, datainf damping", "eigen, spectral 1", "eigen, spectral 3", "eigen, spectral 10"]
    assert lds.LLM_LABELS[n + len(variants.LABELS):] == eigen + variants.DAMPED_LABELS
    assert variants.DAMPED_LABELS == ["hyperinf, spectral 0.1, mixed 99", "hyperinf, spectral 0.1, mixed 99, symmetric"]
    assert len(set(lds.LLM_LABELS)) == len(lds.LLM_LABELS)


@pytest.mark.parametrize("kf, bg", [(False, False), (True, False), (False, True), (True, True)])
def test_run_labels_leave_out_the_peers_that_are_missing(monkeypatch, kf, bg):
    from bench import lds

    monkeypatch.setattr(lds, "_have_kronfluence", lambda: kf)
    monkeypatch.setattr(lds, "have_bergson", lambda: bg)
    labels, skipped = lds.run_labels(True)
    assert all(l in labels for l in lds.LLM_LABELS if l not in lds.LLM_PEER_LABELS)
    assert all((l in labels) == kf for l in lds.EKFAC_SCALES)
    assert all((l in labels) == bg for l in lds.BERGSON_LABELS)
    assert len(skipped) == (not kf) + (not bg)
    labels, _ = lds.run_labels(True, no_ekfac=True, no_bergson=True)
    assert not set(labels) & set(lds.LLM_PEER_LABELS)
    # the classifier's labels are as before: only the base EK-FAC label depends on kronfluence
    labels, skipped = lds.run_labels(False)
    assert labels == [l for l in lds.LABELS if kf or l != lds.EKFAC] and len(skipped) == (not kf)
    # --ekfac-scales: only the named scales of Kronfluence's grid, the rest named as skipped
    labels, skipped = lds.run_labels(True, ekfac_scales=[0.01])
    assert [l for l in labels if l in lds.EKFAC_SCALES] == (["kronfluence EK-FAC, spectral 0.01"] if kf else [])
    assert all(l in labels for l in lds.LLM_LABELS if l not in lds.EKFAC_SCALES and (bg or l not in lds.BERGSON_LABELS))
    assert any("(--ekfac-scales)" in n for n in skipped) == kf
    with pytest.raises(ValueError, match="--ekfac-scales: \\[0.5\\] not in the grid"):
        lds.run_labels(True, ekfac_scales=[0.5])


@pytest.mark.skipif(not (HAVE_KF and HAVE_BG), reason="needs both kronfluence and bergson importable "
                    "(CI installs neither)")
def test_pipeline_experiment_yields_the_llm_peers(tiny):
    """PipelineExperiment._llm_peer_score_sets on the tiny model: every peer label, our sign, extra fields
    that bench/defaults_rule.py reads (method, damping)."""
    from bench import lds
    from bench.defaults_rule import setting_of
    from hyperinf_ext.app.data import make_loader

    exp = lds.PipelineExperiment.__new__(lds.PipelineExperiment)
    exp.cfg = lds.LdsConfig(n_train=N_TRAIN, n_val=N_QUERY, max_length=MAX_LEN, model="smollm2")
    exp.ekfac, exp.bergson, exp.causal = True, True, True
    exp.pcfg = SimpleNamespace(fit_batch_size=4)
    exp.data = SimpleNamespace(train=tiny.train, val=tiny.query)
    exp.loaders = SimpleNamespace(tokenizer=tiny.tok, train_encodings=tiny.train_enc,
                                  influence_val=make_loader(tiny.query, tiny.tok, batch_size=4,
                                                            encodings=tiny.query_enc, max_length=MAX_LEN))
    trained = SimpleNamespace(model=tiny.fresh())
    kron = ours(tiny, "kronecker", **SPECTRAL)
    labels = ["kronfluence EK-FAC", "kronfluence EK-FAC, spectral 3", "bergson EK-FAC", "bergson TrackStar"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(exp._llm_peer_score_sets(trained, labels + ["tracin"], {"full_val_accuracy": 1.0}))
    assert [g[0] for g in got] == ["bergson TrackStar", "bergson EK-FAC", "kronfluence EK-FAC",
                                   "kronfluence EK-FAC, spectral 3"]
    for label, s, extra in got:
        assert s is not None and s.shape == (N_QUERY, N_TRAIN), extra
        assert extra["full_val_accuracy"] == 1.0 and "seconds" in extra
        setting_of({"method": extra["method"], "damping": extra["damping"]})  # readable by the frozen rule
    by = {label: s for label, s, _ in got}
    assert spearman(by["kronfluence EK-FAC"].ravel(), kron.ravel()) > 0.85
    assert spearman(by["bergson EK-FAC"].ravel(), kron.ravel()) > 0.85


@needs_kf
def test_kronfluence_classifier_grid_still_in_our_sign(tmp_path):
    """bench/lds_ekfac.py ekfac_pairwise_grid (the MiniLM study's path, which now shares its scoring loop with
    the causal LM's) on a tiny float32 BERT classifier with LoRA: our sign, one column per training example."""
    from tiny_bert import tiny_bert_lora

    from bench.lds_ekfac import ekfac_pairwise_grid
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import TextDataset, make_loader

    tok = make_tokenizer(chat_template=False)
    rows = sentiment_rows(N_TRAIN + N_QUERY, seed=2)
    texts, labels = [r["prompt"] for r in rows], [int(r["response"] == "positive") for r in rows]
    train, query = TextDataset(texts[:N_TRAIN], labels[:N_TRAIN]), TextDataset(texts[N_TRAIN:], labels[N_TRAIN:])

    def fresh():
        return tiny_bert_lora(vocab=len(tok), hidden=16, layers=1, max_positions=MAX_LEN, seed=0).float()

    ref = HyperINF(fresh(), method="kronecker", progress=False, **SPECTRAL).fit(
        make_loader(train, tok, batch_size=4, max_length=MAX_LEN)).scores(
        make_loader(query, tok, batch_size=4, max_length=MAX_LEN)).detach().double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (scale, s, seconds), = ekfac_pairwise_grid(fresh(), tok, train, query, str(tmp_path), [0.1], max_length=MAX_LEN)
    assert scale == 0.1 and seconds > 0 and s.dtype == torch.float64
    check(s.numpy(), ref, 0.85, 0.7, "Kronfluence EK-FAC (classifier) vs kronecker")
