// Shared declarations of the hyperinf C++ CPU ops (registered in hyperinf_ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

namespace hyperinf {

// acc [L, d, d] float32/float64 contiguous; grads [L, m, d] any float dtype, any strides.
// acc[l] += grads[l]ᵀ·grads[l], computed on the upper triangle only and mirrored.
void gfim_accumulate_cpu(const at::Tensor& acc, const at::Tensor& grads);

// gfim_bf16.cpp: whether this CPU runs the AVX512-BF16 kernel (checked once).
bool gfim_bf16_kernel_usable();
// g [m, d] bf16, any strides, m ≥ 1; S [d, d] fp32 row-major.  Overwrites S[i, j] for i ≤ j with
// (gᵀ·g)[i, j] (entries just below the diagonal may be written too).  `scratch` holds the packed
// rows between calls (reallocated when too small).  Requires gfim_bf16_kernel_usable().
void gfim_bf16_upper(const at::Tensor& g, float* S, at::Tensor& scratch);

// A [B, d, d] float32/float64 contiguous; lower/upper [B] float64.
// Returns (X like A, iterations int64 [B], residual float64 [B], status int64 [B]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> schulz_inverse_cpu(
    const at::Tensor& A, const at::Tensor& lower, const at::Tensor& upper, double tol, int64_t max_iter);

// One Schulz step on [d, d] matrices: R = I − A·X, X_new = β(2−β)·X + β²·X·R; returns ‖R‖_F.
double schulz_step_cpu(const at::Tensor& X_new, const at::Tensor& R, const at::Tensor& A, const at::Tensor& X,
                       double beta);

// project.cpp.  grads [B, r, d] any float dtype, any strides; proj [d, k] float32/float64.
// Returns y = grads · proj as [B, r, k] in proj's dtype (grads converted to it first).
at::Tensor project_cpu(const at::Tensor& grads, const at::Tensor& proj);
// y as above, then per example b: scale[b] = 2^k_b (float32 [B]) with k_b = max(e_b − top_exponent, −126)
// where max|y_b| = m·2^e_b, m in [1/2, 1) (1 for an all-zero example, NaN for a non-finite one, inf past
// 2^127), and values [B, r, k] out_dtype (float16/bfloat16/float32) = y_b / scale[b] rounded to nearest.
std::tuple<at::Tensor, at::Tensor> project_quantize_cpu(const at::Tensor& grads, const at::Tensor& proj,
                                                        at::ScalarType out_dtype, int64_t top_exponent);

// Runs `worker(next)` once per thread; workers pull item indices from the shared counter `next`
// until it passes n_items.  Dynamic hand-out matters because items differ in cost (Schulz matrices
// converge in different iteration counts), which at::parallel_for's static split would leave idle.
// Workers allocate their scratch once, before pulling items.  Inside an enclosing parallel region
// (or with one thread) the single worker runs inline.
template <class Worker>
void parallel_items(int64_t n_items, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_items);
  if (n_threads <= 1 || at::in_parallel_region()) {
    worker(next);
    return;
  }
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) worker(next);
  });
}

}  // namespace hyperinf
