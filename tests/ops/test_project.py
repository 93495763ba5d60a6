"""The gradient projection ops (ops.project, ops.project_quantize) on every backend against float64.

Every reference is computed from float64 copies of the values the op multiplies: grads rounded to
proj's dtype (exact for fp16/bf16/fp32 into fp32 or fp64; float64 grads into a float32 proj are rounded,
as the op documents), proj as given.

Tolerances (a-priori bounds, valid for any summation order, hence any BLAS or tile shape):
* GEMM, entrywise: |y − y_ref| ≤ (d + 2)·(u_p + u64)·(|g|·|P|) + d·tiny_p·eps_p, where u_p is the unit
  roundoff of proj's dtype (Higham's γ_d bound of a d-term dot product, plus the float64 reference's own
  rounding) and the last term is what d products may lose to underflow (half a subnormal spacing each).
  A wrong row, column, d-chunk or example offset is off by O(|y|), far above this.
* Quantisation, entrywise: values·s − y_ref = (round(y/s) − y/s)·s + (y − y_ref), so
  |values·s − y_ref| ≤ GEMM bound·(1 + u_o) + (u_o + u_x)·|y_ref| + (tiny_o·eps_o/2)·s: half an ulp of
  out_dtype relative to the value, or half its smallest subnormal spacing (times the scale) below its normal
  range; u_x = u32 where a float64 projection goes to fp16/bf16 through float32 (torch's own cast rounds
  twice), else 0.  The scale itself is checked exactly: a power of two, ≥ 2^-126, and it puts every row's
  largest value in [2^(E−1), 2^E] (E = TOP_EXPONENT[out_dtype]; the top end is reachable by rounding up).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from hyperinf_ext import backends, ops
from hyperinf_ext.backends import cpp as cpp_ops
from hyperinf_ext.ops.projection import TOP_EXPONENT

DEVICE = os.environ.get("HYPERINF_TEST_DEVICE", "cpu")
BACKENDS = backends.available_backends(DEVICE if DEVICE in ("cpu", "cuda") else "cpu", "project")
U64 = torch.finfo(torch.float64).eps / 2
# (B, r, d, k): every listed value of each size at least once, B = 0 included.
CASES = [(0, 8, 7, 33), (1, 1, 1, 1), (5, 8, 129, 33), (5, 16, 576, 128), (1, 16, 7, 128), (5, 1, 576, 1),
         (5, 8, 1, 128), (1, 8, 129, 1)]
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = ("contiguous", "transposed", "sliced", "example-strided")


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _grads(B: int, r: int, d: int, dtype: torch.dtype, layout: str, row_scale=None) -> torch.Tensor:
    """[B, r, d] of ``dtype`` in the given memory layout (drawn in float64, example b times row_scale[b],
    cast to dtype before the view is taken, so the strides are those of the layout)."""
    shape, ex_axis, view = {
        "contiguous": ((B, r, d), 0, lambda x: x),
        "transposed": ((B, d, r), 0, lambda x: x.transpose(1, 2)),
        "sliced": ((B, r, 2 * d + 1), 0, lambda x: x[:, :, 1::2]),
        "example-strided": ((r, B, d), 1, lambda x: x.transpose(0, 1)),
    }[layout]
    x = torch.randn(shape, dtype=torch.float64)
    if row_scale is not None:
        x = x * torch.tensor(row_scale, dtype=torch.float64).reshape([-1 if i == ex_axis else 1 for i in range(3)])
    out = view(x.to(dtype))
    assert out.shape == (B, r, d)
    return out


def _reference(grads: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_ref, GEMM bound) in float64, entrywise."""
    g = grads.to(proj.dtype).double()
    P = proj.double()
    fi = torch.finfo(proj.dtype)
    d = grads.shape[-1]
    bound = (d + 2) * (_u(proj.dtype) + U64) * (g.abs() @ P.abs()) + d * fi.tiny * fi.eps
    return g @ P, bound


