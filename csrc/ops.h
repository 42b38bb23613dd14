// Entry points of the C++ CPU kernels, one group per op; csrc/bindings.cpp exposes them to Python
// as iapt_kernels._C, and iapt_kernels/library.py registers them as the CPU kernels of the
// iapt:: torch.library ops.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace iapt {

// csrc/rational.cpp
at::Tensor rational_fwd(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator,
                        bool version_b);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& numerator,
                                                             const at::Tensor& denominator, bool version_b);

// csrc/attention_pool.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_fwd(
    const at::Tensor& h, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& down_weight, const at::Tensor& down_bias, const at::Tensor& pool_weight,
    int64_t max_seqlen);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd(
    const at::Tensor& grad_u, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& down_weight,
    const at::Tensor& pool_weight, const at::Tensor& a, const at::Tensor& z, const at::Tensor& n,
    int64_t max_seqlen);

}  // namespace iapt
