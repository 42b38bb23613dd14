/*
 * Fused CPU kernels for IAPT self-attention pooling with projections, forward and backward.
 *
 *   U = A^T (H Wd^T + bd),   A = softmax over s of (H Wd^T + bd) Wp^T, masked
 *
 * computed by reassociation, never forming H Wd^T (B, S, r):
 *
 *   Wdp = Wd^T Wp^T (d, L),   c = Wp bd (L)
 *   E   = H Wdp + c                          (B, S, L)   instruction tokens only
 *   A   = softmax_s(E)                       (B, S, L)   0 at other positions, 0 for empty rows
 *   Z   = A^T H                              (B, L, d)
 *   U   = Z Wd^T + n bd                      (B, L, r)   n_b = 1 if row b has any token, else 0
 *
 * Backward, for an upstream gradient gU:
 *
 *   gZ    = gU Wd                            (B, L, d)
 *   gA    = H gZ^T,   gE = A (gA - delta),   delta_l = sum_s A_sl gA_sl
 *   gH    = A gZ + gE Wdp^T                  exactly 0 at masked positions
 *   gWdp  = sum_b H_b^T gE_b,   gWd = sum_b gU_b^T Z_b + (gWdp Wp)^T,   gbd = sum_b n_b sum_l gU_bl
 *   gWp   = (Wd gWdp)^T
 *
 * Design
 *  - The passes over H are bound by memory traffic, so each direction reads every instruction row
 *    of H from memory once (as the Triton twin does):
 *      forward:  online softmax. A block of up to kRows rows is read for its scores (E = H Wdp),
 *                then, still in L2, folded into Z with weights exp(E - m); the Z built so far is
 *                rescaled when the running max m grows.
 *      backward: delta = sum_s A gA equals Z . gZ (Z = A^T H), so it is known before the pass and
 *                gA, gE, the gH rows and the gWdp partial all come from one read of each row. The
 *                gWdp partials are then corrected to the delta of the gA actually computed (see
 *                bwd_finish), so the weight gradients match the two-pass formulation.
 *    gH needs no H (gH_s = A_s gZ + gE_s Wdp^T): it is written row by row in panels with
 *    streaming stores, which skip the read-for-ownership of every output line. While a block is
 *    being folded, the next block's rows are prefetched, so the memory stream overlaps the math.
 *  - The L-wide products are hand-blocked for registers: the score kernel holds 2 rows x 4 lanes
 *    of vector accumulators; the column kernel (Z update, gWdp) keeps one accumulator per lane
 *    while it sweeps a block's rows; the row kernel (gH, gWd) keeps the lane coefficients in
 *    registers. Vectors are GCC vector extensions (32 bytes), ymm + FMA in the x86-64-v3 clone.
 *    The small d x r x L products around the passes (Wdp, gZ, U, gWd, gWp) reuse these kernels,
 *    rather than BLAS, which is slow and allocation-heavy at these skinny shapes.
 *  - Masked positions are never loaded: rows are gathered by index, so NaN/Inf there cannot reach
 *    a result (a BLAS A^T H would give 0 * NaN = NaN). gH is written with zeros there.
 *  - Work is split into chunks (ranges of positions of one sequence with equal token counts) that
 *    depend on the mask only, never on the thread count; each chunk writes its own partials, which
 *    are merged in chunk order; every output element is reduced in a fixed order. So results are
 *    bitwise reproducible for any number of threads, without atomics, and a packed batch gives
 *    bitwise the results of the same batch padded.
 *  - fp16/bf16 rows are converted to float in a small scratch block; all arithmetic runs in T
 *    (double for float64, float otherwise).
 *
 * Build with -O3 -fopenmp (compile and link): at::parallel_for runs serially without -fopenmp.
 */

#include "common.h"
#include "pool_chunks.h"
#include "pool_pass.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace iapt {
// ap: the products (pool_simd.h) and the chunk passes (pool_chunks.h) this file's drivers run.
using namespace ap;

