// Operator library `hyperinf` (torch.ops.hyperinf.*) and its CPU kernels.
//
// The schemas live here, in C++, so the ops exist as soon as the shared object is loaded;
// hyperinf_ext/backends/cpp.py adds the fake (meta) kernels torch.compile needs.
#include <Python.h>
#include <torch/library.h>

#include "hyperinf_ops.h"

extern "C" {
// `import hyperinf_ext._C` only has to load this shared object so that the TORCH_LIBRARY static
// initialisers below run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "C++ CPU kernels of hyperinf-ext, registered as torch.ops.hyperinf.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hyperinf, m) {
  // acc [L, d, d] fp32/fp64 contiguous (mutated); grads [L, m, d] fp16/bf16/fp32/fp64, any strides.
  m.def("gfim_accumulate_(Tensor(a!) acc, Tensor grads) -> ()", {at::Tag::pt2_compliant_tag});
  // A [B, d, d] fp32/fp64; lower/upper [B] fp64 -> X like A, iterations/status int64 [B],
  // residual fp64 [B].  Status codes as in hyperinf_ext/backends/schedule.py.
  m.def(
      "schulz_inverse(Tensor A, Tensor lower, Tensor upper, float tol, int max_iter) -> "
      "(Tensor X, Tensor iterations, Tensor residual, Tensor status)",
      {at::Tag::pt2_compliant_tag});
  // One step on [d, d] matrices, for benchmarks: writes R = I − A·X and X_new, returns ‖R‖_F.
  // Returns a Python float, so it is eager-only (no fake kernel).
  m.def("schulz_step_(Tensor(a!) X_new, Tensor(b!) R, Tensor A, Tensor X, float beta) -> float");
  // Whether gfim_accumulate_ takes the AVX512-BF16 kernel for bf16 grads into an fp32 acc on this
  // CPU (for tests and benchmarks; HYPERINF_GFIM_BF16_KERNEL=0 still switches it off per call).
  // No tensor arguments, hence no backend to dispatch on: defined together with its kernel.
  m.def("gfim_bf16_kernel_available() -> bool", [] { return hyperinf::gfim_bf16_kernel_usable(); });
  // grads [B, r, d] any float dtype and strides; proj [d, k] fp32/fp64 -> y [B, r, k] in proj's dtype.
  m.def("project(Tensor grads, Tensor proj) -> Tensor", {at::Tag::pt2_compliant_tag});
  // The same y, then values [B, r, k] out_dtype (fp16/bf16/fp32) and scale fp32 [B] (powers of two)
  // with y ≈ values·scale[b]; top_exponent: max |values| < 2^top_exponent (project.cpp).
  m.def("project_quantize(Tensor grads, Tensor proj, ScalarType out_dtype, int top_exponent) -> "
        "(Tensor values, Tensor scale)",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(hyperinf, CPU, m) {
  m.impl("gfim_accumulate_", &hyperinf::gfim_accumulate_cpu);
  m.impl("schulz_inverse", &hyperinf::schulz_inverse_cpu);
  m.impl("schulz_step_", &hyperinf::schulz_step_cpu);
  m.impl("project", &hyperinf::project_cpu);
  m.impl("project_quantize", &hyperinf::project_quantize_cpu);
}
