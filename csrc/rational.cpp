/*
 * Fused CPU kernels for the rational (Padé) activation, forward and backward.
 *
 *   P(x) = a_0 + a_1 x + ... + a_m x^m
 *   version B:  A(x) = b_1 x + ... + b_n x^n,          Q = 1 + |A(x)|
 *   version A:  Q = 1 + |b_1||x| + ... + |b_n||x|^n
 *   y = P / Q
 *
 * with sgn(u) = -1 if u < 0 else +1 (so sgn(0) = sgn(NaN) = +1) and |u| = u * sgn(u).
 *
 * Backward, for an upstream gradient g:
 *   dx   = g * (P' - y Q') / Q
 *          B: Q' = sgn(A) A'(x)          A: Q' = sgn(x) sum_k k |b_k| |x|^(k-1)
 *   da_j = sum g x^j / Q                                  (j = 0..m)
 *   db_k = sum -g (P/Q^2) sgn(A) x^k                      (B, k = 1..n)
 *   db_k = sum -g (P/Q^2) sgn(b_k) |x|^k                  (A, k = 1..n)
 * the sums running over the elements of the coefficient row's group.
 *
 * Groups: the last dim C splits into G contiguous chunks of C/G; flat element i uses row
 * (i / chunk) % G of the coefficients.
 *
 * Design
 *  - Work is cut into fixed-size "blocks" of at most kBlock elements of ONE group (a block is a
 *    strided set of equal-length runs: rows x column range of a chunk). The block layout depends
 *    only on the shape and G, never on the thread count, and every block writes its own partial
 *    coefficient gradients; the partials are summed in block order in double. That makes the
 *    coefficient gradients bitwise reproducible for any number of threads, without atomics.
 *  - Inside a block, elements go through small tiles in the compute type T (double for float64,
 *    float otherwise): used in place for contiguous float/double data, otherwise gathered and
 *    converted. Each kernel is a few passes over the tile, each a plain loop over elements that
 *    the compiler vectorises; the runtime degrees are turned into compile-time ones by a switch
 *    so that each element's Horner chain unrolls into registers (see "Tile kernels").
 *  - The hot functions are compiled twice (GCC target_clones: x86-64-v3 = AVX2+FMA, and the
 *    baseline) and picked at load time, so the .so runs everywhere but uses ymm + FMA where it can.
 *
 * Build with -O3 -fopenmp (compile and link): at::parallel_for is header-inlined and runs
 * single-threaded without -fopenmp.
 */

#include "common.h"
#include "ops.h"
#include "rational_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

// rb: the block layout and gather/scatter (rational_blocks.h) the tile kernels below run over.
using namespace iapt::rb;