namespace {

// ---------------------------------------------------------------------------------------------
// Small products over Wd (r, d), in T
// ---------------------------------------------------------------------------------------------

// out[l, k] = sum_j p[j * np + l] Wd[j, k] for l < np, k in [k0, k1): Wdp^T (p = Wp^T) and, in
// the backward, gZ alongside (p = [Wp^T | gU^T]). Each column is summed over j in order, so the
// split into column tasks does not change a result.
template <typename T>
IAPT_INLINE void project_cols(const T* wd, int64_t r, int64_t d, const T* p, int64_t np, T* out,
                              int64_t k0, int64_t k1) {
  const T* rows[kRows];
  for (int64_t j0 = 0; j0 < r; j0 += kRows) {
    const int n = static_cast<int>(std::min<int64_t>(kRows, r - j0));
    for (int i = 0; i < n; ++i) rows[i] = wd + (j0 + i) * d + k0;
    pool(rows, n, p + j0 * np, np, np, static_cast<const T*>(nullptr), j0 == 0, out + k0, d, k1 - k0);
  }
}

// out[j * nq + l] = Wd_j . q_l for j in [j0, j1), l < nq: U^T (q = Z) and gWp^T (q = gWdp^T).
template <typename T>
IAPT_INLINE void wd_dots(const T* wd, int64_t d, const T* q, int64_t nq, T* out, int64_t j0,
                         int64_t j1) {
  const T* rows[kRows];
  for (int64_t j = j0; j < j1; j += kRows) {
    const int n = static_cast<int>(std::min<int64_t>(kRows, j1 - j));
    for (int i = 0; i < n; ++i) rows[i] = wd + (j + i) * d;
    dots(rows, n, q, d, nq, d, out + j * nq, nq);
  }
}

// gWd rows [j0, j1) = sum_l Wp[l, j] gWdp^T_l + sum_bl gU[bl, j] Z_bl: the column kernel with the
// L + B L rows of X = [gWdp^T; Z] streaming and the output rows as lanes; coef^T = [Wp | gU]
// (L + B L, r) holds the lane weights. Each element sums its terms in one fixed order.
template <typename T>
IAPT_INLINE void wd_grad_rows(const T* const* x, int nx, const T* coeft, int64_t r, int64_t d,
                              T* out, int64_t j0, int64_t j1) {
  pool(x, nx, coeft + j0, r, j1 - j0, static_cast<const T*>(nullptr), true, out + j0 * d, d, d);
}

// Multiversioned entry points; the kernels above are force-inlined into each clone.
#define IAPT_DEFINE_PASSES(NAME, S, T)                                                          \
  IAPT_MULTIVERSION void fwd_##NAME(const FwdArgs<S, T>& a, int64_t c0, int64_t c1) {           \
    fwd_chunks<S, T>(a, c0, c1);                                                                \
  }                                                                                             \
  IAPT_MULTIVERSION void bwd_##NAME(const BwdArgs<S, T>& a, int64_t c0, int64_t c1) {           \
    bwd_chunks<S, T>(a, c0, c1);                                                                \
  }
#define IAPT_DEFINE_PRODUCTS(NAME, T)                                                           \
  IAPT_MULTIVERSION void project_##NAME(const T* wd, int64_t r, int64_t d, const T* p,          \
                                        int64_t np, T* out, int64_t k0, int64_t k1) {           \
    project_cols<T>(wd, r, d, p, np, out, k0, k1);                                              \
  }                                                                                             \
  IAPT_MULTIVERSION void wd_dots_##NAME(const T* wd, int64_t d, const T* q, int64_t nq, T* out, \
                                        int64_t j0, int64_t j1) {                               \
    wd_dots<T>(wd, d, q, nq, out, j0, j1);                                                      \
  }                                                                                             \
  IAPT_MULTIVERSION void wd_grad_##NAME(const T* const* x, int nx, const T* coeft, int64_t r,   \
                                        int64_t d, T* out, int64_t j0, int64_t j1) {            \
    wd_grad_rows<T>(x, nx, coeft, r, d, out, j0, j1);                                           \
  }

IAPT_DEFINE_PASSES(f32, float, float)
IAPT_DEFINE_PASSES(f64, double, double)
IAPT_DEFINE_PASSES(f16, c10::Half, float)
IAPT_DEFINE_PASSES(bf16, c10::BFloat16, float)
IAPT_DEFINE_PRODUCTS(f32, float)
IAPT_DEFINE_PRODUCTS(f64, double)

#undef IAPT_DEFINE_PASSES
#undef IAPT_DEFINE_PRODUCTS

template <typename S>
struct Kernels;
template <>
struct Kernels<float> {
  using T = float;
  static constexpr auto fwd = &fwd_f32;
  static constexpr auto bwd = &bwd_f32;
};
template <>
struct Kernels<double> {
  using T = double;
  static constexpr auto fwd = &fwd_f64;
  static constexpr auto bwd = &bwd_f64;
};
template <>
struct Kernels<c10::Half> {
  using T = float;
  static constexpr auto fwd = &fwd_f16;
  static constexpr auto bwd = &bwd_f16;
};
template <>
struct Kernels<c10::BFloat16> {
  using T = float;
  static constexpr auto fwd = &fwd_bf16;
  static constexpr auto bwd = &bwd_bf16;
};

IAPT_INLINE void project(const float* wd, int64_t r, int64_t d, const float* p, int64_t np, float* out, int64_t k0, int64_t k1) { project_f32(wd, r, d, p, np, out, k0, k1); }
IAPT_INLINE void project(const double* wd, int64_t r, int64_t d, const double* p, int64_t np, double* out, int64_t k0, int64_t k1) { project_f64(wd, r, d, p, np, out, k0, k1); }
IAPT_INLINE void wd_dots_mv(const float* wd, int64_t d, const float* q, int64_t nq, float* out, int64_t j0, int64_t j1) { wd_dots_f32(wd, d, q, nq, out, j0, j1); }
IAPT_INLINE void wd_dots_mv(const double* wd, int64_t d, const double* q, int64_t nq, double* out, int64_t j0, int64_t j1) { wd_dots_f64(wd, d, q, nq, out, j0, j1); }
IAPT_INLINE void wd_grad_mv(const float* const* x, int nx, const float* coeft, int64_t r, int64_t d, float* out, int64_t j0, int64_t j1) { wd_grad_f32(x, nx, coeft, r, d, out, j0, j1); }
IAPT_INLINE void wd_grad_mv(const double* const* x, int nx, const double* coeft, int64_t r, int64_t d, double* out, int64_t j0, int64_t j1) { wd_grad_f64(x, nx, coeft, r, d, out, j0, j1); }

