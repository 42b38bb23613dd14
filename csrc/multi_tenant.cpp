/*
 * Multi-tenant prompt generator on the CPU: one pass over the batch for every tenant present
 * (docs/design.md section 1, "Multi-tenant"; the algebra of iapt_kernels/ops/multi_tenant_generator.py).
 *
 * Request b of tenant t (segment k of the batch's TenantGroups, seg_tenant[k] = t):
 *
 *   Wdp_t^T = Wp_t Wd_t (L, d),   c_t = Wp_t bd_t                 once per present tenant
 *   A_b, Z_b = attention pool of H_b with Wdp_t, c_t                one pass over H, all tenants
 *   U_b = Z_b Wd_t^T + n_b bd_t,   G_b = R_t(U_b),   P_b = G_b Wu_t^T + bu_t
 *
 * and P_b = 0 for tenant -1. Backward, for gP:
 *
 *   gG_b = gP_b Wu_t,   gU_b, gnum, gden = rational backward (coefficients of t)
 *   gWu_t = sum_b gP_b^T G_b,   gbu_t = sum_b sum_l gP_b,   gZ_b = gU_b Wd_t
 *   gH, gWdp_t^T = attention-pool backward pass (one pass over H, all tenants)
 *   gWd_t = Wp_t^T gWdp_t^T + sum_b gU_b^T Z_b,   gbd_t = sum_b n_b sum_l gU_b,   gWp_t = gWdp_t^T Wd_t^T
 *
 * Design
 *  - The pass over H is the attention pool's (csrc/attention_pool.cpp, through pool_pass.h) with a
 *    weight set per request: every request's rows are read once, with its tenant's Wdp, whatever
 *    the mix of tenants; no sub-batch of H is ever copied. Requests of tenant -1 cost nothing
 *    there (gH = 0 is written for them).
 *  - The products around the pass read each present tenant's weights in place (fp32/fp64; fp16 and
 *    bf16 weights of the present tenants alone are converted once per call) and run as one
 *    parallel loop over (request or tenant, block of rows), with the attention pool's
 *    hand-vectorised kernels. The rational activation is the rational op's kernel with one
 *    coefficient group per request (the tenant's coefficients), so nothing of it is rewritten.
 *  - Every sum runs in a fixed order: over a tenant's requests in batch order, and each request's
 *    arithmetic depends on that request alone, so a mixed batch gives each tenant bitwise the
 *    results of its own sub-batch, for any thread count, without atomics.
 *  - Stacked gradients (T, ...) are written by the kernels for the present tenants; absent tenants'
 *    slices are only zero-filled (no arithmetic, no pass over their weights).
 */

#include "common.h"
#include "ops.h"
#include "pool_pass.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace iapt {
namespace {

// Rows of a weight matrix per task of the products: small enough for many tasks at r = 64.
constexpr int64_t kRowTask = 16;
// Columns per task of the projections (p^T W) over d.
constexpr int64_t kColTask = 256;

struct Groups {
  int64_t B = 0, K = 0, T = 0;
  std::vector<int32_t> sel;     // (B,): segment of each request, -1 = no adapter
  std::vector<int64_t> tenant;  // (K,): tenant of each segment
  std::vector<int64_t> start;   // (K + 1,): the segment's requests are order[start[k], start[k+1])
  std::vector<int64_t> order;   // requests with an adapter, segment by segment, batch order within
};

Groups read_groups(const char* fn, int64_t B, int64_t T, const at::Tensor& order, const at::Tensor& seg_start,
                   const at::Tensor& seg_tenant) {
  for (const at::Tensor* t : {&order, &seg_start, &seg_tenant})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->dim() == 1, fn,
                ": order, seg_start and seg_tenant must be 1-D int32 CPU tensors (TenantGroups.build)");
  Groups g;
  g.B = B;
  g.T = T;
  g.K = seg_tenant.numel();
  TORCH_CHECK(seg_start.numel() == g.K + 1, fn, ": seg_start must have K + 1 = ", g.K + 1, " entries, got ",
              seg_start.numel());
  const at::Tensor oc = order.contiguous(), sc = seg_start.contiguous(), tc = seg_tenant.contiguous();
  const int32_t* op = oc.data_ptr<int32_t>();
  const int32_t* sp = sc.data_ptr<int32_t>();
  const int32_t* tp = tc.data_ptr<int32_t>();
  g.sel.assign(static_cast<size_t>(B), -1);
  TORCH_CHECK(sp[0] == 0 && sp[g.K] == order.numel(), fn, ": seg_start must run from 0 to len(order)");
  for (int64_t k = 0; k < g.K; ++k) {
    TORCH_CHECK(tp[k] >= 0 && tp[k] < T, fn, ": seg_tenant[", k, "] = ", tp[k], " is not in [0, ", T, ")");
    TORCH_CHECK(k == 0 || tp[k] > tp[k - 1], fn, ": seg_tenant must be increasing");
    TORCH_CHECK(sp[k + 1] > sp[k], fn, ": segment ", k, " is empty");
    g.tenant.push_back(tp[k]);
    g.start.push_back(sp[k]);
    for (int64_t i = sp[k]; i < sp[k + 1]; ++i) {
      const int64_t b = op[i];
      TORCH_CHECK(b >= 0 && b < B && g.sel[b] < 0, fn, ": order must list distinct requests in [0, ", B, ")");
      g.sel[b] = static_cast<int32_t>(k);
      g.order.push_back(b);
    }
  }
  g.start.push_back(sp[g.K]);
  return g;
}