def _check_quantized(values, scale, y_ref, bound, proj_dtype, out_dtype):
    B = y_ref.shape[0]
    E = TOP_EXPONENT[out_dtype]
    assert values.shape == y_ref.shape and values.dtype == out_dtype
    assert scale.shape == (B,) and scale.dtype == torch.float32
    s = scale.double().cpu()
    mant, _ = torch.frexp(s)
    assert bool(torch.isfinite(s).all()) and bool((mant == 0.5).all()), s  # exactly 2^k
    assert bool((s >= 2.0 ** -126).all())
    v = values.double().cpu()
    vmax = v.abs().flatten(1).amax(1) if v[0].numel() else torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        if not bool(y_ref[b].any()):
            assert float(s[b]) == 1.0 and not bool(v[b].any()), b  # all-zero example
        elif float(s[b]) > 2.0 ** -126:  # not clamped: the row maximum sits in the top binade below 2^E
            assert 2.0 ** (E - 1) <= float(vmax[b]) <= 2.0 ** E, (b, float(vmax[b]), float(s[b]))
        else:
            assert float(vmax[b]) <= 2.0 ** E
    fo = torch.finfo(out_dtype)
    u_o = _u(out_dtype)
    u_x = _u(torch.float32) if (proj_dtype == torch.float64 and out_dtype != torch.float32) else 0.0
    sb = s.reshape(-1, 1, 1)
    err = (v * sb - y_ref).abs()
    tol = bound * (1 + u_o) + (u_o + u_x) * y_ref.abs() + fo.tiny * fo.eps / 2 * sb
    assert bool((err <= tol).all()), float((err - tol).max())