// out (np, d) = p^T Wd for p (r, np), parallel over column ranges.
template <typename T>
void project_all(const T* wd, int64_t r, int64_t d, const T* p, int64_t np, T* out) {
  const int64_t tasks = (d + kColTask - 1) / kColTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    project(wd, r, d, p, np, out, t0 * kColTask, std::min(d, t1 * kColTask));
  });
}

// out (r, nq) = Wd q^T for q (nq, d), parallel over rows of Wd.
template <typename T>
void wd_dots_all(const T* wd, int64_t r, int64_t d, const T* q, int64_t nq, T* out) {
  const int64_t tasks = (r + kRows - 1) / kRows;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    wd_dots_mv(wd, d, q, nq, out, t0 * kRows, std::min(r, t1 * kRows));
  });
}

// ---------------------------------------------------------------------------------------------
// Merges (small: L x d per chunk)
// ---------------------------------------------------------------------------------------------

// Per sequence: combine the chunk partials in chunk order into Z, turn the raw scores in A into
// weights, and set n.
template <typename T>
void fwd_finish(const Layout& lay, const Plan& plan, const T* zpart, const T* mpart, const T* dpart,
                const int64_t* count, T* a, T* z, T* nvec) {
  const int64_t L = lay.L, d = lay.d;
  at::parallel_for(0, lay.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> mx(L), inv(L);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = plan.first[b], c1 = plan.first[b + 1];
      bool any = false;
      for (int64_t c = c0; c < c1; ++c) any = any || count[c] > 0;
      for (int64_t l = 0; l < L; ++l) {
        T M = -std::numeric_limits<T>::infinity();
        for (int64_t c = c0; c < c1; ++c)
          if (count[c] > 0) M = std::max(M, mpart[c * L + l]);
        T den = T(0);
        for (int64_t c = c0; c < c1; ++c)
          if (count[c] > 0) den += dpart[c * L + l] * std::exp(mpart[c * L + l] - M);
        mx[l] = M;
        inv[l] = den > T(0) ? T(1) / den : T(0);  // an empty instruction pools to U = 0
        T* zl = z + (b * L + l) * d;
        std::fill(zl, zl + d, T(0));
        for (int64_t c = c0; c < c1; ++c) {
          if (count[c] == 0) continue;  // an empty chunk never wrote its partial
          const T w = std::exp(mpart[c * L + l] - M) * inv[l];
          const T* src = zpart + (c * L + l) * d;
          for (int64_t k = 0; k < d; ++k) zl[k] += w * src[k];
        }
      }
      T* ab = a + b * lay.S * L;
      for (int64_t s = 0; s < lay.S; ++s) {
        const bool v = any && lay.valid(b, s);  // a skipped sequence's raw scores were never written
        for (int64_t l = 0; l < L; ++l)
          ab[s * L + l] = v ? std::exp(ab[s * L + l] - mx[l]) * inv[l] : T(0);
      }
      nvec[b] = any ? T(1) : T(0);
    }
  });
}