namespace {

// ---------------------------------------------------------------------------------------------
// Tile kernels
//
// Evaluating one coefficient per pass over the tile ("column Horner") would let the runtime
// degree stay a loop bound, but then every coefficient costs a load and a store per element and
// the loop is bound by L1 stores (measured ~2x slower than below). Instead the degree is made a
// compile-time constant by a switch over 1..8: each element's Horner chain is then fully unrolled
// and stays in registers, and the loop over elements is a plain loop the compiler vectorises.
// Numerator and denominator get separate passes (8 + 8 instantiations rather than 8 x 8).
// ---------------------------------------------------------------------------------------------

#define IAPT_WITH_DEGREE(d, K, ...)                 \
  switch (d) {                                      \
    case 1: { constexpr int K = 1; __VA_ARGS__; } break; \
    case 2: { constexpr int K = 2; __VA_ARGS__; } break; \
    case 3: { constexpr int K = 3; __VA_ARGS__; } break; \
    case 4: { constexpr int K = 4; __VA_ARGS__; } break; \
    case 5: { constexpr int K = 5; __VA_ARGS__; } break; \
    case 6: { constexpr int K = 6; __VA_ARGS__; } break; \
    case 7: { constexpr int K = 7; __VA_ARGS__; } break; \
    case 8: { constexpr int K = 8; __VA_ARGS__; } break; \
    default: break;                                 \
  }

// c[0] + c[1] x + ... + c[D] x^D (Horner).
template <int D, typename T>
IAPT_INLINE T poly(const T* c, T x) {
  T v = c[D];
  for (int j = D - 1; j >= 0; --j) v = v * x + c[j];
  return v;
}

// Value and derivative together, D >= 1. The derivative chain starts at c[D] rather than at
// 0 * x + c[D], so an infinite x does not turn it into NaN on the first step.
template <int D, typename T>
IAPT_INLINE T poly_d(const T* c, T x, T& deriv) {
  T v = c[D] * x + c[D - 1];
  T d = c[D];
  for (int j = D - 2; j >= 0; --j) {
    d = d * x + v;
    v = v * x + c[j];
  }
  deriv = d;
  return v;
}

template <typename T>
IAPT_INLINE T sgn(T u) {
  return u < T(0) ? T(-1) : T(1);
}

template <typename T>
IAPT_INLINE T abs_(T u) {
  return u < T(0) ? -u : u;  // bitwise equal to u * sgn(u), NaN and -0 included
}

// p[i] = P(x[i]).
template <int M, typename T>
IAPT_INLINE void num_pass(const T* __restrict x, T* __restrict p, int64_t nw, const T* a) {
  T c[M + 1];
  for (int j = 0; j <= M; ++j) c[j] = a[j];
  for (int64_t i = 0; i < nw; ++i) p[i] = poly<M>(c, x[i]);
}

// y[i] = p[i] / Q(x[i]).
template <int N, bool kB, typename T>
IAPT_INLINE void fwd_den_pass(const T* __restrict x, const T* __restrict p, T* __restrict y,
                              int64_t nw, const T* q) {
  T c[N + 1];
  for (int k = 0; k <= N; ++k) c[k] = q[k];
  for (int64_t i = 0; i < nw; ++i) {
    const T xi = x[i];
    T Q;
    if (kB) {
      const T A = xi * poly<N - 1>(c + 1, xi);  // A has no constant term
      Q = T(1) + abs_(A);
    } else {
      Q = poly<N>(c, abs_(xi));  // c[0] = 1
    }
    y[i] = p[i] / Q;
  }
}

// p[i] = P(x[i]), dp[i] = P'(x[i]).
template <int M, typename T>
IAPT_INLINE void num_d_pass(const T* __restrict x, T* __restrict p, T* __restrict dp, int64_t nw,
                            const T* a) {
  T c[M + 1];
  for (int j = 0; j <= M; ++j) c[j] = a[j];
  for (int64_t i = 0; i < nw; ++i) {
    T d;
    p[i] = poly_d<M>(c, x[i], d);
    dp[i] = d;
  }
}

// From P, P' (in p, dp) computes dx, and overwrites p with u = g / Q (so da_j = sum u x^j) and
// dp with w = -u y sgn(A) for B, -u y for A (so db_k = sum w x^k, resp. sgn(b_k) sum w |x|^k).
template <int N, bool kB, typename T>
IAPT_INLINE void bwd_den_pass(const T* __restrict x, const T* __restrict g, T* __restrict p,
                              T* __restrict dp, T* __restrict dx, int64_t nw, const T* q) {
  T c[N + 1];
  for (int k = 0; k <= N; ++k) c[k] = q[k];
  for (int64_t i = 0; i < nw; ++i) {
    const T xi = x[i];
    T Q, dQ, s;
    if (kB) {
      T dA;
      const T A = poly_d<N>(c, xi, dA);  // c[0] = 0
      s = sgn(A);
      Q = T(1) + A * s;
      dQ = s * dA;
    } else {
      const T sx = sgn(xi);
      T dQa;
      Q = poly_d<N>(c, xi * sx, dQa);  // c[0] = 1
      dQ = sx * dQa;
      s = T(1);
    }
    const T rQ = T(1) / Q;
    const T y = p[i] * rQ;
    const T u = g[i] * rQ;
    dx[i] = g[i] * (dp[i] - y * dQ) * rQ;
    p[i] = u;
    dp[i] = -(u * y) * s;
  }
}

// Partial sums for the coefficient gradients run in L = kSumLanes<T> lanes: lane l accumulates
// elements i = l (mod L) of a tile in T, in element order, and the lanes are then folded into
// double in lane order. The result is a fixed function of the data, whatever the thread count.
// Written as plain per-lane loops, GCC vectorises across lane-rows instead and shuffles every
// element into place (measured 2-4x slower), so with GNU compilers the lanes are spelled as two
// 32-byte vectors (one AVX register each; two SSE registers each in the baseline clone).
#if defined(__GNUC__)
// (A typedef inside a class template: GCC drops vector_size on an alias template.)
template <typename T>
struct Vec32 {
  typedef T V __attribute__((vector_size(32)));
  static_assert(sizeof(V) == 32, "vector_size not applied");
};

// One power step of the coefficient-gradient sums: h <- h * b (h <- b on the first step) with
// b = x or |x|, then su += sum u h and sw += sum w h.
template <bool kFirst, bool kAbs, bool kU, bool kW, typename T>
IAPT_INLINE void power_step(T* __restrict h, const T* __restrict x, const T* __restrict u,
                            const T* __restrict w, int64_t nw, double& su, double& sw) {
  using V = typename Vec32<T>::V;
  constexpr int64_t W = 32 / sizeof(T);
  static_assert(2 * W == kSumLanes<T> && kLanes % (2 * W) == 0, "lane layout");
  V au0 = {}, au1 = {}, aw0 = {}, aw1 = {};
  for (int64_t i = 0; i < nw; i += 2 * W) {
    V x0, x1, h0, h1, u0, u1, w0, w1;
    __builtin_memcpy(&x0, x + i, sizeof(V));
    __builtin_memcpy(&x1, x + i + W, sizeof(V));
    if (kAbs) {
      x0 = x0 < T(0) ? -x0 : x0;
      x1 = x1 < T(0) ? -x1 : x1;
    }
    if (kFirst) {
      h0 = x0;
      h1 = x1;
    } else {
      __builtin_memcpy(&h0, h + i, sizeof(V));
      __builtin_memcpy(&h1, h + i + W, sizeof(V));
      h0 *= x0;
      h1 *= x1;
    }
    __builtin_memcpy(h + i, &h0, sizeof(V));
    __builtin_memcpy(h + i + W, &h1, sizeof(V));
    if (kU) {
      __builtin_memcpy(&u0, u + i, sizeof(V));
      __builtin_memcpy(&u1, u + i + W, sizeof(V));
      au0 += u0 * h0;
      au1 += u1 * h1;
    }
    if (kW) {
      __builtin_memcpy(&w0, w + i, sizeof(V));
      __builtin_memcpy(&w1, w + i + W, sizeof(V));
      aw0 += w0 * h0;
      aw1 += w1 * h1;
    }
  }
  T lu[2 * W], lw[2 * W];
  __builtin_memcpy(lu, &au0, sizeof(V));
  __builtin_memcpy(lu + W, &au1, sizeof(V));
  __builtin_memcpy(lw, &aw0, sizeof(V));
  __builtin_memcpy(lw + W, &aw1, sizeof(V));
  double tu = 0.0, tw = 0.0;
  for (int64_t l = 0; l < 2 * W; ++l) {
    tu += static_cast<double>(lu[l]);
    tw += static_cast<double>(lw[l]);
  }
  if (kU) su += tu;
  if (kW) sw += tw;
}

template <typename T>
IAPT_INLINE double tile_sum(const T* __restrict u, int64_t nw) {
  using V = typename Vec32<T>::V;
  constexpr int64_t W = 32 / sizeof(T);
  V a0 = {}, a1 = {};
  for (int64_t i = 0; i < nw; i += 2 * W) {
    V u0, u1;
    __builtin_memcpy(&u0, u + i, sizeof(V));
    __builtin_memcpy(&u1, u + i + W, sizeof(V));
    a0 += u0;
    a1 += u1;
  }
  T l[2 * W];
  __builtin_memcpy(l, &a0, sizeof(V));
  __builtin_memcpy(l + W, &a1, sizeof(V));
  double s = 0.0;
  for (int64_t k = 0; k < 2 * W; ++k) s += static_cast<double>(l[k]);
  return s;
}
#else
template <bool kFirst, bool kAbs, bool kU, bool kW, typename T>
IAPT_INLINE void power_step(T* __restrict h, const T* __restrict x, const T* __restrict u,
                            const T* __restrict w, int64_t nw, double& su, double& sw) {
  constexpr int64_t L = kSumLanes<T>;
  T au[L] = {};
  T aw[L] = {};
  for (int64_t i0 = 0; i0 < nw; i0 += L) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = i0 + l;
      const T base = kAbs ? abs_(x[i]) : x[i];
      const T v = kFirst ? base : h[i] * base;
      h[i] = v;
      if (kU) au[l] += u[i] * v;
      if (kW) aw[l] += w[i] * v;
    }
  }
  double tu = 0.0, tw = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    tu += static_cast<double>(au[l]);
    tw += static_cast<double>(aw[l]);
  }
  if (kU) su += tu;
  if (kW) sw += tw;
}

