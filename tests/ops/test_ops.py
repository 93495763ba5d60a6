"""The public kernel API on every available backend, against float64 torch.linalg references.

Tolerances are a-priori bounds (tests/_numerics.py), never measured values, so the suite passes
whatever summation order the BLAS takes (MKL's paths differ between Intel and AMD).  GFIM: relative
to ‖G‖_F, γ_m·‖|g|ᵀ|g|‖_F/‖G‖_F in the accumulator's dtype (bf16/fp16 inputs are compared with the
reference built from the same rounded values).  Schulz inverses: the relative 2-norm error is
bounded by the returned residual, plus the rounding of that residual in the compute dtype and the
float64 reference's own error (both of order d·u·κ).
"""
import math

import pytest
import torch

import hyperinf_ext as hx
from _numerics import gfim_slack, inverse_reference_slack, rank_gram_slack, ref_inv, ref_solve, residual_slack
from hyperinf_ext.backends import torch as torch_backend

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
    tol = gfim_slack(grads, G.dtype)
    assert (G.double() - ref).norm() <= tol * ref.norm()
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e2])
def test_rank_gram_matches_float64_einsum(acc_dtype, dtype, scale):
    # [L, n, r, d] with odd sizes, non-contiguous (r and d swapped in memory), accumulated in two calls.
    grads = (torch.randn(3, 7, 37, 5, dtype=torch.float64) * scale).transpose(-1, -2).to(dtype)
    acc = torch.zeros(3, 5, 5, dtype=acc_dtype)
    hx.ops.rank_gram_accumulate_(acc, grads[:, :3])
    out = hx.ops.rank_gram_accumulate_(acc, grads[:, 3:])
    assert out is acc and acc.dtype == acc_dtype
    ref = torch.einsum("lnid,lnjd->lij", grads.double(), grads.double())
    assert (acc.double() - ref).norm() <= 2 * rank_gram_slack(grads, acc_dtype) * ref.norm()
    assert torch.equal(acc, acc.transpose(1, 2))


