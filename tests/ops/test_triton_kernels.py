"""Numerics of the Triton kernels, run on CPU tensors through the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported.  Sizes are small (the
interpreter executes every tl op in Python) but odd, so every masked / multi-tile path runs.
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import hyperinf_ext  # noqa: E402
from hyperinf_ext import ops  # noqa: E402
from hyperinf_ext.backends import schedule as reference  # noqa: E402
from hyperinf_ext.backends import torch as torch_backend  # noqa: E402
from hyperinf_ext.backends import triton as launchers  # noqa: E402
from hyperinf_ext.errors import ConvergenceError  # noqa: E402
from hyperinf_ext.kernels import gfim as kgfim  # noqa: E402
from hyperinf_ext.kernels import schulz as kschulz  # noqa: E402
from _numerics import (U64, agree_slack, cond2, gfim_acc_slack, inverse_reference_slack, inverses_agree, ref_inv,  # noqa: E402
                       iterations_agree, residual_slack, schulz_runs_agree)

pytestmark = pytest.mark.skipif(
    not (ops.backends.triton_interpreter() or os.environ.get("HYPERINF_TEST_DEVICE") == "cuda"),
    reason="needs TRITON_INTERPRET=1 before triton is imported, or HYPERINF_TEST_DEVICE=cuda (tests/conftest.py)",
)

# ‖acc − exact‖_F / ‖exact‖_F allowed: the a-priori bound of an m-term sum in the accumulator dtype
# (_numerics.gfim_acc_slack; was a fixed 1e-5 / 1e-13: with Gaussian grads the bound is ≈ 2.6e-6 / 1e-14
# at m = 15 and 8.5e-6 / 3e-14 at m = 37, so the new check is tighter, yet valid for any summation order).  fp16/bf16 inputs are compared
# with the exact product of the SAME rounded values, so only the accumulation error remains.  A
# mis-mapped tile, a lost K chunk or an unmirrored lower triangle is off by ≥ 1e-1.


def _gfim_tol(acc0: torch.Tensor, g: torch.Tensor) -> float:
    return gfim_acc_slack(g.to(acc0.dtype), acc0.dtype, acc0)


def _exact_gfim(acc0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """acc0 + gᵀg in float64 from the values the kernel sees (g rounded to acc's dtype, as the reference)."""
    g64 = g.to(acc0.dtype).double()
    return acc0.double() + torch.einsum("lmi,lmj->lij", g64, g64)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _sym(L: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    a = torch.randn(L, d, d, dtype=torch.float64)
    return (a + a.transpose(1, 2)).to(dtype)


# --------------------------------------------------------------------------------------------------
# GFIM


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("d", [77, 33, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gfim_matches_float64_einsum(dtype, d, L):
    acc_dtype = ops.compute_dtype(dtype)
    n, r = 5, 3  # m = 15: not a multiple of BLOCK_K
    for scale in (1e-6, 1.0, 1e4):
        g = (torch.randn(L, n * r, d, dtype=torch.float64) * scale).to(dtype)
        acc = torch.zeros(L, d, d, dtype=acc_dtype)
        out = launchers.gfim_accumulate_(acc, g)
        assert out is acc
        assert _rel(acc, _exact_gfim(torch.zeros_like(acc), g)) <= _gfim_tol(torch.zeros_like(acc), g)
        # Mirror exactness: the lower triangle is a bitwise copy of the upper one.
        assert torch.equal(acc, acc.transpose(1, 2))


@pytest.mark.parametrize(
    "in_dtype, acc_dtype",
    [
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float64),
        (torch.float16, torch.float64),
        (torch.float32, torch.float64),
    ],
)
def test_gfim_mixed_dtypes(in_dtype, acc_dtype):
    g = torch.randn(2, 15, 40, dtype=torch.float64).to(in_dtype)
    acc0 = _sym(2, 40, acc_dtype)
    acc = acc0.clone()
    launchers.gfim_accumulate_(acc, g)
    assert _rel(acc, _exact_gfim(acc0, g)) <= _gfim_tol(acc0, g)


def _strided_views(L, m, d, dtype):
    base = torch.randn(L, d, m, dtype=torch.float64).to(dtype)
    yield "transposed", base.transpose(1, 2)  # stride along d is m
    big = torch.randn(2 * L, 3 * m, d + 5, dtype=torch.float64).to(dtype)
    yield "sliced", big[::2, ::3, 2 : d + 2]  # every stride > the contiguous one
    row = torch.randn(1, 1, d, dtype=torch.float64).to(dtype)
    yield "expanded", row.expand(L, m, d)  # zero strides over layers and rows
    perm = torch.randn(d, L, m, dtype=torch.float64).to(dtype)
    yield "permuted", perm.permute(1, 2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gfim_non_contiguous_grads(dtype):
    L, m, d = 3, 15, 33
    for name, g in _strided_views(L, m, d, dtype):
        assert not g.is_contiguous(), name
        acc = torch.zeros(L, d, d)
        launchers.gfim_accumulate_(acc, g)
        ref = _exact_gfim(torch.zeros(L, d, d), g)
        assert _rel(acc, ref) <= _gfim_tol(torch.zeros(L, d, d), g), name
        assert torch.equal(acc, acc.transpose(1, 2)), name


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_gfim_streaming_equals_one_call(acc_dtype):
    L, d = 2, 77
    g1 = torch.randn(L, 15, d, dtype=acc_dtype)
    g2 = torch.randn(L, 22, d, dtype=acc_dtype)
    acc0 = _sym(L, d, acc_dtype)
    two = acc0.clone()
    launchers.gfim_accumulate_(two, g1)
    launchers.gfim_accumulate_(two, g2)
    one = acc0.clone()
    launchers.gfim_accumulate_(one, torch.cat([g1, g2], dim=1))
    # Equal up to the order of the float additions.
    tol = _gfim_tol(acc0, torch.cat([g1, g2], dim=1))
    assert _rel(two, one.double()) <= agree_slack(tol)
    assert _rel(one, _exact_gfim(acc0, torch.cat([g1, g2], dim=1))) <= tol
    # Accumulating into a symmetric acc keeps it exactly symmetric.
    assert torch.equal(two, two.transpose(1, 2)) and torch.equal(one, one.transpose(1, 2))


def test_gfim_many_tiles_small_blocks():
    # 16-wide tiles: d = 150 gives 10 tile rows, 55 (i <= j) programs, checking the in-kernel
    # linear-index → tile-pair mapping well past the first few pairs; m = 37 leaves a partial K chunk.
    cfg = kgfim.GfimConfig(block_d=16, block_k=16, num_warps=1, num_stages=1)
    g = torch.randn(1, 37, 150)
    acc = torch.zeros(1, 150, 150)
    launchers.gfim_accumulate_(acc, g, config=cfg)
    assert _rel(acc, _exact_gfim(torch.zeros(1, 150, 150), g)) <= _gfim_tol(torch.zeros(1, 150, 150), g)
    assert torch.equal(acc, acc.transpose(1, 2))


def test_gfim_tf32_flag():
    g = torch.randn(2, 15, 33)
    acc = torch.zeros(2, 33, 33)
    launchers.gfim_accumulate_(acc, g, input_precision="tf32")
    # The interpreter multiplies in full fp32; on a GPU TF32 rounds each input to 2⁻¹¹ (was a fixed 2e-3,
    # now ≈ 1e-3·‖|g|ᵀ|g|‖_F/‖gᵀg‖_F); an fp32 product path wrongly demoted to bf16 (u = 2⁻⁸) exceeds it
    tol = gfim_acc_slack(g, torch.float32, input_roundoff=2.0**-11)
    assert _rel(acc, _exact_gfim(torch.zeros(2, 33, 33), g)) <= tol
    with pytest.raises(ValueError, match="input_precision"):
        launchers.gfim_accumulate_(acc, g, input_precision="bf16x9")


# --------------------------------------------------------------------------------------------------
# Schulz


def _spd(d: int, cond: float, scale: float, seed: int) -> torch.Tensor:
    """Symmetric positive definite [d, d] float64 with eigenvalues scale·logspace(1, 1/cond)."""
    gen = torch.Generator(device=torch.get_default_device()).manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    ev = torch.logspace(0.0, -math.log10(cond), d, dtype=torch.float64) * scale
    a = (q * ev) @ q.T
    return 0.5 * (a + a.T)


def _batch(d, specs, dtype):
    """[B, d, d] of the (scale, cond) specs, and their exact smallest eigenvalues (float64 [B])."""
    A = torch.stack([_spd(d, cond, scale, seed) for seed, (scale, cond) in enumerate(specs)])
    lam_min = torch.tensor([scale / cond for scale, cond in specs], dtype=torch.float64)
    return A.to(dtype).contiguous(), lam_min


# (scale, condition number): every scale with every decade of conditioning somewhere in the batch.
SPECS = [(1e-6, 1e1), (1.0, 1e2), (1e4, 1e3), (1.0, 1e4)]


def _compare_with_reference(A, lower, tol, max_iter, **kw):
    upper = ops.spectral_upper_bound(A)
    lower = torch.minimum(lower, upper)
    X, it, res, st = launchers.schulz_inverse(A, lower, upper, tol, max_iter, **kw)
    Xr, itr, resr, str_ = torch_backend.schulz_inverse(A, lower, upper, tol, max_iter)
    assert X.dtype == A.dtype and X.shape == A.shape
    assert it.dtype == torch.int64 and res.dtype == torch.float64 and st.dtype == torch.int64
    # equal decisions where tol is above the residual's rounding (was exact equality everywhere)
    assert schulz_runs_agree(it, st, itr, str_, A, ops.compute_dtype(A.dtype), tol), (it, st, itr, str_)
    return X, it, res, st, Xr, resr


@pytest.mark.parametrize("with_lower", [False, True], ids=["no-lower", "lower"])
@pytest.mark.parametrize("d", [77, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_schulz_matches_reference_and_inverse(dtype, d, with_lower):
    A, lam_min = _batch(d, SPECS, dtype)
    lower = 0.9 * lam_min if with_lower else torch.zeros(len(SPECS), dtype=torch.float64)
    tol = ops.DEFAULT_TOL[dtype]
    X, it, res, st, Xr, resr = _compare_with_reference(A, lower, tol, 100)
    assert st.tolist() == [reference.CONVERGED] * len(SPECS)
    # Same residual up to rounding: each computed residual is within residual_slack (d^1.5·u·κ, was the
    # probabilistic κ·eps·√d) of its exact value, and the last step squares the previous residual, so a
    # relative change there shows up doubled (1e-3·resr).  A wrong iterate is off by O(res).
    floor = residual_slack(A, dtype)
    assert bool(((res - resr).abs() <= 1e-3 * resr + 2 * floor).all()), (res, resr, floor)
    assert bool((res <= tol).all())
    inv = ref_inv(A.double())
    for i in range(len(SPECS)):
        # The exact residual ‖I − A·X‖_F bounds the relative error ‖X − A⁻¹‖₂/‖A⁻¹‖₂; the computed one
        # is off by its rounding in the dtype, and the float64 reference inverse by its own.
        e2 = torch.linalg.matrix_norm(X[i].double() - inv[i], 2)
        err = float(e2 / torch.linalg.matrix_norm(inv[i], 2))
        slack = float(residual_slack(A[i], dtype) + inverse_reference_slack(A[i]))
        assert err <= float(res[i]) + slack, (i, err, float(res[i]), slack)
        # both within their residual of A⁻¹ (was 1e-4 / 1e-10 Frobenius: float64 κ = 1e4 rounding is ~κ·u)
        assert inverses_agree(X[i : i + 1], Xr[i : i + 1], A[i : i + 1], res[i : i + 1], resr[i : i + 1], dtype)
    if with_lower:
        # The optimal scaling with a known lower bound needs fewer steps than plain Schulz.
        zeros = torch.zeros(len(SPECS), dtype=torch.float64)
        _, it0, _, _ = torch_backend.schulz_inverse(A, zeros, ops.spectral_upper_bound(A), tol, 100)
        assert bool((it <= it0).all())


def test_schulz_multi_tile_config():
    # 32-wide tiles with 2-row groups: d = 77 is 3×3 tiles (last group partial), 3 K chunks.
    cfg = kschulz.SchulzConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_warps=1, num_stages=1)
    A, lam_min = _batch(77, [(1e-3, 1e3)], torch.float64)
    X, it, res, st, Xr, resr = _compare_with_reference(A, 0.9 * lam_min, 1e-8, 100, config=cfg)
    assert st.tolist() == [reference.CONVERGED]
    assert inverses_agree(X, Xr, A, res, resr, torch.float64)  # was Frobenius 1e-10 at κ = 1e3


def test_schulz_max_iter_and_zero_budget():
    A, _ = _batch(33, [(1.0, 1e3), (1.0, 1e1)], torch.float64)
    for max_iter in (0, 3):
        X, it, res, st, Xr, resr = _compare_with_reference(A, torch.zeros(2, dtype=torch.float64), 1e-8, max_iter)
        assert st.tolist() == [reference.MAX_ITER] * 2
        assert it.tolist() == [max_iter] * 2
        # Before convergence ‖X_k·A‖ ≤ 2^k: each step's GEMMs round at ≈ 3·γ_d·2^k relative and the
        # next step at most doubles a perturbation, so ≤ 3·4^k·d^1.5·u64 max-norm after k steps
        # (4e-12 at k = 3; was 1e-12); a skipped or repeated step changes X by O(1).
        assert _rel(X, Xr.double()) <= 3 * 4.0**max_iter * 33**1.5 * U64
        # |‖I − AX‖ − ‖I − AXr‖| ≤ ‖A(X − Xr)‖_F, plus each residual's rounding (was rtol 1e-10)
        gap = torch.linalg.matrix_norm(A @ (X - Xr))
        assert bool(((res - resr).abs() <= gap + 2 * residual_slack(A, torch.float64)).all()), (res, resr)


def test_schulz_non_pd_diverges_while_batchmate_converges():
    # Positive diagonal (so ops' cheap check would let it through) but one negative eigenvalue.
    d = 33
    gen = torch.Generator().manual_seed(3)  # CPU draw, then to the test device (HYPERINF_TEST_DEVICE)
    draw = torch.randn(d, d, generator=gen, dtype=torch.float64, device="cpu").to(torch.get_default_device())
    q, _ = torch.linalg.qr(draw)
    ev = torch.linspace(1.0, 0.1, d, dtype=torch.float64)
    ev[-1] = -0.3
    bad = (q * ev) @ q.T
    bad = 0.5 * (bad + bad.T)
    assert bool((torch.diagonal(bad) > 0).all())
    A = torch.stack([bad, _spd(d, 1e2, 1.0, 4)]).contiguous()
    X, it, res, st, Xr, _ = _compare_with_reference(A, torch.zeros(2, dtype=torch.float64), 1e-8, 100)
    assert st.tolist() == [reference.DIVERGED, reference.CONVERGED]
    assert float(res[0]) > reference.divergence_limit(d) or not math.isfinite(float(res[0]))
    # ‖X − A⁻¹‖_F/‖A⁻¹‖_F ≤ ‖I − AX‖_F; plus the residual's and the float64 reference's rounding (was 1e-8)
    slack = float(residual_slack(A[1], torch.float64) + inverse_reference_slack(A[1]))
    assert _rel(X[1], ref_inv(A[1])) <= float(res[1]) + slack


def test_schulz_fp32_stagnates_at_condition_1e6():
    A, lam_min = _batch(33, [(1.0, 1e6), (1.0, 1e2)], torch.float32)
    upper = ops.spectral_upper_bound(A)
    for lower in (torch.zeros(2, dtype=torch.float64), 0.9 * lam_min):
        X, it, res, st = launchers.schulz_inverse(A, lower, upper, 1e-2, 100)
        Xr, itr, resr, str_ = torch_backend.schulz_inverse(A, lower, upper, 1e-2, 100)
        assert st.tolist() == str_.tolist() == [reference.STAGNATED, reference.CONVERGED]
        # At the rounding floor the step where the residual stops halving is a rounding tie:
        # counts within 2 there (iterations_agree's rule), equal on the well-conditioned matrix.
        assert schulz_runs_agree(it, st, itr, str_, A, torch.float32, 1e-2)
        assert 1e-2 < float(res[0]) < reference.QUADRATIC_PHASE
        assert float(res[0]) == pytest.approx(float(resr[0]), rel=0.2)


def test_schulz_one_by_one():
    A = torch.tensor([[[4.0]], [[1e-5]]], dtype=torch.float64)
    X, it, res, st, Xr, _ = _compare_with_reference(A, torch.zeros(2, dtype=torch.float64), 1e-8, 100)
    # 1×1: |x − 1/a|·a = |1 − a·x| is the residual itself, computed with 2 roundings (was rtol 1e-12)
    exact = torch.tensor([0.25, 1e5], dtype=torch.float64)
    assert bool(((X[:, 0, 0] - exact).abs() <= (res + 2 * U64) * exact).all()), (X, res)


def test_schulz_rejects_unknown_precision():
    A, _ = _batch(5, [(1.0, 1e1)], torch.float32)
    with pytest.raises(ValueError, match="input_precision"):
        launchers.schulz_inverse(A, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 1e-2, 10,
                                 input_precision="tf32")


# --------------------------------------------------------------------------------------------------
# Through the public API


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_schulz_inverse_triton_equals_torch(dtype):
    A, lam_min = _batch(33, [(1e-6, 1e1), (1e4, 1e3), (1.0, 1e2), (1.0, 1e1)], dtype)
    A = A.reshape(2, 2, 33, 33)
    for lower in (None, (0.9 * lam_min).reshape(2, 2)):
        Xt, it = ops.schulz_inverse(A, backend="triton", return_info=True, lower_bound=lower)
        Xr, ir = ops.schulz_inverse(A, backend="torch", return_info=True, lower_bound=lower)
        assert it.backend == "triton" and it.converged
        assert Xt.shape == A.shape and Xt.dtype == dtype
        assert it.status == ir.status
        assert iterations_agree(it.iterations, ir.iterations, it.extra["stop"])
        assert inverses_agree(Xt, Xr, A, it.residual, ir.residual, ops.compute_dtype(dtype))


def test_ops_schulz_non_pd_raises_through_triton():
    A = _spd(9, 10.0, 1.0, 0).to(torch.float32)
    A[0, 0] = -1.0  # caught by ops' diagonal check before any kernel runs
    bad = torch.stack([A, _spd(9, 10.0, 1.0, 1).to(torch.float32)])
    with pytest.raises(ConvergenceError):
        ops.schulz_inverse(bad, backend="triton")
    X, info = ops.schulz_inverse(bad, backend="triton", return_info=True, check=False)
    assert info.status == ["diverged", "converged"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_ops_gfim_triton_equals_torch(dtype):
    grads = torch.randn(3, 5, 3, 40, dtype=torch.float64).to(dtype)  # [L, n, r, d]
    Gt = ops.gfim(grads, backend="triton")
    Gr = ops.gfim(grads, backend="torch")
    assert Gt.dtype == Gr.dtype == ops.compute_dtype(dtype)
    tol = agree_slack(gfim_acc_slack(grads.reshape(3, 15, 40), Gt.dtype))  # two computed GFIMs, m = n·r = 15
    assert _rel(Gt, Gr.double()) <= tol
    # One layer, non-contiguous [n, r, d] into a 2-D accumulator.
    g1 = grads[1].transpose(0, 1)
    acc_t = torch.zeros(40, 40, dtype=Gt.dtype)
    acc_r = torch.zeros(40, 40, dtype=Gt.dtype)
    ops.gfim_accumulate_(acc_t, g1, backend="triton")
    ops.gfim_accumulate_(acc_r, g1, backend="torch")
    assert _rel(acc_t, acc_r.double()) <= tol


def test_ops_inverse_hvp_triton_equals_torch():
    grads = torch.randn(2, 6, 2, 24, dtype=torch.float64)
    G = ops.gfim(grads, backend="triton")
    v = torch.randn(2, 3, 24, dtype=torch.float64)
    damping = ops.datainf_damping(G, rank=2)
    out_t = hyperinf_ext.inverse_hvp(G, v, damping=damping, backend="triton")
    out_r = hyperinf_ext.inverse_hvp(G, v, damping=damping, method="cholesky")
    # Schulz stops at ‖I − AX‖_F ≤ tol = 1e-8 (plus its rounding), which bounds ‖(X − A⁻¹)v‖/‖A⁻¹v‖ by
    # κ·(tol + slack); Cholesky's own error is ~d·u·κ (was a fixed 1e-7)
    A = G.double() + torch.as_tensor(damping, dtype=torch.float64).reshape(-1, 1, 1) * torch.eye(24, dtype=torch.float64)
    k = float(cond2(A).max())
    slack = k * (ops.DEFAULT_TOL[torch.float64] + float(residual_slack(A, torch.float64).max())) + float(inverse_reference_slack(A).max())
    assert _rel(out_t, out_r) <= slack, (_rel(out_t, out_r), slack)
