// Gradient projection y = grads · proj ([B, r, d] · [d, k] → [B, r, k]) and its per-example
// power-of-two quantisation (values = round(y / s_b), s_b = 2^k_b), for a compressed gradient index.
//
// The GEMM is BLAS's (at::cpu::mm_out on the B·r flattened rows); grads that BLAS cannot take
// directly (another dtype than proj, or strides that do not flatten to a matrix) are converted in
// chunks of whole examples, so a huge bf16 grads never gets a full fp32 copy.  The quantisation is
// one pass per example (parallel over examples): max |y| over its r·k entries, the scale from it, then
// the scaled, rounded copy, while the example's rows are still in cache.
#include "hyperinf_ops.h"

#include <ATen/ops/mm_cpu_dispatch.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

namespace hyperinf {
namespace {

// Converted chunk ≈ 2^21 elements (8 MB in fp32), as in gfim.cpp: large enough for an efficient
// GEMM, small enough to live beside the grads.
constexpr int64_t kChunkElems = int64_t{1} << 21;
// float32's normal exponents: scales stay normal floats, so no consumer that flushes subnormals
// (GPU fast paths, DAZ) can turn one into 0.  A row too small for 2^-126 keeps that scale (its values
// then sit below 2^E but are still representable); above 2^127 there is no float32 scale, and the op
// returns inf so that ops/ names the example.
constexpr int kMinScaleExp = -126;
constexpr int kMaxScaleExp = 127;

bool blas_rows(const at::Tensor& g2) {
  return g2.stride(1) == 1 && g2.stride(0) >= std::max<int64_t>(1, g2.size(1));
}

// y [B, r, k] (proj's dtype, contiguous) = grads · proj.
at::Tensor project_into(const at::Tensor& grads, const at::Tensor& proj) {
  const int64_t B = grads.size(0), r = grads.size(1), d = grads.size(2), k = proj.size(1);
  at::Tensor y = at::empty({B, r, k}, proj.options());
  if (B == 0 || r == 0 || k == 0) return y;
  if (d == 0) return y.zero_();
  // The kernel is the whole op: nothing inside it should be recorded by autograd.
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor y2 = y.view({B * r, k});
  if (grads.scalar_type() == proj.scalar_type()) {
    // reshape is a view whenever the strides allow (contiguous, or sliced along B only, ...).
    at::Tensor g2 = grads.reshape({B * r, d});
    if (blas_rows(g2)) {
      at::cpu::mm_out(y2, g2, proj);
      return y;
    }
  }
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(B, kChunkElems / std::max<int64_t>(r * d, 1)));
  at::Tensor chunk = at::empty({step, r, d}, proj.options());
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t nb = std::min(step, B - b0);
    at::Tensor c = chunk.narrow(0, 0, nb);
    c.copy_(grads.narrow(0, b0, nb));
    at::Tensor out = y2.narrow(0, b0 * r, nb * r);
    at::cpu::mm_out(out, c.view({nb * r, d}), proj);
  }
  return y;
}

// The scale exponent of one example from max |y| (the rule of backends/torch.py: pow2_scale):
// amax = m·2^e with m in [1/2, 1) gives k = max(e − top, −126); 0 → scale 1; NaN/inf → NaN.
template <typename acc_t>
float scale_of(acc_t amax, int64_t top, int* k_out) {
  *k_out = 0;
  if (!(amax <= std::numeric_limits<acc_t>::max())) return std::numeric_limits<float>::quiet_NaN();
  if (amax == acc_t(0)) return 1.0f;
  int e = 0;
  std::frexp(amax, &e);
  const int64_t k = std::max<int64_t>(int64_t{e} - top, kMinScaleExp);
  if (k > kMaxScaleExp) return std::numeric_limits<float>::infinity();
  *k_out = static_cast<int>(k);
  return std::ldexp(1.0f, static_cast<int>(k));
}

template <typename acc_t, typename out_t>
void quantize(const acc_t* y, out_t* values, float* scale, int64_t B, int64_t n, int64_t top) {
  // One example per task, several per grain: an example is r·k values (a few thousand).
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(n, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* yb = y + b * n;
      out_t* vb = values + b * n;
      acc_t amax = 0;
      bool nan = false;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t a = std::abs(yb[i]);
        nan |= a != a;
        amax = a > amax ? a : amax;
      }
      int k = 0;
      scale[b] = scale_of<acc_t>(nan ? std::numeric_limits<acc_t>::quiet_NaN() : amax, top, &k);
      // 2^-k is exact in acc_t (at worst the subnormal 2^-127 in float), so y·inv is y/s exactly;
      // the conversion is the one rounding (to nearest even; double → half goes through float, as
      // torch's own cast does).
      const acc_t inv = std::ldexp(acc_t(1), -k);
      for (int64_t i = 0; i < n; ++i) vb[i] = static_cast<out_t>(yb[i] * inv);
    }
  });
}

}  // namespace

at::Tensor project_cpu(const at::Tensor& grads, const at::Tensor& proj) {
  TORCH_CHECK(grads.device().is_cpu() && proj.device().is_cpu(), "project: expected CPU tensors");
  TORCH_CHECK(grads.dim() == 3 && proj.dim() == 2 && grads.size(2) == proj.size(0),
              "project: expected grads [B, r, d] and proj [d, k], got ", grads.sizes(), " and ", proj.sizes());
  TORCH_CHECK(proj.scalar_type() == at::kFloat || proj.scalar_type() == at::kDouble,
              "project: proj must be float32 or float64, got ", proj.scalar_type());
  TORCH_CHECK(at::isFloatingType(grads.scalar_type()), "project: grads must be floating point, got ",
              grads.scalar_type());
  return project_into(grads, proj.contiguous());
}

std::tuple<at::Tensor, at::Tensor> project_quantize_cpu(const at::Tensor& grads, const at::Tensor& proj,
                                                        at::ScalarType out_dtype, int64_t top_exponent) {
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat,
              "project_quantize: out_dtype must be float16, bfloat16 or float32, got ", out_dtype);
  at::Tensor y = project_cpu(grads, proj);
  const int64_t B = y.size(0), n = y.size(1) * y.size(2);
  at::Tensor values = at::empty(y.sizes(), y.options().dtype(out_dtype));
  at::Tensor scale = at::ones({B}, y.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return {values, scale};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "hyperinf_project_quantize", [&] {
    using acc_t = scalar_t;
    const acc_t* yp = y.const_data_ptr<acc_t>();
    float* sp = scale.mutable_data_ptr<float>();
    switch (out_dtype) {
      case at::kHalf:
        quantize<acc_t, c10::Half>(yp, values.mutable_data_ptr<c10::Half>(), sp, B, n, top_exponent);
        break;
      case at::kBFloat16:
        quantize<acc_t, c10::BFloat16>(yp, values.mutable_data_ptr<c10::BFloat16>(), sp, B, n, top_exponent);
        break;
      default:
        quantize<acc_t, float>(yp, values.mutable_data_ptr<float>(), sp, B, n, top_exponent);
    }
  });
  return {values, scale};
}

}  // namespace hyperinf
