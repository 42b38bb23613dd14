// The iapt:: ops in PyTorch's dispatcher: their schemas (iapt_kernels/schemas.py, the one source
// that Python reads too) and the C++ kernels as their CPU implementations. Loading the library
// with torch.ops.load_library is all it takes to call them as torch.ops.iapt.*; iapt_kernels adds
// the CUDA (Triton) kernels, the fakes and the autograd formulas from Python.
#include "ops.h"

#include <torch/library.h>

namespace {

bool is_version_b(c10::string_view version) {
  TORCH_CHECK(version.size() == 1 && (version[0] == 'A' || version[0] == 'B'),
              "rational: version must be \"A\" or \"B\"");
  return version[0] == 'B';
}

at::Tensor rational_fwd(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator,
                        c10::string_view version) {
  return iapt::rational_fwd(x.contiguous(), numerator, denominator, is_version_b(version));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& numerator,
                                                             const at::Tensor& denominator,
                                                             c10::string_view version) {
  return iapt::rational_bwd(grad.contiguous(), x.contiguous(), numerator, denominator, is_version_b(version));
}

}  // namespace

TORCH_LIBRARY(iapt, m) {
#define IAPT_OP(schema) m.def(schema);
#include "../iapt_kernels/schemas.py"
#undef IAPT_OP
}

TORCH_LIBRARY_IMPL(iapt, CPU, m) {
  m.impl("rational_fwd", TORCH_FN(rational_fwd));
  m.impl("rational_bwd", TORCH_FN(rational_bwd));
  m.impl("attention_pool_fwd", TORCH_FN(iapt::attention_pool_fwd));
  m.impl("attention_pool_bwd", TORCH_FN(iapt::attention_pool_bwd));
  m.impl("multi_tenant_generator_fwd", TORCH_FN(iapt::multi_tenant_generator_fwd));
  m.impl("multi_tenant_generator_bwd", TORCH_FN(iapt::multi_tenant_generator_bwd));
}