template <typename T>
IAPT_INLINE double tile_sum(const T* __restrict u, int64_t nw) {
  constexpr int64_t L = kSumLanes<T>;
  T acc[L] = {};
  for (int64_t i0 = 0; i0 < nw; i0 += L)
    for (int64_t l = 0; l < L; ++l) acc[l] += u[i0 + l];
  double s = 0.0;
  for (int64_t l = 0; l < L; ++l) s += static_cast<double>(acc[l]);
  return s;
}
#endif

template <typename T>
struct alignas(64) FwdScratch {
  alignas(64) T x[kTileAlloc<T>];
  alignas(64) T p[kTileAlloc<T>];
  alignas(64) T y[kTileAlloc<T>];
};

template <typename T>
IAPT_INLINE void fwd_tile(const T* __restrict x, T* __restrict y, T* __restrict p,
                          const Coef<T>& c, int64_t nw, bool vb) {
  IAPT_WITH_DEGREE(c.m, M, num_pass<M>(x, p, nw, c.a))
  if (vb) {
    IAPT_WITH_DEGREE(c.n, N, fwd_den_pass<N, true>(x, p, y, nw, c.q))
  } else {
    IAPT_WITH_DEGREE(c.n, N, fwd_den_pass<N, false>(x, p, y, nw, c.q))
  }
}