// Pointers to each present tenant's slice of a stacked (T, ...) weight, in the compute type:
// in place when the dtype is already it, else the present tenants alone, converted once.
template <typename T>
struct Present {
  at::Tensor holder;
  std::vector<const T*> ptr;  // (K,)
};

template <typename T>
Present<T> present(const at::Tensor& w, const Groups& g) {
  const auto ct = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  Present<T> p;
  const int64_t per = w.numel() / std::max<int64_t>(1, w.size(0));
  if (w.scalar_type() == ct) {
    p.holder = w.contiguous();
    for (int64_t k = 0; k < g.K; ++k) p.ptr.push_back(p.holder.template data_ptr<T>() + g.tenant[k] * per);
  } else {
    const at::Tensor idx = at::tensor(g.tenant, at::kLong);
    p.holder = w.index_select(0, idx).to(ct).contiguous();
    for (int64_t k = 0; k < g.K; ++k) p.ptr.push_back(p.holder.template data_ptr<T>() + k * per);
  }
  return p;
}

// Per-request coefficient rows (B, .) for the rational op's one-group-per-request layout; rows of
// requests without an adapter take tenant 0's (their inputs are 0 and their gradients are unused).
at::Tensor per_request(const at::Tensor& coef, const Groups& g) {
  std::vector<int64_t> idx(static_cast<size_t>(g.B), 0);
  for (int64_t b = 0; b < g.B; ++b)
    if (g.sel[b] >= 0) idx[b] = g.tenant[g.sel[b]];
  return coef.index_select(0, at::tensor(idx, at::kLong)).contiguous();
}

// Absent tenants' slices of a stacked gradient are exactly 0: filled, never computed.
void zero_absent(at::Tensor& grad, const Groups& g) {
  const int64_t per = grad.numel() / std::max<int64_t>(1, grad.size(0));
  const int64_t bytes = per * static_cast<int64_t>(grad.element_size());
  char* base = static_cast<char*>(grad.data_ptr());
  std::vector<bool> on(static_cast<size_t>(g.T), false);
  for (int64_t t : g.tenant) on[t] = true;
  for (int64_t t = 0; t < g.T; ++t)
    if (!on[t]) std::memset(base + t * bytes, 0, static_cast<size_t>(bytes));
}

void check_stacked(const char* fn, const at::Tensor& w, const char* name, at::IntArrayRef shape,
                   at::ScalarType st) {
  TORCH_CHECK(w.device().is_cpu() && w.sizes() == shape, fn, ": ", name, " must be a CPU tensor of shape ",
              shape, ", got ", w.sizes(), " on ", w.device());
  TORCH_CHECK(w.scalar_type() == st, fn, ": ", name, " must have dtype ", st, ", got ", w.scalar_type());
}

