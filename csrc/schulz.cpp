// Scaled Schulz (Newton–Schulz) inverse of a batch of SPD matrices: the C++ twin of
// hyperinf_ext/backends/schedule.py::schulz_inverse, which is the specification.  The scalar helpers below
// mirror the Python ones operation for operation (same evaluation order, double precision, same
// min/max tie rules) so that both backends take the same decisions at every iteration.
//
// Per iteration and matrix: R = I − A·X as one GEMM whose beta carries the identity, r = ‖R‖_F,
// then X_new = β(2−β)·X + β²·X·R as one GEMM into the second buffer, and the buffers swap.  The
// previous iterate survives in the other buffer until the next update overwrites it, which is
// exactly what the stagnation rule's rollback needs.
#include "hyperinf_ops.h"

#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/linalg_vector_norm_cpu_dispatch.h>

#include <cmath>
#include <limits>
#include <utility>

// Python's float arithmetic never fuses a·b + c; a compiler allowed to emit FMAs (e.g. a build with
// -march=native) could round the bracket updates differently and change a decision.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace hyperinf {
namespace {

// Status codes, shared with hyperinf_ext/backends/schedule.py.
constexpr int64_t kConverged = 0;
constexpr int64_t kStagnated = 1;
constexpr int64_t kMaxIter = 2;
constexpr int64_t kDiverged = 3;
constexpr double kQuadraticPhase = 0.5;  // reference.QUADRATIC_PHASE
constexpr double kUnscaled = 1e-2;       // reference.UNSCALED

// Matrices of at most this size are solved one per thread (single-threaded BLAS) when the batch has
// two or more; larger ones are solved one after the other with BLAS threading each GEMM.  At
// d <= 256 a GEMM is ~30 MFLOP or less, where BLAS threading and its barriers cost more than
// whole-matrix parallelism (which has no synchronisation at all).
constexpr int64_t kSmallD = 256;

// std::min/std::max below keep Python's tie and argument order: min(x, y) is y iff y < x and
// max(x, y) is y iff y > x, for both languages.
double initial_scale(double lower, double upper) { return lower > 0 ? 2.0 / (lower + upper) : 1.0 / upper; }

struct Scale {
  double beta, a, b;
};

Scale step_scale(double a, double b, double residual) {
  if (residual < 1.0) {
    b = std::min(b, 1.0 + residual);
    if (a > 0.0) a = std::max(a, 1.0 - residual);
  }
  if (a <= 0.0) return {1.0, a, b};
  return {2.0 / (a + b), a, b};
}

std::pair<double, double> next_bracket(double a, double b, double beta) {
  const auto f = [beta](double s) { return beta * s * (2.0 - beta * s); };
  const double fa = f(a), fb = f(b);
  const double lo = std::min(fa, fb);
  const double hi = (a <= 1.0 / beta && 1.0 / beta <= b) ? 1.0 : std::max(fa, fb);
  return {lo, hi};
}

double divergence_limit(int64_t d) { return 2.0 * std::sqrt(static_cast<double>(d)) + 1.0; }

template <typename scalar_t>
void fill_scaled_identity(const at::Tensor& T, double value) {
  const int64_t d = T.size(0);
  scalar_t* p = T.data_ptr<scalar_t>();
  std::fill(p, p + d * d, scalar_t(0));
  const auto v = static_cast<scalar_t>(value);  // as `eye * beta0` rounds beta0 to the dtype
  for (int64_t i = 0; i < d; ++i) p[i * d + i] = v;
}

// R = I − A·X (R contiguous [d, d]); returns ‖R‖_F through the same ATen reduction the reference
// calls, in the dtype of R (float32 norms are rounded to float32 there too).
template <typename scalar_t>
double residual(at::Tensor& R, const at::Tensor& A, const at::Tensor& X, at::Tensor& nrm) {
  fill_scaled_identity<scalar_t>(R, 1.0);
  at::cpu::addmm_(R, A, X, /*beta=*/1, /*alpha=*/-1);
  at::cpu::linalg_vector_norm_out(nrm, R);
  return static_cast<double>(*nrm.const_data_ptr<scalar_t>());
}

// X_new = β(2−β)·X + β²·X·R in one GEMM (X_new must not alias X or R).
void update(at::Tensor& X_new, const at::Tensor& X, const at::Tensor& R, double beta) {
  at::cpu::addmm_out(X_new, X, X, R, /*beta=*/beta * (2.0 - beta), /*alpha=*/beta * beta);
}

struct Outcome {
  int64_t iterations;
  double residual;
  int64_t status;
};

// Per-thread work buffers, allocated once and reused for every matrix the thread solves.
struct Buffers {
  at::Tensor W, R, nrm;
  Buffers(int64_t d, const at::TensorOptions& opt)
      : W(at::empty({d, d}, opt)), R(at::empty({d, d}, opt)), nrm(at::empty({}, opt)) {}
};

// One matrix, step for step as reference.schulz_inverse.  The iterates alternate between X_out and
// buf.W; the returned iterate is copied into X_out if it ended in W.
template <typename scalar_t>
Outcome schulz_one(const at::Tensor& A, const at::Tensor& X_out, Buffers& buf, double lower, double upper,
                   double tol, int64_t max_iter) {
  const double limit = divergence_limit(A.size(0));
  const double beta0 = initial_scale(lower, upper);
  double a = beta0 * lower, b = beta0 * upper;
  at::Tensor X = X_out, other = buf.W;
  fill_scaled_identity<scalar_t>(X, beta0);
  double r_prev = std::numeric_limits<double>::infinity();
  double beta = std::numeric_limits<double>::infinity();
  double r = 0.0;
  int64_t k = 0, status = kConverged;
  while (true) {
    r = residual<scalar_t>(buf.R, A, X, buf.nrm);
    if (!std::isfinite(r) || r > limit) {
      status = kDiverged;
      break;
    }
    if (r <= tol) {
      status = kConverged;
      break;
    }
    if (r_prev < kQuadraticPhase && std::abs(beta - 1.0) < kUnscaled && r > 0.5 * r_prev) {
      status = kStagnated;
      if (r > r_prev) {  // the previous iterate is still intact in `other`
        std::swap(X, other);
        r = r_prev;
        --k;
      }
      break;
    }
    if (k == max_iter) {
      status = kMaxIter;
      break;
    }
    const Scale s = step_scale(a, b, r);
    beta = s.beta;
    r_prev = r;
    update(other, X, buf.R, beta);
    std::swap(X, other);
    std::tie(a, b) = next_bracket(s.a, s.b, beta);
    ++k;
  }
  if (!X.is_same(X_out)) X_out.copy_(X);
  return {k, r, status};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> schulz_inverse_cpu(
    const at::Tensor& A, const at::Tensor& lower, const at::Tensor& upper, double tol, int64_t max_iter) {
  TORCH_CHECK(A.device().is_cpu(), "schulz_inverse: expected a CPU tensor");
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "schulz_inverse: A must be [B, d, d], got ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "schulz_inverse: A must be float32 or float64, got ", A.scalar_type());
  const int64_t B = A.size(0), d = A.size(1);
  TORCH_CHECK(lower.dim() == 1 && lower.size(0) == B && upper.dim() == 1 && upper.size(0) == B,
              "schulz_inverse: lower and upper must be [B] = [", B, "], got ", lower.sizes(), " and ",
              upper.sizes());
  TORCH_CHECK(max_iter >= 0, "schulz_inverse: max_iter must be >= 0, got ", max_iter);

  const at::Tensor A_c = A.contiguous();
  const at::Tensor lo = lower.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor up = upper.to(at::kCPU, at::kDouble).contiguous();
  at::Tensor X = at::empty({B, d, d}, A.options());
  at::Tensor iters = at::zeros({B}, A.options().dtype(at::kLong));
  at::Tensor resid = at::zeros({B}, A.options().dtype(at::kDouble));
  at::Tensor status = at::zeros({B}, A.options().dtype(at::kLong));
  if (B == 0) return {X, iters, resid, status};

  at::AutoDispatchBelowADInplaceOrView guard;
  const double* lo_p = lo.const_data_ptr<double>();
  const double* up_p = up.const_data_ptr<double>();
  int64_t* it_p = iters.data_ptr<int64_t>();
  double* re_p = resid.data_ptr<double>();
  int64_t* st_p = status.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "hyperinf_schulz_inverse", [&] {
    const auto solve = [&](int64_t i, Buffers& buf) {
      const Outcome o = schulz_one<scalar_t>(A_c[i], X[i], buf, lo_p[i], up_p[i], tol, max_iter);
      it_p[i] = o.iterations;
      re_p[i] = o.residual;
      st_p[i] = o.status;
    };
    if (B >= 2 && d <= kSmallD) {
      parallel_items(B, [&](std::atomic<int64_t>& next) {
        at::AutoDispatchBelowADInplaceOrView worker_guard;  // TLS: not inherited by pool threads
        Buffers buf(d, A.options());
        for (int64_t i; (i = next.fetch_add(1)) < B;) solve(i, buf);
      });
    } else {
      Buffers buf(d, A.options());
      for (int64_t i = 0; i < B; ++i) solve(i, buf);
    }
  });
  return {X, iters, resid, status};
}

double schulz_step_cpu(const at::Tensor& X_new, const at::Tensor& R, const at::Tensor& A, const at::Tensor& X,
                       double beta) {
  TORCH_CHECK(A.dim() == 2 && A.size(0) == A.size(1), "schulz_step_: A must be [d, d], got ", A.sizes());
  for (const at::Tensor* t : {&X_new, &R, &X}) {
    TORCH_CHECK(t->sizes() == A.sizes() && t->scalar_type() == A.scalar_type() && t->device().is_cpu(),
                "schulz_step_: X_new, R, A and X must share shape, dtype and (CPU) device");
  }
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "schulz_step_: expected float32 or float64, got ", A.scalar_type());
  TORCH_CHECK(X_new.is_contiguous() && R.is_contiguous(), "schulz_step_: X_new and R must be contiguous");
  TORCH_CHECK(!X_new.is_same(X) && !X_new.is_same(R) && !R.is_same(X) && !R.is_same(A),
              "schulz_step_: X_new and R must be distinct buffers from the inputs");
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor nrm = at::empty({}, A.options());
  at::Tensor R_ = R, X_new_ = X_new;
  double r = 0.0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "hyperinf_schulz_step", [&] {
    r = residual<scalar_t>(R_, A, X, nrm);
    update(X_new_, X, R_, beta);
  });
  return r;
}

}  // namespace hyperinf
