// GFIM accumulation acc[l] += G_lᵀ·G_l, SYRK-style: BLAS GEMMs on the upper block triangle only.
//
// Layout of the work for one layer (G = grads[l], [m, d]):
//   * the upper triangle is covered by row panels S[i0:i1, i0:d] = G[:, i0:i1]ᵀ·G[:, i0:d] of
//     b = panel_rows(d) rows each, i.e. one wide GEMM per panel (d/b GEMMs per layer, ~0.5 + b/2d
//     of the full GEMM's flops, and wide panels keep BLAS near its full rate);
//   * the panels land in a scratch S, then acc is updated from S's upper triangle on both sides
//     (acc[p,q] += S[min(p,q), max(p,q)]): the result is exactly symmetric whenever acc was, and it
//     stays correct for an acc whose lower triangle differs from its upper one.
//   * grads that BLAS cannot take directly (another dtype than acc, or no unit stride) are
//     converted/copied in chunks of rows, so a huge bf16 grads never gets a full fp32 copy; the
//     panels then accumulate over chunks in S (in acc's dtype, so fp32 or fp64 accumulation).
//   * bf16 grads into an fp32 acc on a CPU with AVX512-BF16 skip all of the above: gfim_bf16.cpp
//     fills S's upper triangle with its own vdpbf16ps micro-kernel (measured ~1.7× fp32 torch.mm).
#include "hyperinf_ops.h"

#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <cstdlib>
#include <cstring>

namespace hyperinf {
namespace {

// Rows per panel: d/4 rounded down to a multiple of 32, within [32, 128].  Measured with fp32 MKL,
// one thread, CPU time, as a fraction of the full GEMM's time: d = 768, m = 8000: 128-row panels
// 0.66 (flop share 0.58), 192-row 0.68 (lower-triangle panels or a pre-transposed G are no
// faster); m = 2048: d = 256: 64-row 0.70, 128-row 0.78; d = 128: 32-row 0.78; d = 64: 32-row 0.92.
// Narrower panels lose more to GEMM efficiency than they save in flops.
int64_t panel_rows(int64_t d) { return std::min<int64_t>(128, std::max<int64_t>(32, d / 4 / 32 * 32)); }
// Converted chunk ≈ 2^21 elements (8 MB in fp32): big enough that the chunk GEMMs (k = rows)
// stay efficient, small enough to live beside the grads.
constexpr int64_t kChunkElems = int64_t{1} << 21;
constexpr int64_t kChunkMinRows = 256;
// Tile edge of the mirror pass: a 64×64 tile of S read transposed stays in L1/L2.
constexpr int64_t kTile = 64;
// Threading.  At or below this d a layer's GEMMs are too small for BLAS threading to pay, so with
// two or more layers each thread takes whole layers (single-threaded BLAS); above it too when the
// layers go round the threads evenly or at least twice (see gfim_accumulate_cpu).  Otherwise a layer
// with at least two panels per thread hands its panels out to the threads, largest first
// (single-threaded GEMMs, one barrier per chunk): triangular panel sizes then balance within a few
// percent, and on a loaded 2-core box this measured 0.65–0.73 of a full torch.matmul's time where
// BLAS-threaded panels took 1.1–1.3 (every BLAS call synchronises its threads, which costs dearly
// as soon as a core is busy elsewhere).  With fewer panels than that (small d, many cores)
// each panel GEMM is BLAS-threaded instead.
constexpr int64_t kSmallD = 256;

// BLAS takes a matrix with one unit stride and a leading dimension covering the other extent;
// anything else (e.g. an expanded, stride-0 view) would be copied by ATen once per panel GEMM.
bool blas_compatible(const at::Tensor& g) {
  const int64_t rows = g.size(0), cols = g.size(1);
  return (g.stride(1) == 1 && g.stride(0) >= std::max<int64_t>(1, cols)) ||
         (g.stride(0) == 1 && g.stride(1) >= std::max<int64_t>(1, rows));
}

int64_t chunk_rows(int64_t m, int64_t d) {
  const int64_t rows = std::max<int64_t>(kChunkMinRows, kChunkElems / std::max<int64_t>(d, 1));
  return std::min(m, rows);
}

// acc += sym(S): acc[p,q] += S[min(p,q), max(p,q)].  Tiles of the full d×d grid are independent
// (each acc element is written by exactly one tile), so they split across threads without races.
template <typename scalar_t>
void mirror_add(scalar_t* acc, const scalar_t* S, int64_t d) {
  const int64_t nt = (d + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kTile * kTile));
  at::parallel_for(0, nt * nt, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ti = t / nt, tj = t % nt;
      const int64_t p0 = ti * kTile, p1 = std::min(d, p0 + kTile);
      const int64_t q0 = tj * kTile, q1 = std::min(d, q0 + kTile);
      if (ti < tj) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t q = q0; q < q1; ++q) acc[p * d + q] += S[p * d + q];
      } else if (ti > tj) {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t q = q0; q < q1; ++q) acc[p * d + q] += S[q * d + p];
      } else {
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t q = q0; q < q1; ++q) acc[p * d + q] += (p <= q) ? S[p * d + q] : S[q * d + p];
      }
    }
  });
}