# --------------------------------------------------------------------------------------------------
# project


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}r{}d{}k{}".format(*c))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda t: str(t)[6:])
def test_project_matches_float64(backend, case, dtype):
    B, r, d, k = case
    # The interpreter is slow: the largest case runs there in two layouts only.
    layouts = LAYOUTS if backend != "triton" or d * k < 50_000 else ("contiguous", "transposed")
    for proj_dtype in (torch.float32, torch.float64):
        proj = torch.randn(d, k, dtype=torch.float64).to(proj_dtype)
        for layout in layouts:
            g = _grads(B, r, d, dtype, layout)
            y = ops.project(g, proj, backend=backend)
            assert y.shape == (B, r, k) and y.dtype == proj_dtype, layout
            y_ref, bound = _reference(g, proj)
            assert bool(((y.double().cpu() - y_ref.cpu()).abs() <= bound.cpu()).all()), (layout, proj_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_degenerate_sizes(backend):
    # k = 0 and d = 0: empty outputs, and zeros (an empty sum) with their scale 1.
    y = ops.project(torch.randn(3, 2, 5), torch.randn(5, 0), backend=backend)
    assert y.shape == (3, 2, 0)
    y = ops.project(torch.randn(3, 2, 0), torch.randn(0, 4), backend=backend)
    assert y.shape == (3, 2, 4) and not bool(y.any())
    v, s = ops.project_quantize(torch.randn(3, 2, 0), torch.randn(0, 4), backend=backend)
    assert v.shape == (3, 2, 4) and not bool(v.any()) and s.tolist() == [1.0] * 3
    v, s = ops.project_quantize(torch.randn(0, 2, 5), torch.randn(5, 4), backend=backend)
    assert v.shape == (0, 2, 4) and v.dtype == torch.float16 and s.shape == (0,)


# --------------------------------------------------------------------------------------------------
# project_quantize

# Per grads dtype, example magnitudes within its range: tiny, huge, 1, an all-zero example, in between.
MAGNITUDES = {
    torch.float16: [1e-3, 1.0, 0.0, 3e2, 1.0],
    torch.bfloat16: [1e-30, 1e30, 0.0, 1.0, 3e-5],
    torch.float32: [1e-30, 1e30, 0.0, 1.0, 3e-5],
    torch.float64: [1e-30, 1e30, 0.0, 1.0, 1e-200],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda t: str(t)[6:])
def test_project_quantize_matches_float64(backend, out_dtype, dtype):
    r, d, k = 8, 129, 33
    mags = MAGNITUDES[dtype]
    proj_dtypes = (torch.float64,) if dtype == torch.float64 else (torch.float32, torch.float64)
    for proj_dtype in proj_dtypes:
        proj = torch.randn(d, k, dtype=torch.float64).to(proj_dtype)
        for layout in ("contiguous", "transposed") if backend == "triton" else LAYOUTS:
            g = _grads(len(mags), r, d, dtype, layout, row_scale=mags)
            values, scale = ops.project_quantize(g, proj, out_dtype=out_dtype, backend=backend)
            y_ref, bound = _reference(g, proj)
            _check_quantized(values, scale, y_ref.cpu(), bound.cpu(), proj_dtype, out_dtype)
            if dtype == torch.float64:
                assert float(scale[4]) == 2.0 ** -126  # 1e-200: the smallest (normal) scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [(1, 1, 1, 1), (5, 16, 576, 128), (5, 8, 7, 33)], ids=lambda c: "B{}r{}d{}k{}".format(*c))
def test_project_quantize_sizes(backend, case):
    B, r, d, k = case
    proj = torch.randn(d, k)
    g = _grads(B, r, d, torch.bfloat16, "transposed")
    values, scale = ops.project_quantize(g, proj, backend=backend)
    y_ref, bound = _reference(g, proj)
    _check_quantized(values, scale, y_ref.cpu(), bound.cpu(), torch.float32, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_quantize_backends_agree_with_torch(backend):
    # Same y up to summation order; where the row maxima are not at a binade edge the scales agree
    # exactly, and the values within one rounding of each other.
    g = torch.randn(6, 8, 129) * torch.tensor([1e-20, 1e-3, 1.0, 7.0, 1e3, 1e20]).reshape(-1, 1, 1)
    proj = torch.randn(129, 64)
    v, s = ops.project_quantize(g, proj, backend=backend)
    vr, sr = ops.project_quantize(g, proj, backend="torch")
    y = (g.double() @ proj.double()).abs().flatten(1).amax(1)
    frac = torch.frexp(y)[0]
    edge = (frac < 0.5 + 1e-5) | (frac > 1 - 1e-5)
    assert torch.equal(s.cpu()[~edge], sr.cpu()[~edge])
    assert bool(((v.double() - vr.double()).abs() <= 2.0 ** (TOP_EXPONENT[torch.float16] - 10)).all())


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda t: str(t)[6:])
def test_quantize_is_project_quantize_with_the_identity(out_dtype, dtype):
    """ops.quantize (an unprojected index layer): equal to project_quantize with torch.eye(d) in the work
    dtype (float64 for float64 grads, else float32) on every backend, over magnitudes, layouts, sizes
    (B = 0, d = 1, odd d); and within half an ulp of out_dtype of the float64 gradients."""
    mags = MAGNITUDES[dtype]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    for r, d in ((8, 129), (1, 1), (3, 7)):
        for layout in LAYOUTS:
            g = _grads(len(mags), r, d, dtype, layout, row_scale=mags)
            v, s = ops.quantize(g, out_dtype=out_dtype)
            for backend in BACKENDS:
                vr, sr = ops.project_quantize(g, torch.eye(d, dtype=work), out_dtype=out_dtype, backend=backend)
                # equal values (an all-zero example's −0.0 sums to +0.0 in the GEMM: equal, not the same bits)
                assert torch.equal(s, sr.cpu()) and torch.equal(v, vr.cpu()), (backend, layout, r, d)
            y_ref, bound = _reference(g, torch.eye(d, dtype=work))
            _check_quantized(v, s, y_ref, bound, work, out_dtype)
    v, s = ops.quantize(torch.randn(0, 2, 5, dtype=dtype), out_dtype=out_dtype)
    assert v.shape == (0, 2, 5) and v.dtype == out_dtype and s.shape == (0,)


def test_quantize_rejects_bad_input():
    g = torch.randn(3, 2, 7)
    for bad, msg in ((torch.randn(3, 7), "grads: expected a 3-D"), (g.to(torch.int64), "grads: unsupported dtype"),
                     ("grads", "grads: expected a torch.Tensor")):
        with pytest.raises(ValueError, match=msg):
            ops.quantize(bad)
    with pytest.raises(ValueError, match="out_dtype: expected one of"):
        ops.quantize(g, out_dtype=torch.float64)
    g[1, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="grads: the projection of example 1 is not finite"):
        ops.quantize(g)
    with pytest.raises(ValueError, match="backend: 'cpp' does not implement quantize|backend: 'cpp' is not available"):
        ops.quantize(g, backend="cpp")


def test_scale_rule():
    # backends.torch.pow2_scale, the one rule: exponent of amax (frexp) minus E, clamped at 2^-126; 0 → 1;
    # non-finite → NaN; past 2^127 → inf.
    from hyperinf_ext.backends.torch import pow2_scale

    amax = torch.tensor([0.0, 1.0, 0.75, 2.0 ** 14, 3.0e-40, float("nan"), float("inf"), 1e300], dtype=torch.float64)
    s = pow2_scale(amax, 14)
    assert s.dtype == torch.float32
    assert s[:5].tolist() == [1.0, 2.0 ** -13, 2.0 ** -14, 2.0 ** 1, 2.0 ** -126]
    assert math.isnan(float(s[5])) and math.isnan(float(s[6])) and float(s[7]) == float("inf")


# --------------------------------------------------------------------------------------------------
# bad input


def test_rejects_bad_input():
    g, P = torch.randn(2, 3, 7), torch.randn(7, 4)
    bad = [
        ((torch.randn(3, 7), P), "grads: expected a 3-D"),
        ((torch.randn(1, 2, 3, 7), P), "grads: expected a 3-D"),
        ((g, torch.randn(7)), "proj: expected a 2-D"),
        ((g, torch.randn(8, 4)), "grads: last dimension d = 7 does not match proj"),
        ((g, P.to(torch.int32)), "proj: unsupported dtype"),
        ((g, P.half()), "proj: unsupported dtype"),
        ((g.to(torch.int64), P), "grads: unsupported dtype"),
        ((g, torch.randn(7, 4, device="meta")), "proj: on meta but grads is on"),
        ((g.to("meta"), P.to("meta")), "grads: a meta tensor"),
        (("grads", P), "grads: expected a torch.Tensor"),
        ((g, [[1.0]]), "proj: expected a torch.Tensor"),
    ]
    for fn in (ops.project, ops.project_quantize):
        for args, msg in bad:
            with pytest.raises(ValueError, match=msg):
                fn(*args)
    for out_dtype in (torch.float64, torch.int8, "float16", None):
        with pytest.raises(ValueError, match="out_dtype: expected one of"):
            ops.project_quantize(g, P, out_dtype=out_dtype)
    with pytest.raises(ValueError, match="backend: unknown backend"):
        ops.project(g, P, backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_and_out_of_range(backend):
    g, P = torch.randn(3, 2, 7), torch.randn(7, 4)
    g[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="grads: the projection is not finite"):
        ops.project(g, P, backend=backend)
    with pytest.raises(ValueError, match="grads: the projection of example 1 is not finite"):
        ops.project_quantize(g, P, backend=backend)
    g = torch.randn(3, 2, 7, dtype=torch.float64)
    g[2] *= 1e300  # fine in float64, but no float32 power of two scales it below 2^14
    with pytest.raises(ValueError, match="example 2 exceeds 2\\^127·2\\^E, past the largest float32 scale"):
        ops.project_quantize(g, P.double(), backend=backend)


# --------------------------------------------------------------------------------------------------
# the C++ ops under torch.compile / opcheck

needs_cpp = pytest.mark.skipif(DEVICE != "cpu" or not cpp_ops.has_op("project"),
                               reason="the C++ projection ops are not built (or the tests run on another device)")


@needs_cpp
def test_torch_compile_traces_the_cpp_ops():
    torch._dynamo.reset()

    def f(g, P):
        y = torch.ops.hyperinf.project(g, P)
        v, s = torch.ops.hyperinf.project_quantize(g, P, torch.float16, 14)
        return y * 2, v.float() * s[:, None, None]

    g, P = torch.randn(4, 3, 20), torch.randn(20, 9)
    y2, rec = torch.compile(f, fullgraph=True, backend="aot_eager")(g, P)
    y_ref, bound = _reference(g, P)
    assert bool(((y2.double() / 2 - y_ref).abs() <= bound).all())
    assert bool(((rec.double() - y_ref).abs() <= bound * 2 + _u(torch.float16) * y_ref.abs() * 2 + 1e-30).all())
    torch._dynamo.reset()


@needs_cpp
def test_opcheck():
    g = torch.randn(3, 4, 9)
    P = torch.randn(9, 5)
    torch.library.opcheck(torch.ops.hyperinf.project.default, (g, P))
    torch.library.opcheck(torch.ops.hyperinf.project.default, (g.bfloat16().transpose(1, 2).contiguous().transpose(1, 2), P.double()))
    torch.library.opcheck(torch.ops.hyperinf.project_quantize.default, (g, P, torch.float16, 14))
    torch.library.opcheck(torch.ops.hyperinf.project_quantize.default, (g.half(), P, torch.bfloat16, 1))


@needs_cpp
def test_dispatch_knows_the_projection_backends():
    assert backends.available_backends("cpu", "project")[:2] == ["cpp", "torch"]
    assert backends.select(None, torch.device("cpu"), op="project_quantize")[0] == "cpp"
    assert backends.implements("torch", "project") and not backends.implements("torch", "no_such_op")


# --------------------------------------------------------------------------------------------------
# ahead-of-time code generation for sm_80 / sm_90 (no GPU needed)


@pytest.mark.skipif(DEVICE != "cpu", reason="code generation is checked on the CPU")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
def test_aot_compiles_the_projection_kernels(arch):
    pytest.importorskip("triton")
    import re

    from hyperinf_ext.kernels import aot

    kernels = aot.compile_all(arch, only=("project", "scale_cast"))
    assert set(kernels) == set(aot.PROJECT_VARIANTS) | set(aot.SCALE_CAST_VARIANTS)
    for name, k in kernels.items():
        ptx = k.asm["ptx"]
        assert len(k.asm["cubin"]) > 0 and f".target sm_{arch}" in ptx and ".entry" in ptx, name
    for name, (_, proj_dtype, amax) in aot.PROJECT_VARIANTS.items():
        ptx = kernels[name].asm["ptx"]
        # Both operand tiles stream through 16-byte async copies (the main loop is pipelined).
        assert len(re.findall(r"\bcp\.async\.cg\.shared\.global[^;]*,\s*(16|0x10)\s*[,;]", ptx)) >= 2, name
        if proj_dtype == torch.float32:
            # "ieee" float32: exact fp32 FMA, never a (TF32) tensor-core mma.
            assert "fma.rn.f32" in ptx and not re.search(r"\b(wgmma|mma\.sync)", ptx), name
        else:
            assert re.search(r"\b(mma\.sync\.aligned\.m8n8k4[\w.]*f64|fma\.rn\.f64)", ptx), name
        has_atomic = bool(re.search(r"\b(atom|red)\.[\w.:]*max\.s(32|64)\b", ptx))
        assert has_atomic == amax, name
    cvt = {"scale_cast_fp32_fp16": r"cvt\.rn\.f16(x2)?\.f32", "scale_cast_fp32_bf16": r"cvt\.rn\.bf16(x2)?\.f32",
           "scale_cast_fp64_fp16": r"cvt\.rn\.f16\.f64"}
    for name, pattern in cvt.items():
        assert re.search(pattern, kernels[name].asm["ptx"]), name
