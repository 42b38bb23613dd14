// The hand-vectorised products of the attention-pool pass over H (csrc/attention_pool.cpp, the only
// file that includes this): score dots of rows with L lanes, the column kernel z_l += sum_i p[i, l]
// rows[i], the row kernel combining two coefficient sets. All force-inlined into the multiversioned
// entry points of attention_pool.cpp, so each is compiled for every target there.
#pragma once

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// 32-byte vector values passed between always-inlined helpers never cross a real call, so the
// "AVX vector argument without AVX enabled changes the ABI" note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace iapt {
namespace ap {

// Rows per block: a block (up to 16 rows of d values) is read from memory by the score kernel
// and re-read from L2 by the column kernel, so it must sit well inside a 512 KiB L2 for large d.
constexpr int kRows = 16;
// Lanes of L handled together by the score and column kernels: 4 lanes of accumulators (x 2
// rows or x 2 vectors) plus the operands fill the 16 ymm registers.
constexpr int kLaneGroup = 4;
// Chunks: at least kMinTasks in all (enough to balance a few threads), but none with fewer than
// kMinChunk tokens (the per-chunk L x d partials must stay small next to the rows they cover).
constexpr int64_t kMinTasks = 16;
constexpr int64_t kMinChunk = 64;
// Bytes of the coefficient rows (2 L of them for gH) that the row kernel keeps in L1 per panel.
constexpr int64_t kPanelBytes = 16 * 1024;
// Columns per task of the small products over Wd.
constexpr int64_t kColTask = 256;

// ---------------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------------

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8), may_alias));
};
template <typename T>
using Vec = typename VecOf<T>::type;

// Elements of T in V: V is Vec<T> for the vector body of a loop, or T itself for its tail, so
// each kernel is written once and instantiated for both.
template <typename V, typename T>
constexpr int64_t width() {
  return static_cast<int64_t>(sizeof(V) / sizeof(T));
}

template <typename V, typename T>
IAPT_INLINE V loadu(const T* p) {
  if constexpr (std::is_same<V, T>::value)
    return *p;
  else
    return *reinterpret_cast<const typename VecOf<T>::unaligned*>(p);
}

template <typename V, typename T, typename O>
IAPT_INLINE void storeu(O* p, const V& v) {
  if constexpr (std::is_same<V, O>::value) {
    *p = v;
  } else if constexpr (std::is_same<O, T>::value) {
    *reinterpret_cast<typename VecOf<T>::unaligned*>(p) = v;
  } else if constexpr (std::is_same<V, T>::value) {
    *p = static_cast<O>(v);
  } else {
    for (int64_t j = 0; j < width<V, T>(); ++j) p[j] = static_cast<O>(v[j]);
  }
}

// Lanes folded in a fixed order, so a score does not depend on how the vector is split.
template <typename T>
IAPT_INLINE T hsum(const Vec<T>& v) {
  T s = v[0];
  for (int64_t j = 1; j < width<Vec<T>, T>(); ++j) s += v[j];
  return s;
}

// Streaming (non-temporal) store of one vector to 16-byte aligned `p`: gH is written once and not
// read back here, so bypassing the caches saves the read-for-ownership of every line and keeps the
// rows of H in cache.
template <typename V, typename T, typename O>
IAPT_INLINE void stream(O* p, const V& v) {
#if defined(__SSE2__)
  constexpr int64_t W = width<V, T>();
  if constexpr (std::is_same<O, float>::value) {
    for (int64_t j = 0; j < W; j += 4) _mm_stream_ps(p + j, _mm_setr_ps(v[j], v[j + 1], v[j + 2], v[j + 3]));
  } else if constexpr (std::is_same<O, double>::value) {
    for (int64_t j = 0; j < W; j += 2) _mm_stream_pd(p + j, _mm_setr_pd(v[j], v[j + 1]));
  } else {
    static_assert(sizeof(O) == 2 && W % 8 == 0, "16-bit outputs stream 8 values at a time");
    alignas(16) O t[W];
    storeu<V, T>(t, v);
    for (int64_t j = 0; j < W; j += 8)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + j), _mm_load_si128(reinterpret_cast<const __m128i*>(t + j)));
  }