template <typename S>
void run_fwd(const char* fn, const Groups& g, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
             const c10::optional<at::Tensor>& cu, int64_t max_seqlen, const at::Tensor& wd,
             const at::Tensor& bd, const at::Tensor& wp, const at::Tensor& num, const at::Tensor& den,
             const at::Tensor& wu, const at::Tensor& bu, bool vb, std::vector<at::Tensor>& outs) {
  using T = typename std::conditional<std::is_same<S, double>::value, double, float>::type;
  const auto ct = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  const int64_t B = g.B, K = g.K, r = wd.size(1), d = wd.size(2), L = wp.size(1);
  const Present<T> Wd = present<T>(wd, g), Bd = present<T>(bd, g), Wp = present<T>(wp, g);
  const Present<T> Wu = present<T>(wu, g), Bu = present<T>(bu, g);

  // Wdp_k^T = Wp_k Wd_k (K, L, d), as p^T Wd with p = Wp_k^T (r, L); c_k = Wp_k bd_k in double.
  at::Tensor wdp = at::empty({K, L, d}, h.options().dtype(ct));
  at::Tensor c = at::empty({K, L}, h.options().dtype(ct));
  std::vector<T> wpt(static_cast<size_t>(K * r * L));
  T* wdpp = wdp.data_ptr<T>();
  T* cp = c.data_ptr<T>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = 0; l < L; ++l) {
      double s = 0.0;
      for (int64_t j = 0; j < r; ++j) {
        wpt[(k * r + j) * L + l] = Wp.ptr[k][l * r + j];
        s += static_cast<double>(Wp.ptr[k][l * r + j]) * static_cast<double>(Bd.ptr[k][j]);
      }
      cp[k * L + l] = static_cast<T>(s);
    }
  const int64_t col_tasks = (d + kColTask - 1) / kColTask;
  at::parallel_for(0, K * col_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / col_tasks, k0 = (t % col_tasks) * kColTask;
      detail::project_rows(Wd.ptr[k], r, d, wpt.data() + k * r * L, L, wdpp + k * L * d, k0,
                           std::min(d, k0 + kColTask));
    }
  });

  const at::Tensor sel = at::from_blob(const_cast<int32_t*>(g.sel.data()), {B}, at::kInt);
  at::Tensor a, z, n;
  std::tie(a, z, n) = detail::pool_pass_fwd(fn, h, mask, cu, max_seqlen, wd[0], wp[0], wdp, c, sel);
  const T* zp = z.data_ptr<T>();
  const T* nv = n.data_ptr<T>();

  // U_b = Z_b Wd_k^T + n_b bd_k, via U_b^T (r, L) = Wd_k Z_b^T; 0 for requests without an adapter.
  at::Tensor u = at::zeros({B, L, r}, h.options().dtype(ct));
  T* up = u.data_ptr<T>();
  const int64_t row_tasks_r = (r + kRowTask - 1) / kRowTask;
  const int64_t Ba = static_cast<int64_t>(g.order.size());
  at::parallel_for(0, Ba * row_tasks_r, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> out(static_cast<size_t>(kRowTask * L));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = g.order[t / row_tasks_r], k = g.sel[b];
      const int64_t j0 = (t % row_tasks_r) * kRowTask, j1 = std::min(r, j0 + kRowTask);
      detail::dot_rows(Wd.ptr[k] + j0 * d, d, zp + b * L * d, L, out.data(), 0, j1 - j0);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t l = 0; l < L; ++l) up[(b * L + l) * r + j] = out[(j - j0) * L + l] + nv[b] * Bd.ptr[k][j];
    }
  });

  // G = R(U) with one coefficient group per request (its tenant's coefficients).
  at::Tensor gact = u.clone();
  if (B > 0)
    gact = rational_fwd(u.view({1, B * L * r}), per_request(num, g), per_request(den, g), vb).view({B, L, r});
  T* gp = gact.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    if (g.sel[b] < 0) std::fill(gp + b * L * r, gp + (b + 1) * L * r, T(0));

  // P_b = G_b Wu_k^T + bu_k, via P_b^T (d, L) = Wu_k G_b^T, 16 rows of Wu a task.
  at::Tensor p = (Ba == B ? at::empty({B, L, d}, h.options()) : at::zeros({B, L, d}, h.options()));
  S* pp = p.data_ptr<S>();
  const int64_t row_tasks_d = (d + kRowTask - 1) / kRowTask;
  at::parallel_for(0, Ba * row_tasks_d, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> out(static_cast<size_t>(kRowTask * L));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = g.order[t / row_tasks_d], k = g.sel[b];
      const int64_t j0 = (t % row_tasks_d) * kRowTask, j1 = std::min(d, j0 + kRowTask);
      detail::dot_rows(Wu.ptr[k] + j0 * r, r, gp + b * L * r, L, out.data(), 0, j1 - j0);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t j = j0; j < j1; ++j)
          pp[(b * L + l) * d + j] = static_cast<S>(out[(j - j0) * L + l] + Bu.ptr[k][j]);
    }
  });
  // Saved for the backward in the layout of the Triton op: Wdp (K, d, L).
  outs = {p, a, z, u, gact, n, wdp.transpose(1, 2).contiguous()};
}

