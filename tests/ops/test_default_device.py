"""The library's tensors follow their inputs' device, whatever ``torch.set_default_device`` says.

A factory call without ``device=`` (torch.zeros, torch.tensor, torch.randn with a CPU generator, ...)
lands on the default device.  Users (and the GPU check, through HYPERINF_TEST_DEVICE=cuda) set CUDA as
the default while their data, or the library's CPU-side bookkeeping, stays on the CPU; the mismatch
then fails only on a GPU machine.  "meta" as the default device catches the same class on the CPU:
any tensor the library makes without a device becomes a meta tensor, and the first operation that
mixes it with a CPU tensor, or reads a number out of it, raises.

Each case runs once without and once with the meta default on the same CPU inputs; the results must
be CPU tensors equal to the plain run.  Same inputs, same code path, same CPU kernels: the only slack
allowed is a few ulps of the compute dtype for reductions whose blocking may differ between calls.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from _numerics import unit_roundoff
import hyperinf_ext
from hyperinf_ext import ops, solvers
from hyperinf_ext.backends import available_backends


@contextlib.contextmanager
def default_device(device):
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture(autouse=True)
def _restore_default_device():
    # A failing case must not leave "meta" as the default for the tests after it.
    previous = torch.get_default_device()
    yield
    torch.set_default_device(previous)


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif hasattr(x, "__dataclass_fields__"):
        for name in x.__dataclass_fields__:
            yield from _leaves(getattr(x, name))


def _same(plain, under_meta, ulps: float = 8.0) -> None:
    a, b = list(_leaves(plain)), list(_leaves(under_meta))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert y.device.type == "cpu", f"a result landed on {y.device}"
        assert x.shape == y.shape and x.dtype == y.dtype
        if not x.is_floating_point():
            assert torch.equal(x, y)
            continue
        # Identical inputs and kernels: equal up to a few ulps of the dtype (summation blocking).
        slack = ulps * unit_roundoff(x.dtype) * max(1.0, float(x.abs().nan_to_num(0, 0, 0).max()) if x.numel() else 1.0)
        both_nan = x.isnan() & y.isnan()
        same_inf = x.isinf() & (x == y)
        close = ((x - y).abs() <= slack) | both_nan | same_inf
        assert bool(close.all()), f"max diff {float((x - y).abs().nan_to_num(0).max()):g} > {slack:g}"


def _twice(fn, ulps: float = 8.0):
    torch.manual_seed(0)
    plain = fn()
    torch.manual_seed(0)
    with default_device("meta"):
        under_meta = fn()
    _same(plain, under_meta, ulps)
    return plain


def _spd(B, d, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, d, d + 3, generator=g, dtype=torch.float64)
    return ((M @ M.mT / (d + 3) + 0.5 * torch.eye(d, dtype=torch.float64)) * scale).to(dtype)


def _grads(n=6, r=2, d=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, n, r, d, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------- ops

def test_gfim_and_damping_ops():
    g = _grads()

    def run():
        acc = torch.zeros(3, 5, 5, dtype=torch.float64, device="cpu")
        gram = torch.zeros(3, 2, 2, dtype=torch.float64, device="cpu")
        G = ops.gfim(g)
        return (G, ops.gfim_accumulate_(acc, g), ops.rank_gram_accumulate_(gram, g),
                torch.as_tensor(ops.datainf_damping(G, 2), device="cpu"), ops.spectral_upper_bound(G))

    _twice(run)


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton", "cpp") if b in available_backends("cpu")])
@pytest.mark.parametrize("case", ["plain", "lower", "not_pd", "scaled", "empty"])
def test_schulz_inverse(backend, case):
    dtype = torch.float64 if backend != "triton" else torch.float32
    d = 6 if backend != "triton" else 16
    A = _spd(3, d, dtype)
    kw = {}
    if case == "lower":
        kw["lower_bound"] = torch.full((3,), 0.4, dtype=torch.float64)
    elif case == "not_pd":
        A = A.clone()
        A[1, 0, 0] = -1.0
        A[1] = (A[1] + A[1].mT) / 2
        kw["check"] = False
    elif case == "scaled":  # entries beyond 2^64: the power-of-two rescaling path
        A = A * 2.0 ** 80
    elif case == "empty":
        A = A[:0]
    _twice(lambda: ops.schulz_inverse(A, backend=backend, return_info=True, **kw))


@pytest.mark.parametrize("solver", ["auto", "schulz", "cholesky", "cg"])
def test_make_ihvp_and_inverse_hvp(solver):
    G = _spd(2, 7)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)

    def run():
        out = hyperinf_ext.inverse_hvp(G, v, damping=0.1, solver=solver, return_info=True)
        if solver == "cg":  # cg keeps no inverse to reuse: make_ihvp does not offer it
            return out
        apply = hyperinf_ext.make_ihvp(G, damping=0.1, solver=solver)
        return out, apply(v), apply.info

    _twice(run)


def test_make_ihvp_gradient_dict():
    g = torch.Generator().manual_seed(4)
    train = {"a": torch.randn(8, 2, 5, generator=g, dtype=torch.float64),
             "b": torch.randn(8, 3, 4, generator=g, dtype=torch.float64)}
    query = {k: v[:3] for k, v in train.items()}
    _twice(lambda: hyperinf_ext.make_ihvp(train)(query))


# --------------------------------------------------------------------------------------- solvers

@pytest.mark.parametrize("solver", ["auto", "schulz", "cholesky"])
def test_spd_inverse(solver):
    G = _spd(3, 6)
    _twice(lambda: solvers.spd_inverse(G, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, device="cpu"),
                                       solver=solver))


@pytest.mark.parametrize("solver", ["auto", "schulz", "cholesky", "cg"])
def test_solve_rows(solver):
    G = _spd(2, 6)
    g = torch.Generator().manual_seed(5)
    V = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    _twice(lambda: solvers.solve_rows(G, 0.1, V, solver=solver))


def test_schulz_variants_and_krylov():
    A = _spd(2, 6)
    A32 = A.float()
    big = _spd(1, 128)
    g = torch.Generator().manual_seed(6)
    V = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    grads = torch.randn(10, 6, generator=g, dtype=torch.float64)

    def run():
        return (solvers.scaled_schulz(A, lower=0.5),
                solvers.scaled_schulz(A32, lower=0.5),
                solvers.scaled_schulz(big, lower=0.5),  # d >= POLISH_MIN_D: float32 phase, float64 polish
                solvers.paper_schulz(A / 4),
                solvers.cholesky_inverse(A),
                solvers.cg(A, V, max_iter=50),
                solvers.neumann(grads[0], lambda u: solvers.fisher_product(u, grads, 0.5), scale=2.0, iterations=5),
                solvers.datainf(grads[:2], [grads[:5], grads[5:]], 0.5, 10))

    _twice(run)


@pytest.mark.parametrize("low", ["bf16", "tf32"])
@pytest.mark.parametrize("case", ["plain", "lower", "fallback", "scaled"])
def test_mixed_schulz(low, case):
    A = _spd(3, 8, torch.float32)
    kw = {}
    if case == "lower":
        kw["lower"] = 0.4
    elif case == "fallback":  # a tolerance the mixed path cannot meet at first: the float32 redo
        kw["tol"] = 1e-5
        kw["check"] = False
    elif case == "scaled":  # beyond 2^64: handed to ops.schulz_inverse as a whole
        A = A * 2.0 ** 70
    # float32 throughout; the plain and meta runs take the same steps on the same data.
    _twice(lambda: solvers.mixed_schulz(A, low=low, **kw))


# ------------------------------------------------------------------------------------ attributor

@pytest.fixture(scope="module")
def bert():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from tiny_bert import tiny_bert_lora

    model = tiny_bert_lora(vocab=30, layers=1, seed=0)  # built before any default device is set
    g = torch.Generator().manual_seed(7)

    def data(n, offset):
        return {"input_ids": torch.randint(1, 30, (n, 6), generator=g),
                "attention_mask": torch.ones(n, 6, dtype=torch.long),
                "labels": torch.randint(0, 2, (n,), generator=g),
                "index": torch.arange(offset, offset + n, device="cpu")}

    return model, data(6, 0), data(3, 0)


def _split(data, size):
    n = data["labels"].shape[0]
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


@pytest.mark.parametrize("method", ["hyperinf", "exact", "datainf", "tracin", "lissa", "kronecker"])
def test_attributor_fit_and_scores(bert, method):
    from hyperinf_ext import HyperINF

    model, train, query = bert

    def run():
        attr = HyperINF(model, method=method, progress=False).fit(_split(train, 4))
        return attr.scores(_split(query, 2)), attr.mean_scores(_split(query, 2)), attr.self_scores()

    # Autograd on the same model and batches: the same CPU kernels, bit for bit up to blocking.
    _twice(run, ulps=64.0)
