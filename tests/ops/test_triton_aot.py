"""Ahead-of-time code generation of every Triton kernel for sm_80 and sm_90 (no GPU needed).

Checks that each kernel variant of ``hyperinf_ext.kernels.aot`` compiles to PTX and a cubin, that
the signatures cover exactly the kernels' parameters, that the fp16/bf16 (and TF32) GFIM paths
use tensor-core instructions while the exact fp32 paths do not, and that every kernel's main loop is
software-pipelined with asynchronous copies (16-byte cp.async for the GFIM loads; wgmma issued
asynchronously on sm_90).  The GFIM variants are compiled for the aligned layout the GPU launcher
guarantees for fp16/bf16 grads; the last tests check that layout rule and the copy that provides it.
"""
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from hyperinf_ext.kernels import aot  # noqa: E402
from hyperinf_ext.kernels import gfim as kgfim  # noqa: E402
from hyperinf_ext.kernels import project as kproject  # noqa: E402
from hyperinf_ext.kernels import schulz as kschulz  # noqa: E402
from _numerics import gfim_acc_slack  # noqa: E402

ARCHS = (80, 90)
TENSOR_CORE = {80: re.compile(r"\bmma\.sync\.aligned"), 90: re.compile(r"\b(wgmma\.mma_async|mma\.sync\.aligned)")}
ANY_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)")
CP_ASYNC = re.compile(r"\bcp\.async\.(c[ag]\.shared\.global|bulk\.tensor)")
ASYNC_WAIT = re.compile(r"\b(cp\.async\.wait_group|mbarrier\.try_wait)")
CP_ASYNC_16B = re.compile(r"\bcp\.async\.cg\.shared\.global[^;]*,\s*(16|0x10)\s*[,;]")
# A register-staged tile load: what the fp16/bf16 GFIM loads fell back to before the layout fix.
LD_GLOBAL_VEC = re.compile(r"\bld\.global(\.[a-z0-9]+)*\.v[24]\b")


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"sm_{a}")
def compiled(request):
    return request.param, aot.compile_all(request.param)


def test_every_kernel_compiles(compiled):
    arch, kernels = compiled
    expected = set(aot.GFIM_VARIANTS) | {
        f"schulz_{kind}_{tag}" for kind in ("residual", "update") for tag in aot.SCHULZ_VARIANTS
    } | set(aot.PROJECT_VARIANTS) | set(aot.SCALE_CAST_VARIANTS)
    if arch >= aot.TMA_MIN_ARCH:
        expected |= set(aot.GFIM_TMA_VARIANTS)
    assert set(kernels) == expected
    for name, k in kernels.items():
        assert isinstance(k.asm["cubin"], bytes) and len(k.asm["cubin"]) > 0, name
        assert f".target sm_{arch}" in k.asm["ptx"], name
        assert ".entry" in k.asm["ptx"], name


def test_signatures_match_the_kernels():
    # Longest prefix first: gfim_tma_* before gfim_*.
    fns = {"gfim_tma": kgfim.gfim_tma_kernel, "gfim": kgfim.gfim_kernel,
           "schulz_residual": kschulz.schulz_residual_kernel, "schulz_update": kschulz.schulz_update_kernel,
           "project": kproject.project_kernel, "scale_cast": kproject.scale_cast_kernel}
    for name, (src, opts) in aot.sources(90).items():
        fn = next(f for prefix, f in fns.items() if name.startswith(prefix))
        assert list(src.signature) == fn.arg_names, name
        assert opts["num_warps"] >= 1 and opts["num_stages"] >= 1


@pytest.mark.parametrize("variant", ["gfim_bf16", "gfim_fp16", "gfim_fp32_tf32", "gfim_tma_bf16", "gfim_tma_fp16"])
def test_low_precision_gfim_uses_tensor_cores(compiled, variant):
    arch, kernels = compiled
    if variant not in kernels:
        pytest.skip(f"{variant} is not built for sm_{arch}")
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


def test_every_kernel_pipelines_its_loads(compiled):
    # Schulz and fp64 included: a kernel whose loads are not async copies waits on every load.
    arch, kernels = compiled
    for name, k in kernels.items():
        if name in aot.SCALE_CAST_VARIANTS:
            continue  # one elementwise pass, no loop: nothing to overlap (tests/ops/test_project.py)
        ptx = k.asm["ptx"]
        assert CP_ASYNC.search(ptx) and ASYNC_WAIT.search(ptx), f"{name} on sm_{arch}: no async copy"