// gWdp^T (L, d) = sum over sequences b, in order, of [its chunk partials, in order, then
// Z_b (delta_b - sum_s A gA)]. The partials used gE' = A (gA - delta) with delta = Z . gZ, which
// equals sum_s A gA only up to rounding; the last term swaps in the sum over the gA actually
// computed, so gWdp (hence gWd, gWp) is that of gE = A (gA - sum_s A gA) as in the two-pass
// formulation. (With a peaked softmax the difference matters: a one-token sequence, say, gets
// gE = 0 and exactly zero weight gradients.) gH keeps gE': there it is a relative O(eps) change.
// With `sel`, `out` is (sets, L, d) and each sequence adds into its own set's slice.
template <typename T>
void bwd_finish(const Layout& lay, const Plan& plan, const T* part, const int64_t* count,
                const T* z, const T* corr, T* dst, const int32_t* sel = nullptr, int64_t sets = 1) {
  const int64_t L = lay.L, d = lay.d;
  at::parallel_for(0, L * d, 2048, [&](int64_t k0, int64_t k1) {
    for (int64_t set = 0; set < sets; ++set) std::fill(dst + set * L * d + k0, dst + set * L * d + k1, T(0));
    for (int64_t b = 0; b < lay.B; ++b) {
      if (sel && sel[b] < 0) continue;
      T* out = dst + (sel ? sel[b] : 0) * L * d;
      bool any = false;
      for (int64_t c = plan.first[b]; c < plan.first[b + 1]; ++c) {
        if (count[c] == 0) continue;
        any = true;
        const T* src = part + c * L * d;
        for (int64_t k = k0; k < k1; ++k) out[k] += src[k];
      }
      if (!any) continue;
      const T* zb = z + b * L * d;
      for (int64_t k = k0; k < k1; ++k) out[k] += zb[k] * corr[b * L + k / d];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

// Validates H, the layout arguments and the weights; returns the layout (pointers unset).
Layout check_common(const char* fn, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
                    const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& down_weight,
                    const at::Tensor& pool_weight, int64_t max_seqlen) {
  TORCH_CHECK(h.device().is_cpu(), fn, ": hidden states must be a CPU tensor, got ", h.device());
  const auto st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, fn,
              ": hidden states must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(down_weight.dim() == 2, fn, ": down_weight must be (r, d), got shape ", down_weight.sizes());
  TORCH_CHECK(pool_weight.dim() == 2 && pool_weight.size(1) == down_weight.size(0), fn,
              ": pool_weight must be (L, r) with r = ", down_weight.size(0), ", got shape ",
              pool_weight.sizes());
  TORCH_CHECK(pool_weight.size(0) >= 1, fn, ": pool_weight must have at least one row (L >= 1)");
  TORCH_CHECK(down_weight.scalar_type() == st && pool_weight.scalar_type() == st, fn,
              ": weights must have the dtype of the hidden states (", st, "), got down_weight ",
              down_weight.scalar_type(), " and pool_weight ", pool_weight.scalar_type());
  TORCH_CHECK(down_weight.device().is_cpu() && pool_weight.device().is_cpu(), fn,
              ": weights must be CPU tensors");
  Layout lay;
  lay.L = pool_weight.size(0);
  const bool has_mask = mask.has_value() && mask->defined();
  const bool has_cu = cu_seqlens.has_value() && cu_seqlens->defined();
  TORCH_CHECK(has_mask != has_cu, fn,
              ": pass exactly one of mask (padded layout) or cu_seqlens (packed layout)");
  if (has_cu) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(h.dim() == 2, fn, ": with cu_seqlens, hidden states must be packed (N, d), got shape ", h.sizes());
    TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
                fn, ": cu_seqlens must be a 1-D int32 CPU tensor of B + 1 offsets");
    TORCH_CHECK(max_seqlen >= 0, fn, ": max_seqlen must be >= 0, got ", max_seqlen);
    lay.packed = true;
    lay.B = cu.numel() - 1;
    lay.S = max_seqlen;
    lay.d = h.size(1);
  } else {
    const at::Tensor& m = *mask;
    TORCH_CHECK(h.dim() == 3, fn, ": with a mask, hidden states must be padded (B, S, d), got shape ", h.sizes());
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool, fn,
                ": mask must be a bool CPU tensor, got ", m.scalar_type(), " on ", m.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == h.size(0) && m.size(1) == h.size(1), fn,
                ": mask must be (B, S) = (", h.size(0), ", ", h.size(1), "), got ", m.sizes());
    lay.B = h.size(0);
    lay.S = h.size(1);
    lay.d = h.size(2);
  }
  TORCH_CHECK(down_weight.size(1) == lay.d, fn, ": hidden size d = ", lay.d,
              " does not match down_weight of shape ", down_weight.sizes());
  return lay;
}

// Points the layout at the (contiguous) mask or offsets, checking the offsets of a packed batch.
void bind_layout(const char* fn, Layout& lay, const at::Tensor& h, const at::Tensor& mask_c,
                 const at::Tensor& cu_c) {
  if (lay.packed) {
    lay.cu = cu_c.data_ptr<int32_t>();
    TORCH_CHECK(lay.cu[0] == 0, fn, ": cu_seqlens must start at 0, got ", lay.cu[0]);
    for (int64_t b = 0; b < lay.B; ++b) {
      const int64_t len = static_cast<int64_t>(lay.cu[b + 1]) - lay.cu[b];
      TORCH_CHECK(len >= 0, fn, ": cu_seqlens must be non-decreasing");
      TORCH_CHECK(len <= lay.S, fn, ": sequence ", b, " has ", len, " tokens, more than max_seqlen = ", lay.S);
    }
    TORCH_CHECK(lay.cu[lay.B] == h.size(0), fn, ": cu_seqlens must end at N = ", h.size(0), ", got ",
                lay.cu[lay.B]);
  } else {
    lay.mask = mask_c.data_ptr<bool>();
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------------------------

// Inputs shared by both directions, in the compute type: Wd, and p = [Wp^T | extra] (r, L + ne),
// the coefficients whose projection p^T Wd gives Wdp^T (and, with extra = gU^T, gZ).
template <typename T>
struct Weights {
  at::Tensor wd;  // (r, d) contiguous
  std::vector<T> p;
  int64_t r = 0, np = 0;
};

template <typename T>
Weights<T> weights(const at::Tensor& down_weight, const at::Tensor& pool_weight, const T* gu,
                   int64_t BL) {
  Weights<T> w;
  const auto ct = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  w.wd = down_weight.to(ct).contiguous();
  const at::Tensor wp = pool_weight.to(ct).contiguous();
  const int64_t L = wp.size(0);
  w.r = w.wd.size(0);
  w.np = L + BL;
  w.p.resize(static_cast<size_t>(w.r * w.np));
  const T* wpp = wp.data_ptr<T>();
  for (int64_t j = 0; j < w.r; ++j) {
    for (int64_t l = 0; l < L; ++l) w.p[j * w.np + l] = wpp[l * w.r + j];
    for (int64_t m = 0; m < BL; ++m) w.p[j * w.np + L + m] = gu[m * w.r + j];
  }
  return w;
}

// The pass over H, forward: A, Z, n from Wdp^T and c; with `sel`, per-sequence weight sets.
template <typename S>
void pass_forward(const Layout& lay, const at::Tensor& h, const typename Kernels<S>::T* wdp,
                  const typename Kernels<S>::T* c, const int32_t* sel, int64_t want, at::Tensor& a,
                  at::Tensor& z, at::Tensor& n) {
  using T = typename Kernels<S>::T;
  const int64_t L = lay.L, d = lay.d;
  const Plan plan = plan_chunks(lay, want);
  const int64_t nc = static_cast<int64_t>(plan.chunks.size());
  std::vector<T> zpart(static_cast<size_t>(nc * L * d)), mpart(static_cast<size_t>(nc * L)),
      dpart(static_cast<size_t>(nc * L));
  std::vector<int64_t> count(static_cast<size_t>(nc), 0);
  FwdArgs<S, T> args{lay, plan.chunks.data(), h.data_ptr<S>(), wdp, c, sel, a.data_ptr<T>(),
                     zpart.data(), mpart.data(), dpart.data(), count.data()};
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) { Kernels<S>::fwd(args, c0, c1); });
  fwd_finish<T>(lay, plan, zpart.data(), mpart.data(), dpart.data(), count.data(), a.data_ptr<T>(),
                z.data_ptr<T>(), n.data_ptr<T>());
}

// The pass over H, backward: gH and gWdp^T (sets, L, d) from gZ; with `sel`, set `sel[b]` of
// sequence b gets its sum (in batch order), and a skipped sequence gets gH = 0.
template <typename S>
void pass_backward(const Layout& lay, const at::Tensor& h, const typename Kernels<S>::T* wdp,
                   const typename Kernels<S>::T* gz, const int32_t* sel, int64_t sets, int64_t want,
                   const at::Tensor& a, const at::Tensor& z, at::Tensor& gh,
                   typename Kernels<S>::T* gwdp) {
  using T = typename Kernels<S>::T;
  const int64_t L = lay.L, d = lay.d, B = lay.B, BL = B * L;
  const T* zp = z.data_ptr<T>();
  // delta = Z . gZ, accumulated in double: gE subtracts it from gA.
  std::vector<T> delta(static_cast<size_t>(BL));
  at::parallel_for(0, BL, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      double s = 0.0;
      for (int64_t k = 0; k < d; ++k) s += static_cast<double>(zp[m * d + k]) * static_cast<double>(gz[m * d + k]);
      delta[m] = static_cast<T>(s);
    }
  });

  const Plan plan = plan_chunks(lay, want);
  const int64_t nc = static_cast<int64_t>(plan.chunks.size());
  std::vector<T> gwpart(static_cast<size_t>(nc * L * d));
  std::vector<double> dpart(static_cast<size_t>(nc * L), 0.0);
  std::vector<int64_t> count(static_cast<size_t>(nc), 0);
  BwdArgs<S, T> args{lay, plan.chunks.data(), h.data_ptr<S>(), wdp, sel, gz, delta.data(), a.data_ptr<T>(),
                     gh.data_ptr<S>(), gwpart.data(), dpart.data(), count.data()};
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) { Kernels<S>::bwd(args, c0, c1); });

  // corr = delta - sum_s A gA per (b, l), the chunk sums added in chunk order.
  std::vector<T> corr(static_cast<size_t>(BL), T(0));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      double sum = 0.0;
      for (int64_t c = plan.first[b]; c < plan.first[b + 1]; ++c) sum += dpart[c * L + l];
      corr[b * L + l] = delta[b * L + l] - static_cast<T>(sum);
    }
  bwd_finish<T>(lay, plan, gwpart.data(), count.data(), zp, corr.data(), gwdp, sel, sets);
}

