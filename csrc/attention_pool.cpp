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

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IAPT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define IAPT_MULTIVERSION
#endif

// The kernels must be inlined into the multiversioned entry points so that their bodies get
// compiled for each target; a plain `inline` is only a hint.
#if defined(__GNUC__)
#define IAPT_INLINE inline __attribute__((always_inline))
#else
#define IAPT_INLINE inline
#endif

// 32-byte vector values passed between always-inlined helpers never cross a real call, so the
// "AVX vector argument without AVX enabled changes the ABI" note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace iapt {
namespace {

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

// ---------------------------------------------------------------------------------------------
// Layout and chunks
// ---------------------------------------------------------------------------------------------

struct Layout {
  int64_t B = 0, S = 0, d = 0, L = 0;
  bool packed = false;
  const bool* mask = nullptr;     // (B, S), padded layout
  const int32_t* cu = nullptr;    // (B + 1,), packed layout

  IAPT_INLINE bool valid(int64_t b, int64_t s) const {
    return packed ? s < static_cast<int64_t>(cu[b + 1]) - cu[b] : mask[b * S + s];
  }
  IAPT_INLINE int64_t row(int64_t b, int64_t s) const { return packed ? cu[b] + s : b * S + s; }
};

// A unit of work: positions [s0, s1) of sequence b.
struct Chunk {
  int64_t b, s0, s1;
};

// The chunks of a sequence hold equal numbers of instruction tokens (a random mask still splits
// evenly), at least kMinTasks chunks in all where the tokens allow. The plan depends on the mask
// (resp. the offsets) only, never on the thread count, and a packed batch gets exactly the chunks,
// hence the arithmetic, of the same batch padded. Every sequence, even an empty one, has at least
// one chunk, and in the padded layout the chunks of a sequence tile [0, S), so every position has
// exactly one owner (which zeroes gH there if it is masked).
struct Plan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;  // (B + 1,): the chunks of sequence b are [first[b], first[b + 1])
};

// `want` > 0 fixes the chunks per sequence (the multi-tenant pass: then a request's chunks, hence its
// bits, do not depend on the rest of the batch); 0 derives it from B.
Plan plan_chunks(const Layout& lay, int64_t want = 0) {
  Plan plan;
  plan.first.assign(static_cast<size_t>(lay.B) + 1, 0);
  if (want <= 0) want = std::max<int64_t>(1, (kMinTasks + lay.B - 1) / std::max<int64_t>(1, lay.B));
  for (int64_t b = 0; b < lay.B; ++b) {
    plan.first[b] = static_cast<int64_t>(plan.chunks.size());
    int64_t tokens = 0;
    if (lay.packed) {
      tokens = static_cast<int64_t>(lay.cu[b + 1]) - lay.cu[b];
    } else {
      for (int64_t s = 0; s < lay.S; ++s) tokens += lay.mask[b * lay.S + s] ? 1 : 0;
    }
    const int64_t per = std::max<int64_t>(1, std::min(want, tokens / kMinChunk));
    const int64_t len = std::max<int64_t>(1, (tokens + per - 1) / per);
    if (lay.packed) {
      if (tokens == 0) plan.chunks.push_back({b, 0, 0});
      for (int64_t t = 0; t < tokens; t += len) plan.chunks.push_back({b, t, std::min(tokens, t + len)});
    } else {
      // A chunk starts at the position of its first token (the first one at 0) and runs to the
      // start of the next (the last one to S).
      plan.chunks.push_back({b, 0, lay.S});
      int64_t t = 0;
      for (int64_t s = 0; s < lay.S; ++s) {
        if (!lay.mask[b * lay.S + s]) continue;
        if (t > 0 && t % len == 0) {
          plan.chunks.back().s1 = s;
          plan.chunks.push_back({b, s, lay.S});
        }
        ++t;
      }
    }
  }
  plan.first[lay.B] = static_cast<int64_t>(plan.chunks.size());
  return plan;
}

// Up to kRows instruction rows of one sequence: their positions and where they are in H.
template <typename S>
struct Block {
  int n = 0;
  int64_t pos[kRows];
  const S* src[kRows];
};

// Collects the next block of sequence b from positions [s, s1), advancing s; `skip(s)` is called
// for every other position passed over. Only pointers: the rows are read later.
template <typename S, typename Skip>
IAPT_INLINE void gather(const Layout& lay, const S* h, int64_t b, int64_t& s, int64_t s1,
                        Block<S>& blk, Skip&& skip) {
  blk.n = 0;
  for (; s < s1 && blk.n < kRows; ++s) {
    if (!lay.valid(b, s)) {
      skip(s);
      continue;
    }
    blk.pos[blk.n] = s;
    blk.src[blk.n] = h + lay.row(b, s) * lay.d;
    ++blk.n;
  }
}