def test_rank_gram_rejects_bad_input():
    acc, g = torch.zeros(2, 4, 4), torch.randn(2, 3, 4, 6)
    bad = [
        (torch.zeros(2, 4, 4, dtype=torch.float16), g, "acc: unsupported dtype"),
        (torch.zeros(4, 4), g, "acc: expected a 3-D"),
        (torch.zeros(2, 4, 5), g, "acc: matrices must be square"),
        (torch.zeros(2, 8, 8)[:, ::2, ::2], g, "acc: must be contiguous"),
        (acc, torch.randn(3, 4, 6), "grads: expected a 4-D"),
        (acc, torch.randn(3, 3, 4, 6), "does not match acc"),
        (acc, torch.randn(2, 3, 5, 6), "does not match acc"),
        (acc, g.to(torch.int32), "grads: unsupported dtype"),
        (acc, torch.randn(2, 3, 4, 6, device="meta"), "grads: a meta tensor"),
        (torch.zeros(1, 4, 4).expand(2, 4, 4), g, "acc: elements share memory"),
        (torch.zeros(2, 4, 4, requires_grad=True), g, "acc: requires grad"),
        ("acc", g, "acc: expected a torch.Tensor"),
    ]
    for a, gr, msg in bad:
        with pytest.raises(ValueError, match=msg):
            hx.ops.rank_gram_accumulate_(a, gr)
    g_nan = g.clone()
    g_nan[1, 2, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="grads: contains NaN or Inf"):
        hx.ops.rank_gram_accumulate_(torch.zeros(2, 4, 4), g_nan)
    empty = torch.zeros(2, 4, 4)
    assert torch.equal(hx.ops.rank_gram_accumulate_(empty, torch.randn(2, 0, 4, 6)), torch.zeros(2, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_batched_layers_noncontiguous(backend):
    base = torch.randn(3, 5, 77, 2, 4, dtype=torch.float64)  # [L, n, d, ?, r]
    grads = base[..., 1, :].transpose(-1, -2)  # [L, n, r, d], non-contiguous
    assert not grads.is_contiguous()
    G = hx.gfim(grads, backend=backend)
    assert G.shape == (3, 77, 77)
    ref = gfim64(grads)
    assert (G - ref).norm() <= gfim_slack(grads, G.dtype) * ref.norm()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_accumulate_streams(backend):
    grads = torch.randn(2, 12, 4, 50)
    acc = torch.zeros(2, 50, 50)
    hx.gfim_accumulate_(acc, grads[:, :5], backend=backend)
    hx.gfim_accumulate_(acc, grads[:, 5:], backend=backend)
    ref = gfim64(grads) * 12
    assert (acc.double() - ref).norm() <= gfim_slack(grads, torch.float32) * ref.norm()
    acc2 = torch.zeros(50, 50, dtype=torch.float64)
    out = hx.gfim_accumulate_(acc2, grads[0].double(), backend=backend)
    assert out is acc2
    assert (acc2 - ref[0]).norm() <= gfim_slack(grads[0], torch.float64) * ref[0].norm()


def test_gfim_accumulate_noncontiguous_acc():
    grads = torch.randn(4, 2, 10, dtype=torch.float64)
    big = torch.zeros(10, 20, dtype=torch.float64)
    acc = big[:, ::2]
    hx.gfim_accumulate_(acc, grads)
    ref = gfim64(grads) * 4
    assert (acc - ref).norm() <= gfim_slack(grads, torch.float64) * ref.norm()


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
    inv = ref_inv(A)
    # The exact residual bounds the relative error; the computed one differs from it by its own
    # rounding, and the reference inverse has an error of its own (both of order d·u·κ).
    slack = residual_slack(A, torch.float64) + inverse_reference_slack(A)
    for i in range(3):
        err = torch.linalg.matrix_norm(X[i] - inv[i], 2) / torch.linalg.matrix_norm(inv[i], 2)
        assert float(info.residual[i]) <= 1e-8
        assert float(err) <= float(info.residual[i]) + float(slack[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_float32_and_bf16_inputs(backend):
    A64 = spd(33, 1e2, 5.0)
    for dtype in (torch.float32, torch.bfloat16):
        A = A64.to(dtype)
        X, info = hx.schulz_inverse(A, backend=backend, return_info=True)
        assert X.dtype == torch.float32 and info.converged
        inv = ref_inv(A.double())  # the inverse of the matrix actually given
        err = torch.linalg.matrix_norm(X.double() - inv, 2) / torch.linalg.matrix_norm(inv, 2)
        slack = residual_slack(A, torch.float32) + inverse_reference_slack(A)
        assert float(info.residual) <= 1e-2
        assert float(err) <= float(info.residual) + float(slack)


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
    Xr, it, res, st = torch_backend.schulz_inverse(A, lower, up, hx.ops.DEFAULT_TOL[torch.float64], 100)
    assert torch.equal(info.iterations.reshape(-1), it)
    # Both are within their residual of A⁻¹ (up to the residuals' rounding): so within the sum of each other.
    slack = info.residual + res + 2 * residual_slack(A, torch.float64)
    diff = torch.linalg.matrix_norm(X - Xr, 2) / torch.linalg.matrix_norm(Xr, 2)
    assert bool((diff <= slack).all()), (diff, slack)


def test_schulz_loose_lower_bound_still_converges():
    A = spd(60, 1e3)
    X, info = hx.schulz_inverse(A, lower_bound=0.5, return_info=True)  # not a true bound (λmin = 1e-3)
    assert info.converged
    inv = ref_inv(A)
    err = torch.linalg.matrix_norm(X - inv, 2) / torch.linalg.matrix_norm(inv, 2)
    assert float(err) <= float(info.residual) + float(residual_slack(A, torch.float64) + inverse_reference_slack(A))


def test_schulz_identity_times_scalar_is_immediate():
    A = 7.0 * torch.eye(5, dtype=torch.float64)
    X, info = hx.schulz_inverse(A, lower_bound=7.0, return_info=True)
    assert int(info.iterations) == 0 and torch.allclose(X, A / 49)


def test_schulz_noncontiguous_input():
    A = spd(30, 10.0)
    big = torch.zeros(30, 60, dtype=torch.float64)
    big[:, ::2] = A
    X, info = hx.schulz_inverse(big[:, ::2], return_info=True)
    inv = ref_inv(A)
    err = torch.linalg.matrix_norm(X - inv, 2) / torch.linalg.matrix_norm(inv, 2)
    assert float(err) <= float(info.residual) + float(residual_slack(A, torch.float64) + inverse_reference_slack(A))


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
    ref = ref_solve(A, v.reshape(-1, 77).T).T.reshape(vshape)
    assert out.shape == v.shape
    # Schulz: within its residual (≤ 1e-8 by default) of the exact inverse; Cholesky: backward
    # stable; both up to d·u·κ rounding, as is the reference solve.
    slack = 1e-8 + float(residual_slack(A, torch.float64) + inverse_reference_slack(A))
    assert (out - ref).norm() <= slack * ref.norm()


def test_inverse_hvp_batched_layers():
    G = torch.stack([hx.gfim(torch.randn(10, 2, 20, dtype=torch.float64)) for _ in range(3)])
    lam = hx.datainf_damping(G, 2)
    v = torch.randn(3, 5, 2, 20, dtype=torch.float64)
    out = hx.inverse_hvp(G, v, damping=lam)
    for l in range(3):
        A = G[l] + float(lam[l]) * torch.eye(20, dtype=torch.float64)
        ref = v[l] @ ref_inv(A)
        slack = 1e-8 + float(residual_slack(A, torch.float64) + inverse_reference_slack(A))
        assert (out[l] - ref).norm() <= slack * ref.norm()


def test_make_ihvp_reuses_factor():
    G = hx.gfim(torch.randn(10, 2, 20, dtype=torch.float64))
    apply = hx.make_ihvp(G, damping=0.1)
    v = torch.randn(6, 20, dtype=torch.float64)
    ref = hx.inverse_hvp(G, v, damping=0.1, method="cholesky")
    A = G + 0.1 * torch.eye(20, dtype=torch.float64)
    slack = 1e-8 + float(residual_slack(A, torch.float64) + inverse_reference_slack(A))
    assert (apply(v) - ref).norm() <= slack * ref.norm()


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
        (lambda: hx.schulz_inverse(torch.eye(2), tol=-1.0), r"tol: expected a number in \(0, 1\), got -1.0"),
        # ‖I − A·X‖ ≤ 10 holds at X = 0: "converged" after 0 steps at 99 % error before
        (lambda: hx.schulz_inverse(torch.eye(2), tol=10.0), r"tol: expected a number in \(0, 1\), got 10.0"),
        (lambda: hx.schulz_inverse(torch.eye(2), tol=1), r"tol: expected a number in \(0, 1\)"),
        # a GFIM has a non-negative diagonal: a negative λ came out of -I before
        (lambda: hx.datainf_damping(-torch.eye(3), 1), r"G: has a negative diagonal entry \(-1\)"),
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


# ------------------------------------------------------------------- float32 accuracy (issue #10 §2)


def _fp32_problem(d: int, kappa: float, seed: int = 0):
    """float32 G with eigenvalues in [1/(10κ), 1] and damping 1/κ: κ(G + λI) ≈ κ (bench/fp32_accuracy.py)."""
    G = spd(d, 10 * kappa, seed=seed).float()
    v = torch.randn(8, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    return G, 1.0 / kappa, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kappa", [1e2, 1e3, 1e4])
def test_float32_schulz_default_reaches_float32_accuracy(backend, kappa):
    """By default float32 Schulz iterates to its rounding floor: within a small factor of a float32
    Cholesky solve of the same input (it stopped at ‖I − AX‖_F ≤ 1e-2 before: up to 45× worse)."""
    d = 48 if backend == "triton" else 128
    G, lam, v = _fp32_problem(d, kappa)
    A64 = G.double() + lam * torch.eye(d, dtype=torch.float64)
    ref = ref_solve(A64, v.double().T).T
    chol = hx.inverse_hvp(G, v, damping=lam, method="cholesky")
    ours = hx.inverse_hvp(G, v, damping=lam, method="schulz", backend=backend)
    err_c = float((chol.double() - ref).norm() / ref.norm())
    err_s = float((ours.double() - ref).norm() / ref.norm())
    # A small factor, and never worse than float32's own a-priori bound d·u·κ.
    assert err_s <= max(4 * err_c, 1e-7), (err_s, err_c)
    assert err_s <= d * 2**-24 * kappa
    _, info = hx.schulz_inverse(A64.float(), lower_bound=lam, backend=backend, return_info=True)
    _, early = hx.schulz_inverse(A64.float(), lower_bound=lam, backend=backend, return_info=True, tol=1e-2)
    assert info.converged and info.tol == 1e-2 and info.extra["stop"] == 0.0
    assert int(early.iterations) <= int(info.iterations) <= int(early.iterations) + 3  # quadratic: 1–2 more


def test_float32_explicit_tol_still_stops_early():
    A = spd(64, 1e3).float()
    _, info = hx.schulz_inverse(A, lower_bound=1e-3, tol=0.5, return_info=True)
    assert info.converged and float(info.residual) <= 0.5 and info.tol == 0.5
    _, full = hx.schulz_inverse(A, lower_bound=1e-3, return_info=True)
    assert int(info.iterations) < int(full.iterations) and float(full.residual) < float(info.residual)


def test_float64_default_is_unchanged():
    A = spd(64, 1e3)
    _, info = hx.schulz_inverse(A, lower_bound=1e-3, return_info=True)
    assert info.tol == 1e-8 and info.extra["stop"] == 1e-8 and float(info.residual) <= 1e-8


# ------------------------------------------------------- range, resolution and bad input (issue #10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-170), (torch.float64, 1e-300), (torch.float64, 1e250),
                                          (torch.float32, 1e-30), (torch.float32, 1e30)])
def test_schulz_extreme_scales_are_exact_or_named(backend, dtype, scale):
    """Entries ≤ 1e-165 used to underflow the Frobenius bound and read "not positive definite"."""
    A64 = spd(12, 1e2, seed=3)
    A = (A64 * scale).to(dtype)
    X, info = hx.schulz_inverse(A, lower_bound=float(1e-2 * scale), backend=backend, return_info=True)
    assert info.converged and bool(torch.isfinite(X).all())
    inv = ref_inv(A.double())
    err = torch.linalg.matrix_norm(X.double() - inv, 2) / torch.linalg.matrix_norm(inv, 2)
    assert float(err) <= float(info.residual) + float(residual_slack(A, dtype) + inverse_reference_slack(A))


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-310), (torch.float32, 1e-42)])
def test_schulz_inverse_beyond_range_is_named(dtype, scale):
    A = (torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64) * scale).to(dtype)
    with pytest.raises(hx.ConvergenceError, match="beyond .*range") as exc:
        hx.schulz_inverse(A)
    assert exc.value.info.status == ["overflow"]