template <typename S, typename T>
IAPT_INLINE void fwd_blocks(const Plan& pl, const S* x, S* y, const T* a, const T* b, int m, int n,
                            bool vb, int64_t b0, int64_t b1) {
  FwdScratch<T> s;
  Coef<T> c;
  constexpr int64_t tile = kTile<T>;
  int64_t cur_g = -1;
  for (int64_t id = b0; id < b1; ++id) {
    const Block bl = block_at(pl, id);
    if (bl.g != cur_g) {
      load_coef(c, a, b, m, n, bl.g, vb);
      cur_g = bl.g;
    }
    const int64_t total = bl.nseg * bl.len;
    Cursor cur;
    int64_t nt = 0;
    for (int64_t done = 0; done < total; done += nt) {
      nt = std::min(tile, total - done);
      // float/double data in one contiguous run: compute in place, no copies.
      if constexpr (std::is_same<S, T>::value) {
        if (bl.len - cur.off >= nt) {
          const int64_t pos = bl.base + cur.seg * bl.stride + cur.off;
          fwd_tile<T>(x + pos, y + pos, s.p, c, nt, vb);
          advance(bl, cur, nt);
          continue;
        }
      }
      Cursor back = cur;
      gather(x, s.x, bl, cur, nt);
      fwd_tile<T>(s.x, s.y, s.p, c, nt, vb);
      scatter(s.y, y, bl, back, nt);
    }
  }
}

template <typename T>
struct alignas(64) BwdScratch {
  alignas(64) T x[kTileAlloc<T>];
  alignas(64) T g[kTileAlloc<T>];
  alignas(64) T p[kTileAlloc<T>];   // P, then u
  alignas(64) T dp[kTileAlloc<T>];  // P', then w
  alignas(64) T h[kTileAlloc<T>];   // running power of x or |x|
  alignas(64) T dx[kTileAlloc<T>];
};

