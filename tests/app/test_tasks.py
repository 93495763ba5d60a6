"""Tests of the task building blocks: ranking metrics, the detection plot, the shared query gradient."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hyperinf_ext.app.tasks.metrics import detection_curve, found_at, roc_auc
from hyperinf_ext.app.tasks.mislabeled import plot_detection_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_force_auc(scores, positives) -> float:
    """P(pos > neg) + ½·P(tie) over every positive/negative pair."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    # few distinct values, so many ties within and across classes
    scores = rng.integers(0, 4 + seed, n).astype(float)
    positives = rng.random(n) < 0.3
    positives[0], positives[1] = True, False
    assert roc_auc(scores, positives) == pytest.approx(brute_force_auc(scores, positives), abs=1e-12)


def test_roc_auc_continuous_scores_and_inputs():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    positives = rng.random(200) < 0.2
    expected = brute_force_auc(scores, positives)
    assert roc_auc(scores, positives) == pytest.approx(expected)
    assert roc_auc(list(scores), list(positives)) == pytest.approx(expected)  # plain lists
    torch = pytest.importorskip("torch")
    assert roc_auc(torch.tensor(scores), torch.tensor(positives)) == pytest.approx(expected)


def test_roc_auc_perfect_reversed_and_constant():
    positives = np.array([1, 1, 0, 0, 0], dtype=bool)
    assert roc_auc([5, 4, 3, 2, 1], positives) == 1.0
    assert roc_auc([1, 2, 3, 4, 5], positives) == 0.0
    assert roc_auc([7, 7, 7, 7, 7], positives) == 0.5


def test_roc_auc_random_scores_near_half():
    rng = np.random.default_rng(1)
    auc = roc_auc(rng.random(20000), rng.random(20000) < 0.2)
    assert abs(auc - 0.5) < 0.02


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="length"):
        roc_auc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([1.0, float("nan")], [True, False])


def test_detection_curve_endpoints_monotone_and_ranking():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, 50).astype(float)
    positives = rng.random(50) < 0.3
    x, y = detection_curve(scores, positives)
    assert x.shape == y.shape == (51,)
    assert (x[0], y[0]) == (0.0, 0.0) and (x[-1], y[-1]) == (1.0, 1.0)
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) >= -1e-12)

    # perfect ranking: all 2 positives found after inspecting 2 of 4
    x, y = detection_curve([4, 3, 2, 1], [True, True, False, False])
    np.testing.assert_allclose(y, [0, 0.5, 1, 1, 1])


def test_detection_curve_ties_are_expected_value():
    # all tied: a random order finds positives in proportion, i.e. the diagonal
    x, y = detection_curve([1.0] * 8, [True, False] * 4)
    np.testing.assert_allclose(y, x)
    # the area under the tie-aware curve equals the AUC-based expectation regardless of input order
    a = detection_curve([1, 1, 0, 0], [True, False, True, False])[1]
    b = detection_curve([1, 1, 0, 0], [False, True, False, True])[1]
    np.testing.assert_allclose(a, b)


def test_found_at():
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    positives = [True, False, True, False, False, False, False, False, False, True]
    assert found_at(scores, positives, 0.0) == 0.0
    assert found_at(scores, positives, 0.1) == pytest.approx(1 / 3)
    assert found_at(scores, positives, 0.3) == pytest.approx(2 / 3)
    assert found_at(scores, positives, 1.0) == 1.0
    with pytest.raises(ValueError):
        found_at(scores, positives, 1.5)


