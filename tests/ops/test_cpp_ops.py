"""The C++ CPU backend (torch.ops.hyperinf.*, hyperinf_ext/backends/cpp.py) against the torch reference.

Skipped when the extension is not built (``python setup.py build_ext --inplace``).

Tolerances:
* GFIM is compared normwise, max|acc − ref| / max|ref|, against a float64 einsum of the very
  values the op sees (grads cast to their dtype first), within the a-priori bound
  _numerics.gfim_acc_slack(norm="max") = (m+3)·(u_acc + u64)·max(|acc0| + |g|ᵀ|g|)/max|ref| (≈ m·u32
  for Gaussian grads: 9e-6 at m = 150, 9e-4 at m = 15000; ≈ 2e-14 at m = 100 in float64).  MKL's
  sgemm blocks the sum differently on AVX-512 and AVX2, so only a bound valid for any summation
  order is portable.  Two computed GFIMs are compared with twice that (agree_slack).  Every bug
  these tests target (a dropped or doubled row panel, conversion chunk or layer, a transposed
  operand, an unmirrored tile) moves max|·| by ≥ 1e-1 relative.  Exact symmetry (torch.equal) is
  guaranteed by construction: the op mirrors each upper tile bitwise.
* Schulz: statuses and iteration counts must equal the torch backend's wherever tol is above
  the residual's rounding (schulz_runs_agree; at the rounding floor the stop is a rounding tie);
  X agrees with the reference within the two residuals plus their rounding (inverses_agree: both
  are within their residual of A⁻¹; the two backends round R = I − A·X differently).  Against torch.linalg.inv,
  ‖X − A⁻¹‖₂ / ‖A⁻¹‖₂ must be within the true residual ‖I − A·X‖_F (evaluated in float64), which
  bounds it exactly since X − A⁻¹ = −A⁻¹·(I − A·X).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from hyperinf_ext import ops
from hyperinf_ext.backends import schedule as reference
from hyperinf_ext.backends import cpp as cpp_ops
from hyperinf_ext.backends import torch as torch_backend
from _numerics import (agree_slack, gfim_acc_slack, inverse_reference_slack, inverses_agree, iterations_agree, ref_inv,
                       residual_slack, schulz_runs_agree)

pytestmark = pytest.mark.skipif(
    not cpp_ops.is_available(), reason="hyperinf_ext._C is not built (python setup.py build_ext --inplace)"
)


def _einsum_ref(grads: torch.Tensor) -> torch.Tensor:
    g = grads.double()
    return torch.einsum("lmi,lmj->lij", g, g)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _spd(d: int, cond: float, scale: float, dtype=torch.float64, negative: bool = False) -> torch.Tensor:
    """scale·Q·diag(1 … 1/cond)·Qᵀ (eigenvalues geometric), symmetric to the last bit."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    ev = torch.logspace(0.0, -math.log10(cond), d, dtype=torch.float64)
    if negative:
        ev[-1] = -0.5
    A = (Q * ev) @ Q.T * scale
    A = 0.5 * (A + A.T)
    return A.to(dtype)