@pytest.mark.parametrize("variant", ["gfim_bf16", "gfim_fp16", "gfim_fp32", "gfim_fp32_tf32"])
def test_gfim_loads_are_16_byte_async_copies(compiled, variant):
    arch, kernels = compiled
    ptx = kernels[variant].asm["ptx"]
    if arch == 90 and variant == "gfim_fp32_tf32":
        # wgmma reads tf32 only K-major; both GFIM operands are d-major, so Triton transposes them
        # into shared memory element by element (4-byte cp.async.ca): async, but not vectorised.
        assert CP_ASYNC.search(ptx)
        return
    # Both operand tiles stream through 16-byte async copies: none is staged through registers.
    assert len(CP_ASYNC_16B.findall(ptx)) >= 2, f"{variant} on sm_{arch}"
    assert not LD_GLOBAL_VEC.search(ptx), f"{variant} on sm_{arch}: a tile is loaded through registers"


def test_sm90_low_precision_gfim_uses_async_wgmma(compiled):
    arch, kernels = compiled
    if arch != 90:
        pytest.skip("wgmma is sm_90")
    for name in ("gfim_bf16", "gfim_fp16", "gfim_fp32_tf32", *aot.GFIM_TMA_VARIANTS):
        ptx = kernels[name].asm["ptx"]
        assert re.search(r"\bwgmma\.mma_async", ptx), name
        # The accumulation overlaps the next wgmma group: a wait that leaves one group in flight.
        assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1\b", ptx), name


def test_sm90_tma_variants_use_the_tensor_memory_accelerator(compiled):
    arch, kernels = compiled
    if arch < aot.TMA_MIN_ARCH:
        pytest.skip("TMA is sm_90")
    for name in aot.GFIM_TMA_VARIANTS:
        ptx = kernels[name].asm["ptx"]
        # Both tiles of each K step by bulk tensor copies completing on an mbarrier, no ld.global tiles.
        assert re.search(r"\bcp\.async\.bulk\.tensor\.3d\.shared::cta\.global\.mbarrier", ptx), name
        assert "mbarrier.try_wait" in ptx and not LD_GLOBAL_VEC.search(ptx), name
        # The only global loads left are the epilogue's (acc's previous values).
        assert not re.search(r"\bld\.global(\.[a-z0-9]+)*\.b16\b", ptx), name


def test_pipelinable_layout_rule():
    g = torch.zeros(2, 32, 48, dtype=torch.bfloat16)
    assert kgfim.is_pipelinable(g)
    assert not kgfim.is_pipelinable(g[:, :, :40])  # d not a multiple of 16
    assert not kgfim.is_pipelinable(torch.zeros(2, 48, 32, dtype=torch.bfloat16).transpose(1, 2))
    assert not kgfim.is_pipelinable(torch.zeros(2, 32, 49, dtype=torch.bfloat16)[:, :, 1:])  # misaligned base
    buf = kgfim.pipelinable_copy(g[:, :, :40])
    assert buf.shape == (2, 32, 48) and kgfim.is_pipelinable(buf)
    assert torch.equal(buf[:, :, :40], g[:, :, :40]) and not buf[:, :, 40:].any()


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("HYPERINF_TEST_DEVICE") == "cuda"),
                    reason="needs the interpreter, or HYPERINF_TEST_DEVICE=cuda (the GPU check)")
@pytest.mark.parametrize("path", ["pipelined", "tma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_layout_paths_numerics(dtype, path):
    # The GPU launcher's padded-copy path and the TMA kernel, through the interpreter (or on the GPU
    # in the GPU check, where tma=True below sm_90 runs the cp.async kernel instead): odd d (padded
    # to 48), a transposed view, partial K chunks (the TMA descriptor zero-fills past m).
    L, m, d = 2, 21, 33
    g = torch.randn(L, d, m, dtype=torch.float64).to(dtype).transpose(1, 2)
    cfg = kgfim.config(dtype, torch.float32, interpret=g.device.type == "cpu")
    acc = torch.zeros(L, d, d)
    kgfim.launch_gfim(acc, g, cfg, pipelined=True, tma=(path == "tma"))
    g64 = g.double()
    exact = torch.einsum("lmi,lmj->lij", g64, g64)
    # fp32 sum of m = 21 exact bf16/fp16 products: the a-priori bound (_numerics.gfim_acc_slack, ≈ 24·6e-8
    # times ‖|g|ᵀ|g|‖_F/‖gᵀg‖_F ≈ 5e-6, was a fixed 1e-5); a padding column read as data, a TMA tile not
    # zero-filled past m or a lost K chunk is off by ≥ 1e-1
    assert float((acc.double() - exact).norm() / exact.norm()) <= gfim_acc_slack(g, torch.float32)
    assert torch.equal(acc, acc.transpose(1, 2))
