"""Property-based tests of every kernel-level op on every backend (issue #10 §5).

Hypothesis draws shapes, dtypes, scales, strides, batch sizes, spectra and damping; each example must
either agree with a float64 oracle of the values actually given (after rounding to the input dtype)
within the op's stated tolerance plus a-priori rounding slack (tests/_numerics.py), or raise a named
error — a ``ValueError`` whose message starts with the argument's name, or a ``ConvergenceError`` —
and never return a non-finite or wrong result.  Where the input is well inside the dtype's range and
resolution the op must succeed.

Examples are derandomized (the same on every machine and run); the Triton backend runs through the
interpreter, so it gets smaller and fewer examples.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import collections

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hyperinf_ext as hx
from _numerics import fro, gfim_slack, inverse_reference_slack, ref_inv, ref_solve, residual_slack, unit_roundoff

BACKENDS = hx.available_backends("cpu")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NAMED = re.compile(r"^(acc|grads|A|G|v|damping|lower_bound|tol|max_iter|rank|scale|method|backend)\b")


def _settings(backend: str, n: int):
    return settings(
        max_examples=max(4, n // 5) if backend == "triton" else n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _max_d(backend: str, full: int) -> int:
    return 12 if backend == "triton" else full


def _layout(data, x: torch.Tensor) -> torch.Tensor:
    """The same values as x in a drawn memory layout: contiguous, strided (every other element of a
    larger buffer), or transposed storage of the last two dims."""
    kind = data.draw(st.sampled_from(["contiguous", "strided", "transposed"]), label="layout")
    if kind == "strided" and x.dim() >= 1:
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def _named_value_error(e: ValueError) -> None:
    assert NAMED.match(str(e)), f"ValueError does not name its argument: {e}"


def _spd(d: int, cond: float, scale: float, seed: int, indefinite: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    ev = torch.logspace(0, -math.log10(cond), d, dtype=torch.float64)
    if indefinite:
        ev[-1] = -0.5
    A = (Q * ev) @ Q.T * scale
    return 0.5 * (A + A.T)


# ---------------------------------------------------------------------------------------------- GFIM


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfim_accumulate_property(backend):
    counts = collections.Counter()

    @_settings(backend, 100)
    @given(data=st.data())
    def check(data):
        acc_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="acc_dtype")
        g_dtype = data.draw(st.sampled_from(DTYPES), label="grads_dtype")
        layers = data.draw(st.sampled_from([None, 0, 1, 3]), label="layers")
        n = data.draw(st.integers(0, 6), label="n")
        r = data.draw(st.integers(1, 4), label="r")
        d = data.draw(st.integers(1, _max_d(backend, 70)), label="d")
        # scales whose squares stay normal in the accumulator and whose values fit the grads dtype
        lo, hi = {torch.float16: (-2, 3), torch.bfloat16: (-12, 12), torch.float32: (-12, 12),
                  torch.float64: (-12, 12) if acc_dtype == torch.float32 else (-100, 100)}[g_dtype]
        scale = 10.0 ** data.draw(st.integers(lo, hi), label="log10_scale")
        poison = data.draw(st.sampled_from([None, float("nan"), float("inf")]), label="poison")
        lead = () if layers is None else (layers,)
        seed = data.draw(st.integers(0, 2**16), label="seed")
        g64 = torch.randn(lead + (n, r, d), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
        if poison is not None and g64.numel():
            g64.view(-1)[data.draw(st.integers(0, g64.numel() - 1), label="where")] = poison
        grads = _layout(data, g64.to(g_dtype))
        acc0 = torch.rand(lead + (d, d), dtype=torch.float64)
        acc0 = (acc0 + acc0.transpose(-1, -2)).to(acc_dtype)
        acc = _layout(data, acc0.clone())
        try:
            out = hx.gfim_accumulate_(acc, grads, backend=backend)
        except ValueError as e:
            _named_value_error(e)
            assert poison is not None, f"well-scaled finite input refused: {e}"
            counts["refused"] += 1
            return
        assert poison is None or grads.numel() == 0, "a non-finite gradient was accumulated silently"
        assert out is acc and bool(torch.isfinite(acc).all())
        counts["accumulated"] += 1
        gd = grads.double().reshape(lead + (n * r, d)) if lead else grads.double().reshape(n * r, d)
        ref = acc0.double() + gd.transpose(-1, -2) @ gd
        slack = gfim_slack(grads.reshape(lead + (n, r, d)), acc_dtype) if grads.numel() else 0.0
        # the starting values are rounded to acc's dtype once more
        bound = (slack + 4 * unit_roundoff(acc_dtype)) * fro(ref) + 1e-300
        assert fro(acc.double() - ref) <= bound

    check()
    print(f"gfim_accumulate_ [{backend}]:", dict(counts))
    assert counts["accumulated"] >= counts["refused"] > 0  # both outcomes exercised


# --------------------------------------------------------------------------------------------- Schulz


@pytest.mark.parametrize("backend", BACKENDS)
def test_schulz_inverse_property(backend):
    counts = collections.Counter()

    @_settings(backend, 120)
    @given(data=st.data())
    def check(data):
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        batch = data.draw(st.sampled_from([(), (0,), (1,), (3,), (2, 2)]), label="batch")
        d = data.draw(st.integers(1, _max_d(backend, 40)), label="d")
        log_cond = data.draw(st.floats(0, 12 if cdtype == torch.float64 else 8), label="log10_cond")
        e_lim = 1000 if dtype == torch.float64 else (100 if cdtype == dtype else 10)
        log2_scale = data.draw(st.integers(-e_lim, e_lim), label="log2_scale")
        indefinite = d > 1 and data.draw(st.booleans(), label="indefinite")
        bound = data.draw(st.sampled_from([None, "true", "loose"]), label="lower_bound")
        tol = data.draw(st.sampled_from([None, None, 1e-3, 0.3]), label="tol")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        n = math.prod(batch)
        mats = [_spd(d, 10**log_cond, 1.0, seed + i, indefinite) for i in range(n)]
        A64 = (torch.stack(mats) if n else torch.zeros(0, d, d, dtype=torch.float64)).reshape(batch + (d, d))
        A64 = A64 * 2.0**log2_scale
        A = _layout(data, A64.to(dtype))
        given64 = A.double()  # the matrix actually given
        lower = None
        if bound is not None and n:
            lower = 2.0**log2_scale * 10**-log_cond * (0.5 if bound == "true" else 10.0)
        try:
            X, info = hx.schulz_inverse(A, lower_bound=lower, tol=tol, backend=backend, return_info=True)
        except ValueError as e:
            _named_value_error(e)
            raise AssertionError(f"valid input refused: {e}")
        except hx.ConvergenceError as e:
            if not n:
                raise
            ev = torch.linalg.eigvalsh(given64.reshape(-1, d, d))
            lam_min, lam_max = ev[:, 0], ev[:, -1].abs()
            finfo = torch.finfo(cdtype)
            must = bool(
                (lam_min > 0).all()
                and (lam_max / lam_min * d * unit_roundoff(cdtype) <= 1e-4 * (tol or 1e-2)).all()
                and (1 / lam_min < finfo.max / 64).all()
                and (lam_max > finfo.tiny * 2**30).all()
            )
            assert not must, f"well-conditioned, in-range SPD input failed: {e}"
            counts["ConvergenceError"] += 1
            if indefinite and bool((lam_min < -0.1 * lam_max).all()):
                assert "not positive definite" in str(e)
            return
        assert not indefinite or n == 0, "an indefinite matrix was 'inverted'"
        counts["converged" if n else "empty"] += 1
        assert X.shape == A.shape and X.dtype == cdtype and bool(torch.isfinite(X).all())
        assert info.converged and bool((info.residual <= info.tol).all())
        if n:
            A3, X3 = given64.reshape(-1, d, d), X.double().reshape(-1, d, d)
            inv = ref_inv(A3)
            err = torch.linalg.matrix_norm(X3 - inv, 2) / torch.linalg.matrix_norm(inv, 2)
            slack = residual_slack(A3, cdtype) + inverse_reference_slack(A3)
            assert bool((err <= info.residual.reshape(-1) + slack).all()), (err, info.residual, slack)

    check()
    print(f"schulz_inverse [{backend}]:", dict(counts))
    assert counts["converged"] >= 2 * counts["ConvergenceError"] // 3 and counts["ConvergenceError"] > 0


# ------------------------------------------------------------------------------------------ inverse-HVP


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_hvp_property(backend):
    counts = collections.Counter()

    @_settings(backend, 80)
    @given(data=st.data())
    def check(data):
        method = data.draw(st.sampled_from(["schulz", "cholesky"]), label="method")
        g_dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), label="G_dtype")
        v_dtype = data.draw(st.sampled_from(DTYPES), label="v_dtype")
        cdtype = torch.float64 if g_dtype == torch.float64 else torch.float32
        layers = data.draw(st.sampled_from([None, 1, 3]), label="layers")
        d = data.draw(st.integers(1, _max_d(backend, 40)), label="d")
        vshape = data.draw(st.sampled_from([(), (2,), (3, 2)]), label="v_batch")
        log_scale = data.draw(st.integers(-30, 30) if cdtype == torch.float32 else st.integers(-150, 150), label="log10_scale")
        scale = 10.0**log_scale
        rel_damping = data.draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 3.0]), label="damping/scale")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        L = 1 if layers is None else layers
        gen = torch.Generator().manual_seed(seed)
        grads = torch.randn(L, 2 * d, 2, d, dtype=torch.float64, generator=gen)  # full-rank G
        G64 = torch.einsum("lnri,lnrj->lij", grads, grads) / (2 * d) * scale
        G = G64 if layers is not None else G64[0]
        G = _layout(data, G.to(g_dtype))
        damping = rel_damping * scale
        lead = (L,) if layers is not None else ()
        v = _layout(data, torch.randn(lead + vshape + (d,), dtype=torch.float64, generator=gen).to(v_dtype))
        try:
            out = hx.inverse_hvp(G, v, damping=damping, method=method, backend=backend if method == "schulz" else None)
        except ValueError as e:
            _named_value_error(e)
            raise AssertionError(f"valid input refused: {e}")
        except hx.ConvergenceError as e:
            A = G.double().reshape(-1, d, d) + torch.tensor(damping, dtype=cdtype).double() * torch.eye(d, dtype=torch.float64)
            kappa = float(torch.linalg.cond(A).max())
            assert kappa * d * unit_roundoff(cdtype) > 1e-5, f"well-conditioned input failed (κ = {kappa:.1e}): {e}"
            counts["ConvergenceError"] += 1
            return
        counts["solved"] += 1
        out_dtype = torch.promote_types(v.dtype, cdtype)
        assert out.shape == v.shape and out.dtype == out_dtype and bool(torch.isfinite(out).all())
        # oracle: float64 solve with the values actually used (G, the damping in the compute dtype, v)
        lam = float(torch.tensor(damping, dtype=torch.float64).to(cdtype))
        A = G.double().reshape(L, d, d) + lam * torch.eye(d, dtype=torch.float64)
        v3 = v.double().reshape(L, -1, d)
        ref = ref_solve(A, v3.transpose(-1, -2)).transpose(-1, -2)
        inv_norm = 1 / torch.linalg.eigvalsh(A)[:, 0]
        tol = hx.ops.DEFAULT_TOL[cdtype] if method == "schulz" else 0.0
        slack = tol + residual_slack(A, cdtype) + inverse_reference_slack(A) + 4 * unit_roundoff(out_dtype)
        err = (out.double().reshape(L, -1, d) - ref).norm(dim=(-2, -1))
        bound = slack * v3.norm(dim=(-2, -1)) * inv_norm
        assert bool((err <= bound).all()), (err, bound)

    check()
    print(f"inverse_hvp [{backend}]:", dict(counts))
    assert counts["solved"] >= 3 * counts["ConvergenceError"]


# ----------------------------------------------------------------------------------------- damping


@given(
    d=st.integers(1, 30),
    rank=st.integers(1, 8),
    scale=st.floats(0, 10),
    log_g=st.integers(-100, 100),
    layers=st.sampled_from([None, 2]),
)
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
def test_datainf_damping_property(d, rank, scale, log_g, layers):
    g = torch.randn((() if layers is None else (layers,)) + (5, rank, d), dtype=torch.float64) * 10.0**log_g
    G = torch.einsum("...nri,...nrj->...ij", g, g) / 5
    lam = hx.datainf_damping(G, rank, scale)
    ref = scale * (g**2).mean(dim=(-3, -2, -1))
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    assert bool(torch.isfinite(lam_t).all())
    assert bool(((lam_t - ref).abs() <= 4 * d * rank * 5 * 2**-53 * ref.abs() + 1e-300).all())
