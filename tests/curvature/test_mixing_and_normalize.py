"""curvature/mixing.py and curvature/normalize.py on random float64 gradients, against einsum and loops."""
from __future__ import annotations

import math

import pytest
import torch

from hyperinf_ext.curvature import mixing, normalize
from hyperinf_ext.curvature.damping import damp_layers
from hyperinf_ext.curvature.methods import METHODS, LayerFactor, make_method


def factors(g):
    return {n: LayerFactor(n, x.shape[1], x.shape[2], torch.einsum("nri,nrj->ij", x, x), x.shape[0],
                           rank_sum=torch.einsum("nri,nsi->rs", x, x)) for n, x in g.items()}


@pytest.fixture
def grads():
    gen = torch.Generator().manual_seed(0)
    train = {"a": torch.randn(9, 2, 5, generator=gen, dtype=torch.float64),
             "b": torch.randn(9, 3, 4, generator=gen, dtype=torch.float64)}
    query = {"a": torch.randn(4, 2, 5, generator=gen, dtype=torch.float64),
             "b": torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)}
    return train, query


def test_query_moments_in_batches_equal_einsum(grads):
    _, q = grads
    m = mixing.QueryMoments(torch.float64).add({n: v[:3] for n, v in q.items()}).add({n: v[3:] for n, v in q.items()})
    assert m.count == 4
    for n, v in q.items():
        assert torch.allclose(m.gfim_sum[n], torch.einsum("nri,nrj->ij", v, v), rtol=1e-13, atol=0)
        assert torch.allclose(m.rank_sum[n], torch.einsum("nri,nsi->rs", v, v), rtol=1e-13, atol=0)
    again = mixing.QueryMoments(torch.float64).add({n: v[:3] for n, v in q.items()}).add({n: v[3:] for n, v in q.items()})
    assert m.same_as(again) and not m.same_as(None)
    assert not m.same_as(mixing.QueryMoments(torch.float64).add({n: v[:3] for n, v in q.items()}))


@pytest.mark.parametrize("w", [0.0, 0.5, 99.0])
def test_mixed_factors_are_g_plus_w_q(grads, w):
    train, q = grads
    f = factors(train)
    before = {n: x.gfim_sum.clone() for n, x in f.items()}
    mixed = mixing.mixed_factors(f, mixing.QueryMoments(torch.float64).add(q), w)
    for n, x in train.items():
        G = torch.einsum("nri,nrj->ij", x, x) / 9 + w * torch.einsum("nri,nrj->ij", q[n], q[n]) / 4
        R = torch.einsum("nri,nsi->rs", x, x) / 9 + w * torch.einsum("nri,nsi->rs", q[n], q[n]) / 4
        assert torch.allclose(mixed[n].gfim, G, rtol=1e-13, atol=0)
        assert torch.allclose(mixed[n].rank_sum / mixed[n].count, R, rtol=1e-13, atol=0)
        assert torch.equal(f[n].gfim_sum, before[n])  # the fitted factors stay as they were
    if w == 0:
        assert all(torch.equal(mixed[n].gfim_sum, f[n].gfim_sum) for n in f)


def test_mixed_spectral_damping_and_inverse(grads):
    train, q = grads
    mixed = mixing.mixed_factors(factors(train), mixing.QueryMoments(torch.float64).add(q), 2.0)
    damp_layers(mixed, "spectral", 1.0)
    method = make_method("hyperinf")
    method.prepare(mixed)
    for n, f in mixed.items():
        assert f.damping == pytest.approx(float(f.gfim.trace()) / f.dim, rel=1e-14)
        A = f.gfim + f.damping * torch.eye(f.dim, dtype=torch.float64)
        out = method.precondition({n: q[n]}, mixed, lambda: iter(()))[n]
        assert torch.allclose(out, torch.linalg.solve(A, q[n].reshape(-1, f.dim).T).T.reshape(q[n].shape),
                              rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, -math.inf, True, "2", None, [1.0]])
def test_bad_weight(bad):
    with pytest.raises(ValueError, match="mix_queries"):
        mixing.check_weight(bad)


