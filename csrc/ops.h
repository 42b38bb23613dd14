// Entry points of the C++ CPU kernels, one group per op; csrc/bindings.cpp exposes them to Python
// as iapt_kernels._C, and iapt_kernels/library.py registers them as the CPU kernels of the
// iapt:: torch.library ops.
#pragma once

#include <torch/extension.h>

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

// csrc/multi_tenant.cpp: (P, A, Z, U, G, n, Wdp) and (gH, gWd, gbd, gWp, gnum, gden, gWu, gbu)
std::vector<at::Tensor> multi_tenant_generator_fwd(
    const at::Tensor& h, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& order, const at::Tensor& seg_start, const at::Tensor& seg_tenant,
    const at::Tensor& down_weight, const at::Tensor& down_bias, const at::Tensor& pool_weight,
    const at::Tensor& numerator, const at::Tensor& denominator, const at::Tensor& up_weight,
    const at::Tensor& up_bias, bool version_b, int64_t max_seqlen);
std::vector<at::Tensor> multi_tenant_generator_bwd(
    const at::Tensor& grad, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& order, const at::Tensor& seg_start,
    const at::Tensor& seg_tenant, const at::Tensor& down_weight, const at::Tensor& pool_weight,
    const at::Tensor& numerator, const at::Tensor& denominator, const at::Tensor& up_weight,
    const at::Tensor& a, const at::Tensor& z, const at::Tensor& u, const at::Tensor& g_act,
    const at::Tensor& n, const at::Tensor& pool_product, bool version_b, int64_t max_seqlen);

}  // namespace iapt