// Writes dx and adds this tile's coefficient-gradient contributions to acc (acc[0..m] for a,
// acc[m+1 .. m+n] for b_1..b_n). nw is a multiple of kLanes; padding has x = g = 0, which gives
// finite values and exactly zero contributions.
template <typename T>
IAPT_INLINE void bwd_tile(const T* __restrict x, const T* __restrict g, T* __restrict dx,
                          BwdScratch<T>& s, const Coef<T>& c, int64_t nw, bool vb, double* acc) {
  T* u = s.p;  // aliases s.p / s.dp, hence no __restrict here (the passes take their own)
  T* w = s.dp;
  T* h = s.h;
  const int m = c.m, n = c.n;
  IAPT_WITH_DEGREE(m, M, num_d_pass<M>(x, s.p, s.dp, nw, c.a))
  if (vb) {
    IAPT_WITH_DEGREE(n, N, bwd_den_pass<N, true>(x, g, s.p, s.dp, dx, nw, c.q))
  } else {
    IAPT_WITH_DEGREE(n, N, bwd_den_pass<N, false>(x, g, s.p, s.dp, dx, nw, c.q))
  }
  acc[0] += tile_sum(u, nw);
  double unused = 0.0;
  if (vb) {
    // a and b both take powers of x: one running power serves both sums.
    const int top = std::max(m, n);
    power_step<true, false, true, true>(h, x, u, w, nw, acc[1], acc[m + 1]);
    for (int j = 2; j <= top; ++j) {
      if (j <= m && j <= n)
        power_step<false, false, true, true>(h, x, u, w, nw, acc[j], acc[m + j]);
      else if (j <= m)
        power_step<false, false, true, false>(h, x, u, w, nw, acc[j], unused);
      else
        power_step<false, false, false, true>(h, x, u, w, nw, unused, acc[m + j]);
    }
  } else {
    // a takes powers of x, b powers of |x| (sgn(b_k) is applied once per block).
    power_step<true, false, true, false>(h, x, u, w, nw, acc[1], unused);
    for (int j = 2; j <= m; ++j)
      power_step<false, false, true, false>(h, x, u, w, nw, acc[j], unused);
    power_step<true, true, false, true>(h, x, u, w, nw, unused, acc[m + 1]);
    for (int k = 2; k <= n; ++k)
      power_step<false, true, false, true>(h, x, u, w, nw, unused, acc[m + k]);
  }
}

template <typename S, typename T>
IAPT_INLINE void bwd_blocks(const Plan& pl, const S* gr, const S* x, S* dx, const T* a, const T* b,
                            int m, int n, bool vb, double* partials, int64_t b0, int64_t b1) {
  BwdScratch<T> s;
  Coef<T> c;
  constexpr int64_t tile = kTile<T>;
  const int K = m + 1 + n;
  int64_t cur_g = -1;
  for (int64_t id = b0; id < b1; ++id) {
    const Block bl = block_at(pl, id);
    if (bl.g != cur_g) {
      load_coef(c, a, b, m, n, bl.g, vb);
      cur_g = bl.g;
    }
    double acc[2 * kMaxDegree + 1] = {};
    const int64_t total = bl.nseg * bl.len;
    Cursor cur;
    int64_t nt = 0;
    for (int64_t done = 0; done < total; done += nt) {
      nt = std::min(tile, total - done);
      // float/double data in one contiguous run of whole lane rows: compute in place.
      if constexpr (std::is_same<S, T>::value) {
        if (bl.len - cur.off >= nt && nt % kLanes == 0) {
          const int64_t pos = bl.base + cur.seg * bl.stride + cur.off;
          bwd_tile<T>(x + pos, gr + pos, dx + pos, s, c, nt, vb, acc);
          advance(bl, cur, nt);
          continue;
        }
      }
      const int64_t nw = (nt + kLanes - 1) / kLanes * kLanes;
      Cursor back = cur;
      Cursor gcur = cur;
      gather(x, s.x, bl, cur, nt);
      gather(gr, s.g, bl, gcur, nt);
      for (int64_t i = nt; i < nw; ++i) {
        s.x[i] = T(0);
        s.g[i] = T(0);
      }
      bwd_tile<T>(s.x, s.g, s.dx, s, c, nw, vb, acc);
      scatter(s.dx, dx, bl, back, nt);
    }
    double* out = partials + id * K;
    for (int j = 0; j <= m; ++j) out[j] = acc[j];
    for (int k = 1; k <= n; ++k)
      out[m + k] = vb ? acc[m + k] : acc[m + k] * static_cast<double>(c.bsgn[k]);
  }
}

