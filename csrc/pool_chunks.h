// The attention-pool pass over H cut into chunks (csrc/attention_pool.cpp, the only file that
// includes this): the batch layout (padded or packed), the chunk plan (which depends on the mask
// alone, never on the thread count), and the forward and backward chunk passes that write each
// chunk's partials. Force-inlined into the multiversioned entry points of attention_pool.cpp.
#pragma once

#include "pool_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace iapt {
namespace ap {

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
inline Plan plan_chunks(const Layout& lay, int64_t want = 0) {
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

}  // namespace ap
}  // namespace iapt