template <typename S>
void run_bwd(const char* fn, const Groups& g, const at::Tensor& gp_in, const at::Tensor& h,
             const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu, int64_t max_seqlen,
             const at::Tensor& wd, const at::Tensor& wp, const at::Tensor& num, const at::Tensor& den,
             const at::Tensor& wu, const at::Tensor& a, const at::Tensor& z, const at::Tensor& u,
             const at::Tensor& gact, const at::Tensor& n, const at::Tensor& wdp_dl, bool vb,
             std::vector<at::Tensor>& outs) {
  using T = typename std::conditional<std::is_same<S, double>::value, double, float>::type;
  const auto ct = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  const int64_t B = g.B, K = g.K, T_ = g.T, r = wd.size(1), d = wd.size(2), L = wp.size(1);
  const int64_t Ba = static_cast<int64_t>(g.order.size());
  const auto opts = h.options().dtype(ct);
  const Present<T> Wd = present<T>(wd, g), Wp = present<T>(wp, g), Wu = present<T>(wu, g);

  // gP in the compute type, gathered in segment order (B_a, L, d): the lane weights of gWu.
  const at::Tensor gpc = gp_in.to(ct).contiguous();
  const T* gpp = gpc.data_ptr<T>();
  std::vector<T> gpo(static_cast<size_t>(Ba * L * d));
  at::parallel_for(0, Ba, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      std::copy(gpp + g.order[i] * L * d, gpp + (g.order[i] + 1) * L * d, gpo.data() + i * L * d);
  });

  // gG_b = gP_b Wu_k (L, r), as p^T Wu_k with p = gP_b^T (d, L); 0 for requests without an adapter.
  at::Tensor gg = at::zeros({B, L, r}, opts);
  T* ggp = gg.data_ptr<T>();
  at::parallel_for(0, Ba, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> pt(static_cast<size_t>(d * L));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = g.order[i], k = g.sel[b];
      for (int64_t l = 0; l < L; ++l)
        for (int64_t j = 0; j < d; ++j) pt[j * L + l] = gpp[(b * L + l) * d + j];
      detail::project_rows(Wu.ptr[k], d, r, pt.data(), L, ggp + b * L * r, 0, r);
    }
  });

  // gU, and each request's coefficient gradients, summed per tenant in batch order.
  at::Tensor gu = at::zeros({B, L, r}, opts), gnr = at::zeros({B, num.size(1)}, opts),
             gdr = at::zeros({B, den.size(1)}, opts);
  if (B > 0) {
    const at::Tensor numr = per_request(num, g), denr = per_request(den, g);
    std::tie(gu, gnr, gdr) = rational_bwd(gg.view({1, B * L * r}), u.view({1, B * L * r}), numr, denr, vb);
    gu = gu.view({B, L, r});
  }
  const T* gup = gu.data_ptr<T>();
  at::Tensor gnum = at::empty(num.sizes(), num.options()), gden = at::empty(den.sizes(), den.options());
  zero_absent(gnum, g);
  zero_absent(gden, g);
  for (int64_t k = 0; k < K; ++k) {
    for (auto* pair : {&gnum, &gden}) {
      const at::Tensor& src = pair == &gnum ? gnr : gdr;
      const int64_t m = src.size(1);
      T* dst = pair->template data_ptr<T>() + g.tenant[k] * m;
      for (int64_t j = 0; j < m; ++j) {
        double s = 0.0;
        for (int64_t i = g.start[k]; i < g.start[k + 1]; ++i) s += src.template data_ptr<T>()[g.order[i] * m + j];
        dst[j] = static_cast<T>(s);
      }
    }
  }

  // gWu_k (d, r) = sum gP^T G over the segment's rows, gbu_k = their column sums; rows of d per task.
  at::Tensor gwu = at::empty({T_, d, r}, opts), gbu = at::empty({T_, d}, opts);
  zero_absent(gwu, g);
  zero_absent(gbu, g);
  const T* gap = gact.data_ptr<T>();
  const int64_t row_tasks_d = (d + kRowTask - 1) / kRowTask;
  at::parallel_for(0, K * row_tasks_d, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const T*> x;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / row_tasks_d, j0 = (t % row_tasks_d) * kRowTask, j1 = std::min(d, j0 + kRowTask);
      const int64_t i0 = g.start[k], nx = (g.start[k + 1] - i0) * L;
      x.clear();
      for (int64_t i = i0; i < g.start[k + 1]; ++i)
        for (int64_t l = 0; l < L; ++l) x.push_back(gap + (g.order[i] * L + l) * r);
      const T* coef = gpo.data() + i0 * L * d;
      T* out = gwu.data_ptr<T>() + g.tenant[k] * d * r;
      detail::outer_rows(x.data(), static_cast<int>(nx), coef, d, r, out, j0, j1);
      T* ob = gbu.data_ptr<T>() + g.tenant[k] * d;
      for (int64_t j = j0; j < j1; ++j) {
        T s = T(0);
        for (int64_t m = 0; m < nx; ++m) s += coef[m * d + j];
        ob[j] = s;
      }
    }
  });

  // gZ_b = gU_b Wd_k (L, d), as p^T Wd_k with p = gU_b^T (r, L), column tasks over d.
  std::vector<T> gut(static_cast<size_t>(B * r * L));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < r; ++j) gut[(b * r + j) * L + l] = gup[(b * L + l) * r + j];
  at::Tensor gz = at::zeros({B, L, d}, opts);
  T* gzp = gz.data_ptr<T>();
  const int64_t col_tasks = (d + kColTask - 1) / kColTask;
  at::parallel_for(0, Ba * col_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = g.order[t / col_tasks], k = g.sel[b], k0 = (t % col_tasks) * kColTask;
      detail::project_rows(Wd.ptr[k], r, d, gut.data() + b * r * L, L, gzp + b * L * d, k0,
                           std::min(d, k0 + kColTask));
    }
  });

  // The pass over H: gH, and gWdp_k^T (K, L, d) summed over each tenant's requests in order.
  const at::Tensor wdp = wdp_dl.transpose(1, 2).contiguous();
  const at::Tensor sel = at::from_blob(const_cast<int32_t*>(g.sel.data()), {B}, at::kInt);
  at::Tensor gh, gwdp;
  std::tie(gh, gwdp) = detail::pool_pass_bwd(fn, h, mask, cu, max_seqlen, wd[0], wp[0], wdp, sel, a, z, gz);
  const T* gwdpp = gwdp.data_ptr<T>();

  // gWd_k = Wp_k^T gWdp_k^T + sum gU^T Z: rows X = [gWdp_k^T; Z rows], lane weights [Wp_k; gU rows].
  std::vector<int64_t> cstart(static_cast<size_t>(K + 1), 0);
  for (int64_t k = 0; k < K; ++k) cstart[k + 1] = cstart[k] + L + (g.start[k + 1] - g.start[k]) * L;
  std::vector<T> coef(static_cast<size_t>(cstart[K] * r));
  for (int64_t k = 0; k < K; ++k) {
    T* ck = coef.data() + cstart[k] * r;
    std::copy(Wp.ptr[k], Wp.ptr[k] + L * r, ck);
    for (int64_t i = g.start[k]; i < g.start[k + 1]; ++i) {
      const int64_t b = g.order[i];
      std::copy(gup + b * L * r, gup + (b + 1) * L * r, ck + (L + (i - g.start[k]) * L) * r);
    }
  }
  at::Tensor gwd = at::empty({T_, r, d}, opts), gbd = at::empty({T_, r}, opts), gwp = at::empty({T_, L, r}, opts);
  zero_absent(gwd, g);
  zero_absent(gbd, g);
  zero_absent(gwp, g);
  const T* zp = z.data_ptr<T>();
  const T* nv = n.data_ptr<T>();
  const int64_t row_tasks_r = (r + kRowTask - 1) / kRowTask;
  at::parallel_for(0, K * row_tasks_r, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const T*> x;
    std::vector<T> wpt(static_cast<size_t>(kRowTask * L));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / row_tasks_r, j0 = (t % row_tasks_r) * kRowTask, j1 = std::min(r, j0 + kRowTask);
      const int64_t tn = g.tenant[k];
      x.clear();
      for (int64_t l = 0; l < L; ++l) x.push_back(gwdpp + (k * L + l) * d);
      for (int64_t i = g.start[k]; i < g.start[k + 1]; ++i)
        for (int64_t l = 0; l < L; ++l) x.push_back(zp + (g.order[i] * L + l) * d);
      detail::outer_rows(x.data(), static_cast<int>(x.size()), coef.data() + cstart[k] * r, r, d,
                         gwd.data_ptr<T>() + tn * r * d, j0, j1);
      // gbd_k = sum_b n_b sum_l gU_b;  gWp_k^T rows j = Wd_k[j] . gWdp_k^T rows.
      T* gb = gbd.data_ptr<T>() + tn * r;
      for (int64_t j = j0; j < j1; ++j) {
        T s = T(0);
        for (int64_t i = g.start[k]; i < g.start[k + 1]; ++i) {
          const int64_t b = g.order[i];
          for (int64_t l = 0; l < L; ++l) s += nv[b] * gup[(b * L + l) * r + j];
        }
        gb[j] = s;
      }
      detail::dot_rows(Wd.ptr[k] + j0 * d, d, gwdpp + k * L * d, L, wpt.data(), 0, j1 - j0);
      T* gw = gwp.data_ptr<T>() + tn * L * r;
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t l = 0; l < L; ++l) gw[l * r + j] = wpt[(j - j0) * L + l];
    }
  });
  outs = {gh, gwd, gbd, gwp, gnum, gden, gwu, gbu};
}