// Row pointers in T: float/double rows are used in place, fp16/bf16 rows converted into `buf`.
template <typename S, typename T>
IAPT_INLINE void rows_of(const Block<S>& blk, int64_t d, T* buf, const T** rows) {
  for (int i = 0; i < blk.n; ++i) {
    if constexpr (std::is_same<S, T>::value) {
      rows[i] = blk.src[i];
    } else {
      T* dst = buf + i * d;
      const S* src = blk.src[i];
      for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<T>(src[k]);
      rows[i] = dst;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: chunk pass
// ---------------------------------------------------------------------------------------------

template <typename S, typename T>
struct FwdArgs {
  Layout lay;
  const Chunk* chunks;
  const S* h;
  const T* wdp;    // Wdp^T (L, d), or (sets, L, d) with `sel`
  const T* c;      // (L,), or (sets, L) with `sel`
  const int32_t* sel;  // null, or (B,): the weight set of each sequence, -1 = skipped (no work)
  T* a;            // (B, S, L): raw scores here, normalised by fwd_finish
  T* zpart;        // (chunks, L, d): sum_s exp(E - m) H over the chunk
  T* mpart;        // (chunks, L): running max
  T* dpart;        // (chunks, L): sum_s exp(E - m)
  int64_t* count;  // (chunks,): instruction rows in the chunk
};

template <typename S, typename T>
IAPT_INLINE void fwd_chunks(const FwdArgs<S, T>& A, int64_t c0, int64_t c1) {
  const Layout& lay = A.lay;
  const int64_t d = lay.d, L = lay.L;
  std::vector<T> buf(std::is_same<S, T>::value ? 0 : kRows * d);
  std::vector<T> e(kRows * L), p(kRows * L), scale(L), m(L), den(L);
  Block<S> cur, nxt;
  const T* rows[kRows];
  const char* pf[kRows];
  auto skip = [](int64_t) {};  // fwd_finish writes A at the other positions
  for (int64_t ci = c0; ci < c1; ++ci) {
    const Chunk ch = A.chunks[ci];
    T* zc = A.zpart + ci * L * d;
    T* ab = A.a + ch.b * lay.S * L;
    int64_t count = 0;
    const int64_t set = A.sel ? A.sel[ch.b] : 0;
    if (set < 0) {  // count 0: fwd_finish writes A = 0, Z = 0, n = 0
      A.count[ci] = 0;
      continue;
    }
    const T* wdp = A.wdp + set * L * d;
    const T* cs = A.c + set * L;
    int64_t s = ch.s0;
    gather(lay, A.h, ch.b, s, ch.s1, cur, skip);
    while (cur.n > 0) {
      gather(lay, A.h, ch.b, s, ch.s1, nxt, skip);
      for (int i = 0; i < nxt.n; ++i) pf[i] = reinterpret_cast<const char*>(nxt.src[i]);
      const int n = cur.n;
      rows_of<S, T>(cur, d, buf.data(), rows);
      const bool first = count == 0;
      dots(rows, n, wdp, d, L, d, e.data(), L);
      for (int i = 0; i < n; ++i)
        for (int64_t l = 0; l < L; ++l) {
          e[i * L + l] += cs[l];
          ab[cur.pos[i] * L + l] = e[i * L + l];
        }
      // Online softmax: shift by the running max; the Z and den built so far are rescaled by
      // exp(m_old - m_new) inside the column pass, so the block is not read twice.
      for (int64_t l = 0; l < L; ++l) {
        T bm = e[l];
        for (int i = 1; i < n; ++i) bm = std::max(bm, e[i * L + l]);
        const T mn = first ? bm : std::max(m[l], bm);
        scale[l] = first ? T(0) : std::exp(m[l] - mn);
        T sum = T(0);
        for (int i = 0; i < n; ++i) {
          const T pv = std::exp(e[i * L + l] - mn);
          p[i * L + l] = pv;
          sum += pv;
        }
        den[l] = first ? sum : den[l] * scale[l] + sum;
        m[l] = mn;
      }
      pool(rows, n, p.data(), L, L, scale.data(), first, zc, d, d, pf, nxt.n,
           static_cast<int64_t>(sizeof(S)));
      count += n;
      std::swap(cur, nxt);
    }
    A.count[ci] = count;
    for (int64_t l = 0; l < L; ++l) {
      A.mpart[ci * L + l] = count ? m[l] : T(0);
      A.dpart[ci * L + l] = count ? den[l] : T(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: chunk pass
// ---------------------------------------------------------------------------------------------

template <typename S, typename T>
struct BwdArgs {
  Layout lay;
  const Chunk* chunks;
  const S* h;
  const T* wdp;     // Wdp^T (L, d), or (sets, L, d) with `sel`
  const int32_t* sel;  // as in FwdArgs; gH is 0 on a skipped sequence
  const T* gz;      // (B, L, d)
  const T* delta;   // (B, L): Z . gZ
  const T* a;       // (B, S, L)
  S* gh;            // like h
  T* gwpart;        // (chunks, L, d): sum_s gE^T H over the chunk
  double* dpart;    // (chunks, L): sum_s A gA over the chunk
  int64_t* count;   // (chunks,)
};

template <typename S, typename T>
IAPT_INLINE void bwd_chunks(const BwdArgs<S, T>& A, int64_t c0, int64_t c1) {
  const Layout& lay = A.lay;
  const int64_t d = lay.d, L = lay.L;
  std::vector<T> buf(std::is_same<S, T>::value ? 0 : kRows * d);
  std::vector<T> ga(kRows * L), av(kRows * L), ge(kRows * L);
  std::vector<double> dsum(L);
  Block<S> cur, nxt;
  const T* rows[kRows];
  const char* pf[kRows];
  S* out[kRows];
  for (int64_t ci = c0; ci < c1; ++ci) {
    const Chunk ch = A.chunks[ci];
    const T* gzb = A.gz + ch.b * L * d;
    const T* db = A.delta + ch.b * L;
    const T* ab = A.a + ch.b * lay.S * L;
    T* gwc = A.gwpart + ci * L * d;
    std::fill(dsum.begin(), dsum.end(), 0.0);
    int64_t count = 0;
    // Padded layout: gH is exactly 0 at masked positions (the row itself is never read).
    auto zero_gh = [&](int64_t s) { std::memset(A.gh + lay.row(ch.b, s) * d, 0, sizeof(S) * d); };
    const int64_t set = A.sel ? A.sel[ch.b] : 0;
    if (set < 0) {
      for (int64_t s = ch.s0; s < ch.s1; ++s) zero_gh(s);
      A.count[ci] = 0;
      std::fill(A.dpart + ci * L, A.dpart + (ci + 1) * L, 0.0);
      continue;
    }
    const T* wdp = A.wdp + set * L * d;
    int64_t s = ch.s0;
    gather(lay, A.h, ch.b, s, ch.s1, cur, zero_gh);
    while (cur.n > 0) {
      gather(lay, A.h, ch.b, s, ch.s1, nxt, zero_gh);
      for (int i = 0; i < nxt.n; ++i) pf[i] = reinterpret_cast<const char*>(nxt.src[i]);
      const int n = cur.n;
      rows_of<S, T>(cur, d, buf.data(), rows);
      dots(rows, n, gzb, d, L, d, ga.data(), L);
      for (int i = 0; i < n; ++i) {
        out[i] = A.gh + lay.row(ch.b, cur.pos[i]) * d;
        for (int64_t l = 0; l < L; ++l) {
          const T ail = ab[cur.pos[i] * L + l];
          av[i * L + l] = ail;
          ge[i * L + l] = ail * (ga[i * L + l] - db[l]);
          dsum[l] += static_cast<double>(ail) * static_cast<double>(ga[i * L + l]);
        }
      }
      // gWdp partial += gE^T rows (the forward's column kernel, unit scale), then the gH rows.
      pool(rows, n, ge.data(), L, L, static_cast<const T*>(nullptr), count == 0, gwc, d, d, pf,
           nxt.n, static_cast<int64_t>(sizeof(S)));
      combine(n, av.data(), ge.data(), L, gzb, L, wdp, L, d, d, out, true);
      count += n;
      std::swap(cur, nxt);
    }
    A.count[ci] = count;
    for (int64_t l = 0; l < L; ++l) A.dpart[ci * L + l] = dsum[l];
  }
  stream_fence();  // streamed gH stores are weakly ordered: complete them before the join
}

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

at::ScalarType compute_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// A fresh output of many MB costs more in first-touch page faults than the kernel takes to fill
// it; transparent huge pages on the 2 MiB-aligned interior cut the fault count 512-fold where THP
// is in "madvise" mode. Advice about memory this tensor owns; harmless where THP is off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

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

#define IAPT_DISPATCH(ST, FN, ...)                                             \
  switch (ST) {                                                              \
    case at::kFloat: FN<float>(__VA_ARGS__); break;                          \
    case at::kDouble: FN<double>(__VA_ARGS__); break;                        \
    case at::kHalf: FN<c10::Half>(__VA_ARGS__); break;                       \
    case at::kBFloat16: FN<c10::BFloat16>(__VA_ARGS__); break;               \
    default: TORCH_CHECK(false, "attention_pool: unsupported dtype ", ST);   \
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
  IAPT_DISPATCH(h.scalar_type(), run_forward, lay, hc, down_weight, down_bias, pool_weight, u, a, z, n);
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
  IAPT_DISPATCH(h.scalar_type(), run_backward, lay, grad_u, hc, down_weight, pool_weight,
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
  IAPT_DISPATCH(h.scalar_type(), set_forward, lay, hc, wdp, c, sel.data_ptr<int32_t>(), a, z, n);
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
  IAPT_DISPATCH(h.scalar_type(), set_backward, lay, hc, wdp, sel.data_ptr<int32_t>(), a, z, gz, gh, gwdp);
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
