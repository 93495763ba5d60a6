"""Mixed-precision Schulz (solvers/mixed.py) against all-float32 Schulz and float64 references.

Slacks: float32 Schulz stops at its rounding floor, about κ·u32·√d/2 in ‖I − A·X‖_F (ops.DEFAULT_TOL's
note); two float32 runs that take different paths to that floor may each land anywhere below it, so the
mixed result may exceed the all-float32 one by FLOOR = κ·u32·√d (residual, and the relative error it
bounds) — never more.  The CPU emulates the low GEMMs by rounding their inputs (bf16: 8 bits, TF32: 11).
"""
from __future__ import annotations

import math

import pytest
import torch

from hyperinf_ext import ops
from hyperinf_ext.errors import ConvergenceError
from hyperinf_ext.solvers import MIXED_PRECISIONS, mixed, mixed_schulz, scaled_schulz

from _numerics import cond2, ref_inv, unit_roundoff

U32 = unit_roundoff(torch.float32)
D = 96


def _spd(d: int, kappa: float, seed: int) -> tuple[torch.Tensor, float]:
    """float32 SPD [d, d] with log-spaced eigenvalues in [1/κ, 1], and its exact λmin (the lower bound)."""
    # A CPU generator draws on the CPU whatever the default device (HYPERINF_TEST_DEVICE): the same
    # matrices everywhere, then moved to where the test runs.
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn(d, d, dtype=torch.float64, generator=gen, device="cpu").to(torch.get_default_device())
    Q, _ = torch.linalg.qr(draw)
    lam = torch.logspace(0, -math.log10(kappa), d, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    return (0.5 * (A + A.T)).float(), float(lam.min())


def _quality(A: torch.Tensor, X: torch.Tensor) -> tuple[float, float]:
    """(‖I − A·X‖_F, ‖X − A⁻¹‖₂/‖A⁻¹‖₂) in float64, A⁻¹ the float64 inverse of the float32 A."""
    A64, X64 = A.double(), X.double()
    ref = ref_inv(A64)
    res = torch.linalg.matrix_norm(torch.eye(A.shape[-1], dtype=torch.float64) - A64 @ X64)
    err = torch.linalg.matrix_norm(X64 - ref, 2) / torch.linalg.matrix_norm(ref, 2)
    return float(res), float(err)


def test_round_to_low_resolution():
    x = torch.randn(4096, dtype=torch.float32) * torch.logspace(-20, 20, 4096)
    for low, bits in (("bf16", 16), ("tf32", 13)):
        r = mixed.round_to_low(x, low)
        u = mixed.LOW_UNIT_ROUNDOFF[low]
        assert bool(((r - x).abs() <= u * x.abs()).all())  # round to nearest: within u relative
        assert bool(((r.view(torch.int32) & ((1 << bits) - 1)) == 0).all())  # only the format's mantissa bits
    assert torch.equal(mixed.round_to_low(x, "bf16"), x.bfloat16().float())


@pytest.mark.parametrize("low", ["bf16", "tf32"])
@pytest.mark.parametrize("kappa", [1e2, 1e3, 1e4, 1e5, 1e6])
def test_never_worse_than_all_fp32(kappa, low):
    A, lower = _spd(D, kappa, seed=int(math.log10(kappa)))
    X32, i32 = ops.schulz_inverse(A, lower_bound=lower, return_info=True, check=False, backend="torch")
    Xm, im = mixed_schulz(A, lower=lower, low=low, check=False)
    floor = float(cond2(A)) * U32 * math.sqrt(D)
    r32, e32 = _quality(A, X32)
    rm, em = _quality(A, Xm)
    assert rm <= r32 + floor and em <= e32 + floor
    if i32.converged:  # whatever fp32 can do, the mixed run (or its fallback) does, to the same test
        assert im.converged and float(im.residual) <= i32.tol
    assert im.extra["path"][0] in ("mixed", "fp32")
    if kappa <= 1e4:
        # Within float32's reach, the hand-over leaves a start the float32 finish converges from (no
        # fallback), and the low steps replace float32 ones: at most two more steps in all.
        assert im.extra["path"] == ["mixed"]
        assert int(im.extra["low_steps"]) >= 2
        assert int(im.extra["fp32_steps"]) < int(i32.iterations)
        assert int(im.iterations) <= int(i32.iterations) + 2


def test_handover_keeps_x_positive_definite():
    # Rule (c) stops the low phase before bf16 rounding of X can make it indefinite (which a float32
    # finish cannot recover from): the hand-over iterate's symmetric part stays positive definite.
    A, lower = _spd(D, 1e6, seed=0)
    seen = {}
    orig = mixed._scaled_phase

    def spy(gemm, X, a, b, **kw):
        if isinstance(gemm, mixed._Fp32Gemm):
            seen["X"] = X.clone()
        return orig(gemm, X, a, b, **kw)

    try:
        mixed._scaled_phase = spy
        mixed_schulz(A, lower=lower, check=False)
    finally:
        mixed._scaled_phase = orig
    Xh = seen["X"][0].double()
    assert float(torch.linalg.eigvalsh(0.5 * (Xh + Xh.T)).min()) > 0


def test_fallback_to_fp32_when_the_mixed_run_falls_short(monkeypatch):
    # A hand-over iterate the float32 finish cannot converge from (−X: A·X negative definite, as bf16
    # rounding makes it when the low phase runs past the resolution of X): the all-float32 fallback
    # must then run for that matrix only, converge, and be recorded.
    A, lower = _spd(D, 1e4, seed=1)
    orig = mixed._scaled_phase

    def spoil_first(gemm, X, a, b, **kw):
        if isinstance(gemm, mixed._Fp32Gemm):
            X = X.clone()
            X[0] = -X[0]
        return orig(gemm, X, a, b, **kw)

    monkeypatch.setattr(mixed, "_scaled_phase", spoil_first)
    X, info = mixed_schulz(torch.stack([A, A]), lower=lower, low="bf16")
    assert info.converged and info.extra["path"] == ["fp32", "mixed"]
    assert float(info.extra["mixed_residual"][0]) > info.tol
    X32, i32 = ops.schulz_inverse(A, lower_bound=lower, return_info=True)
    assert int(info.iterations[0]) == int(i32.iterations)
    assert _quality(A, X[0])[0] <= float(i32.residual) + float(cond2(A)) * U32 * math.sqrt(D)


def test_batch_shapes_lower_tensor_and_no_lower():
    As = torch.stack([torch.stack([_spd(48, k, s)[0] for k in (1e2, 1e3, 1e4)]) for s in (0, 1)])  # [2, 3, 48, 48]
    lower = torch.tensor([[1e-2, 1e-3, 1e-4]] * 2) * 0.999
    for lo in (lower, None):
        X, info = mixed_schulz(As.double(), lower=lo)  # float64 input is computed in float32
        assert X.shape == As.shape and X.dtype == torch.float32
        assert info.residual.shape == (2, 3) and info.converged
        assert float(info.residual.max()) <= ops.DEFAULT_TOL[torch.float32]
        for i in range(2):
            for j in range(3):
                r, _ = _quality(As[i, j], X[i, j])
                floor = float(cond2(As[i, j])) * U32 * math.sqrt(48)
                assert r <= float(info.residual[i, j]) + floor


def test_explicit_tol_and_failure():
    A, lower = _spd(D, 1e3, seed=2)
    X, info = mixed_schulz(A, lower=lower, tol=1e-3)
    assert float(info.residual) <= 1e-3 and info.tol == 1e-3
    with pytest.raises(ConvergenceError):
        mixed_schulz(A, lower=lower, max_iter=3)
    _, info = mixed_schulz(A, lower=lower, max_iter=3, check=False)
    assert not info.converged


def test_scaled_schulz_precision_option():
    A, lower = _spd(64, 1e3, seed=3)
    assert MIXED_PRECISIONS["mixed"] == "bf16"
    X, info = scaled_schulz(A.double(), lower=lower, precision="mixed")
    assert X.dtype == torch.float32 and info.converged and info.extra["low"] == "bf16"
    _, info = scaled_schulz(A, lower=lower, precision="mixed-tf32")
    assert info.extra["low"] == "tf32" and info.backend == "mixed-tf32"
    with pytest.raises(ValueError):
        scaled_schulz(A, lower=lower, precision="fp8")
    with pytest.raises(ValueError):
        mixed_schulz(A, lower=lower, low="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 tensor cores / TF32)")
@pytest.mark.parametrize("low", ["bf16", "tf32"])
def test_cuda_matches_the_cpu_emulation(low):
    A, lower = _spd(256, 1e3, seed=4)
    Xc, ic = mixed_schulz(A.cuda(), lower=lower, low=low)
    X32, i32 = ops.schulz_inverse(A, lower_bound=lower, return_info=True)
    assert ic.converged and ic.extra["path"] == ["mixed"]
    r, _ = _quality(A, Xc.cpu())
    assert r <= float(i32.residual) + float(cond2(A)) * U32 * math.sqrt(256)