// bf16 grads into an fp32 acc go to the AVX512-BF16 kernel (gfim_bf16.cpp) when the CPU has it,
// unless HYPERINF_GFIM_BF16_KERNEL=0 (read on every call, so benchmarks can compare both paths in
// one process; getenv is negligible next to a layer's GEMM).
bool use_bf16_kernel(const at::Tensor& acc_l, const at::Tensor& g_l) {
  if (g_l.scalar_type() != at::kBFloat16 || acc_l.scalar_type() != at::kFloat || !gfim_bf16_kernel_usable()) {
    return false;
  }
  const char* env = std::getenv("HYPERINF_GFIM_BF16_KERNEL");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// One layer: acc_l [d, d] += g_lᵀ·g_l.  S [d, d] and (when g_l needs converting) chunk [rows, d]
// are caller-owned scratch in acc's dtype, reused across layers.
void accumulate_layer(const at::Tensor& acc_l, const at::Tensor& g_l, at::Tensor& S, at::Tensor& chunk) {
  const int64_t m = g_l.size(0), d = g_l.size(1);
  if (use_bf16_kernel(acc_l, g_l)) {
    gfim_bf16_upper(g_l, S.mutable_data_ptr<float>(), chunk);  // `chunk` holds its packed rows
    mirror_add<float>(acc_l.data_ptr<float>(), S.const_data_ptr<float>(), d);
    return;
  }
  const bool convert = g_l.scalar_type() != acc_l.scalar_type() || !blas_compatible(g_l);
  const int64_t step = convert ? chunk_rows(m, d) : m;
  const int64_t panel_b = panel_rows(d);
  const int64_t n_panels = (d + panel_b - 1) / panel_b;
  if (convert && (!chunk.defined() || chunk.size(0) < step)) {
    chunk = at::empty({step, d}, acc_l.options());
  }
  for (int64_t c0 = 0; c0 < m; c0 += step) {
    const int64_t rows = std::min(step, m - c0);
    at::Tensor C = g_l.narrow(0, c0, rows);
    if (convert) C = chunk.narrow(0, 0, rows).copy_(C);
    const auto panel = [&](int64_t p) {
      const int64_t i0 = p * panel_b;
      const int64_t b = std::min(panel_b, d - i0);
      at::Tensor out = S.narrow(0, i0, b).narrow(1, i0, d - i0);
      const at::Tensor lhs = C.narrow(1, i0, b).t();
      const at::Tensor rhs = C.narrow(1, i0, d - i0);
      if (c0 == 0) {
        at::cpu::mm_out(out, lhs, rhs);
      } else {
        at::cpu::addmm_(out, lhs, rhs);
      }
    };
    if (n_panels >= 2 * at::get_num_threads()) {
      parallel_items(n_panels, [&](std::atomic<int64_t>& next) {
        at::AutoDispatchBelowADInplaceOrView worker_guard;
        for (int64_t p; (p = next.fetch_add(1)) < n_panels;) panel(p);
      });
    } else {
      for (int64_t p = 0; p < n_panels; ++p) panel(p);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(acc_l.scalar_type(), "hyperinf_gfim_mirror", [&] {
    mirror_add<scalar_t>(acc_l.data_ptr<scalar_t>(), S.const_data_ptr<scalar_t>(), d);
  });
}

}  // namespace

void gfim_accumulate_cpu(const at::Tensor& acc, const at::Tensor& grads) {
  TORCH_CHECK(acc.device().is_cpu() && grads.device().is_cpu(), "gfim_accumulate_: expected CPU tensors");
  TORCH_CHECK(acc.dim() == 3 && acc.size(1) == acc.size(2), "gfim_accumulate_: acc must be [L, d, d], got ",
              acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "gfim_accumulate_: acc must be float32 or float64, got ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "gfim_accumulate_: acc must be contiguous");
  TORCH_CHECK(grads.dim() == 3 && grads.size(0) == acc.size(0) && grads.size(2) == acc.size(2),
              "gfim_accumulate_: grads must be [L, m, d] matching acc ", acc.sizes(), ", got ", grads.sizes());
  TORCH_CHECK(at::isFloatingType(grads.scalar_type()), "gfim_accumulate_: grads must be floating point, got ",
              grads.scalar_type());
  const int64_t L = acc.size(0), m = grads.size(1), d = acc.size(2);
  if (L == 0 || m == 0 || d == 0) return;
  // The kernel is the whole op: nothing inside it should be recorded by autograd.
  at::AutoDispatchBelowADInplaceOrView guard;

  // Whole layers per thread whenever they go round evenly or at least twice: splitting one layer's
  // panels (or bf16 tiles) costs barriers per layer and per chunk.  fp32, 2 threads, same process,
  // load ≈ 2: L = 24, d = 384, m = 256 / 512 / 1024 rows: 1.81× / 2.30× / 1.44× faster by layers;
  // L = 12, d = 768, m = 2000 / 8000: 1.25× / 1.15×; float64 acc (d = 385, m = 256): 2.11×.  bf16
  // kernel: 0.56 of a torch.mm's time by layers vs 0.84 by tiles (d = 768, L = 2, 4).
  const int64_t threads = at::get_num_threads();
  const bool by_layers = L >= threads && (L % threads == 0 || L >= 2 * threads);
  if (L >= 2 && (d <= kSmallD || by_layers)) {
    parallel_items(L, [&](std::atomic<int64_t>& next) {
      at::AutoDispatchBelowADInplaceOrView worker_guard;  // TLS: not inherited by pool threads
      at::Tensor S = at::empty({d, d}, acc.options());
      at::Tensor chunk;
      for (int64_t l; (l = next.fetch_add(1)) < L;) accumulate_layer(acc[l], grads[l], S, chunk);
    });
  } else {
    at::Tensor S = at::empty({d, d}, acc.options());
    at::Tensor chunk;
    for (int64_t l = 0; l < L; ++l) accumulate_layer(acc[l], grads[l], S, chunk);
  }
}

}  // namespace hyperinf