def _bounds(A: torch.Tensor, lower: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    upper = ops.spectral_upper_bound(A)
    lo = torch.zeros_like(upper) if lower is None else torch.minimum(lower, upper)
    return lo, upper


# --------------------------------------------------------------------------------------------------
# registration


def test_ops_registered():
    for name in ("gfim_accumulate_", "schulz_inverse", "schulz_step_", "gfim_bf16_kernel_available"):
        assert hasattr(torch.ops.hyperinf, name)
    schema = torch.ops.hyperinf.gfim_accumulate_.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
    assert not torch.ops.hyperinf.schulz_inverse.default._schema.is_mutable
    assert "cpp" in ops.available_backends("cpu")


def test_backend_imports_without_extension():
    # A fresh interpreter where `hyperinf_ext._C` cannot be imported (as when it was never built):
    # cpp_ops still imports, reports unavailable, and the dispatcher falls back to torch.
    code = (
        "import sys; sys.modules['hyperinf_ext._C'] = None\n"
        "from hyperinf_ext import backends\n"
        "from hyperinf_ext.backends import cpp as cpp_ops\n"
        "assert not cpp_ops.is_available()\n"
        "import torch\n"
        "assert 'cpp' not in backends.available_backends('cpu')\n"
        "assert backends.select(None, torch.device('cpu'))[0] == 'torch'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=300)


# --------------------------------------------------------------------------------------------------
# GFIM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("d", [1, 77, 300])
@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_gfim_matches_einsum(dtype, d, L, scale):
    acc_dtype = ops.compute_dtype(dtype)
    grads = (torch.randn(L, 150, d, dtype=torch.float64) * scale).to(dtype)
    acc = torch.zeros(L, d, d, dtype=acc_dtype)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    assert _rel(acc, _einsum_ref(grads)) <= gfim_acc_slack(grads, acc_dtype, norm="max")
    assert torch.equal(acc, acc.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gfim_noncontiguous_grads(dtype):
    L, m, d = 3, 200, 150
    acc_dtype = ops.compute_dtype(dtype)
    cases = {
        "column-major": torch.randn(L, d, m, dtype=torch.float64).to(dtype).transpose(1, 2),
        "strided rows and columns": torch.randn(L, 2 * m, 3 * d, dtype=torch.float64).to(dtype)[:, ::2, ::3],
        "expanded rows": torch.randn(L, 1, d, dtype=torch.float64).to(dtype).expand(L, m, d),
        "layer-strided": torch.randn(m, L, d, dtype=torch.float64).to(dtype).transpose(0, 1),
    }
    for name, grads in cases.items():
        acc = torch.zeros(L, d, d, dtype=acc_dtype)
        torch.ops.hyperinf.gfim_accumulate_(acc, grads)
        assert _rel(acc, _einsum_ref(grads)) <= gfim_acc_slack(grads, acc_dtype, norm="max"), name
        assert torch.equal(acc, acc.transpose(1, 2)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gfim_streaming_two_calls_equal_one(dtype):
    L, m, d = 2, 300, 200
    grads = torch.randn(L, m, d).to(dtype)
    one = torch.zeros(L, d, d)
    torch.ops.hyperinf.gfim_accumulate_(one, grads)
    two = torch.zeros(L, d, d)
    torch.ops.hyperinf.gfim_accumulate_(two, grads[:, :120])
    torch.ops.hyperinf.gfim_accumulate_(two, grads[:, 120:])
    # two streamed calls and one call are each within gfim_acc_slack (≈ 1.8e-5 at m = 300) of the
    # exact sum; a dropped or doubled call is off by ≥ 40%
    assert _rel(two, one.double()) <= agree_slack(gfim_acc_slack(grads, torch.float32, norm="max"))
    assert torch.equal(two, two.transpose(1, 2))


def test_gfim_exact_symmetry_from_symmetric_acc():
    d = 300  # 64-row panels and 64-wide mirror tiles: both end in partial tiles
    S0 = torch.randn(4, d, d)
    acc = S0 + S0.transpose(1, 2)
    acc0 = acc.clone()
    grads = torch.randn(4, 500, d, dtype=torch.bfloat16)
    expected = acc.double() + _einsum_ref(grads)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    assert torch.equal(acc, acc.transpose(1, 2))
    assert _rel(acc, expected) <= gfim_acc_slack(grads, torch.float32, acc0, norm="max")


def test_gfim_nonsymmetric_acc_keeps_both_triangles():
    # The increment is added to both triangles, so an acc that is not symmetric stays correct.
    L, m, d = 2, 100, 260
    acc = torch.randn(L, d, d, dtype=torch.float64)
    acc0 = acc.clone()
    grads = torch.randn(L, m, d, dtype=torch.float64)
    expected = acc + _einsum_ref(grads)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    # ≈ 103·2.2e-16 ≈ 2.3e-14 (was 1e-12); a lower triangle left without its increment is off by O(1)
    assert _rel(acc, expected) <= gfim_acc_slack(grads, torch.float64, acc0, norm="max")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gfim_chunked_conversion(dtype):
    # m above the conversion chunk (2^21 / d rows) so several chunks accumulate into one layer;
    # float32 grads without a unit stride take the same copy-in-chunks path.
    L, m, d = 1, 15000, 300
    base = torch.randn(L, m, 2 * d)
    grads = base.to(dtype) if dtype != torch.float32 else base[:, :, ::2]
    grads = grads[:, :, :d]
    acc = torch.zeros(L, d, d)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    # m = 15000 fp32 terms per entry: bound ≈ 9e-4 (was 1e-4, below the a-priori m·u32); a dropped
    # or doubled 7000-row conversion chunk is off by ≥ 45%
    assert _rel(acc, _einsum_ref(grads)) <= gfim_acc_slack(grads, torch.float32, norm="max")
    assert torch.equal(acc, acc.transpose(1, 2))


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gfim_large_d_panels(dtype, L):
    # d = 520: five 128-row panels (the last one 8 rows), handed out to threads when there are at
    # least two per thread (L = 1; with L = 2 and two threads each thread takes a whole layer);
    # bf16 with m = 9000 also spans three conversion chunks.
    m, d = 9000, 520
    grads = torch.randn(L, m, d).to(dtype)
    acc = torch.zeros(L, d, d)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    # m = 9000 fp32 terms per entry: bound ≈ 5.4e-4 (was 1e-4); a lost 8-row panel is off by 100%
    assert _rel(acc, _einsum_ref(grads)) <= gfim_acc_slack(grads, torch.float32, norm="max")
    assert torch.equal(acc, acc.transpose(1, 2))


def test_results_do_not_depend_on_thread_count():
    # One thread runs every parallel section inline; results must match the threaded run.
    grads = [torch.randn(4, 300, 100), torch.randn(1, 700, 520)]
    A = torch.stack([_spd(60, c, 1.0) for c in (10.0, 1e3, 1e5)])
    lower, upper = _bounds(A, None)
    runs = []
    n = torch.get_num_threads()
    try:
        for threads in (1, n):
            torch.set_num_threads(threads)
            accs = []
            for g in grads:
                acc = torch.zeros(g.shape[0], g.shape[2], g.shape[2])
                torch.ops.hyperinf.gfim_accumulate_(acc, g)
                accs.append(acc)
            runs.append((accs, cpp_ops.schulz_inverse(A, lower, upper, 1e-10, 100)))
    finally:
        torch.set_num_threads(n)
    (acc1, s1), (accn, sn) = runs
    # MKL may split a GEMM's sum differently with another thread count: each run is within the
    # a-priori bound of the exact value (was 1e-6, below 2·m·u32 ≈ 8e-5 at m = 700)
    for g, a1, an in zip(grads, acc1, accn):
        assert _rel(a1, an.double()) <= agree_slack(gfim_acc_slack(g, torch.float32, norm="max"))
    # κ = 1e5 in float64 puts the residual's rounding near tol = 1e-10: exact decisions only above it
    assert schulz_runs_agree(s1[1], s1[3], sn[1], sn[3], A, torch.float64, 1e-10)
    assert inverses_agree(s1[0], sn[0], A, s1[2], sn[2], torch.float64)  # was max-norm 1e-10


def test_gfim_many_small_layers():
    L, m, d = 96, 2048, 64
    grads = torch.randn(L, m, d)
    acc = torch.zeros(L, d, d)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    # m = 2048: bound ≈ 1.2e-4 (was 2e-5, below the a-priori m·u32); a layer skipped or written to
    # its neighbour is off by 100%
    assert _rel(acc, _einsum_ref(grads)) <= gfim_acc_slack(grads, torch.float32, norm="max")
    assert torch.equal(acc, acc.transpose(1, 2))


def test_gfim_empty_rows_is_noop():
    acc = torch.randn(2, 5, 5)
    before = acc.clone()
    torch.ops.hyperinf.gfim_accumulate_(acc, torch.zeros(2, 0, 5))
    assert torch.equal(acc, before)


def test_gfim_rejects_bad_layouts():
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.hyperinf.gfim_accumulate_(torch.zeros(1, 4, 4).transpose(1, 2), torch.zeros(1, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.hyperinf.gfim_accumulate_(torch.zeros(1, 4, 4, dtype=torch.bfloat16), torch.zeros(1, 3, 4))
    with pytest.raises(RuntimeError, match="grads must be"):
        torch.ops.hyperinf.gfim_accumulate_(torch.zeros(2, 4, 4), torch.zeros(1, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gfim_public_api_matches_torch_backend(dtype):
    grads = torch.randn(3, 16, 4, 90, dtype=torch.float64).to(dtype)  # [L, n, r, d]
    G_cpp = ops.gfim(grads, backend="cpp")
    G_ref = ops.gfim(grads, backend="torch")
    assert G_cpp.dtype == G_ref.dtype
    rows = grads.reshape(3, 64, 90)  # the n·r = 64 rows summed per layer
    assert _rel(G_cpp, G_ref.double()) <= agree_slack(gfim_acc_slack(rows, G_ref.dtype, norm="max"))
    acc = torch.zeros(90, 90, dtype=ops.compute_dtype(dtype))
    ops.gfim_accumulate_(acc, grads[0], backend="cpp")
    # G_ref is the mean over n = 16 (a power of two: ·16 is exact)
    assert _rel(acc, G_ref[0].double() * 16) <= agree_slack(gfim_acc_slack(rows[:1], acc.dtype, norm="max"))


# --------------------------------------------------------------------------------------------------
# GFIM: the AVX512-BF16 kernel (bf16 grads into an fp32 acc, csrc/gfim_bf16.cpp)


def _cpu_has_avx512_bf16() -> bool | None:
    """The avx512_bf16 flag of /proc/cpuinfo (with the AVX-512 subsets the kernel needs), None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return all(flag in flags for flag in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


_HAS_BF16_KERNEL = cpp_ops.is_available() and torch.ops.hyperinf.gfim_bf16_kernel_available()
needs_bf16_kernel = pytest.mark.skipif(not _HAS_BF16_KERNEL, reason="CPU without AVX512-BF16")


@pytest.fixture
def conversion_path(monkeypatch):
    """Context that routes bf16 grads to the old bf16→fp32 conversion path (read on every call)."""

    class _Switch:
        def __enter__(self):
            monkeypatch.setenv("HYPERINF_GFIM_BF16_KERNEL", "0")

        def __exit__(self, *exc):
            monkeypatch.delenv("HYPERINF_GFIM_BF16_KERNEL")

    return _Switch()


def test_gfim_bf16_kernel_available_matches_cpu_flags():
    flag = _cpu_has_avx512_bf16()
    if flag is None:
        pytest.skip("no /proc/cpuinfo")
    assert torch.ops.hyperinf.gfim_bf16_kernel_available() is flag


@needs_bf16_kernel
def test_gfim_bf16_kernel_is_taken(conversion_path):
    # vdpbf16ps flushes denormal fp32 results to zero, the fp32 GEMMs of the conversion path do
    # not: a 1e-21² product (denormal in fp32) tells the two paths apart.
    grads = torch.full((2, 4, 3), 1e-21).to(torch.bfloat16)
    acc = torch.zeros(2, 3, 3)
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    assert torch.equal(acc, torch.zeros_like(acc))
    with conversion_path:
        torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    assert (acc > 0).all()


def _bf16_check(acc0: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Accumulates grads into a copy of acc0; checks it against float64 (within the a-priori bound of
    an fp32 sum of m bf16 products, exact in fp32, plus acc0: was a fixed 2e-5, and 1e-4 at
    m = 4001, below m·u32 ≈ 2.4e-4) and for exact symmetry."""
    acc = acc0.clone()
    torch.ops.hyperinf.gfim_accumulate_(acc, grads)
    expected = acc0.double() + _einsum_ref(grads)
    assert _rel(acc, expected) <= gfim_acc_slack(grads, torch.float32, acc0, norm="max")
    assert torch.equal(acc, acc.transpose(1, 2))
    return acc


def _sym_acc(L: int, d: int, scale: float) -> torch.Tensor:
    A = torch.randn(L, d, d) * scale
    return A + A.transpose(1, 2)


@needs_bf16_kernel
@pytest.mark.parametrize("d", [1, 7, 33, 64, 100, 257, 768])
@pytest.mark.parametrize("m", [1, 2, 15, 64, 301])
@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_gfim_bf16_kernel_awkward_sizes(d, m, scale):
    # d: below, at and across the 16-column vectors and 48-column panels; m = 1 and odd m end in a
    # zero-padded pair.  L = 3 layers into a non-zero (symmetric) acc.
    L = 3
    grads = (torch.randn(L, m, d, dtype=torch.float64) * scale).to(torch.bfloat16)
    _bf16_check(_sym_acc(L, d, scale * scale * math.sqrt(m)), grads)


@needs_bf16_kernel
@pytest.mark.parametrize("m", [1, 200, 333])
def test_gfim_bf16_kernel_noncontiguous(m):
    L, d = 3, 150
    cases = {
        "transposed view": torch.randn(L, d, m).to(torch.bfloat16).transpose(1, 2),
        "slices with step": torch.randn(L, 2 * m, 3 * d).to(torch.bfloat16)[:, ::2, ::3],
        "expanded rows": torch.randn(L, 1, d).to(torch.bfloat16).expand(L, m, d),
        "layer-strided": torch.randn(m, L, d).to(torch.bfloat16).transpose(0, 1),
        "column offset": torch.randn(L, m, d + 5).to(torch.bfloat16)[:, :, 5:],
    }
    for name, grads in cases.items():
        assert not grads.is_contiguous() or m == 1, name
        _bf16_check(_sym_acc(L, d, 1.0), grads)


@needs_bf16_kernel
def test_gfim_bf16_kernel_matches_conversion_path(conversion_path):
    L, m, d = 2, 777, 300
    grads = torch.randn(L, m, d).to(torch.bfloat16)
    acc0 = _sym_acc(L, d, 10.0)
    ours = _bf16_check(acc0, grads)
    old = acc0.clone()
    with conversion_path:
        torch.ops.hyperinf.gfim_accumulate_(old, grads)
    assert _rel(ours, old.double()) <= agree_slack(gfim_acc_slack(grads, torch.float32, acc0, norm="max"))


@needs_bf16_kernel
def test_gfim_bf16_kernel_packed_chunks_and_tile_split():
    # d = 2048: the packed chunk holds 1792 pairs, so m = 4001 rows take three chunks, the last
    # one ending in an odd row.  L = 1 splits the tiles of the layer across threads.
    grads = torch.randn(1, 4001, 2048).to(torch.bfloat16)
    _bf16_check(_sym_acc(1, 2048, 1.0), grads)  # m = 4001 fp32 terms per entry


@needs_bf16_kernel
def test_gfim_bf16_kernel_bitwise_independent_of_threading():
    # Each tile is summed by one job in a fixed K-block order, whatever the split: whole layers
    # per thread (L = 4), tiles across threads (one layer per call) and one thread agree bitwise.
    L, m, d = 4, 1201, 400
    grads = torch.randn(L, m, d).to(torch.bfloat16)
    by_layers = torch.zeros(L, d, d)
    torch.ops.hyperinf.gfim_accumulate_(by_layers, grads)
    by_tiles = torch.zeros(L, d, d)
    for l in range(L):
        torch.ops.hyperinf.gfim_accumulate_(by_tiles[l : l + 1], grads[l : l + 1])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = torch.zeros(L, d, d)
        torch.ops.hyperinf.gfim_accumulate_(one_thread, grads)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(by_layers, by_tiles) and torch.equal(by_layers, one_thread)  # guaranteed: fixed order
    assert _rel(by_layers, _einsum_ref(grads)) <= gfim_acc_slack(grads, torch.float32, norm="max")


# --------------------------------------------------------------------------------------------------
# Schulz


def _check_against_reference(A, lower, upper, tol, max_iter):
    X, it, res, st = cpp_ops.schulz_inverse(A, lower, upper, tol, max_iter)
    Xr, itr, resr, str_ = torch_backend.schulz_inverse(A, lower, upper, tol, max_iter)
    assert X.dtype == A.dtype and X.shape == A.shape
    assert (it.dtype, res.dtype, st.dtype) == (torch.int64, torch.float64, torch.int64)
    # equal statuses and counts where tol is above the residual's rounding (was torch.equal always)
    assert schulz_runs_agree(it, st, itr, str_, A, A.dtype, tol), (it, st, itr, str_)
    for i in range(A.shape[0]):
        if int(st[i]) == reference.DIVERGED:
            continue
        # both within their residual of A⁻¹ (was max-norm 1e-10 in float64, max(res_ref, 1e-5) in
        # float32: at κ = 1e6 float64 rounding alone is ~κ·u ≈ 1e-10); a wrong X is caught as soon as it
        # is farther from the reference than the two residuals say
        assert inverses_agree(X[i : i + 1], Xr[i : i + 1], A[i : i + 1], res[i : i + 1], resr[i : i + 1], A.dtype), i
        if int(st[i]) == reference.CONVERGED:
            assert float(res[i]) <= tol and float(resr[i]) <= tol
    return X, it, res, st


def _true_residual(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(A.shape[-1], dtype=torch.float64)
    return torch.linalg.matrix_norm(eye - A.double() @ X.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_lower", [False, True])
def test_schulz_matches_reference_and_inverse(dtype, with_lower):
    d = 40
    conds = (1e1, 1e3, 1e6) if dtype == torch.float64 else (1e1, 1e2, 1e4)
    mats, lows = [], []
    for scale in (1e-6, 1.0, 1e4):
        for cond in conds:
            mats.append(_spd(d, cond, scale, dtype))
            lows.append(scale / cond * 0.9)  # a valid (slightly loose) lower bound
    A = torch.stack(mats)
    lower, upper = _bounds(A, torch.tensor(lows, dtype=torch.float64) if with_lower else None)
    tol = ops.DEFAULT_TOL[dtype]
    X, it, res, st = _check_against_reference(A, lower, upper, tol, 100)
    assert bool((st == reference.CONVERGED).all()), st
    inv = ref_inv(A.double())
    err = torch.linalg.matrix_norm(X.double() - inv, ord=2) / torch.linalg.matrix_norm(inv, ord=2)
    r_true = _true_residual(A, X)
    slack = residual_slack(A, torch.float64) + inverse_reference_slack(A)  # float64 residual and inv rounding
    assert bool((err <= r_true + slack).all()), (err, r_true, slack)
    if dtype == torch.float32:
        # the float32 residual the op stopped on is within residual_slack (d^1.5·u32·κ) of the true one
        # (was 1.5·tol: κ = 1e4 rounding alone can reach 0.4·tol)
        assert bool((r_true <= tol + residual_slack(A, torch.float32)).all())
    if with_lower:  # optimal scaling needs fewer steps than plain Schulz
        _, it0, _, _ = cpp_ops.schulz_inverse(A, torch.zeros_like(lower), upper, tol, 100)
        assert bool((it <= it0).all())


def test_schulz_large_d_blas_threaded_path():
    # d above the one-matrix-per-thread cut-off (256): matrices solved in turn, BLAS-threaded GEMMs.
    A = torch.stack([_spd(300, 1e3, 1.0), _spd(300, 1e2, 5.0)])
    lower, upper = _bounds(A, torch.tensor([0.9e-3, 4.5e-2], dtype=torch.float64))
    _check_against_reference(A, lower, upper, 1e-8, 100)


def test_schulz_not_pd_diverges():
    A = torch.stack([_spd(30, 1e2, 1.0, negative=True), _spd(30, 1e2, 1.0)])
    lower, upper = _bounds(A, None)
    _, _, _, st = _check_against_reference(A, lower, upper, 1e-8, 200)
    assert st.tolist() == [reference.DIVERGED, reference.CONVERGED]


def test_schulz_float32_at_condition_1e6_stagnates():
    A = torch.stack([_spd(64, 1e6, 1.0, torch.float32), _spd(64, 1e6, 1e3, torch.float32)])
    lower, upper = _bounds(A, None)
    _, _, res, st = _check_against_reference(A, lower, upper, 1e-6, 200)
    assert st.tolist() == [reference.STAGNATED] * 2
    assert bool((res > 1e-6).all())


@pytest.mark.parametrize("max_iter", [0, 3])
def test_schulz_max_iter(max_iter):
    A = torch.stack([_spd(20, 1e4, 1.0), _spd(20, 1e2, 1.0)])
    lower, upper = _bounds(A, None)
    _, it, _, st = _check_against_reference(A, lower, upper, 1e-8, max_iter)
    assert it.tolist() == [max_iter, max_iter]
    assert st.tolist() == [reference.MAX_ITER] * 2


def test_schulz_single_matrix_and_empty_batch():
    A = _spd(16, 10.0, 2.0).unsqueeze(0)
    _check_against_reference(A, *_bounds(A, None), 1e-10, 100)
    X, it, res, st = cpp_ops.schulz_inverse(torch.zeros(0, 3, 3), torch.zeros(0), torch.zeros(0), 1e-8, 10)
    assert X.shape == (0, 3, 3) and it.shape == res.shape == st.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_schulz_public_api_matches_torch_backend(dtype):
    A = torch.stack([_spd(50, c, s, dtype) for c, s in ((10.0, 1e-6), (1e3, 1.0), (1e2, 1e4))]).reshape(3, 1, 50, 50)
    X, info = ops.schulz_inverse(A, backend="cpp", return_info=True)
    Xr, info_r = ops.schulz_inverse(A, backend="torch", return_info=True)
    assert info.backend == "cpp" and info.converged
    stop = info.extra["stop"]
    assert iterations_agree(info.iterations, info_r.iterations, stop) and info.status == info_r.status
    assert inverses_agree(X, Xr, A, info.residual, info_r.residual, X.dtype)
    lam = torch.tensor([1e-7, 1e-3, 1e2], dtype=torch.float64).reshape(3, 1)
    X2, info2 = ops.schulz_inverse(A, backend="cpp", return_info=True, lower_bound=lam)
    _, info2_r = ops.schulz_inverse(A, backend="torch", return_info=True, lower_bound=lam)
    assert iterations_agree(info2.iterations, info2_r.iterations, stop) and info2.status == info2_r.status


def test_schulz_step_matches_formula():
    d, beta = 70, 0.9
    A = _spd(d, 50.0, 1.0)
    X = torch.eye(d, dtype=torch.float64) * 0.5
    X_new, R = torch.empty_like(X), torch.empty_like(X)
    r = torch.ops.hyperinf.schulz_step_(X_new, R, A, X, beta)
    R_ref = torch.eye(d, dtype=torch.float64) - A @ X
    # X = 0.5·I: every entry of A·X and X·R is one exact product, so R is exact and X_new has a few
    # roundings of O(1) values (1e-14 = 45 ulps of 1.0); r sums d² = 4900 squares: each side within
    # γ_4900/2 ≈ 2.7e-13 relative of the exact norm, 1e-12 > twice that
    assert math.isclose(r, float(torch.linalg.vector_norm(R_ref)), rel_tol=1e-12)
    assert torch.allclose(R, R_ref, rtol=0, atol=1e-14)
    assert torch.allclose(X_new, beta * (2 - beta) * X + beta * beta * X @ R_ref, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# torch.compile / opcheck


def test_torch_compile_traces_both_ops():
    torch._dynamo.reset()

    def accumulate(acc, grads):
        torch.ops.hyperinf.gfim_accumulate_(acc, grads)
        return acc * 0.5

    def invert(A, lower, upper):
        X, it, res, st = torch.ops.hyperinf.schulz_inverse(A, lower, upper, 1e-8, 100)
        return X @ A, it, st

    grads = torch.randn(2, 30, 12)
    acc = torch.zeros(2, 12, 12)
    out = torch.compile(accumulate, fullgraph=True, backend="aot_eager")(acc, grads)
    gtol = gfim_acc_slack(grads, torch.float32, norm="max")  # m = 30: ≈ 2e-6
    assert _rel(out, 0.5 * _einsum_ref(grads)) <= gtol
    assert _rel(acc, _einsum_ref(grads)) <= gtol  # the mutation reached the caller's tensor

    A = torch.stack([_spd(12, 10.0, 1.0), _spd(12, 100.0, 3.0)])
    lower, upper = _bounds(A, None)
    XA, it, st = torch.compile(invert, fullgraph=True, backend="aot_eager")(A, lower, upper)
    # |X·A − I| ≤ ‖I − A·X‖_F (≤ tol = 1e-8) + ‖X·A − A·X‖ and the product's rounding (≈ 3·d·u64·κ ≈ 4e-13
    # at κ = 100); atol 1e-7 is 10× that, a non-inverse is off by O(1)
    assert torch.allclose(XA, torch.eye(12, dtype=torch.float64).expand(2, 12, 12), atol=1e-7)
    assert st.tolist() == [reference.CONVERGED] * 2 and it.dtype == torch.int64
    torch._dynamo.reset()


def test_opcheck():
    # Default opcheck suite: schema (mutation/aliasing as declared), autograd registration (the
    # inputs do not require grad: these ops are not differentiable), fake tensor kernel and AOT
    # dispatch with dynamic shapes.
    acc = torch.randn(2, 9, 9)
    acc = acc + acc.transpose(1, 2)
    torch.library.opcheck(torch.ops.hyperinf.gfim_accumulate_.default, (acc, torch.randn(2, 7, 9, dtype=torch.bfloat16)))
    torch.library.opcheck(torch.ops.hyperinf.gfim_accumulate_.default, (acc.double(), torch.randn(2, 7, 9)))
    A = torch.stack([_spd(8, 10.0, 1.0), _spd(8, 100.0, 2.0)])
    lower, upper = _bounds(A, None)
    torch.library.opcheck(torch.ops.hyperinf.schulz_inverse.default, (A, lower, upper, 1e-8, 50))
    torch.library.opcheck(torch.ops.hyperinf.schulz_inverse.default, (A.float(), lower, upper, 1e-2, 50))