// Shapes and dtypes of the stacked weights; returns (T, r, d, L).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_weights(const char* fn, const at::Tensor& h,
                                                             const at::Tensor& wd, const at::Tensor& wp,
                                                             const at::Tensor& num, const at::Tensor& den,
                                                             const at::Tensor& wu) {
  TORCH_CHECK(wd.dim() == 3 && wd.size(0) >= 1, fn, ": down_weight must be (T, r, d), got ", wd.sizes());
  const int64_t T = wd.size(0), r = wd.size(1), d = wd.size(2);
  TORCH_CHECK(wp.dim() == 3 && wp.size(0) == T && wp.size(2) == r, fn, ": pool_weight must be (T, L, r) = (",
              T, ", L, ", r, "), got ", wp.sizes());
  const int64_t L = wp.size(1);
  const auto st = h.scalar_type();
  const auto ct = compute_type(st);
  check_stacked(fn, wd, "down_weight", {T, r, d}, st);
  check_stacked(fn, wp, "pool_weight", {T, L, r}, st);
  check_stacked(fn, wu, "up_weight", {T, d, r}, st);
  TORCH_CHECK(num.dim() == 2 && den.dim() == 2 && num.size(0) == T && den.size(0) == T, fn,
              ": numerator must be (T, m+1) and denominator (T, n), got ", num.sizes(), " and ", den.sizes());
  TORCH_CHECK(num.scalar_type() == ct && den.scalar_type() == ct && num.is_contiguous() && den.is_contiguous(),
              fn, ": coefficients must be contiguous ", ct);
  return {T, r, d, L};
}

}  // namespace