template <typename S>
void run_forward(const Layout& lay, const at::Tensor& h, const at::Tensor& down_weight,
                 const at::Tensor& down_bias, const at::Tensor& pool_weight, at::Tensor& u,
                 at::Tensor& a, at::Tensor& z, at::Tensor& n) {
  using T = typename Kernels<S>::T;
  const int64_t L = lay.L, d = lay.d, B = lay.B, BL = B * L;
  const Weights<T> w = weights<T>(down_weight, pool_weight, nullptr, 0);
  const int64_t r = w.r;
  const T* wd = w.wd.template data_ptr<T>();
  std::vector<T> wdp(static_cast<size_t>(L * d));
  project_all<T>(wd, r, d, w.p.data(), L, wdp.data());
  const at::Tensor bd_t = down_bias.to(a.scalar_type()).contiguous();
  const T* bd = bd_t.data_ptr<T>();
  std::vector<T> c(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    double s = 0.0;
    for (int64_t j = 0; j < r; ++j) s += static_cast<double>(w.p[j * L + l]) * static_cast<double>(bd[j]);
    c[l] = static_cast<T>(s);
  }

  pass_forward<S>(lay, h, wdp.data(), c.data(), nullptr, 0, a, z, n);
  const T* nv = n.data_ptr<T>();

  // U = Z Wd^T + n bd, via U^T (r, B L) = Wd Z^T.
  std::vector<T> ut(static_cast<size_t>(r * BL));
  wd_dots_all<T>(wd, r, d, z.data_ptr<T>(), BL, ut.data());
  S* up = u.data_ptr<S>();
  for (int64_t m = 0; m < BL; ++m)
    for (int64_t j = 0; j < r; ++j) up[m * r + j] = static_cast<S>(ut[j * BL + m] + nv[m / L] * bd[j]);
}