#else
  storeu<V, T>(p, v);
#endif
}

IAPT_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------------
// Score kernel: dot products of rows with L lanes
// ---------------------------------------------------------------------------------------------

// out[r * ldo + l] = rows[r][0, len) . q[l * ldq + (0, len)] for NR rows and LG lanes: NR x LG
// vector accumulators (8 when full) hide the FMA latency, and each loaded vector feeds several FMAs.
template <int NR, int LG, typename T>
IAPT_INLINE void dots_tile(const T* const* rows, const T* q, int64_t ldq, int64_t len, T* out,
                           int64_t ldo) {
  using V = Vec<T>;
  constexpr int64_t W = width<V, T>();
  V acc[NR][LG];
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < LG; ++l) acc[r][l] = V{};
  int64_t k = 0;
  for (; k + W <= len; k += W) {
    V x[NR];
    for (int r = 0; r < NR; ++r) x[r] = loadu<V>(rows[r] + k);
    for (int l = 0; l < LG; ++l) {
      const V w = loadu<V>(q + l * ldq + k);
      for (int r = 0; r < NR; ++r) acc[r][l] += x[r] * w;
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int l = 0; l < LG; ++l) {
      T s = hsum<T>(acc[r][l]);
      for (int64_t j = k; j < len; ++j) s += rows[r][j] * q[l * ldq + j];
      out[r * ldo + l] = s;
    }
  }
}

template <int LG, typename T>
IAPT_INLINE void dots_group(const T* const* rows, int n, const T* q, int64_t ldq, int64_t len,
                            T* out, int64_t ldo) {
  // With few lanes, more rows per tile keep enough independent accumulators in flight.
  constexpr int NR = LG <= 2 ? 4 : 2;
  int i = 0;
  for (; i + NR <= n; i += NR) dots_tile<NR, LG>(rows + i, q, ldq, len, out + i * ldo, ldo);
  for (; i < n; ++i) dots_tile<1, LG>(rows + i, q, ldq, len, out + i * ldo, ldo);
}