def test_which_methods_mix():
    assert all(mixing.can_mix(METHODS[n]) for n in ("hyperinf", "exact", "paper", "kronecker"))
    for name in ("tracin", "datainf", "lissa"):
        with pytest.raises(ValueError, match=f"mix_queries: method '{name}'"):
            mixing.check_method(METHODS[name])


def test_empty_or_missing_query_layers(grads):
    train, q = grads
    with pytest.raises(ValueError, match="mix_queries: the query set has no examples"):
        mixing.mixed_factors(factors(train), mixing.QueryMoments(torch.float64), 1.0)
    with pytest.raises(ValueError, match="mix_queries: no query gradients for layer 'b'"):
        mixing.mixed_factors(factors(train), mixing.QueryMoments(torch.float64).add({"a": q["a"]}), 1.0)


def test_query_moments_refuse_nan(grads):
    _, q = grads
    bad = {"a": q["a"].clone()}
    bad["a"][1, 0, 0] = math.nan
    with pytest.raises(ValueError):
        mixing.QueryMoments(torch.float64).add(bad)


# --------------------------------------------------------------------------------------------- normalize

def test_modes():
    assert normalize.check_mode(False) is None and normalize.check_mode(None) is None
    assert normalize.check_mode(True) == "unit"
    for m in normalize.MODES:
        assert normalize.check_mode(m) == m
    for bad in ("cosine", 1, 0, "Unit", 1.0):
        with pytest.raises(ValueError, match="normalize"):
            normalize.check_mode(bad)


def test_joint_and_dual_norms_over_all_layers(grads):
    _, q = grads
    whole = torch.cat([v.reshape(4, -1) for v in q.values()], dim=1)
    assert torch.allclose(normalize.joint_norms(q, torch.float64), whole.norm(dim=1), rtol=1e-14)
    A = {n: torch.eye(v.shape[-1], dtype=torch.float64) * (2.0 + i) for i, (n, v) in enumerate(q.items())}
    pre = {n: v @ torch.linalg.inv(A[n]) for n, v in q.items()}
    expected = (sum((pre[n] * q[n]).sum(dim=(1, 2)) for n in q)).sqrt()
    assert torch.allclose(normalize.dual_norms(pre, q, torch.float64), expected, rtol=1e-14)
    unit = normalize.scale_rows(q, normalize.reciprocal(normalize.joint_norms(q, torch.float64)))
    assert torch.allclose(normalize.joint_norms(unit, torch.float64), torch.ones(4, dtype=torch.float64), rtol=1e-14)


def test_zero_vectors_scale_to_zero_not_nan():
    r = normalize.reciprocal(torch.tensor([0.0, 2.0, -0.0], dtype=torch.float64))
    assert r.tolist() == [0.0, 0.5, 0.0]
    z = {"a": torch.zeros(2, 1, 3, dtype=torch.float64)}
    assert normalize.dual_norms(z, z, torch.float64).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-23), (torch.float32, 1e20), (torch.float64, 1e-170),
                                          (torch.float64, 1e160)])
def test_joint_norms_of_tiny_and_huge_gradients(dtype, scale):
    """Squaring 1e-23 in float32 (1e-170 in float64) underflowed to a norm of 0 (the example then scored 0),
    1e20 overflowed to inf: rows are scaled by their largest entry first.  Reference: the float64 norm of
    the unscaled values times the scale; the sum of 14 squares, a division and a square root each round in
    ``dtype``: rtol 2·16·eps."""
    from hyperinf_ext.curvature.normalize import joint_norms

    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(3, 2, 5, generator=gen, dtype=torch.float64),
            "b": torch.randn(3, 1, 4, generator=gen, dtype=torch.float64)}
    base["a"][2] = 0.0
    base["b"][2] = 0.0  # an all-zero example keeps norm 0
    grads = {k: (v * scale).to(dtype) for k, v in base.items()}
    ref = torch.sqrt(sum((grads[k].double() / scale).reshape(3, -1).pow(2).sum(1) for k in grads)) * scale
    got = joint_norms(grads, dtype)
    assert got.dtype == dtype and bool(torch.isfinite(got).all()) and float(got[2]) == 0.0
    torch.testing.assert_close(got.double(), ref, rtol=32 * torch.finfo(dtype).eps, atol=0)
