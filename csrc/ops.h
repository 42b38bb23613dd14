// Entry points of the C++ CPU kernels, one group per op; csrc/registration.cpp registers them as the
// CPU kernels of the iapt:: ops (schemas: iapt_kernels/schemas.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

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

// csrc/multi_tenant.cpp: (P, A, Z, U, G, n, Wdp) and (gH, gWd, gbd, gWp, gnum, gden, gWu, gbu); the
// lists are the schemas' (iapt_kernels/schemas.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multi_tenant_generator_fwd(const at::Tensor& h, const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& cu_seqlens, at::TensorList groups,
                           at::TensorList weights, c10::string_view version, int64_t max_seqlen);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multi_tenant_generator_bwd(const at::Tensor& grad, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& cu_seqlens, at::TensorList groups,
                           at::TensorList weights, at::TensorList saved, c10::string_view version,
                           int64_t max_seqlen);

}  // namespace iapt
