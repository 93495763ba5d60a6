// GFIM upper triangle S = Gᵀ·G for bf16 G with an fp32 result, on AVX512-BF16 (vdpbf16ps).
//
// Why: the generic path converts bf16 chunks to fp32 and runs fp32 GEMMs, ~0.35 of the bf16 GEMM
// rate torch.mm reaches through oneDNN; the BLAS-level bf16→fp32 GEMMs reachable from libtorch are
// no faster than fp32 on Zen 4.  vdpbf16ps does fp32 += a0·b0 + a1·b1 per lane: the bf16 products
// are exact in fp32 and every sum is an fp32 sum, like the conversion path (but denormal bf16
// inputs read as zero and denormal fp32 results flush to zero: irrelevant at gradient magnitudes).
//
// Layout: a chunk of rows of G [m, d] is packed pair-interleaved along the sample axis k, in column
// panels of 48: P[jb][kp][c] is a 32-bit word holding (G[2kp][48jb+c], G[2kp+1][48jb+c]), the
// columns padded with zeros to a multiple of 48 and an odd last row paired with a zero.  One packed
// copy serves both operands: the micro-kernel vector-loads 3×16 pairs of a column panel (B) and
// broadcasts single pairs of 8 rows from the same buffer (A).
// Blocking: micro-tile 8 rows × 48 columns = 24 zmm accumulators (+3 B vectors, 1 broadcast; 24
// vdpbf16ps per 11 loads, runs at the instruction's peak from L1); K-blocks of KC = 256 pairs
// (B block 48 KB, A block of a job ≤ 192 KB: both L2-resident).  Only tiles on or above the
// diagonal are computed, and on the diagonal panel a micro-tile drops its 16-column vectors that
// lie wholly below the diagonal (1.3 × the needed flops on that panel instead of 2 ×).
// Threading: a job is one column panel × up to 192 rows, jobs handed out dynamically, widest
// panels first; packing splits the pairs over threads.  (gfim.cpp prefers whole layers per thread
// whenever L allows, and then all of this runs inline.)
// Rows are packed in chunks of ≤ 2^22 words (16 MB), so a huge m never gets a full packed copy.
//
// Measured (a one-off probe, m = 8000, 2 Zen 4 cores shared with other jobs, ratios taken within one
// process; bench/RESULTS.md's GFIM section, `python -m bench.compare --only gfim`, tracks it since; GFLOP/s count our symmetric half m·d·(d+1), a GEMM 2·m·d²):
//   L = 12, d = 768:  100 GFLOP/s = 81 % of torch.mm bf16 (123), 0.61 of its time; old path 24 %
//   L = 12, d = 2048: 103 GFLOP/s = 77 % of torch.mm bf16 (133), 0.65 of its time; old path 31 %
//   L = 1 (tiles split across threads): 0.94 (d = 768) and 0.78 (d = 2048) of torch.mm's time
//     on a box where two threads got about one core, so every barrier waited for a timeslice;
//     one thread alone: 0.75 at d = 768.
// One core: micro-kernel 145–185 GFLOP/s from L1 (vdpbf16ps peak measured ~155, fp32 FMA ~78);
// packing is ~5 % of the time at d = 768, ~2 % at d = 2048.
#include "hyperinf_ops.h"

#include <immintrin.h>

#include <cstring>
#include <vector>

namespace hyperinf {
namespace {

constexpr int64_t NR = 48;  // columns per packed panel / micro-tile (3 zmm of 16 fp32)
constexpr int64_t MR = 8;   // rows per micro-tile
constexpr int64_t KC = 256;  // pairs per K-block
constexpr int64_t IB = 192;  // rows per job (a multiple of MR)
constexpr int64_t kPackWords = int64_t{1} << 22;

#define HYPERINF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// C[0:rows, 0:ncols] (+)= the micro-tile A[kc pairs × 8]ᵀ·B[kc pairs × 16W].  A and B both step by
// NR words per pair.  ncols ≤ 16W; `first` overwrites C instead of adding to it.
template <int W>
HYPERINF_BF16_TARGET void micro_kernel(const uint32_t* A, const uint32_t* B, int64_t kc, float* C, int64_t ldc,
                                       int64_t rows, int64_t ncols, bool first) {
  __m512 acc[MR][W];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < W; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kc; ++kp, A += NR, B += NR) {
    __m512bh b[W];
    for (int v = 0; v < W; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r]));
      for (int v = 0; v < W; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int v = 0; v < W; ++v) {
    const int64_t n = ncols - 16 * v;
    if (n <= 0) break;
    const __mmask16 mask = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    for (int64_t r = 0; r < rows; ++r) {
      float* c = C + r * ldc + 16 * v;
      const __m512 x = first ? acc[r][v] : _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), acc[r][v]);
      _mm512_mask_storeu_ps(c, mask, x);
    }
  }
}