#undef IAPT_WITH_DEGREE

// Non-template, multiversioned entry points (one per storage dtype); the templates above are
// force-inlined into each clone.
#define IAPT_DEFINE_KERNELS(NAME, S, T)                                                          \
  IAPT_MULTIVERSION void fwd_##NAME(const Plan& pl, const S* x, S* y, const T* a, const T* b,    \
                                    int m, int n, bool vb, int64_t b0, int64_t b1) {             \
    fwd_blocks<S, T>(pl, x, y, a, b, m, n, vb, b0, b1);                                          \
  }                                                                                              \
  IAPT_MULTIVERSION void bwd_##NAME(const Plan& pl, const S* gr, const S* x, S* dx, const T* a,  \
                                    const T* b, int m, int n, bool vb, double* partials,         \
                                    int64_t b0, int64_t b1) {                                    \
    bwd_blocks<S, T>(pl, gr, x, dx, a, b, m, n, vb, partials, b0, b1);                           \
  }

IAPT_DEFINE_KERNELS(f32, float, float)
IAPT_DEFINE_KERNELS(f64, double, double)
IAPT_DEFINE_KERNELS(f16, c10::Half, float)
IAPT_DEFINE_KERNELS(bf16, c10::BFloat16, float)

#undef IAPT_DEFINE_KERNELS

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

// ---------------------------------------------------------------------------------------------
// Checks and dispatch
// ---------------------------------------------------------------------------------------------

struct Shapes {
  int64_t G, m, n, C;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& num, const at::Tensor& den) {
  TORCH_CHECK(x.device().is_cpu(), "rational: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(num.device().is_cpu() && den.device().is_cpu(),
              "rational: numerator and denominator must be CPU tensors, got ", num.device(),
              " and ", den.device());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16,
              "rational: x must be float16, bfloat16, float32 or float64, got ", xt);
  TORCH_CHECK(x.is_contiguous(), "rational: x must be contiguous");
  const auto ct = xt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(num.scalar_type() == ct && den.scalar_type() == ct,
              "rational: coefficients must be ", ct, " for x of dtype ", xt, ", got numerator ",
              num.scalar_type(), " and denominator ", den.scalar_type());
  TORCH_CHECK(num.is_contiguous() && den.is_contiguous(),
              "rational: numerator and denominator must be contiguous");
  TORCH_CHECK(num.dim() == 2 && den.dim() == 2,
              "rational: numerator must be (G, m+1) and denominator (G, n), got shapes ",
              num.sizes(), " and ", den.sizes());
  const int64_t G = num.size(0);
  const int64_t m = num.size(1) - 1;
  const int64_t n = den.size(1);
  TORCH_CHECK(G >= 1 && den.size(0) == G, "rational: numerator has ", G,
              " groups but denominator has ", den.size(0));
  TORCH_CHECK(m >= 1 && m <= kMaxDegree, "rational: numerator degree m must be in 1..",
              kMaxDegree, ", got ", m, " (numerator shape ", num.sizes(), ")");
  TORCH_CHECK(n >= 1 && n <= kMaxDegree, "rational: denominator degree n must be in 1..",
              kMaxDegree, ", got ", n, " (denominator shape ", den.sizes(), ")");
  const int64_t C = x.dim() == 0 ? 1 : x.size(-1);
  TORCH_CHECK(C % G == 0, "rational: groups G=", G,
              " must divide the last dimension of x, got x of shape ", x.sizes());
  return Shapes{G, m, n, C};
}