def test_plot_detection_curves_writes_png(tmp_path):
    x, y = detection_curve([3, 2, 1, 0], [True, False, True, False])
    path = plot_detection_curves({"a": (x, y), "b": (x, x)}, tmp_path / "sub" / "plot.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def one_thread():
    """One torch thread (restored after): several threads oversubscribe a shared 2-core machine."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shared_validation_gradients_equal_mean_scores(one_thread):
    """The tasks compute the validation gradients once; scores must equal a direct mean_scores."""
    pytest.importorskip("peft")
    import torch

    from hyperinf_ext.attributor.hyperinf import HyperINF
    from hyperinf_ext.app.data import load_rotten_tomatoes, make_loader, split_dataset
    from hyperinf_ext.app.tasks.pipeline import score_method, validation_gradients
    from hyperinf_ext.app.models.training import load_lora_model, load_tokenizer

    tok = load_tokenizer()
    model = load_lora_model(seed=0)
    with torch.no_grad():  # a fresh LoRA has B = 0, hence zero A-gradients; make every layer non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    train, val = split_dataset(load_rotten_tomatoes(), 12, 6, seed=0)
    tl = make_loader(train, tok, batch_size=5, sort_by_length=True, max_length=24)
    vl = make_loader(val, tok, batch_size=4, sort_by_length=True, max_length=24)
    attr = HyperINF(model, method="tracin", progress=False).fit(tl)
    queries, seconds = validation_gradients(attr, vl)
    assert seconds >= 0
    for method in ("exact", "datainf", "tracin"):
        shared, timing = score_method(attr, queries, method, "datainf")
        direct = attr.use(method, damping="datainf").mean_scores(vl).double().numpy()
        np.testing.assert_allclose(shared, direct, rtol=1e-9, atol=1e-12)
        assert timing["seconds"] >= 0 and set(timing) >= {"prepare_seconds", "dot_seconds"}


def test_damping_list_with_rule_factors():
    """Damping lists accept rule:factor; score_method passes the factor as damping_scale."""
    from hyperinf_ext.curvature.methods import parse_dampings, split_damping
    from hyperinf_ext.app.tasks.pipeline import score_method

    assert parse_dampings("spectral:3, datainf,1e-3,spectral:3.0,paper:0.5") == ["spectral:3", "datainf", 0.001,
                                                                                "paper:0.5"]
    assert split_damping("spectral:3") == ("spectral", 3.0) and split_damping(0.01) == (0.01, None)
    for bad in ("spectral:x", "spectral:0", "spectral:-1", "auto:3", "0.1:2", "spectral:inf"):
        with pytest.raises(ValueError, match="^damping: "):  # the parameter, not a CLI option (the CLI adds it)
            parse_dampings(bad)

    class FakeAttr:
        timings: dict = {}

        def __init__(self):
            self.calls = []

        def use(self, method, **kw):
            self.calls.append((method, kw))

        def mean_scores(self, queries):
            import torch

            return torch.zeros(3, dtype=torch.float64)

    attr = FakeAttr()
    score_method(attr, None, "hyperinf", "spectral:10")
    score_method(attr, None, "hyperinf", "datainf")
    assert attr.calls == [("hyperinf", {"damping": "spectral", "damping_scale": 10.0}),
                          ("hyperinf", {"damping": "datainf"})]


def test_pipeline_tokenizes_each_split_once():
    """build_loaders: one tokenizer call per split, shared by the fine-tuning, evaluation and influence loaders."""
    pytest.importorskip("transformers")
    from hyperinf_ext.app.data import load_rotten_tomatoes, split_dataset
    from hyperinf_ext.app.tasks.pipeline import PipelineConfig, PreparedData, build_loaders
    from hyperinf_ext.app.models.training import load_tokenizer

    tok = load_tokenizer()
    calls = []

    def counting(texts, **kw):
        calls.append(len(texts))
        return tok(texts, **kw)

    counting.pad_token_id = tok.pad_token_id
    counting.padding_side = tok.padding_side
    train, val = split_dataset(load_rotten_tomatoes(), 20, 8, seed=0)
    data = PreparedData(train, val, list(train.labels), np.zeros(20, dtype=bool), "rt", 28)
    for fit_batch, separate_val in ((32, False), (4, True)):
        calls.clear()
        cfg = PipelineConfig(n_train=20, n_val=8, batch_size=6, fit_batch_size=fit_batch, max_length=24)
        loaders = build_loaders(cfg, data, counting)
        assert calls == [20, 8]
        assert (loaders.influence_val is not loaders.evaluation) == separate_val
        for loader, n in ((loaders.finetune, 20), (loaders.influence_train, 20), (loaders.evaluation, 8),
                          (loaders.influence_val, 8)):
            assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(n))
        assert calls == [20, 8]  # iterating pads the cached token ids, it does not tokenize again


def test_equal_rows_are_marked_within_one_signal():
    """With --signal both, hyperinf's validation row equals exact's validation row, its self row exact's
    self row — never across signals (the scores differ)."""
    from hyperinf_ext.app.tasks.mislabeled import MethodResult, _mark_equal

    rows = [MethodResult("hyperinf", "auto", label, label, signal) for label, signal in
            (("hyperinf", "validation"), ("hyperinf · self", "self"))]
    rows += [MethodResult("exact", "auto", label, label, signal) for label, signal in
             (("exact", "validation"), ("exact · self", "self"))]
    for r in rows:
        r.damping_rule, r.damping_values = "spectral × 3", (1e-3, 2e-3)
    _mark_equal(rows)
    assert [r.same_as for r in rows] == ["exact", "exact · self", None, None]