def test_schulz_pd_beyond_float32_resolution_is_not_called_indefinite():
    """A positive-definite matrix with κ ≥ 3e8 in float32: "beyond resolution", not "not positive definite"."""
    A = spd(32, 1e9, seed=5)
    A32 = A.float()
    with pytest.raises(hx.ConvergenceError) as exc:
        hx.schulz_inverse(A32, lower_bound=1e-9)
    msg = str(exc.value)
    assert "resol" in msg and "float64" in msg
    assert "is not positive definite (" not in msg  # only "…to within float32's resolution" may appear


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_empty_batch(backend):
    X, info = hx.schulz_inverse(torch.zeros(0, 4, 4), backend=backend, return_info=True)
    assert X.shape == (0, 4, 4) and info.status == [] and info.converged
    X = hx.schulz_inverse(torch.zeros(2, 0, 5, 5, dtype=torch.float64), lower_bound=0.1)
    assert X.shape == (2, 0, 5, 5) and X.dtype == torch.float64


@pytest.mark.parametrize("method", ["schulz", "cholesky"])
@pytest.mark.parametrize("dtype, scale, vscale", [(torch.float32, 1e-37, 1e3), (torch.float64, 1e-300, 1e10)])
def test_inverse_hvp_overflow_is_named(method, dtype, scale, vscale):
    G = scale * torch.eye(3, dtype=dtype)
    v = vscale * torch.ones(3, dtype=dtype)
    with pytest.raises((ValueError, hx.ConvergenceError), match="overflow|beyond"):
        hx.inverse_hvp(G, v, damping=0.0, method=method)


