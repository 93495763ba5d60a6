"""The public kernel API on every available backend, against float64 torch.linalg references.

Tolerances: GFIM relative to ‖G‖_F — 1e-12 for float64, 1e-5 for float32 accumulation (the same
for bf16/fp16 inputs, compared with the reference built from the same rounded values).  Schulz
inverses: the relative 2-norm error is bounded by the returned residual, which must be ≤ tol.
"""
import math

import pytest
import torch

import hyperinf_ext as hx
from hyperinf_ext import reference

BACKENDS = hx.available_backends("cpu")


def spd(d: int, cond: float, scale: float = 1.0, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Random SPD [d, d] with eigenvalues log-spaced in [scale/cond, scale]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    ev = torch.logspace(0, -math.log10(cond), d, dtype=torch.float64) * scale
    A = (Q * ev) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def gfim64(grads: torch.Tensor) -> torch.Tensor:
    g = grads.double()
    return torch.einsum("...nri,...nrj->...ij", g, g) / g.shape[-3]


# ---------------------------------------------------------------------------------------------- GFIM


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_gfim_matches_float64_reference(backend, dtype, scale):
    if dtype == torch.float16 and scale == 1e4:
        pytest.skip("1e4 overflows float16 products by design of the dtype, not of the op")
    grads = (torch.randn(9, 3, 77) * scale).to(dtype)
    G = hx.gfim(grads, backend=backend)
    assert G.shape == (77, 77)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = gfim64(grads)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (G.double() - ref).norm() <= tol * ref.norm()
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_batched_layers_noncontiguous(backend):
    base = torch.randn(3, 5, 77, 2, 4, dtype=torch.float64)  # [L, n, d, ?, r]
    grads = base[..., 1, :].transpose(-1, -2)  # [L, n, r, d], non-contiguous
    assert not grads.is_contiguous()
    G = hx.gfim(grads, backend=backend)
    assert G.shape == (3, 77, 77)
    assert torch.allclose(G, gfim64(grads), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_accumulate_streams(backend):
    grads = torch.randn(2, 12, 4, 50)
    acc = torch.zeros(2, 50, 50)
    hx.gfim_accumulate_(acc, grads[:, :5], backend=backend)
    hx.gfim_accumulate_(acc, grads[:, 5:], backend=backend)
    ref = gfim64(grads) * 12
    assert (acc.double() - ref).norm() <= 1e-5 * ref.norm()
    acc2 = torch.zeros(50, 50, dtype=torch.float64)
    out = hx.gfim_accumulate_(acc2, grads[0].double(), backend=backend)
    assert out is acc2
    assert torch.allclose(acc2, ref[0], rtol=1e-12)


def test_gfim_accumulate_noncontiguous_acc():
    grads = torch.randn(4, 2, 10, dtype=torch.float64)
    big = torch.zeros(10, 20, dtype=torch.float64)
    acc = big[:, ::2]
    hx.gfim_accumulate_(acc, grads)
    assert torch.allclose(acc, gfim64(grads) * 4)


def test_datainf_damping_equals_mean_square_gradient():
    grads = torch.randn(20, 8, 33, dtype=torch.float64) * 3
    G = hx.gfim(grads)
    lam = hx.datainf_damping(G, rank=8)
    assert isinstance(lam, float)
    assert math.isclose(lam, 0.1 * float((grads**2).mean()), rel_tol=1e-12)
    lam_b = hx.datainf_damping(torch.stack([G, 2 * G]), rank=8, scale=0.5)
    assert torch.allclose(lam_b, torch.tensor([5 * lam, 10 * lam], dtype=torch.float64))


# --------------------------------------------------------------------------------------------- Schulz


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bound", [True, False])
def test_schulz_batch_with_own_scales(backend, with_bound):
    conds = [1e1, 1e3, 1e4]
    scales = [1e-6, 1.0, 1e4]
    A = torch.stack([spd(77, c, s, seed=i) for i, (c, s) in enumerate(zip(conds, scales))])
    lower = torch.tensor([s / c for c, s in zip(conds, scales)]) if with_bound else None
    X, info = hx.schulz_inverse(A, lower_bound=lower, backend=backend, return_info=True)
    assert info.converged and info.backend == backend
    inv = torch.linalg.inv(A)
    for i in range(3):
        err = torch.linalg.matrix_norm(X[i] - inv[i], 2) / torch.linalg.matrix_norm(inv[i], 2)
        assert float(info.residual[i]) <= 1e-8
        assert float(err) <= float(info.residual[i])  # the residual bounds the relative error


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_float32_and_bf16_inputs(backend):
    A64 = spd(33, 1e2, 5.0)
    for dtype in (torch.float32, torch.bfloat16):
        A = A64.to(dtype)
        X, info = hx.schulz_inverse(A, backend=backend, return_info=True)
        assert X.dtype == torch.float32 and info.converged
        inv = torch.linalg.inv(A.double())  # the inverse of the matrix actually given
        err = torch.linalg.matrix_norm(X.double() - inv, 2) / torch.linalg.matrix_norm(inv, 2)
        assert float(err) <= float(info.residual) <= 1e-2


def test_schulz_scaled_iteration_counts():
    """≤ 14 iterations at κ = 1e4 to a float64 residual of 1e-7 with the bound; plain Schulz needs more."""
    A = spd(128, 1e4)
    lam_min = 1e-4
    _, scaled = hx.schulz_inverse(A, tol=1e-7, lower_bound=lam_min, return_info=True, backend="torch")
    _, plain = hx.schulz_inverse(A, tol=1e-7, return_info=True, backend="torch")
    assert int(scaled.iterations) <= 14
    assert int(plain.iterations) >= int(scaled.iterations) + 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_agrees_with_reference_counts(backend):
    A = torch.stack([spd(40, 1e2, 1e3, seed=1), spd(40, 1e5, 1e-3, seed=2)])
    lower = torch.tensor([1e3 / 1e2, 1e-3 / 1e5])
    X, info = hx.schulz_inverse(A, lower_bound=lower, backend=backend, return_info=True)
    up = hx.ops.spectral_upper_bound(A)
    Xr, it, res, st = reference.schulz_inverse(A, lower, up, hx.ops.DEFAULT_TOL[torch.float64], 100)
    assert torch.equal(info.iterations.reshape(-1), it)
    assert torch.allclose(X, Xr, rtol=1e-9, atol=0)


def test_schulz_loose_lower_bound_still_converges():
    A = spd(60, 1e3)
    X, info = hx.schulz_inverse(A, lower_bound=0.5, return_info=True)  # not a true bound (λmin = 1e-3)
    assert info.converged
    assert torch.allclose(X, torch.linalg.inv(A), rtol=1e-6, atol=1e-6 * float(torch.linalg.inv(A).abs().max()))


def test_schulz_identity_times_scalar_is_immediate():
    A = 7.0 * torch.eye(5, dtype=torch.float64)
    X, info = hx.schulz_inverse(A, lower_bound=7.0, return_info=True)
    assert int(info.iterations) == 0 and torch.allclose(X, A / 49)


def test_schulz_noncontiguous_input():
    A = spd(30, 10.0)
    big = torch.zeros(30, 60, dtype=torch.float64)
    big[:, ::2] = A
    X = hx.schulz_inverse(big[:, ::2])
    assert torch.allclose(X, torch.linalg.inv(A), atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_not_positive_definite(backend):
    ev = torch.tensor([3.0, 1.0, -0.5, 2.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    A = (Q * ev) @ Q.T
    A = 0.5 * (A + A.T)
    assert bool((A.diagonal() > 0).all())  # passes the cheap diagonal test: only the iteration can tell
    with pytest.raises(hx.ConvergenceError, match="not positive definite"):
        hx.schulz_inverse(A, backend=backend)
    with pytest.raises(hx.ConvergenceError, match="not positive definite"):
        hx.schulz_inverse(-torch.eye(3, dtype=torch.float64), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_float32_beyond_resolution_raises(backend):
    A = spd(64, 1e7).float()
    with pytest.raises(hx.ConvergenceError, match="float32") as exc:
        hx.schulz_inverse(A, lower_bound=1e-7, backend=backend)
    assert exc.value.info.status == ["stagnated"]
    X, info = hx.schulz_inverse(A, lower_bound=1e-7, backend=backend, return_info=True, check=False)
    assert info.status == ["stagnated"] and float(info.residual) > 1e-2


def test_schulz_max_iter_raises():
    with pytest.raises(hx.ConvergenceError, match="did not converge in 3 iterations"):
        hx.schulz_inverse(spd(20, 1e6), max_iter=3)


# ------------------------------------------------------------------------------------------ inverse-HVP


@pytest.mark.parametrize("method", ["schulz", "cholesky"])
@pytest.mark.parametrize("vshape", [(77,), (4, 77), (2, 3, 4, 77)])
def test_inverse_hvp_matches_solve(method, vshape):
    grads = torch.randn(30, 4, 77, dtype=torch.float64) * 1e-3
    G = hx.gfim(grads)
    lam = hx.datainf_damping(G, 4)
    v = torch.randn(vshape, dtype=torch.float64)
    out = hx.inverse_hvp(G, v, damping=lam, method=method)
    A = G + lam * torch.eye(77, dtype=torch.float64)
    ref = torch.linalg.solve(A, v.reshape(-1, 77).T).T.reshape(vshape)
    assert out.shape == v.shape
    assert (out - ref).norm() <= 1e-8 * ref.norm()


def test_inverse_hvp_batched_layers():
    G = torch.stack([hx.gfim(torch.randn(10, 2, 20, dtype=torch.float64)) for _ in range(3)])
    lam = hx.datainf_damping(G, 2)
    v = torch.randn(3, 5, 2, 20, dtype=torch.float64)
    out = hx.inverse_hvp(G, v, damping=lam)
    for l in range(3):
        A = G[l] + float(lam[l]) * torch.eye(20, dtype=torch.float64)
        assert torch.allclose(out[l], v[l] @ torch.linalg.inv(A), atol=1e-9)


def test_make_ihvp_reuses_factor():
    G = hx.gfim(torch.randn(10, 2, 20, dtype=torch.float64))
    apply = hx.make_ihvp(G, damping=0.1)
    v = torch.randn(6, 20, dtype=torch.float64)
    assert torch.allclose(apply(v), hx.inverse_hvp(G, v, damping=0.1, method="cholesky"), atol=1e-9)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hx.gfim(torch.randn(4, 5)), r"grads: expected a 3-D or 4-D tensor"),
        (lambda: hx.gfim(torch.ones(2, 2, 3, dtype=torch.int64)), r"grads: unsupported dtype"),
        (lambda: hx.gfim(torch.tensor([[[1.0, float("nan")]]])), r"grads: contains NaN or Inf"),
        (lambda: hx.gfim(torch.zeros(0, 2, 3)), r"grads: no samples"),
        (lambda: hx.gfim_accumulate_(torch.zeros(3, 3), torch.randn(2, 2, 4)), r"grads: last dimension 4 does not match"),
        (lambda: hx.gfim_accumulate_(torch.zeros(3, 4), torch.randn(2, 2, 4)), r"acc: matrices must be square"),
        (lambda: hx.gfim_accumulate_(torch.zeros(3, 3, dtype=torch.bfloat16), torch.randn(2, 2, 3)), r"acc: unsupported dtype"),
        (lambda: hx.gfim_accumulate_(torch.zeros(2, 3, 3), torch.randn(3, 2, 2, 3)), r"grads: 3 layers but acc holds 2"),
        (lambda: hx.schulz_inverse(torch.randn(3, 4)), r"A: matrices must be square"),
        (lambda: hx.schulz_inverse(torch.randn(3)), r"A: expected a"),
        (lambda: hx.schulz_inverse(torch.tensor([[1.0, 2.0], [0.0, 1.0]])), r"A: matrices must be symmetric"),
        (lambda: hx.schulz_inverse(torch.full((2, 2), float("inf"))), r"A: contains NaN or Inf"),
        (lambda: hx.schulz_inverse(torch.eye(2), tol=-1.0), r"tol: expected a positive"),
        (lambda: hx.schulz_inverse(torch.eye(2), lower_bound=-1.0), r"lower_bound: must be finite and non-negative"),
        (lambda: hx.schulz_inverse(torch.eye(2), backend="cuda-magic"), r"backend: unknown backend"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.randn(2, 4), damping=0.1), r"v: last dimension 4 does not match"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.randn(2, 3), damping=0.1, method="lu"), r"method: unknown method"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.randn(2, 3), damping=float("nan")), r"damping: must be finite"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.tensor([1.0, float("nan"), 0.0]), damping=0.1), r"v: contains NaN"),
        (lambda: hx.datainf_damping(torch.eye(3), rank=0), r"rank: expected a positive int"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cholesky_not_positive_definite():
    with pytest.raises(hx.ConvergenceError, match="not positive definite"):
        hx.inverse_hvp(-torch.eye(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), damping=0.0, method="cholesky")


def test_unavailable_backend_is_a_clear_error():
    missing = [b for b in ("cpp", "triton") if b not in BACKENDS]
    for b in missing:
        with pytest.raises(ValueError, match="not available"):
            hx.gfim(torch.randn(2, 2, 3), backend=b)


def test_default_backend_is_fastest_available():
    assert BACKENDS[0] == ("cpp" if "cpp" in BACKENDS else "torch")
    assert "torch" in BACKENDS


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_anywhere_is_caught(backend, bad):
    grads = torch.randn(2, 7, 3, 41)
    grads[1, 5, 2, 40] = bad  # last layer, last column: the O(d) diagonal test must still see it
    with pytest.raises(ValueError, match="grads: contains NaN or Inf"):
        hx.gfim_accumulate_(torch.zeros(2, 41, 41), grads, backend=backend)


def test_overflowing_squares_are_caught():
    with pytest.raises(ValueError, match="overflow"):
        hx.gfim(torch.full((2, 1, 3), 1e30))
