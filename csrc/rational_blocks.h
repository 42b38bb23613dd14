// The work layout of the rational kernels (csrc/rational.cpp, the only file that includes this):
// fixed-size blocks of one coefficient group, independent of the thread count, walked tile by tile
// with gather/scatter over the block's runs; and one group's coefficients in the compute type.
#pragma once

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace iapt {
namespace rb {

constexpr int kMaxDegree = 8;
// Elements per reduction/work block. Fixed (thread-independent) so gradients are reproducible;
// large enough to amortise per-block overhead, small enough to balance two threads on small inputs.
constexpr int64_t kBlock = 8192;
// With G > 1 and short chunks, a block takes a chunk from each of several rows, and the G blocks
// of the same rows then read the same cache lines: keep the rows of a block within this many
// elements of memory (an L2-sized span) so those lines are still cached for the next group.
constexpr int64_t kBlockSpan = 32768;
// Tiles are padded to a multiple of this for the coefficient-gradient sums (see power_step).
constexpr int64_t kLanes = 16;
// Number of partial sums (lanes) those sums use: 64 bytes of T.
template <typename T>
constexpr int64_t kSumLanes = 64 / sizeof(T);

// Tile length: the scratch arrays of a tile (up to 6) stay well within a 32 KiB L1d.
template <typename T>
constexpr int64_t kTile = 2048 / sizeof(T);
// Scratch arrays are padded so that no two start a multiple of 4 KiB apart: a store to p[i] and a
// load of x[i] 4 KiB away look like a dependency to the CPU ("4K aliasing") and stall the loop.
template <typename T>
constexpr int64_t kTileAlloc = kTile<T> + 128 / sizeof(T);

// ---------------------------------------------------------------------------------------------
// Work layout
// ---------------------------------------------------------------------------------------------

struct Plan {
  int64_t G = 1, C = 1, chunk = 1, rows = 0;
  int64_t rows_per_block = 1, cols_per_block = 1;
  int64_t n_row_blocks = 0, n_col_blocks = 0, n_blocks = 0;
};

// One block: `nseg` runs of `len` contiguous elements, run s starting at base + s * stride, all in
// coefficient group g.
struct Block {
  int64_t g, base, stride, nseg, len;
};

inline Plan make_plan(int64_t numel, int64_t C, int64_t G) {
  Plan p;
  p.G = G;
  // With one group every element shares the coefficients, so view the tensor as one long row:
  // blocks then are plain contiguous ranges whatever the shape.
  if (G == 1) C = numel;
  p.C = C;
  p.chunk = C / G;
  p.rows = numel / C;
  if (p.chunk >= kBlock) {
    p.rows_per_block = 1;
    p.cols_per_block = kBlock;
  } else {
    p.rows_per_block = std::max<int64_t>(1, std::min(kBlock / p.chunk, kBlockSpan / C));
    p.cols_per_block = p.chunk;
  }
  p.n_row_blocks = (p.rows + p.rows_per_block - 1) / p.rows_per_block;
  p.n_col_blocks = (p.chunk + p.cols_per_block - 1) / p.cols_per_block;
  p.n_blocks = p.n_row_blocks * G * p.n_col_blocks;
  return p;
}

// Block ids run (row block, group, column block), so neighbouring ids touch neighbouring memory.
IAPT_INLINE Block block_at(const Plan& p, int64_t id) {
  const int64_t cb = id % p.n_col_blocks;
  const int64_t t = id / p.n_col_blocks;
  const int64_t g = t % p.G;
  const int64_t rb = t / p.G;
  const int64_t r0 = rb * p.rows_per_block;
  const int64_t r1 = std::min(p.rows, r0 + p.rows_per_block);
  const int64_t c0 = cb * p.cols_per_block;
  const int64_t c1 = std::min(p.chunk, c0 + p.cols_per_block);
  return Block{g, r0 * p.C + g * p.chunk + c0, p.C, r1 - r0, c1 - c0};
}

// Position inside a block, so a tile can be gathered from (and scattered back to) several runs.
struct Cursor {
  int64_t seg = 0, off = 0;
};

template <typename F>
IAPT_INLINE void for_runs(const Block& bl, Cursor& c, int64_t n, F&& f) {
  int64_t t = 0;
  while (t < n) {
    const int64_t len = std::min(bl.len - c.off, n - t);
    f(bl.base + c.seg * bl.stride + c.off, t, len);
    t += len;
    c.off += len;
    if (c.off == bl.len) {
      c.off = 0;
      ++c.seg;
    }
  }
}

IAPT_INLINE void advance(const Block& bl, Cursor& c, int64_t n) {
  const int64_t pos = c.off + n;
  c.seg += pos / bl.len;
  c.off = pos % bl.len;
}

template <typename S, typename T>
IAPT_INLINE void load_run(const S* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename S, typename T>
IAPT_INLINE void store_run(const T* __restrict src, S* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

// Runs shorter than this (small chunks, G > 1) are moved by one flat loop over the tile that
// steps the source index run by run; a loop per run would be turned into a memcpy call per run,
// which costs more than the math for chunks of a few elements.
constexpr int64_t kShortRun = 64;

// Copies the next n elements of the block at cursor c into dst (converted to T); advances c.
template <typename S, typename T>
IAPT_INLINE void gather(const S* __restrict src, T* __restrict dst, const Block& bl, Cursor& c,
                        int64_t n) {
  if (bl.len < kShortRun) {
    int64_t row = bl.base + c.seg * bl.stride, k = c.off;
    for (int64_t t = 0; t < n; ++t) {
      dst[t] = static_cast<T>(src[row + k]);
      if (++k == bl.len) {
        k = 0;
        row += bl.stride;
      }
    }
    advance(bl, c, n);
    return;
  }
  for_runs(bl, c, n,
           [&](int64_t pos, int64_t t, int64_t len) { load_run(src + pos, dst + t, len); });
}

// The inverse of gather: writes n tile elements back to the block at cursor c; advances c.
template <typename S, typename T>
IAPT_INLINE void scatter(const T* __restrict src, S* __restrict dst, const Block& bl, Cursor& c,
                         int64_t n) {
  if (bl.len < kShortRun) {
    int64_t row = bl.base + c.seg * bl.stride, k = c.off;
    for (int64_t t = 0; t < n; ++t) {
      dst[row + k] = static_cast<S>(src[t]);
      if (++k == bl.len) {
        k = 0;
        row += bl.stride;
      }
    }
    advance(bl, c, n);
    return;
  }
  for_runs(bl, c, n,
           [&](int64_t pos, int64_t t, int64_t len) { store_run(src + t, dst + pos, len); });
}

// Coefficients of one group, in the compute type.
template <typename T>
struct Coef {
  int m, n;
  T a[kMaxDegree + 1];
  // Denominator polynomial. B: q[0] = 0, q[k] = b_k, so A(x) = sum q_k x^k.
  //                         A: q[0] = 1, q[k] = |b_k|, so Q = sum q_k |x|^k directly.
  T q[kMaxDegree + 1];
  T bsgn[kMaxDegree + 1];  // sgn(b_k), for version A's db
};

template <typename T>
IAPT_INLINE void load_coef(Coef<T>& c, const T* a, const T* b, int m, int n, int64_t g, bool vb) {
  c.m = m;
  c.n = n;
  for (int j = 0; j <= m; ++j) c.a[j] = a[g * (m + 1) + j];
  c.q[0] = vb ? T(0) : T(1);
  c.bsgn[0] = T(1);
  for (int k = 1; k <= n; ++k) {
    const T bk = b[g * n + (k - 1)];
    const T s = bk < T(0) ? T(-1) : T(1);
    c.bsgn[k] = s;
    c.q[k] = vb ? bk : bk * s;
  }
}

}  // namespace rb
}  // namespace iapt