def test_inverse_hvp_damping_beyond_the_dtype():
    # G + damping·I is beyond float32, its inverse is not: solved range-scaled by a power of two (issue #24)
    out = hx.inverse_hvp(torch.eye(3), torch.ones(3), damping=1e39)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), torch.full((3,), 1e-39, dtype=torch.float64),
                                                         rtol=1e-3, atol=0)


def test_inverse_hvp_empty_v_and_empty_layers():
    out = hx.inverse_hvp(torch.eye(3).expand(2, 3, 3), torch.ones(2, 0, 3), damping=0.1)
    assert out.shape == (2, 0, 3)
    out = hx.inverse_hvp(torch.zeros(0, 3, 3), torch.ones(0, 4, 3), damping=0.1)
    assert out.shape == (0, 4, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hx.inverse_hvp(torch.eye(3), torch.ones(3), damping="x"), r"damping: expected a non-negative number"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.ones(3), damping=None), r"damping: expected a non-negative number"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.ones(3), damping=True), r"damping: expected a non-negative number"),
        (lambda: hx.schulz_inverse(torch.eye(3), lower_bound="x"), r"lower_bound: expected a non-negative number"),
        (lambda: hx.schulz_inverse(torch.eye(3), lower_bound=[1.0, "y"]), r"lower_bound: expected a non-negative number"),
        (lambda: hx.schulz_inverse(torch.eye(3), tol=True), r"tol: expected a number in \(0, 1\)"),
        (lambda: hx.schulz_inverse(torch.eye(3), max_iter=True), r"max_iter: expected a non-negative int"),
        (lambda: hx.schulz_inverse(torch.eye(3, device="meta")), r"A: a meta tensor has no values"),
        (lambda: hx.gfim(torch.ones(2, 1, 3, device="meta")), r"grads: a meta tensor has no values"),
        (lambda: hx.gfim_accumulate_(torch.zeros(3, 3, device="meta"), torch.ones(2, 1, 3)), r"acc: a meta tensor"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.ones(3, device="meta"), damping=0.1), r"v: a meta tensor"),
        (lambda: hx.datainf_damping(torch.eye(3, device="meta"), rank=1), r"G: a meta tensor"),
        (lambda: hx.inverse_hvp(torch.eye(3), torch.ones(3), damping=torch.tensor(0.1, device="meta")), r"damping: expected"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_accumulate_refuses_shared_memory_acc(backend):
    acc = torch.zeros(1, 3).expand(3, 3)  # stride 0: every row is the same memory
    with pytest.raises(ValueError, match="acc: elements share memory"):
        hx.gfim_accumulate_(acc, torch.ones(2, 1, 3), backend=backend)
    assert bool((acc == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_accumulate_refuses_acc_requiring_grad(backend):
    acc = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="acc: requires grad"):
        hx.gfim_accumulate_(acc, torch.ones(2, 1, 3), backend=backend)
    assert bool((acc == 0).all())
    with torch.no_grad():  # allowed where torch allows in-place updates of a leaf (e.g. optimizers)
        hx.gfim_accumulate_(acc, torch.ones(2, 1, 3), backend=backend)
    assert bool((acc == 2).all())


# ------------------------------------------------------------------------------------ Schulz schedule


def test_schulz_schedule_decisions():
    from hyperinf_ext.backends import schedule as ref

    s = ref.SchulzSchedule(d=4, tol=1e-3, max_iter=3)
    assert s.start(0.5, 2.0) == ref.initial_scale(0.5, 2.0)
    assert s.decide(float("nan")) == ref.DIVERGED
    s.start(0.5, 2.0)
    assert s.decide(ref.divergence_limit(4) * 1.01) == ref.DIVERGED
    s.start(0.5, 2.0)
    assert s.decide(1e-3) == ref.CONVERGED and (s.iterations, s.residual, s.rollback) == (0, 1e-3, False)
    # β and the bracket follow step_scale / next_bracket; MAX_ITER after max_iter steps above tol.
    beta0 = s.start(0.5, 2.0)
    a, b = beta0 * 0.5, beta0 * 2.0
    for r in (0.9, 0.6, 0.45):
        assert s.decide(r) is None
        beta, a, b = ref.step_scale(a, b, r)
        assert s.next_beta() == beta
        a, b = ref.next_bracket(a, b, beta)
    assert s.decide(0.2) == ref.MAX_ITER and s.iterations == 3
    # Unscaled steps (no lower bound: β = 1) in the quadratic phase: a residual that fails to halve
    # stagnates; one that grew rolls back to the previous iterate.
    s = ref.SchulzSchedule(d=4, tol=1e-9, max_iter=100)
    s.start(0.0, 1.0)
    for r in (0.9, 0.3):
        assert s.decide(r) is None and s.next_beta() == 1.0
    assert s.decide(0.2) == ref.STAGNATED and not s.rollback and (s.iterations, s.residual) == (2, 0.2)
    s.start(0.0, 1.0)
    for r in (0.9, 0.3):
        assert s.decide(r) is None and s.next_beta() == 1.0
    assert s.decide(0.31) == ref.STAGNATED and s.rollback and (s.iterations, s.residual) == (1, 0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_takes_overflowing_sums_and_finds_one_bad_entry(dtype):
    """The finiteness check's fast path is a sum: finite entries whose sum overflows must pass, and one
    NaN/±inf anywhere (among huge or ordinary entries, any layout) must be refused."""
    from hyperinf_ext.ops.checks import check_finite

    big = torch.full((5, 7), torch.finfo(dtype).max / 4, dtype=dtype)
    check_finite("x", big)
    check_finite("x", big.t())
    for base in (big, torch.ones(5, 7, dtype=dtype)):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for pos in ((0, 0), (4, 6), (2, 3)):
                y = base.clone()
                y[pos] = bad
                with pytest.raises(ValueError, match="NaN or Inf"):
                    check_finite("y", y.t())
