"""Scale (issue #24 §4): the inverse-HVP front doors give the answer at any scale where it is representable
in the dtype, and a ConvergenceError/ValueError with the reason where it is not.

Inputs are a unit-scale problem times powers of two (G·2^a, v·2^b; gradients g·2^a), so the float64
reference of the unit problem, rescaled, is exact.  Hypothesis draws the exponents over float64's range
(about 1e-300..1e300) and float32's, derandomized and bounded.
"""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hyperinf_ext as hx
from _numerics import cond2, unit_roundoff
from hyperinf_ext.solvers.direct import default_tol

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
# exponent a of the scale 2^a: float64 1e-300..1e300; float32 its normal range, G's entries (2^-7..2^4) kept normal
SPAN = {torch.float64: 996, torch.float32: 118}
MAXEXP = {torch.float64: 1024, torch.float32: 128}  # 2^MAXEXP is the first power of two beyond the dtype
MINEXP = {torch.float64: -1021, torch.float32: -125}  # 2^(MINEXP-1) is the smallest normal number


def _problem(seed: int, d: int, n: int = 24, r: int = 2):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, r, d, generator=gen, dtype=torch.float64)
    v = torch.randn(3, d, generator=gen, dtype=torch.float64)
    return g, torch.einsum("nrd,nre->de", g, g) / n, v


def _check(out_fn, ref: torch.Tensor, shift: int, A: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
    """out_fn() must equal ref·2^shift within the verified tolerance (a bound on ‖X − A⁻¹‖/‖A⁻¹‖) plus the
    rounding of the inputs to dtype, or raise with a reason where ref·2^shift leaves dtype's range."""
    top = math.frexp(float(ref.abs().max()))[1] + shift  # the answer's largest entry is below 2^top
    representable = top <= MAXEXP[dtype] - 2  # beyond the margin of 2 either outcome is right
    try:
        out = out_fn()
    except (hx.ConvergenceError, ValueError) as e:
        assert not representable, f"answer up to 2^{top} is representable in {dtype}, but: {e}"
        assert str(e), "an error without a reason"
        return
    assert top <= MAXEXP[dtype] + 1, f"answer up to 2^{top} overflows {dtype}, yet returned"
    assert bool(torch.isfinite(out).all())
    got = torch.ldexp(out.double(), torch.tensor(-shift, dtype=torch.float64))
    if top < MINEXP[dtype] + 64:  # an answer in (or next to) the subnormals: finite is all we ask
        return
    kappa = float(cond2(A))
    slack = (default_tol(dtype) + 8 * A.shape[-1] * unit_roundoff(dtype) * kappa) * float(v.norm()) \
        * float(torch.linalg.matrix_norm(torch.linalg.inv(A), 2))
    assert float((got - ref).norm()) <= slack, (float((got - ref).norm()), slack)


@SETTINGS
@given(seed=st.integers(0, 3), dtype=st.sampled_from([torch.float64, torch.float32]), a=st.integers(-996, 996),
       b=st.integers(-996, 996), solver=st.sampled_from(["auto", "cholesky", "schulz", "cg", "make_ihvp"]))
def test_matrix_front_doors_any_scale(seed, dtype, a, b, solver):
    """inverse_hvp / make_ihvp on G·2^a, v·2^b: right (rescaled float64 reference) or an error with a reason."""
    d = 5
    _, G, v = _problem(seed, d)
    lam = 0.1
    A = G + lam * torch.eye(d, dtype=torch.float64)
    ref = v @ torch.linalg.inv(A)
    a, b = a * SPAN[dtype] // 996, b * SPAN[dtype] // 996
    Gs, vs = torch.ldexp(G, torch.tensor(float(a))).to(dtype), torch.ldexp(v, torch.tensor(float(b))).to(dtype)
    lam_s = math.ldexp(lam, a)
    if solver == "make_ihvp":
        run = lambda: hx.make_ihvp(Gs, damping=lam_s)(vs)  # noqa: E731
    else:
        run = lambda: hx.inverse_hvp(Gs, vs, damping=lam_s, solver=solver)  # noqa: E731
    _check(run, ref, b - a, A, v, dtype)


@SETTINGS
@given(seed=st.integers(0, 3), dtype=st.sampled_from([torch.float64, torch.float32]), a=st.integers(-996, 996),
       b_off=st.integers(-8, 8), damping=st.sampled_from(["auto", "paper", 0.5]))
def test_gradient_dicts_any_scale(seed, dtype, a, b_off, damping):
    """make_ihvp({layer: g·2^a}) applied to q·2^b: G = gᵀg is 2^2a times the unit G — beyond the dtype
    for |a| past half its exponent range — yet the answer q·(G + λI)⁻¹ ~ 2^(b−2a) is representable."""
    d = 5
    g, G, _ = _problem(seed, d)
    q = torch.randn(2, g.shape[1], d, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    a = a * SPAN[dtype] // 996
    b = max(-SPAN[dtype], min(SPAN[dtype], a + b_off))
    if damping != "auto" and abs(2 * a) > MAXEXP[dtype] - 8:
        damping = "auto"  # an absolute λ at G's scale 2^2a is not a float of the dtype
    if isinstance(damping, float):
        lam_unit = damping
    elif damping == "auto":  # HyperINF's default: the mean eigenvalue of G (scale-covariant)
        lam_unit = float(torch.diagonal(G).sum()) / d
    elif damping == "paper":  # DataInf's value + an absolute 1e-3 in the gradients' own units
        lam_unit = 0.1 * float(torch.diagonal(G).sum()) / (g.shape[1] * d) + math.ldexp(1e-3, -2 * a)
    A = G + lam_unit * torch.eye(d, dtype=torch.float64)
    ref = q.reshape(-1, d) @ torch.linalg.inv(A)
    gs = torch.ldexp(g, torch.tensor(float(a))).to(dtype)
    qs = torch.ldexp(q, torch.tensor(float(b))).to(dtype)
    passed = math.ldexp(damping, 2 * a) if isinstance(damping, float) else damping

    def run():
        return hx.make_ihvp({"l": gs}, damping=passed)({"l": qs})["l"].reshape(-1, d)

    _check(run, ref, b - 2 * a, A, q.reshape(-1, d), dtype)


def test_zero_matrix_without_damping_is_an_error():
    """G = 0 with damping 0 has no inverse: a ConvergenceError saying so (not a ZeroDivisionError)."""
    for solver in ("auto", "cg"):
        try:
            hx.inverse_hvp(torch.zeros(3, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64), damping=0.0,
                           solver=solver)
        except (hx.ConvergenceError, ValueError) as e:
            assert "damping" in str(e)
        else:
            raise AssertionError("G = 0, damping 0 returned")
