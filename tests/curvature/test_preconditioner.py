"""make_ihvp on gradient dicts: per-layer GFIM + damping + verified inverse, against float64 formulas."""
from __future__ import annotations

import pytest
import torch

import hyperinf_ext as hx
from hyperinf_ext.curvature.damping import layer_damping
from hyperinf_ext.curvature.methods import METHOD_DEFAULTS
from hyperinf_ext.curvature.ihvp import make_gradient_ihvp
from _numerics import ref_solve

F64 = torch.float64
N = 23


def grads(seed: int = 0, dtype=F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"attn.lora_A": torch.randn(N, 4, 9, generator=g, dtype=F64).to(dtype),
            "attn.lora_B": (1e-3 * torch.randn(N, 4, 6, generator=g, dtype=F64)).to(dtype),  # awkward scale
            "head": torch.randn(N, 1, 3, generator=g, dtype=F64).to(dtype)}


def reference(train: dict, query: dict, lam: dict) -> dict:
    out = {}
    for n, g in train.items():
        G = torch.einsum("nrd,nre->de", g.double(), g.double()) / g.shape[0]
        A = G + lam[n] * torch.eye(G.shape[0], dtype=F64)
        out[n] = ref_solve(A, query[n].double().reshape(-1, G.shape[0]).T).T.reshape(query[n].shape)
    return out


@pytest.mark.parametrize("solver", ["auto", "schulz", "cholesky"])
def test_dict_matches_float64_formula(solver):
    train, query = grads(0), {n: v[:5] for n, v in grads(1).items()}
    ihvp = make_gradient_ihvp(train, damping=0.05, solver=solver)
    out = ihvp(query)
    ref = reference(train, query, {n: 0.05 for n in train})
    assert set(out) == set(query)
    for n in query:
        assert out[n].shape == query[n].shape and out[n].dtype == query[n].dtype
        # the verified residual ‖I − A·X‖_F bounds the relative error (plus float64 rounding, κ < 1e3 here)
        err = float((out[n] - ref[n]).norm() / ref[n].norm())
        assert err <= ihvp.info[n]["residual"] + 1e-12
        assert ihvp.info[n]["residual"] <= 1e-8 and (solver == "auto" or ihvp.info[n]["solver"] == solver)
        assert ihvp.factors[n].count == N and ihvp.inverses[n].shape == (ihvp.factors[n].dim,) * 2


def test_auto_damping_is_hyperinf_default_and_streaming_is_the_same():
    train, query = grads(0), grads(1)
    one = make_gradient_ihvp(train)
    rule, scale = METHOD_DEFAULTS["hyperinf"]  # damping="auto" of the dict API is method="hyperinf"'s default
    lam = {n: layer_damping(rule, f.gfim, f.rank, scale) for n, f in one.factors.items()}
    assert {n: f.damping for n, f in one.factors.items()} == lam
    ref = reference(train, query, lam)
    streamed = make_gradient_ihvp(({n: g[i:i + 5] for n, g in train.items()} for i in range(0, N, 5)))
    for n in train:
        torch.testing.assert_close(streamed.factors[n].gfim_sum, one.factors[n].gfim_sum, rtol=1e-13, atol=0)
        # whichever solver auto picked, its verified residual bounds the relative error
        err = float((streamed(query)[n] - ref[n]).norm() / ref[n].norm())
        assert err <= streamed.info[n]["residual"] + 1e-12


def test_flattened_gradients_with_shapes():
    train, query = grads(0), {n: v[:3] for n, v in grads(1).items()}
    shapes = {n: tuple(g.shape[1:]) for n, g in train.items()}
    flat = make_gradient_ihvp({n: g.reshape(N, -1) for n, g in train.items()}, damping=0.1, shapes=shapes)
    nested = make_gradient_ihvp(train, damping=0.1)
    out_flat = flat({n: q.reshape(3, -1) for n, q in query.items()})
    out = nested(query)
    for n in query:
        assert out_flat[n].shape == (3, query[n][0].numel())
        torch.testing.assert_close(out_flat[n].reshape(query[n].shape), out[n], rtol=1e-12, atol=0)
    # extra leading axes on the query are fine
    q2 = {n: q.unsqueeze(0) for n, q in query.items()}
    assert nested(q2)["head"].shape == (1, 3, 1, 3)


def test_float32_gradients_give_float32_out():
    train, query = grads(0, torch.float32), grads(1, torch.float32)
    out = make_gradient_ihvp(train, damping=0.5)(query)
    ref = reference(train, query, {n: 0.5 for n in train})
    for n in query:
        assert out[n].dtype == torch.float32
        assert float((out[n].double() - ref[n]).norm() / ref[n].norm()) < 1e-4


