// Internals of csrc/attention_pool.cpp shared with csrc/multi_tenant.cpp: the pass over H with a
// weight set per sequence, and the small hand-vectorised products the attention pool uses around it.
// All compute in T = float (float32/float16/bfloat16 storage) or double (float64).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace iapt {
namespace detail {

// Forward pass over H for sequences with their own weight sets: `wdp (sets, L, d)` = Wdp_k^T and
// `c (sets, L)` in the compute type, `sel (B,)` int32 the set of each sequence (-1: skipped, no
// work, A = 0, Z = 0, n = 0 there). Validates H and the layout as attention_pool_fwd does
// (`down_weight (r, d)`, `pool_weight (L, r)`: any one set's, for the shapes and dtype). Each
// sequence is cut into chunks that depend on it alone, so its results do not depend on the rest of
// the batch. Returns `(A (B, S, L), Z (B, L, d), n (B,))` in the compute type.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_pass_fwd(
    const char* fn, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, const at::Tensor& down_weight,
    const at::Tensor& pool_weight, const at::Tensor& wdp, const at::Tensor& c, const at::Tensor& sel);

// Backward of pool_pass_fwd for `gz (B, L, d)`: `(gH, gWdp^T (sets, L, d))`, each set's gWdp^T
// summed over its sequences in batch order; gH = 0 on skipped sequences.
std::tuple<at::Tensor, at::Tensor> pool_pass_bwd(
    const char* fn, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, const at::Tensor& down_weight,
    const at::Tensor& pool_weight, const at::Tensor& wdp, const at::Tensor& sel, const at::Tensor& a,
    const at::Tensor& z, const at::Tensor& gz);

// Single-threaded products over a row-major matrix W (rows, len); callers split the ranges.
// out[l * len + k] = sum_j p[j * np + l] W[j, k]  for l < np, k in [k0, k1)   (p^T W, p (rows, np))
void project_rows(const float* w, int64_t rows, int64_t len, const float* p, int64_t np, float* out,
                  int64_t k0, int64_t k1);
void project_rows(const double* w, int64_t rows, int64_t len, const double* p, int64_t np, double* out,
                  int64_t k0, int64_t k1);
// out[j * nq + l] = W_j . q_l  for j in [j0, j1), l < nq   (W q^T, q (nq, len))
void dot_rows(const float* w, int64_t len, const float* q, int64_t nq, float* out, int64_t j0, int64_t j1);
void dot_rows(const double* w, int64_t len, const double* q, int64_t nq, double* out, int64_t j0, int64_t j1);
// out[j * len + k] = sum_i coef[i * ldc + j] x_i[k]  for j in [j0, j1), each sum in order i = 0..nx-1
void outer_rows(const float* const* x, int nx, const float* coef, int64_t ldc, int64_t len, float* out,
                int64_t j0, int64_t j1);
void outer_rows(const double* const* x, int nx, const double* coef, int64_t ldc, int64_t len, double* out,
                int64_t j0, int64_t j1);

}  // namespace detail
}  // namespace iapt