// Packs pairs [kp0, kp1) of the chunk starting at row `row0` of g into P (np pairs per panel).
HYPERINF_BF16_TARGET void pack_pairs(const uint16_t* g, int64_t s0, int64_t s1, int64_t m, int64_t d, int64_t row0,
                                     int64_t np, int64_t n_panels, int64_t kp0, int64_t kp1, uint32_t* P) {
  const int64_t groups = n_panels * (NR / 16);
  if (s1 == 1) {
    // Rows are contiguous: interleave 16 columns of two rows with one permute.
    alignas(64) static constexpr uint16_t kIdx[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i idx = _mm512_load_si512(kIdx);
    for (int64_t kp = kp0; kp < kp1; ++kp) {
      const int64_t k = row0 + 2 * kp;
      const uint16_t* r0 = g + k * s0;
      const uint16_t* r1 = k + 1 < m ? g + (k + 1) * s0 : nullptr;
      for (int64_t q = 0; q < groups; ++q) {
        const int64_t c = 16 * q;
        const int64_t n = std::min<int64_t>(16, d - c);
        const __mmask16 mask = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
        const __m256i a = _mm256_maskz_loadu_epi16(mask, r0 + c);
        const __m256i b = r1 ? _mm256_maskz_loadu_epi16(mask, r1 + c) : _mm256_setzero_si256();
        const __m512i ab = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
        _mm512_storeu_si512(P + ((q / 3) * np + kp) * NR + (q % 3) * 16, ab);
      }
    }
    return;
  }
  // Any other strides (column-major included: there a pair is one unaligned 32-bit read).
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    const int64_t k = row0 + 2 * kp;
    const bool odd_tail = k + 1 >= m;
    for (int64_t c = 0; c < n_panels * NR; ++c) {
      uint32_t w = 0;
      if (c < d) {
        const uint16_t* p = g + k * s0 + c * s1;
        if (s0 == 1 && !odd_tail) {
          std::memcpy(&w, p, 4);
        } else {
          w = uint32_t{p[0]} | (odd_tail ? 0u : uint32_t{p[s0]} << 16);
        }
      }
      P[((c / NR) * np + kp) * NR + c % NR] = w;
    }
  }
}

// One job: rows [i0, i1) of column panel jb, over all K-blocks of the packed chunk.
HYPERINF_BF16_TARGET void run_job(const uint32_t* P, int64_t np, int64_t d, int64_t jb, int64_t i0, int64_t i1,
                                  float* S, bool first_chunk) {
  const int64_t j0 = jb * NR;
  for (int64_t kb = 0; kb < np; kb += KC) {
    const int64_t kc = std::min(KC, np - kb);
    const bool first = first_chunk && kb == 0;
    const uint32_t* B = P + (jb * np + kb) * NR;
    for (int64_t i = i0; i < i1; i += MR) {
      const uint32_t* A = P + ((i / NR) * np + kb) * NR + i % NR;
      // Skip the 16-column vectors wholly below the diagonal (only on the diagonal panel).
      const int64_t v0 = i > j0 ? (i - j0) / 16 : 0;
      const int64_t col0 = j0 + 16 * v0;
      const int64_t rows = std::min(MR, d - i), ncols = std::min<int64_t>(16 * (3 - v0), d - col0);
      float* C = S + i * d + col0;
      switch (v0) {
        case 0: micro_kernel<3>(A, B, kc, C, d, rows, ncols, first); break;
        case 1: micro_kernel<2>(A, B + 16, kc, C, d, rows, ncols, first); break;
        default: micro_kernel<1>(A, B + 32, kc, C, d, rows, ncols, first); break;
      }
    }
  }
}

}  // namespace

bool gfim_bf16_kernel_usable() {
  static const bool usable = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return usable;
}

void gfim_bf16_upper(const at::Tensor& g, float* S, at::Tensor& scratch) {
  TORCH_INTERNAL_ASSERT(g.scalar_type() == at::kBFloat16 && g.dim() == 2 && gfim_bf16_kernel_usable());
  const int64_t m = g.size(0), d = g.size(1);
  const int64_t s0 = g.stride(0), s1 = g.stride(1);
  const uint16_t* base = reinterpret_cast<const uint16_t*>(g.const_data_ptr<at::BFloat16>());
  const int64_t n_panels = (d + NR - 1) / NR;
  const int64_t total_pairs = (m + 1) / 2;
  // Pairs per chunk: a multiple of KC, so only the last K-block of the last chunk is short.
  const int64_t chunk_pairs =
      std::min(total_pairs, std::max<int64_t>(KC, kPackWords / (n_panels * NR) / KC * KC));
  const int64_t words = chunk_pairs * n_panels * NR;
  if (!scratch.defined() || scratch.scalar_type() != at::kInt || scratch.numel() < words) {
    scratch = at::empty({words}, at::TensorOptions().dtype(at::kInt));
  }
  uint32_t* P = reinterpret_cast<uint32_t*>(scratch.mutable_data_ptr<int32_t>());

  // Jobs: column panels from the widest (most rows on or above the diagonal) down, each cut into
  // IB-row pieces; the diagonal piece of a panel is the smallest.
  struct Job {
    int64_t jb, i0, i1;
  };
  std::vector<Job> jobs;
  for (int64_t jb = n_panels - 1; jb >= 0; --jb) {
    const int64_t i_end = std::min(d, (jb + 1) * NR);
    for (int64_t i0 = 0; i0 < i_end; i0 += IB) jobs.push_back({jb, i0, std::min(i_end, i0 + IB)});
  }
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());

  for (int64_t p0 = 0; p0 < total_pairs; p0 += chunk_pairs) {
    const int64_t np = std::min(chunk_pairs, total_pairs - p0);
    const int64_t row0 = 2 * p0;
    // ~16 K words per task: enough to amortise the fork, fine enough to balance.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / (n_panels * NR));
    at::parallel_for(0, np, grain, [&](int64_t kp0, int64_t kp1) {
      pack_pairs(base, s0, s1, m, d, row0, np, n_panels, kp0, kp1, P);
    });
    const bool first_chunk = p0 == 0;
    parallel_items(n_jobs, [&](std::atomic<int64_t>& next) {
      for (int64_t t; (t = next.fetch_add(1)) < n_jobs;) {
        run_job(P, np, d, jobs[t].jb, jobs[t].i0, jobs[t].i1, S, first_chunk);
      }
    });
  }
}

}  // namespace hyperinf