namespace {

bool is_version_b(const char* fn, c10::string_view version) {
  TORCH_CHECK(version.size() == 1 && (version[0] == 'A' || version[0] == 'B'), fn,
              ": version must be \"A\" or \"B\"");
  return version[0] == 'B';
}

void check_list(const char* fn, at::TensorList list, size_t lo, size_t hi, const char* what) {
  TORCH_CHECK(list.size() >= lo && list.size() <= hi, fn, ": ", what, " must list ", lo,
              (lo == hi ? "" : " or " + std::to_string(hi)), " tensors, got ", list.size());
}

}  // namespace

// groups = TenantGroups.tensors(): order, seg_start, seg_tenant are read; the rest (wsel, unit,
// absent) are the Triton launchers' (the C++ kernels zero-fill absent tenants from the groups),
// weights = (Wd, bd, Wp, num, den, Wu, bu): the schemas in iapt_kernels/schemas.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multi_tenant_generator_fwd(const at::Tensor& h, const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& cu_seqlens, at::TensorList groups,
                           at::TensorList weights, c10::string_view version, int64_t max_seqlen) {
  const char* fn = "multi_tenant_generator_fwd";
  check_list(fn, groups, 5, 6, "groups");
  check_list(fn, weights, 7, 7, "weights");
  const at::Tensor &down_weight = weights[0], &down_bias = weights[1], &pool_weight = weights[2],
                   &numerator = weights[3], &denominator = weights[4], &up_weight = weights[5],
                   &up_bias = weights[6];
  const bool version_b = is_version_b(fn, version);
  int64_t T, r, d, L;
  std::tie(T, r, d, L) = check_weights(fn, h, down_weight, pool_weight, numerator, denominator, up_weight);
  check_stacked(fn, down_bias, "down_bias", {T, r}, h.scalar_type());
  check_stacked(fn, up_bias, "up_bias", {T, d}, h.scalar_type());
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  const int64_t B = packed ? cu_seqlens->numel() - 1 : (h.dim() == 3 ? h.size(0) : 0);
  const Groups g = read_groups(fn, B, T, groups[0], groups[1], groups[2]);
  std::vector<at::Tensor> outs;
  IAPT_DISPATCH_FLOATING(h.scalar_type(), "multi_tenant_generator", run_fwd, fn, g, h, mask, cu_seqlens, max_seqlen, down_weight, down_bias,
                   pool_weight, numerator, denominator, up_weight, up_bias, version_b, outs);
  return {outs[0], outs[1], outs[2], outs[3], outs[4], outs[5], outs[6]};
}

