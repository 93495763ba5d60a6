"""Ahead-of-time code generation of every Triton kernel for sm_80 and sm_90 (no GPU needed).

Checks that each kernel variant of ``hyperinf_ext.kernels.aot`` compiles to PTX and a cubin, that
the signatures cover exactly the kernels' parameters, and that the fp16/bf16 (and TF32) GFIM paths
use tensor-core instructions while the exact fp32 paths do not.
"""
import re

import pytest

triton = pytest.importorskip("triton")

from hyperinf_ext.kernels import aot  # noqa: E402
from hyperinf_ext.kernels import gfim as kgfim  # noqa: E402
from hyperinf_ext.kernels import schulz as kschulz  # noqa: E402

ARCHS = (80, 90)
TENSOR_CORE = {80: re.compile(r"\bmma\.sync\.aligned"), 90: re.compile(r"\b(wgmma\.mma_async|mma\.sync\.aligned)")}
ANY_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)")


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"sm_{a}")
def compiled(request):
    return request.param, aot.compile_all(request.param)


def test_every_kernel_compiles(compiled):
    arch, kernels = compiled
    expected = set(aot.GFIM_VARIANTS) | {
        f"schulz_{kind}_{tag}" for kind in ("residual", "update") for tag in aot.SCHULZ_VARIANTS
    }
    assert set(kernels) == expected
    for name, k in kernels.items():
        assert isinstance(k.asm["cubin"], bytes) and len(k.asm["cubin"]) > 0, name
        assert f".target sm_{arch}" in k.asm["ptx"], name
        assert ".entry" in k.asm["ptx"], name


def test_signatures_match_the_kernels():
    fns = {"gfim": kgfim.gfim_kernel, "schulz_residual": kschulz.schulz_residual_kernel,
           "schulz_update": kschulz.schulz_update_kernel}
    for name, (src, opts) in aot.sources().items():
        fn = next(f for prefix, f in fns.items() if name.startswith(prefix))
        assert list(src.signature) == fn.arg_names, name
        assert opts["num_warps"] >= 1 and opts["num_stages"] >= 1


@pytest.mark.parametrize("variant", ["gfim_bf16", "gfim_fp16", "gfim_fp32_tf32"])
def test_low_precision_gfim_uses_tensor_cores(compiled, variant):
    arch, kernels = compiled
    assert TENSOR_CORE[arch].search(kernels[variant].asm["ptx"]), f"{variant} on sm_{arch}: no tensor-core mma"


def test_gfim_dtype_specific_instructions(compiled):
    arch, kernels = compiled
    bf16 = kernels["gfim_bf16"].asm["ptx"]
    fp16 = kernels["gfim_fp16"].asm["ptx"]
    assert re.search(r"mma[\w.]*\.bf16", bf16)
    assert re.search(r"mma[\w.]*\.f16", fp16)
    # fp64 accumulates in double precision (DMMA or FMA), never through a lower-precision mma.
    fp64 = kernels["gfim_fp64"].asm["ptx"]
    assert re.search(r"\b(mma\.sync\.aligned\.m8n8k4[\w.]*f64|fma\.rn\.f64)", fp64)


def test_exact_fp32_paths_avoid_tf32(compiled):
    # "ieee" fp32 must stay exact fp32 FMA: a silent TF32 mma would cost ~3 decimal digits.
    _, kernels = compiled
    for name in ("gfim_fp32", "schulz_residual_fp32", "schulz_update_fp32"):
        ptx = kernels[name].asm["ptx"]
        assert not ANY_MMA.search(ptx), name
        assert "fma.rn.f32" in ptx, name


def test_schulz_tf32x3_uses_tensor_cores(compiled):
    arch, kernels = compiled
    for name in ("schulz_residual_fp32_tf32x3", "schulz_update_fp32_tf32x3"):
        assert re.search(r"tf32", kernels[name].asm["ptx"]) and TENSOR_CORE[arch].search(kernels[name].asm["ptx"]), name