@pytest.mark.parametrize("fit, query, match", [
    (lambda g: g, lambda q: {k: v for k, v in q.items() if k != "head"}, r"query\['head'\]: layer missing"),
    (lambda g: g, lambda q: q | {"extra": q["head"]}, r"query\['extra'\]: layer not fitted"),
    (lambda g: g, lambda q: q | {"head": q["head"].float()}, r"query\['head'\]: dtype torch.float32 does not match"),
    (lambda g: g, lambda q: q | {"head": torch.randn(2, 4, dtype=F64)}, r"query\['head'\]: shape \(2, 4\) matches neither"),
    (lambda g: g, lambda q: q | {"head": q["head"] * float("nan")}, r"query\['head'\]: contains NaN"),
    (lambda g: g, lambda q: [q], r"query: expected a dict"),
])
def test_query_mismatch_names_the_layer(fit, query, match):
    ihvp = make_gradient_ihvp(fit(grads(0)), damping=0.1)
    with pytest.raises(ValueError, match=match):
        ihvp(query(grads(1)))


@pytest.mark.parametrize("train, kw, match", [
    (lambda g: {"a": g["head"].reshape(N, -1)}, {}, r"train_grads\['a'\]: flattened \[n, m\] gradients need shapes"),
    (lambda g: {"a": g["attn.lora_A"].reshape(N, -1)}, {"shapes": {"a": (4, 8)}},
     r"train_grads\['a'\]: 36 values per example, but shapes\['a'\] = \(4, 8\) needs 32"),
    (lambda g: {"a": g["head"]}, {"shapes": {"a": (3, 1)}}, r"train_grads\['a'\]: shape \(23, 1, 3\) does not match"),
    (lambda g: {"a": g["head"]}, {"shapes": {"a": (0, 3)}}, r"shapes\['a'\]: expected \(r, d\)"),
    (lambda g: [{"a": g["head"]}, {"b": g["head"]}], {}, r"train_grads\['(a|b)'\]: layer in batch 1 but not in every batch"),
    (lambda g: [{"a": g["head"]}, {"a": g["head"].float()}], {}, r"train_grads\['a'\]: batch 1 has"),
    (lambda g: [{"a": g["head"]}, {"a": g["attn.lora_A"]}], {}, r"train_grads\['a'\]: batch 1 has \[r, d\] = \[4, 9\]"),
    (lambda g: {"a": g["head"] * float("inf")}, {}, r"train_grads\['a'\]: .*NaN or Inf"),
    (lambda g: {"a": g["head"].long()}, {}, r"train_grads\['a'\]: unsupported dtype"),
    (lambda g: g["head"], {}, r"train_grads: expected a dict"),
    (lambda g: [], {}, r"train_grads: no batches"),
    (lambda g: [{}], {}, r"train_grads: batch 0 is not a non-empty dict"),
    (lambda g: g, {"solver": "lu"}, r"solver: unknown solver 'lu'"),
    (lambda g: g, {"damping": "nope"}, r"damping: unknown rule"),
])
def test_bad_training_input(train, kw, match):
    with pytest.raises(ValueError, match=match):
        make_gradient_ihvp(train(grads(0)), **kw)


def test_public_make_ihvp_dispatches_on_the_first_argument():
    train, query = grads(0), grads(1)
    via_ops = hx.make_ihvp(train, damping=0.1, solver="cholesky")
    direct = make_gradient_ihvp(train, damping=0.1, solver="cholesky")
    for n in query:
        assert torch.equal(via_ops(query)[n], direct(query)[n])
    assert hx.make_ihvp(train, damping=0.1, method="schulz").info["head"]["solver"] == "schulz"  # the old name
    G = torch.einsum("nrd,nre->de", train["head"], train["head"]) / N
    apply = hx.make_ihvp(G, damping=0.1, solver="cholesky")  # a matrix: the single-matrix API as before
    torch.testing.assert_close(apply(query["head"]), via_ops(query)["head"], rtol=1e-12, atol=1e-15)
    assert apply.info.solver == "cholesky" and float(apply.info.residual) < 1e-13
    with pytest.raises(ValueError, match="solver: unknown solver 'lu'"):
        hx.make_ihvp(train, solver="lu")
    with pytest.raises(ValueError, match="damping: expected a non-negative number .* for a matrix G"):
        hx.make_ihvp(G)
    with pytest.raises(ValueError, match="shapes/damping_scale: only with gradient dicts"):
        hx.make_ihvp(G, damping=0.1, shapes={"x": (1, 3)})


def test_a_half_precision_answer_that_overflows_is_an_error_not_inf():
    """The solve runs in float32; its answer cast back to a float16 query's dtype can overflow (the matrix
    front door raised, the gradient-dict one returned ±inf): n < d and a tiny damping make |q̃| ~ 1e5 > 65504."""
    gen = torch.Generator().manual_seed(0)
    train = {"l": (1e-2 * torch.randn(4, 1, 16, generator=gen, dtype=F64)).to(torch.float16)}
    q = (1e-2 * torch.randn(2, 1, 16, generator=gen, dtype=F64)).to(torch.float16)  # off the 4-dim span
    ihvp = make_gradient_ihvp(train, damping=1.5e-7)
    with pytest.raises(ValueError, match=r"'l'.*not finite in torch.float16 .*pass float32 gradients"):
        ihvp({"l": q})
    assert torch.isfinite(make_gradient_ihvp(train, damping=1e-2)({"l": q})["l"]).all()  # in range: answered