// weights = (Wd, Wp, num, den, Wu), saved = (A, Z, U, G, n, Wdp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multi_tenant_generator_bwd(const at::Tensor& grad, const at::Tensor& h, const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& cu_seqlens, at::TensorList groups,
                           at::TensorList weights, at::TensorList saved, c10::string_view version,
                           int64_t max_seqlen) {
  const char* fn = "multi_tenant_generator_bwd";
  check_list(fn, groups, 5, 6, "groups");
  check_list(fn, weights, 5, 5, "weights");
  check_list(fn, saved, 6, 6, "saved");
  const at::Tensor &down_weight = weights[0], &pool_weight = weights[1], &numerator = weights[2],
                   &denominator = weights[3], &up_weight = weights[4];
  const at::Tensor &a = saved[0], &z = saved[1], &u = saved[2], &g_act = saved[3], &n = saved[4],
                   &pool_product = saved[5];
  const bool version_b = is_version_b(fn, version);
  int64_t T, r, d, L;
  std::tie(T, r, d, L) = check_weights(fn, h, down_weight, pool_weight, numerator, denominator, up_weight);
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  const int64_t B = packed ? cu_seqlens->numel() - 1 : (h.dim() == 3 ? h.size(0) : 0);
  const Groups g = read_groups(fn, B, T, groups[0], groups[1], groups[2]);
  const auto ct = compute_type(h.scalar_type());
  TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 3 && grad.size(0) == B && grad.size(1) == L &&
                  grad.size(2) == d, fn, ": grad must be (B, L, d) = (", B, ", ", L, ", ", d, "), got ",
              grad.sizes());
  for (const at::Tensor* t : {&u, &g_act})
    TORCH_CHECK(t->scalar_type() == ct && t->is_contiguous() && t->dim() == 3 && t->size(0) == B &&
                    t->size(1) == L && t->size(2) == r, fn, ": the saved U and G must be contiguous (B, L, r) ", ct);
  TORCH_CHECK(n.scalar_type() == ct && n.numel() == B && n.is_contiguous(), fn, ": n must be (B,) ", ct);
  TORCH_CHECK(pool_product.scalar_type() == ct && pool_product.dim() == 3 && pool_product.size(0) == g.K &&
                  pool_product.size(1) == d && pool_product.size(2) == L, fn,
              ": pool_product must be the forward's (K, d, L) = (", g.K, ", ", d, ", ", L, ")");
  std::vector<at::Tensor> outs;
  IAPT_DISPATCH_FLOATING(h.scalar_type(), "multi_tenant_generator", run_bwd, fn, g, grad.contiguous(), h, mask, cu_seqlens, max_seqlen, down_weight,
                   pool_weight, numerator, denominator, up_weight, a.contiguous(), z.contiguous(), u, g_act,
                   n, pool_product, version_b, outs);
  // The weight gradients in their weights' dtypes (a no-op for fp32/fp64 weights), the
  // coefficients' in the compute dtype, as the fake says.
  const auto wdt = down_weight.scalar_type(), pdt = pool_weight.scalar_type(), udt = up_weight.scalar_type();
  return {outs[0], outs[1].to(wdt), outs[2].to(wdt), outs[3].to(pdt), outs[4], outs[5], outs[6].to(udt),
          outs[7].to(udt)};
}

}  // namespace iapt