template <typename S>
void run_backward(const Layout& lay, const at::Tensor& grad_u, const at::Tensor& h,
                  const at::Tensor& down_weight, const at::Tensor& pool_weight, const at::Tensor& a,
                  const at::Tensor& z, const at::Tensor& n, at::Tensor& gh, at::Tensor& g_wd,
                  at::Tensor& g_bd, at::Tensor& g_wp) {
  using T = typename Kernels<S>::T;
  const int64_t L = lay.L, d = lay.d, B = lay.B, BL = B * L;
  const at::Tensor gu_t = grad_u.to(a.scalar_type()).contiguous();
  const T* gu = gu_t.data_ptr<T>();
  const Weights<T> w = weights<T>(down_weight, pool_weight, gu, BL);
  const int64_t r = w.r;
  const T* wd = w.wd.template data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  const T* nv = n.data_ptr<T>();

  // [Wdp^T; gZ] (L + B L, d) in one projection of Wd.
  std::vector<T> proj(static_cast<size_t>((L + BL) * d));
  project_all<T>(wd, r, d, w.p.data(), L + BL, proj.data());
  const T* wdp = proj.data();
  const T* gz = proj.data() + L * d;
  std::vector<T> gwdp(static_cast<size_t>(L * d));
  pass_backward<S>(lay, h, wdp, gz, nullptr, 1, 0, a, z, gh, gwdp.data());

  // gWd = Wp^T gWdp^T + sum_b gU_b^T Z_b, 16 rows a task; in place for float/double outputs.
  {
    std::vector<const T*> x(static_cast<size_t>(L + BL));
    for (int64_t l = 0; l < L; ++l) x[l] = gwdp.data() + l * d;
    for (int64_t m = 0; m < BL; ++m) x[L + m] = zp + m * d;
    std::vector<T> coeft(static_cast<size_t>((L + BL) * r));
    for (int64_t j = 0; j < r; ++j)
      for (int64_t m = 0; m < L + BL; ++m) coeft[m * r + j] = w.p[j * (L + BL) + m];
    constexpr bool direct = std::is_same<S, T>::value;
    std::vector<T> tmp(direct ? 0 : static_cast<size_t>(r * d));
    T* dst = direct ? reinterpret_cast<T*>(g_wd.data_ptr<S>()) : tmp.data();
    at::parallel_for(0, (r + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
      wd_grad_mv(x.data(), static_cast<int>(L + BL), coeft.data(), r, d, dst, t0 * kRows,
                 std::min(r, t1 * kRows));
    });
    if (!direct) {
      S* gwd = g_wd.data_ptr<S>();
      for (int64_t k = 0; k < r * d; ++k) gwd[k] = static_cast<S>(tmp[k]);
    }
  }
  // gWp = gWdp^T Wd^T, via its transpose Wd gWdp.
  std::vector<T> gwpt(static_cast<size_t>(r * L));
  wd_dots_all<T>(wd, r, d, gwdp.data(), L, gwpt.data());
  S* gwp = g_wp.data_ptr<S>();
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < r; ++j) gwp[l * r + j] = static_cast<S>(gwpt[j * L + l]);
  // gbd = sum_b n_b sum_l gU_bl.
  S* gbd = g_bd.data_ptr<S>();
  for (int64_t j = 0; j < r; ++j) {
    T s = T(0);
    for (int64_t m = 0; m < BL; ++m) s += nv[m / L] * gu[m * r + j];
    gbd[j] = static_cast<S>(s);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_fwd(
    const at::Tensor& h, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& down_weight, const at::Tensor& down_bias, const at::Tensor& pool_weight,
    int64_t max_seqlen) {
  const char* fn = "attention_pool_fwd";
  Layout lay = check_common(fn, h, mask, cu_seqlens, down_weight, pool_weight, max_seqlen);
  const int64_t r = down_weight.size(0);
  TORCH_CHECK(down_bias.dim() == 1 && down_bias.size(0) == r, fn, ": down_bias must be (r,) = (", r,
              ",), got ", down_bias.sizes());
  TORCH_CHECK(down_bias.scalar_type() == h.scalar_type() && down_bias.device().is_cpu(), fn,
              ": down_bias must be a CPU tensor of dtype ", h.scalar_type());
  const auto ct = compute_type(h.scalar_type());
  const at::Tensor hc = h.contiguous();
  const at::Tensor mask_c = lay.packed ? at::Tensor() : mask->contiguous();
  const at::Tensor cu_c = lay.packed ? cu_seqlens->contiguous() : at::Tensor();
  bind_layout(fn, lay, hc, mask_c, cu_c);

  const auto opts = h.options().dtype(ct);
  at::Tensor u = at::empty({lay.B, lay.L, r}, h.options());
  at::Tensor a = at::empty({lay.B, lay.S, lay.L}, opts);
  at::Tensor z = at::empty({lay.B, lay.L, lay.d}, opts);
  at::Tensor n = at::empty({lay.B}, opts);
  IAPT_DISPATCH_FLOATING(h.scalar_type(), "attention_pool", run_forward, lay, hc, down_weight, down_bias, pool_weight, u, a, z, n);
  return {u, a, z, n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd(
    const at::Tensor& grad_u, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& down_weight,
    const at::Tensor& pool_weight, const at::Tensor& a, const at::Tensor& z, const at::Tensor& n,
    int64_t max_seqlen) {
  const char* fn = "attention_pool_bwd";
  Layout lay = check_common(fn, h, mask, cu_seqlens, down_weight, pool_weight, max_seqlen);
  const int64_t r = down_weight.size(0), L = lay.L, B = lay.B, d = lay.d;
  const auto ct = compute_type(h.scalar_type());
  TORCH_CHECK(grad_u.device().is_cpu() && grad_u.dim() == 3 && grad_u.size(0) == B &&
                  grad_u.size(1) == L && grad_u.size(2) == r,
              fn, ": grad_u must be a CPU tensor of shape (B, L, r) = (", B, ", ", L, ", ", r, "), got ",
              grad_u.sizes());
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == ct && a.dim() == 3 && a.size(0) == B &&
                  a.size(1) == lay.S && a.size(2) == L,
              fn, ": a must be the forward's (B, S, L) = (", B, ", ", lay.S, ", ", L, ") tensor of dtype ",
              ct, ", got ", a.sizes(), " ", a.scalar_type());
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == ct && z.dim() == 3 && z.size(0) == B &&
                  z.size(1) == L && z.size(2) == d,
              fn, ": z must be the forward's (B, L, d) = (", B, ", ", L, ", ", d, ") tensor of dtype ",
              ct, ", got ", z.sizes(), " ", z.scalar_type());
  TORCH_CHECK(n.device().is_cpu() && n.scalar_type() == ct && n.dim() == 1 && n.size(0) == B, fn,
              ": n must be the forward's (B,) = (", B, ",) tensor of dtype ", ct, ", got ", n.sizes(),
              " ", n.scalar_type());
  const at::Tensor hc = h.contiguous();
  const at::Tensor mask_c = lay.packed ? at::Tensor() : mask->contiguous();
  const at::Tensor cu_c = lay.packed ? cu_seqlens->contiguous() : at::Tensor();
  bind_layout(fn, lay, hc, mask_c, cu_c);

  at::Tensor gh = at::empty(hc.sizes(), hc.options());
  advise_huge_pages(gh);
  at::Tensor g_wd = at::empty({r, d}, h.options());
  at::Tensor g_bd = at::empty({r}, h.options());
  at::Tensor g_wp = at::empty({L, r}, h.options());
  IAPT_DISPATCH_FLOATING(h.scalar_type(), "attention_pool", run_backward, lay, grad_u, hc, down_weight, pool_weight,
                a.contiguous(), z.contiguous(), n.contiguous(), gh, g_wd, g_bd, g_wp);
  return {gh, g_wd, g_bd, g_wp};
}

// ---------------------------------------------------------------------------------------------
// Internals for the multi-tenant generator (csrc/pool_pass.h)
// ---------------------------------------------------------------------------------------------

namespace detail {
namespace {

// Chunks per sequence in the multi-tenant pass, fixed so a request's arithmetic is that of the
// request alone (a mixed batch's results per tenant are bitwise those of its sub-batches).
constexpr int64_t kSetChunks = kMinTasks;

template <typename S>
void set_forward(const Layout& lay, const at::Tensor& h, const at::Tensor& wdp, const at::Tensor& c,
                 const int32_t* sel, at::Tensor& a, at::Tensor& z, at::Tensor& n) {
  using T = typename Kernels<S>::T;
  pass_forward<S>(lay, h, wdp.data_ptr<T>(), c.data_ptr<T>(), sel, kSetChunks, a, z, n);
}

template <typename S>
void set_backward(const Layout& lay, const at::Tensor& h, const at::Tensor& wdp, const int32_t* sel,
                  const at::Tensor& a, const at::Tensor& z, const at::Tensor& gz, at::Tensor& gh,
                  at::Tensor& gwdp) {
  using T = typename Kernels<S>::T;
  pass_backward<S>(lay, h, wdp.data_ptr<T>(), gz.data_ptr<T>(), sel, gwdp.size(0), kSetChunks, a, z, gh,
                   gwdp.data_ptr<T>());
}

Layout set_layout(const char* fn, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
                  const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                  const at::Tensor& down_weight, const at::Tensor& pool_weight, const at::Tensor& wdp,
                  const at::Tensor& sel, at::Tensor& hc, at::Tensor& mask_c, at::Tensor& cu_c) {
  Layout lay = check_common(fn, h, mask, cu_seqlens, down_weight, pool_weight, max_seqlen);
  hc = h.contiguous();
  if (lay.packed)
    cu_c = cu_seqlens->contiguous();
  else
    mask_c = mask->contiguous();
  bind_layout(fn, lay, hc, mask_c, cu_c);
  const auto ct = compute_type(h.scalar_type());
  TORCH_CHECK(wdp.scalar_type() == ct && wdp.is_contiguous() && wdp.dim() == 3 && wdp.size(1) == lay.L &&
                  wdp.size(2) == lay.d, fn, ": wdp must be contiguous (sets, L, d) of dtype ", ct);
  TORCH_CHECK(sel.scalar_type() == at::kInt && sel.is_contiguous() && sel.numel() == lay.B, fn,
              ": sel must be a contiguous (B,) int32 tensor");
  const int32_t* s = sel.data_ptr<int32_t>();
  for (int64_t b = 0; b < lay.B; ++b)
    TORCH_CHECK(s[b] >= -1 && s[b] < wdp.size(0), fn, ": sel[", b, "] = ", s[b], " is not in [-1, ",
                wdp.size(0), ")");
  return lay;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_pass_fwd(
    const char* fn, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, const at::Tensor& down_weight,
    const at::Tensor& pool_weight, const at::Tensor& wdp, const at::Tensor& c, const at::Tensor& sel) {
  at::Tensor hc, mask_c, cu_c;
  Layout lay = set_layout(fn, h, mask, cu_seqlens, max_seqlen, down_weight, pool_weight, wdp, sel, hc, mask_c,
                          cu_c);
  TORCH_CHECK(c.scalar_type() == wdp.scalar_type() && c.is_contiguous() && c.dim() == 2 &&
                  c.size(0) == wdp.size(0) && c.size(1) == lay.L, fn, ": c must be contiguous (sets, L)");
  const auto opts = h.options().dtype(wdp.scalar_type());
  at::Tensor a = at::empty({lay.B, lay.S, lay.L}, opts);
  at::Tensor z = at::empty({lay.B, lay.L, lay.d}, opts);
  at::Tensor n = at::empty({lay.B}, opts);
  IAPT_DISPATCH_FLOATING(h.scalar_type(), "attention_pool", set_forward, lay, hc, wdp, c, sel.data_ptr<int32_t>(), a, z, n);
  return {a, z, n};
}

std::tuple<at::Tensor, at::Tensor> pool_pass_bwd(
    const char* fn, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, const at::Tensor& down_weight,
    const at::Tensor& pool_weight, const at::Tensor& wdp, const at::Tensor& sel, const at::Tensor& a,
    const at::Tensor& z, const at::Tensor& gz) {
  at::Tensor hc, mask_c, cu_c;
  Layout lay = set_layout(fn, h, mask, cu_seqlens, max_seqlen, down_weight, pool_weight, wdp, sel, hc, mask_c,
                          cu_c);
  const auto ct = wdp.scalar_type();
  for (const at::Tensor* t : {&a, &z, &gz})
    TORCH_CHECK(t->scalar_type() == ct && t->is_contiguous(), fn, ": a, z, gz must be contiguous, of dtype ", ct);
  TORCH_CHECK(a.dim() == 3 && a.size(0) == lay.B && a.size(1) == lay.S && a.size(2) == lay.L, fn,
              ": a must be (B, S, L)");
  TORCH_CHECK(z.sizes() == gz.sizes() && z.dim() == 3 && z.size(0) == lay.B && z.size(1) == lay.L &&
                  z.size(2) == lay.d, fn, ": z and gz must be (B, L, d)");
  at::Tensor gh = at::empty(hc.sizes(), hc.options());
  advise_huge_pages(gh);
  at::Tensor gwdp = at::empty(wdp.sizes(), wdp.options());
  IAPT_DISPATCH_FLOATING(h.scalar_type(), "attention_pool", set_backward, lay, hc, wdp, sel.data_ptr<int32_t>(), a, z, gz, gh, gwdp);
  return {gh, gwdp};
}

void project_rows(const float* w, int64_t rows, int64_t len, const float* p, int64_t np, float* out,
                  int64_t k0, int64_t k1) {
  project(w, rows, len, p, np, out, k0, k1);
}
void project_rows(const double* w, int64_t rows, int64_t len, const double* p, int64_t np, double* out,
                  int64_t k0, int64_t k1) {
  project(w, rows, len, p, np, out, k0, k1);
}
void dot_rows(const float* w, int64_t len, const float* q, int64_t nq, float* out, int64_t j0, int64_t j1) {
  wd_dots_mv(w, len, q, nq, out, j0, j1);
}
void dot_rows(const double* w, int64_t len, const double* q, int64_t nq, double* out, int64_t j0, int64_t j1) {
  wd_dots_mv(w, len, q, nq, out, j0, j1);
}
void outer_rows(const float* const* x, int nx, const float* coef, int64_t ldc, int64_t len, float* out,
                int64_t j0, int64_t j1) {
  wd_grad_mv(x, nx, coef, ldc, len, out, j0, j1);
}
void outer_rows(const double* const* x, int nx, const double* coef, int64_t ldc, int64_t len, double* out,
                int64_t j0, int64_t j1) {
  wd_grad_mv(x, nx, coef, ldc, len, out, j0, j1);
}

}  // namespace detail

}  // namespace iapt