template <typename S>
void run_fwd(const at::Tensor& x, const at::Tensor& num, const at::Tensor& den, at::Tensor& y,
             const Shapes& sh, bool vb) {
  using T = typename Kernels<S>::T;
  const Plan pl = make_plan(x.numel(), sh.C, sh.G);
  const S* xp = x.data_ptr<S>();
  S* yp = y.data_ptr<S>();
  const T* ap = num.data_ptr<T>();
  const T* bp = den.data_ptr<T>();
  const int m = static_cast<int>(sh.m), n = static_cast<int>(sh.n);
  at::parallel_for(0, pl.n_blocks, 1, [&](int64_t b0, int64_t b1) {
    Kernels<S>::fwd(pl, xp, yp, ap, bp, m, n, vb, b0, b1);
  });
}

template <typename S>
void run_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& num,
             const at::Tensor& den, at::Tensor& dx, at::Tensor& dnum, at::Tensor& dden,
             const Shapes& sh, bool vb) {
  using T = typename Kernels<S>::T;
  const Plan pl = make_plan(x.numel(), sh.C, sh.G);
  const int m = static_cast<int>(sh.m), n = static_cast<int>(sh.n);
  const int K = m + 1 + n;
  std::vector<double> partials(static_cast<size_t>(pl.n_blocks) * K);
  const S* gp = grad.data_ptr<S>();
  const S* xp = x.data_ptr<S>();
  S* dxp = dx.data_ptr<S>();
  const T* ap = num.data_ptr<T>();
  const T* bp = den.data_ptr<T>();
  double* pp = partials.data();
  at::parallel_for(0, pl.n_blocks, 1, [&](int64_t b0, int64_t b1) {
    Kernels<S>::bwd(pl, gp, xp, dxp, ap, bp, m, n, vb, pp, b0, b1);
  });
  // Block order is fixed by the plan, so this sum is the same for any thread count.
  std::vector<double> tot(static_cast<size_t>(sh.G) * K, 0.0);
  for (int64_t id = 0; id < pl.n_blocks; ++id) {
    const int64_t g = (id / pl.n_col_blocks) % pl.G;
    for (int k = 0; k < K; ++k) tot[g * K + k] += pp[id * K + k];
  }
  T* da = dnum.data_ptr<T>();
  T* db = dden.data_ptr<T>();
  for (int64_t g = 0; g < sh.G; ++g) {
    for (int j = 0; j <= m; ++j) da[g * (m + 1) + j] = static_cast<T>(tot[g * K + j]);
    for (int k = 1; k <= n; ++k) db[g * n + (k - 1)] = static_cast<T>(tot[g * K + m + k]);
  }
}

}  // namespace

namespace iapt {

at::Tensor rational_fwd(const at::Tensor& x, const at::Tensor& numerator,
                        const at::Tensor& denominator, bool version_b) {
  const Shapes sh = check_inputs(x, numerator, denominator);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  advise_huge_pages(y);
  IAPT_DISPATCH_FLOATING(x.scalar_type(), "rational_fwd", run_fwd, x, numerator, denominator, y, sh, version_b);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_bwd(const at::Tensor& grad,
                                                            const at::Tensor& x,
                                                            const at::Tensor& numerator,
                                                            const at::Tensor& denominator,
                                                            bool version_b) {
  const Shapes sh = check_inputs(x, numerator, denominator);
  TORCH_CHECK(grad.device().is_cpu(), "rational_bwd: grad must be a CPU tensor, got ",
              grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "rational_bwd: grad dtype ",
              grad.scalar_type(), " must match x dtype ", x.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), "rational_bwd: grad shape ", grad.sizes(),
              " must match x shape ", x.sizes());
  TORCH_CHECK(grad.is_contiguous(), "rational_bwd: grad must be contiguous");

  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dnum = at::zeros(numerator.sizes(), numerator.options());
  at::Tensor dden = at::zeros(denominator.sizes(), denominator.options());
  if (x.numel() == 0) return {dx, dnum, dden};
  advise_huge_pages(dx);
  IAPT_DISPATCH_FLOATING(x.scalar_type(), "rational_bwd", run_bwd, grad, x, numerator, denominator, dx, dnum, dden,
                         sh, version_b);
  return {dx, dnum, dden};
}

}  // namespace iapt
