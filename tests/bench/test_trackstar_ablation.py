"""bench/trackstar_ablation.py: each curvature against an explicit float64 inverse, the projection against its
definition, the symmetric cosine's invariances, and the grid of labels."""
import numpy as np
import pytest
import torch

from bench import trackstar_ablation as ta

# float64 solves of matrices whose condition number is at most (λ_max + λ)/λ ≤ D/scale + 1 (λ = scale × the
# mean eigenvalue): a few hundred here, so 1e-9 relative leaves a factor > 1e3 over u·κ
RTOL = 1e-9


def _grads(n, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    # awkward scales: rows of very different norms, one all-zero example
    x = torch.randn(n, r, d, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, n, dtype=torch.float64).reshape(-1, 1, 1)
    x[min(2, n - 1)] = 0
    return x


@pytest.mark.parametrize("w", [0.0, 99.0])
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_full_preconditioner_is_the_damped_inverse(w, scale):
    train, query = _grads(7, 3, 5, 0).flatten(1), _grads(4, 3, 5, 1).flatten(1)
    F = train.T @ train / 7 + (w * query.T @ query / 4 if w else 0)
    lam = scale * torch.trace(F) / F.shape[0]
    want = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), query.T).T
    got = ta.full_preconditioner(train, query, w, scale)(query)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


@pytest.mark.parametrize("w", [0.0, 99.0])
def test_gfim_preconditioner_pools_the_rows(w):
    train, query = _grads(6, 4, 5, 2), _grads(3, 4, 5, 3)
    G = sum(g.T @ g for g in train) / 6 + (w * sum(q.T @ q for q in query) / 3 if w else 0)
    lam = 0.1 * torch.trace(G) / 5
    want = torch.stack([torch.linalg.solve(G + lam * torch.eye(5, dtype=G.dtype), q.T).T for q in query])
    got = ta.gfim_preconditioner(train, query, w, 0.1)(query)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


def test_projection_is_a_g_bt():
    g = _grads(3, 2, 7, 4)
    A, B = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    want = torch.stack([(A @ x @ B.T).reshape(-1) for x in g])
    torch.testing.assert_close(ta.project(g, A, B), want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("curvature", ta.CURVATURES)
def test_layer_scores_sum_the_layers_and_symmetric_is_scale_free(curvature):
    train = {"a": _grads(8, 2, 20, 5), "b": _grads(8, 3, 18, 6)}
    query = {"a": _grads(3, 2, 20, 7), "b": _grads(3, 3, 18, 8)}
    cross, qq, gg = ta.layer_scores(train, query, curvature, 0.0, 1.0)
    parts = [ta.layer_scores({k: train[k]}, {k: query[k]}, curvature, 0.0, 1.0) for k in ("a", "b")]
    for i in range(3):
        torch.testing.assert_close(parts[0][i] + parts[1][i], (cross, qq, gg)[i], rtol=1e-12, atol=1e-300)
    # ⟨g H⁻¹, g⟩ ≥ 0 (an SPD inverse), and the zero example scores 0
    assert (gg >= 0).all() and gg[2] == 0 and (cross[:, 2] == 0).all()
    # the cosine does not see a positive factor per training example when the curvature is held fixed
    sym = ta.validation_signal(cross, qq, gg, "symmetric")
    t = torch.linspace(0.5, 4.0, 8, dtype=torch.float64)
    scaled = ta.validation_signal(cross * t, qq, gg * t ** 2, "symmetric")
    np.testing.assert_allclose(scaled, sym, rtol=1e-12, atol=1e-15)
    assert np.all(np.abs(sym) <= 1 + 1e-12)


def test_score_config_labels_every_combination():
    n = 10
    train, query = {"a": _grads(n, 2, 6, 9)}, {"a": _grads(3, 2, 6, 10)}
    flipped = np.array([True, False] * (n // 2))
    out = ta.score_config(train, query, torch.full((n,), 2.0, dtype=torch.float64),
                          torch.full((3,), 2.0, dtype=torch.float64), flipped)
    assert len(out) == len(ta.CURVATURES) * len(ta.MIXES) * len(ta.SCALES) * len(ta.SCORINGS) * len(ta.LOSSES)
    assert all(0 <= v["auc"] <= 1 for v in out.values())
    # with the same T for every example the summed loss only rescales: every ranking (AUC) is the mean loss's
    for k, v in out.items():
        if k.endswith(", summed loss"):
            assert v["auc"] == pytest.approx(out[k[: -len(", summed loss")]]["auc"], abs=1e-12)
    with pytest.raises(ValueError, match="curvature"):
        ta.layer_scores(train, query, "kfac", 0.0, 1.0)
    with pytest.raises(ValueError, match="scoring"):
        ta.validation_signal(torch.zeros(1, n), torch.ones(1), torch.ones(n), "unit")