// out[i * ldo + l] = rows[i] . q_l for i < n, l < nq. Each value is the same whatever tile it
// falls in (same per-lane sequence of operations), so the tiling never changes a result.
template <typename T>
IAPT_INLINE void dots(const T* const* rows, int n, const T* q, int64_t ldq, int64_t nq, int64_t len,
                      T* out, int64_t ldo) {
  for (int64_t l0 = 0; l0 < nq; l0 += kLaneGroup) {
    const T* ql = q + l0 * ldq;
    T* ol = out + l0;
    switch (std::min<int64_t>(kLaneGroup, nq - l0)) {
      case 1: dots_group<1>(rows, n, ql, ldq, len, ol, ldo); break;
      case 2: dots_group<2>(rows, n, ql, ldq, len, ol, ldo); break;
      case 3: dots_group<3>(rows, n, ql, ldq, len, ol, ldo); break;
      default: dots_group<4>(rows, n, ql, ldq, len, ol, ldo); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Column kernel: z_l += sum_i p[i, l] rows[i]
// ---------------------------------------------------------------------------------------------

// One column [k, k + U * width) for LG lanes:
//   z[l] = (first ? 0 : scale[l] * z[l]) + sum_i p[i * ldp + l] rows[i]      (scale null: 1)
// With U = 2 a step covers 64 bytes of each row, and also prefetches the same 64 bytes of each row
// of the next block (byte offsets pf_scale * k into pf[i]), one line per row per step.
template <int LG, int U, typename V, typename T>
IAPT_INLINE void pool_col(const T* const* rows, int n, const T* p, int64_t ldp, const T* scale,
                          bool first, T* z, int64_t ldz, int64_t k, const char* const* pf, int npf,
                          int64_t pf_scale) {
  constexpr int64_t W = width<V, T>();
  V acc[LG][U];
  for (int l = 0; l < LG; ++l)
    for (int u = 0; u < U; ++u) {
      if (first)
        acc[l][u] = V{};
      else if (scale)
        acc[l][u] = loadu<V>(z + l * ldz + k + u * W) * scale[l];
      else
        acc[l][u] = loadu<V>(z + l * ldz + k + u * W);
    }
  for (int i = 0; i < n; ++i) {
    V x[U];
    for (int u = 0; u < U; ++u) x[u] = loadu<V>(rows[i] + k + u * W);
    const T* pi = p + i * ldp;
    for (int l = 0; l < LG; ++l) {
      const T pl = pi[l];
      for (int u = 0; u < U; ++u) acc[l][u] += x[u] * pl;
    }
  }
  for (int i = 0; i < npf; ++i) __builtin_prefetch(pf[i] + k * pf_scale, 0, 3);
  for (int l = 0; l < LG; ++l)
    for (int u = 0; u < U; ++u) storeu<V, T>(z + l * ldz + k + u * W, acc[l][u]);
}

template <int LG, typename T>
IAPT_INLINE void pool_group(const T* const* rows, int n, const T* p, int64_t ldp, const T* scale,
                            bool first, T* z, int64_t ldz, int64_t len, const char* const* pf,
                            int npf, int64_t pf_scale) {
  using V = Vec<T>;
  constexpr int64_t W = width<V, T>();
  int64_t k = 0;
  for (; k + 2 * W <= len; k += 2 * W)
    pool_col<LG, 2, V>(rows, n, p, ldp, scale, first, z, ldz, k, pf, npf, pf_scale);
  for (; k + W <= len; k += W)
    pool_col<LG, 1, V>(rows, n, p, ldp, scale, first, z, ldz, k, pf, 0, 0);
  for (; k < len; ++k) pool_col<LG, 1, T>(rows, n, p, ldp, scale, first, z, ldz, k, pf, 0, 0);
  // The prefetch stream covers len * pf_scale bytes of a next row in 64-byte steps; a row tail
  // shorter than a step gets one more line.
  if (npf > 0 && len % (2 * W) != 0)
    for (int i = 0; i < npf; ++i) __builtin_prefetch(pf[i] + (len - 1) * pf_scale, 0, 3);
}

// z (nq lanes, row stride ldz) over columns [0, len) = (first ? 0 : scale * z) + p^T rows.
template <typename T>
IAPT_INLINE void pool(const T* const* rows, int n, const T* p, int64_t ldp, int64_t nq,
                      const T* scale, bool first, T* z, int64_t ldz, int64_t len,
                      const char* const* pf = nullptr, int npf = 0, int64_t pf_scale = 0) {
  for (int64_t l0 = 0; l0 < nq; l0 += kLaneGroup) {
    const T* pl = p + l0;
    const T* sl = scale ? scale + l0 : nullptr;
    T* zl = z + l0 * ldz;
    const int np = l0 == 0 ? npf : 0;  // the first lane group alone prefetches
    switch (std::min<int64_t>(kLaneGroup, nq - l0)) {
      case 1: pool_group<1>(rows, n, pl, ldp, sl, first, zl, ldz, len, pf, np, pf_scale); break;
      case 2: pool_group<2>(rows, n, pl, ldp, sl, first, zl, ldz, len, pf, np, pf_scale); break;
      case 3: pool_group<3>(rows, n, pl, ldp, sl, first, zl, ldz, len, pf, np, pf_scale); break;
      default: pool_group<4>(rows, n, pl, ldp, sl, first, zl, ldz, len, pf, np, pf_scale); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row kernel: out = sum_m c1[m] x1_m + sum_m c2[m] x2_m
// ---------------------------------------------------------------------------------------------

// One column of one output row. N > 0: m1 = m2 = N known at compile time, the 2 N coefficients
// held in registers by the caller; N = 0: run-time counts.
template <int N, int U, bool kStream, typename V, typename T, typename O>
IAPT_INLINE void comb_col(const T* c1, const T* x1, int64_t m1, const T* c2, const T* x2,
                          int64_t m2, int64_t ldx, O* out, int64_t k) {
  constexpr int64_t W = width<V, T>();
  const int64_t n1 = N > 0 ? N : m1, n2 = N > 0 ? N : m2;
  V acc[U];
  for (int u = 0; u < U; ++u) acc[u] = V{};
  for (int64_t m = 0; m < n1; ++m)
    for (int u = 0; u < U; ++u) acc[u] += loadu<V>(x1 + m * ldx + k + u * W) * c1[m];
  for (int64_t m = 0; m < n2; ++m)
    for (int u = 0; u < U; ++u) acc[u] += loadu<V>(x2 + m * ldx + k + u * W) * c2[m];
  for (int u = 0; u < U; ++u) {
    if constexpr (kStream)
      stream<V, T>(out + k + u * W, acc[u]);
    else
      storeu<V, T>(out + k + u * W, acc[u]);
  }
}

template <int N, bool kStream, typename T, typename O>
IAPT_INLINE void comb_row(const T* c1_, const T* x1, int64_t m1, const T* c2_, const T* x2,
                          int64_t m2, int64_t ldx, O* out, int64_t k0, int64_t k1) {
  using V = Vec<T>;
  constexpr int64_t W = width<V, T>();
  // Local copies: the stores to `out` could alias the coefficient arrays as far as the compiler
  // knows, which would force a reload of every coefficient for every vector.
  constexpr int NC = N > 0 ? N : 1;
  T c1l[NC], c2l[NC];
  const T* c1 = c1_;
  const T* c2 = c2_;
  if constexpr (N > 0) {
    for (int m = 0; m < N; ++m) {
      c1l[m] = c1_[m];
      c2l[m] = c2_[m];
    }
    c1 = c1l;
    c2 = c2l;
  }
  int64_t k = k0;
  for (; k + 2 * W <= k1; k += 2 * W) comb_col<N, 2, kStream, V>(c1, x1, m1, c2, x2, m2, ldx, out, k);
  for (; k + W <= k1; k += W) comb_col<N, 1, kStream, V>(c1, x1, m1, c2, x2, m2, ldx, out, k);
  for (; k < k1; ++k) comb_col<N, 1, false, T>(c1, x1, m1, c2, x2, m2, ldx, out, k);
}

// out[i][0, len) = sum_m c1[i * ldc + m] x1_m + sum_m c2[i * ldc + m] x2_m for i < n. Columns go in
// panels small enough that the panel of the m1 + m2 coefficient rows stays in L1 while every
// output row takes its turn; each output row is then written in long contiguous runs. Streaming
// stores are used when `stream_ok` and the row is 16-byte aligned (panels start 64-byte aligned
// into a row).
template <int N, typename T, typename O>
IAPT_INLINE void combine_n(int n, const T* c1, const T* c2, int64_t ldc, const T* x1, int64_t m1,
                           const T* x2, int64_t m2, int64_t ldx, int64_t len, O* const* out,
                           bool stream_ok) {
  const int64_t W = width<Vec<T>, T>();
  const int64_t lanes = std::max<int64_t>(1, m1 + m2);
  const int64_t panel = std::max<int64_t>(4 * W, kPanelBytes / (lanes * static_cast<int64_t>(sizeof(T))) / (2 * W) * (2 * W));
  for (int64_t k0 = 0; k0 < len; k0 += panel) {
    const int64_t k1 = std::min(len, k0 + panel);
    for (int i = 0; i < n; ++i) {
      if (stream_ok && reinterpret_cast<uintptr_t>(out[i]) % 16 == 0)
        comb_row<N, true>(c1 + i * ldc, x1, m1, c2 + i * ldc, x2, m2, ldx, out[i], k0, k1);
      else
        comb_row<N, false>(c1 + i * ldc, x1, m1, c2 + i * ldc, x2, m2, ldx, out[i], k0, k1);
    }
  }
}

template <typename T, typename O>
IAPT_INLINE void combine(int n, const T* c1, const T* c2, int64_t ldc, const T* x1, int64_t m1,
                         const T* x2, int64_t m2, int64_t ldx, int64_t len, O* const* out,
                         bool stream_ok) {
  switch (m1 == m2 ? m1 : 0) {
    case 1: combine_n<1>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 2: combine_n<2>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 3: combine_n<3>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 4: combine_n<4>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 5: combine_n<5>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 6: combine_n<6>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 7: combine_n<7>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    case 8: combine_n<8>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
    default: combine_n<0>(n, c1, c2, ldc, x1, m1, x2, m2, ldx, len, out, stream_ok); break;
  }
}

}  // namespace ap
}  // namespace iapt
