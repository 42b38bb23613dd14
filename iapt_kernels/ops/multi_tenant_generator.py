"""Batched per-tenant prompt generators: one set of launches serves (and trains) every tenant of a
batch (DESIGN.md section 1, "Multi-tenant"; the algebra of section 3).

Request `b` of tenant `t = tenant_ids[b]` gets the prompts of tenant `t`'s generator:

    Wdp_t = Wd_t^T Wp_t^T (d, L),   c_t = Wp_t bd_t (L)
    E_b = H_b Wdp_t + c_t,   A_b = masked softmax_S(E_b),   Z_b = A_b^T H_b           (L, d)
    U_b = Z_b Wd_t^T + n_b bd_t,   G_b = R_t(U_b),   P_b = G_b Wu_t^T + bu_t            (L, r), (L, d)

and `P_b = 0` for `t = -1` (no adapter). Backward, with `gP`:

    gU_b = R_t'(U_b) * (gP_b Wu_t)     (and the coefficient partials of R_t)
    gWu_t = sum_b gP_b^T G_b,  gbu_t = sum_b sum_l gP_b,  gZ_b = gU_b Wd_t
    gWd_t = sum_b gU_b^T Z_b + Wp_t^T gWdp_t^T,  gbd_t = sum_b n_b sum_l gU_b,  gWp_t = gWdp_t^T Wd_t^T
    gWdp_t^T = sum_b (per-request partials of the attention-pool backward kernels)

The requests are grouped by tenant once per batch (:class:`TenantGroups`, reusable by every layer):
`order` lists the requests with an adapter, tenant by tenant; segment `k` is `order[seg[k]:seg[k+1]]`,
all of tenant `seg_tenant[k]`. Two generic kernels do every product around the attention-pool passes:

* `_multi_tenant_generator_matmul_kernel`: one program per (segment, block of output columns) walks
  the segment's rows in order, `Y[row] = X[row] W_t (+ bias_t)`, reading tenant `t`'s weights in
  place (never a per-request copy), with the rational activation of tenant `t` as an optional
  epilogue: forward (`U` -> `G`) or backward (`gG` -> `gU`, with per-program coefficient partials).
* `_multi_tenant_generator_wgrad_kernel`: one program per (segment, output tile) sums the
  segment's rows in order, `Y_t = sum_rows A^T B` and/or `sum_rows s * A` (bias gradients).

Each gradient element is written by exactly one program after a fixed-order loop, coefficient
partials are summed in float64 in a fixed order: no atomics, bitwise reproducible. Products are
broadcast-multiply-reduce in fp32 (fp64 for float64 inputs), exact with no TF32 rounding; the segments
are a few rows each, so the products are bound by reading each present tenant's weights. Weights are
read in their own dtype and converted in registers, so absent tenants' weights are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_pool import MAX_TOKENS, block_sizes, nonempty, stream_bwd, stream_fwd

NUM_WARPS = 4
MM_BLOCK = (16, 16, 16)  # rows, reduction, columns: 4096 products a program, no spills at 4 warps
WG_BLOCK = (16, 16, 16)  # rows, output rows, output columns
COLSUM_BLOCK = (16, 256)  # rows, output columns, when only column sums are wanted


# --------------------------------------------------------------------------- grouping metadata


@dataclass(frozen=True)
class TenantGroups:
    """Requests grouped by tenant, computed once per batch and reusable by every layer.

    Build it with :meth:`TenantGroups.build`. Fields (all on the device of ``tenant_ids``):
    ``tenant_ids (B,)`` int64 as given; ``order (B_a,)`` int32, the requests with an adapter, grouped
    by tenant in increasing tenant order and in batch order within a tenant; ``seg_start (K+1,)``
    int32 offsets of the ``K`` present tenants' segments in ``order``; ``seg_tenant (K,)`` int32;
    ``wsel (B_a,)`` int32, the segment of each entry of ``order``; ``unit (K+1,)`` int32 ``0..K``.
    """

    num_tenants: int
    tenant_ids: torch.Tensor
    order: torch.Tensor
    seg_start: torch.Tensor
    seg_tenant: torch.Tensor
    wsel: torch.Tensor
    unit: torch.Tensor

    @classmethod
    def build(cls, tenant_ids: torch.Tensor, num_tenants: int) -> "TenantGroups":
        """Group a batch by tenant. ``tenant_ids (B,)`` integer, each in ``[-1, num_tenants)``;
        ``-1`` = no adapter. Raises ``TypeError`` for non-integer ids, ``ValueError`` naming an id out
        of range. One host synchronisation (the number of present tenants)."""
        from .._validate import check_tenant_ids

        check_tenant_ids(tenant_ids, num_tenants)
        ids = tenant_ids.long()
        device = ids.device
        active = ids >= 0
        # Stable sort: within a tenant, requests keep their batch order (a fixed reduction order).
        key = torch.where(active, ids, num_tenants)
        order = torch.sort(key, stable=True).indices
        counts = torch.bincount(ids[active], minlength=num_tenants)
        present = torch.nonzero(counts).flatten()
        sizes = counts[present]
        order = order[: int(sizes.sum())]
        seg_start = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
        k = present.numel()
        wsel = torch.repeat_interleave(torch.arange(k, device=device), sizes)
        i32 = torch.int32
        return cls(num_tenants, ids, order.to(i32), seg_start.to(i32), present.to(i32), wsel.to(i32),
                   torch.arange(k + 1, device=device, dtype=i32))

    @property
    def num_present(self) -> int:
        """``K``: the number of tenants with at least one request in the batch."""
        return self.seg_tenant.numel()

    @property
    def batch_size(self) -> int:
        return self.tenant_ids.numel()

    def segments(self):
        """``(tenant, request indices)`` per present tenant, on the host (for the CPU path)."""
        bounds = self.seg_start.tolist()
        order = self.order.long()
        return [(t, order[bounds[k]: bounds[k + 1]]) for k, t in enumerate(self.seg_tenant.tolist())]

    def tensors(self):
        return self.order, self.seg_start, self.seg_tenant, self.wsel, self.unit


# --------------------------------------------------------------------------- kernels


@triton.jit
def _rational_terms(x, a, b, m, n, VERSION_B: tl.constexpr):
    """`P(x)`, `P'(x)`, `Q(x)`, `Q'(x)` of the rational activation with coefficients at `a` (m+1)
    and `b` (n), by Horner (DESIGN.md section 2); degrees are runtime values here, so one compiled
    kernel serves every degree. Also `sgn` and the power base of the denominator gradients."""
    p = tl.zeros_like(x) + tl.load(a + m)
    dp = tl.zeros_like(x)
    for i in range(m):
        dp = dp * x + p
        p = p * x + tl.load(a + (m - 1 - i))
    if VERSION_B:
        s = tl.zeros_like(x) + tl.load(b + n - 1)  # A / x
        ds = tl.zeros_like(x)
        for i in range(n - 1):
            ds = ds * x + s
            s = s * x + tl.load(b + (n - 2 - i))
        big_a = s * x
        sgn = tl.where(big_a < 0, -1.0, 1.0).to(x.dtype)
        q = 1.0 + big_a * sgn
        dq = sgn * (s + x * ds)
        base = x
    else:
        sgn = tl.where(x < 0, -1.0, 1.0).to(x.dtype)
        ax = x * sgn
        s = tl.zeros_like(x) + tl.abs(tl.load(b + n - 1))
        ds = tl.zeros_like(x)
        for i in range(n - 1):
            ds = ds * ax + s
            s = s * ax + tl.abs(tl.load(b + (n - 2 - i)))
        q = 1.0 + s * ax
        dq = sgn * (s + ax * ds)
        base = ax
    return p, dp, q, dq, sgn, base


@triton.jit
def _multi_tenant_generator_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, aux_ptr, y2_ptr, num_ptr, den_ptr, part_ptr,
    list_ptr, seg_ptr, segw_ptr,
    ROWS, K, N, deg_m, deg_n,
    sx_q, sx_r, sx_k, sw_t, sw_k, sw_n, sy_q, sy_r, sy_n, sb_t,
    X_POS: tl.constexpr, Y_POS: tl.constexpr, W_POS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, EPILOGUE: tl.constexpr, VERSION_B: tl.constexpr,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    COEF_PAD: tl.constexpr,
):
    # Segment k's rows are (entry i of list[seg[k]:seg[k+1]], row 0..ROWS-1); entry i names request
    # q = list[i]. X, Y are addressed by q, or by the list position i where *_POS says so.
    #   Y[q, row, n] = sum_k X[q, row, k] W[t, k, n] + scale[q] bias[t, n]   (+ Y, when ACCUMULATE)
    # EPILOGUE 1: Y holds U, Y2 gets R_t(U).  EPILOGUE 2: the product is gG; Y gets gU = R_t'(U) gG
    # with U read from AUX, and the program's coefficient-gradient partials go to PART.
    seg = tl.program_id(0)
    pn = tl.program_id(1)
    cdt = tl.float64 if FP64 else tl.float32
    start = tl.load(seg_ptr + seg)
    total = (tl.load(seg_ptr + seg + 1) - start) * ROWS
    if W_POS:
        t = seg.to(tl.int64)
    else:
        t = tl.load(segw_ptr + seg).to(tl.int64)
    nn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N
    a = num_ptr + t * (deg_m + 1)
    b = den_ptr + t * deg_n
    lanes = tl.arange(0, COEF_PAD)
    coef = tl.zeros([COEF_PAD], dtype=cdt)
    for f0 in range(0, total, BLOCK_M):
        f = f0 + tl.arange(0, BLOCK_M)
        fmask = f < total
        pos = start + f // ROWS
        row = (f % ROWS).to(tl.int64)
        q = tl.load(list_ptr + pos, mask=fmask, other=0).to(tl.int64)
        if X_POS:
            xq = pos.to(tl.int64)
        else:
            xq = q
        if Y_POS:
            yq = pos.to(tl.int64)
        else:
            yq = q
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=cdt)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            x = tl.load(x_ptr + xq[:, None] * sx_q + row[:, None] * sx_r + kk[None, :] * sx_k,
                        mask=fmask[:, None] & kmask[None, :], other=0.0).to(cdt)
            w = tl.load(w_ptr + t * sw_t + kk[:, None] * sw_k + nn[None, :] * sw_n,
                        mask=kmask[:, None] & nmask[None, :], other=0.0).to(cdt)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + t * sb_t + nn, mask=nmask, other=0.0).to(cdt)
            if HAS_SCALE:
                acc += tl.load(scale_ptr + q, mask=fmask, other=0.0).to(cdt)[:, None] * bias[None, :]
            else:
                acc += bias[None, :]
        yoff = yq[:, None] * sy_q + row[:, None] * sy_r + nn[None, :] * sy_n
        ymask = fmask[:, None] & nmask[None, :]
        if ACCUMULATE:
            acc += tl.load(y_ptr + yoff, mask=ymask, other=0.0).to(cdt)
        if EPILOGUE == 0:
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=ymask)
        elif EPILOGUE == 1:
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=ymask)
            p, _, qv, _, _, _ = _rational_terms(acc, a, b, deg_m, deg_n, VERSION_B)
            tl.store(y2_ptr + yoff, (p / qv).to(y2_ptr.dtype.element_ty), mask=ymask)
        else:
            # Masked lanes have gG = 0 (X was loaded as 0), so they add nothing to the partials.
            u = tl.load(aux_ptr + yoff, mask=ymask, other=0.0).to(cdt)
            p, dp, qv, dq, sgn, base = _rational_terms(u, a, b, deg_m, deg_n, VERSION_B)
            rq = 1.0 / qv
            r = p * rq
            tl.store(y_ptr + yoff, (acc * rq * (dp - r * dq)).to(y_ptr.dtype.element_ty), mask=ymask)
            wg = acc * rq
            up = tl.zeros_like(u) + 1.0
            for j in range(deg_m + 1):
                coef += tl.where(lanes == j, tl.sum(tl.sum(wg * up, axis=1), axis=0), 0.0)
                up = up * u
            if VERSION_B:
                wb = -(wg * r) * sgn
            else:
                wb = -(wg * r)
            bp = base
            for j in range(deg_n):
                part = tl.sum(tl.sum(wb * bp, axis=1), axis=0)
                if not VERSION_B:
                    part = part * tl.where(tl.load(b + j) < 0, -1.0, 1.0).to(cdt)
                coef += tl.where(lanes == deg_m + 1 + j, part, 0.0)
                bp = bp * base
    if EPILOGUE == 2:
        out = part_ptr + (seg * tl.num_programs(1) + pn).to(tl.int64) * (deg_m + 1 + deg_n)
        tl.store(out + lanes, coef, mask=lanes < deg_m + 1 + deg_n)


@triton.jit
def _multi_tenant_generator_wgrad_kernel(
    a_ptr, b_ptr, scale_ptr, y_ptr, yb_ptr, list_ptr, seg_ptr, segw_ptr,
    ROWS, M, N,
    sa_q, sa_r, sa_m, sb_q, sb_r, sb_n, sy_t, sy_m, sy_n, syb_t,
    A_POS: tl.constexpr, OUT_POS: tl.constexpr, HAS_OUTER: tl.constexpr, HAS_COLSUM: tl.constexpr,
    HAS_SCALE: tl.constexpr, FP64: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Y[t, m, n] = sum over segment rows of A[., row, m] B[q, row, n];  YB[t, m] = sum scale[q] A[., row, m]
    # (t = the segment's tenant, or the segment index with OUT_POS). Rows summed in segment order.
    seg = tl.program_id(0)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    cdt = tl.float64 if FP64 else tl.float32
    start = tl.load(seg_ptr + seg)
    total = (tl.load(seg_ptr + seg + 1) - start) * ROWS
    if OUT_POS:
        t = seg.to(tl.int64)
    else:
        t = tl.load(segw_ptr + seg).to(tl.int64)
    mm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = mm < M
    nn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=cdt)
    col = tl.zeros([BLOCK_M], dtype=cdt)
    for f0 in range(0, total, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < total
        pos = start + f // ROWS
        row = (f % ROWS).to(tl.int64)
        q = tl.load(list_ptr + pos, mask=fmask, other=0).to(tl.int64)
        if A_POS:
            aq = pos.to(tl.int64)
        else:
            aq = q
        av = tl.load(a_ptr + aq[:, None] * sa_q + row[:, None] * sa_r + mm[None, :] * sa_m,
                     mask=fmask[:, None] & mmask[None, :], other=0.0).to(cdt)
        if HAS_OUTER:
            bv = tl.load(b_ptr + q[:, None] * sb_q + row[:, None] * sb_r + nn[None, :] * sb_n,
                         mask=fmask[:, None] & nmask[None, :], other=0.0).to(cdt)
            acc += tl.sum(av[:, :, None] * bv[:, None, :], axis=0)
        if HAS_COLSUM:
            if HAS_SCALE:
                av = av * tl.load(scale_ptr + q, mask=fmask, other=0.0).to(cdt)[:, None]
            col += tl.sum(av, axis=0)
    if HAS_OUTER:
        tl.store(y_ptr + t * sy_t + mm[:, None] * sy_m + nn[None, :] * sy_n,
                 acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    if HAS_COLSUM:
        if pn == 0:
            tl.store(yb_ptr + t * syb_t + mm, col.to(yb_ptr.dtype.element_ty), mask=mmask)


# --------------------------------------------------------------------------- launchers


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _matmul(x, x_strides, w, w_strides, y, y_strides, lists, rows, K, N, *, bias=None, bias_stride=0,
            scale=None, x_pos=False, y_pos=False, w_pos=False, accumulate=False, epilogue=0,
            aux=None, y2=None, coefficients=None, version="B", partials=None):
    """Launch `_multi_tenant_generator_matmul_kernel` over `lists = (list, seg, segw)`; returns the
    number of column blocks (the partials' second axis when `epilogue == 2`)."""
    order, seg, segw = lists
    k_segments = seg.numel() - 1
    block_m, block_k, block_n = MM_BLOCK
    n_blocks = triton.cdiv(N, block_n)
    if k_segments == 0 or n_blocks == 0:
        return n_blocks
    num, den = coefficients if coefficients is not None else (y, y)
    deg_m, deg_n = (num.shape[1] - 1, den.shape[1]) if coefficients is not None else (0, 0)
    coef_pad = triton.next_power_of_2(max(deg_m + 1 + deg_n, 2))
    _multi_tenant_generator_matmul_kernel[(k_segments, n_blocks)](
        x, w, bias if bias is not None else y, scale if scale is not None else y, y,
        aux if aux is not None else y, y2 if y2 is not None else y, num, den,
        partials if partials is not None else y, order, seg, segw,
        rows, K, N, deg_m, deg_n, *x_strides, *w_strides, *y_strides, bias_stride,
        X_POS=x_pos, Y_POS=y_pos, W_POS=w_pos, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        ACCUMULATE=accumulate, EPILOGUE=epilogue, VERSION_B=version == "B",
        FP64=y.dtype == torch.float64 if epilogue == 0 else num.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, COEF_PAD=coef_pad, num_warps=NUM_WARPS,
    )
    return n_blocks


def _wgrad(a, a_strides, b, b_strides, lists, rows, M, N, *, y=None, y_strides=(0, 0, 0), yb=None,
           yb_stride=0, scale=None, a_pos=False, out_pos=False, fp64=False):
    """Launch `_multi_tenant_generator_wgrad_kernel`: `y[t] = sum A^T B` and/or `yb[t] = sum s A`."""
    order, seg, segw = lists
    k_segments = seg.numel() - 1
    if k_segments == 0 or M == 0:
        return
    if y is not None:
        block_f, block_m, block_n = WG_BLOCK
        grid = (k_segments, triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    else:
        (block_f, block_m), block_n = COLSUM_BLOCK, 1
        grid = (k_segments, triton.cdiv(M, block_m), 1)
    dummy = yb if y is None else y
    _multi_tenant_generator_wgrad_kernel[grid](
        a, b if b is not None else a, scale if scale is not None else dummy, dummy,
        yb if yb is not None else dummy, order, seg, segw,
        rows, M, N, *a_strides, *b_strides, *y_strides, yb_stride,
        A_POS=a_pos, OUT_POS=out_pos, HAS_OUTER=y is not None, HAS_COLSUM=yb is not None,
        HAS_SCALE=scale is not None, FP64=fp64,
        BLOCK_F=block_f, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )


def _pool_weights(wd, bd, wp, seg_start_unit, seg_tenant, cdt):
    """`Wdp_t (K, d, L)` and `c_t (K, L)` of the K present tenants, in the compute dtype."""
    T, r, d = wd.shape
    L = wp.shape[1]
    K = seg_tenant.numel()
    wdp = torch.empty((K, d, L), dtype=cdt, device=wd.device)
    units = (seg_tenant, seg_start_unit, seg_tenant)
    # Wdp_t^T (L, d) = Wp_t (L, r) Wd_t (r, d), stored transposed as (d, L) for the score kernel.
    _matmul(wp, (L * r, r, 1), wd, (r * d, d, 1), wdp, (d * L, 1, L), units, L, r, d, y_pos=True)
    c = torch.einsum("klr,kr->kl", wp[seg_tenant.long()].to(cdt), bd[seg_tenant.long()].to(cdt))
    return wdp, c


def multi_tenant_generator_fwd(h, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit,
                               wd, bd, wp, num, den, wu, bu, version, max_seqlen):
    """Triton forward: `(P (B, L, d) in h.dtype, A, Z, U, G, n, Wdp)`, the rest in the compute dtype
    and saved for the backward. Rows of requests without an adapter are 0 in `P`."""
    cdt = compute_dtype(h)
    h = h.contiguous()
    T, r, d = wd.shape
    L = wp.shape[1]
    B = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    wdp, c = _pool_weights(wd, bd, wp, unit, seg_tenant, cdt)
    a, z = stream_fwd(h, mask, cu_seqlens, max_seqlen, wdp, c, requests=(order, wsel))
    n = nonempty(mask, cu_seqlens, cdt, B, h.device)
    u = torch.empty((B, L, r), dtype=cdt, device=h.device)
    g = torch.empty_like(u)
    groups = (order, seg_start, seg_tenant)
    # U = Z Wd_t^T + n bd_t and G = R_t(U) in one pass.
    _matmul(z, (L * d, d, 1), wd, (r * d, 1, d), u, (L * r, r, 1), groups, L, d, r,
            bias=bd, bias_stride=r, scale=n, epilogue=1, y2=g, coefficients=(num, den), version=version)
    p = (torch.empty if order.numel() == B else torch.zeros)((B, L, d), dtype=h.dtype, device=h.device)
    _matmul(g, (L * r, r, 1), wu, (d * r, 1, r), p, (L * d, d, 1), groups, L, r, d, bias=bu, bias_stride=d)
    return p, a, z, u, g, n, wdp


def multi_tenant_generator_bwd(gp, h, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit,
                               wd, wp, num, den, wu, a, z, u, g, n, wdp, version, max_seqlen):
    """Triton backward: `(gH, gWd, gbd, gWp, gnum, gden, gWu, gbu)`; stacked-parameter gradients are
    exactly 0 for tenants absent from the batch. Weight gradients in the compute dtype."""
    cdt = compute_dtype(h)
    h = h.contiguous()
    gp = gp.contiguous()
    T, r, d = wd.shape
    L = wp.shape[1]
    B = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    K = seg_tenant.numel()
    kw = dict(dtype=cdt, device=h.device)
    groups = (order, seg_start, seg_tenant)
    units = (seg_tenant, unit, seg_tenant)
    fp64 = cdt == torch.float64

    # gU = R_t'(U) (gP Wu_t), with the coefficient partials of each (segment, column block).
    gu = torch.empty((B, L, r), **kw)
    k_coef = num.shape[1] + den.shape[1]
    partials = torch.empty((K, triton.cdiv(r, MM_BLOCK[2]), k_coef), **kw)
    _matmul(gp, (L * d, d, 1), wu, (d * r, r, 1), gu, (L * r, r, 1), groups, L, d, r,
            epilogue=2, aux=u, coefficients=(num, den), version=version, partials=partials)
    sums = partials.sum(dim=1, dtype=torch.float64).to(cdt)  # fixed order, no atomics
    gnum = torch.zeros((T, num.shape[1]), **kw)
    gden = torch.zeros((T, den.shape[1]), **kw)
    gnum[seg_tenant.long()] = sums[:, : num.shape[1]]
    gden[seg_tenant.long()] = sums[:, num.shape[1]:]

    gwu = torch.zeros((T, d, r), **kw)
    gbu = torch.zeros((T, d), **kw)
    _wgrad(gp, (L * d, d, 1), g, (L * r, r, 1), groups, L, d, r, y=gwu, y_strides=(d * r, r, 1),
           yb=gbu, yb_stride=d, fp64=fp64)

    gz = torch.empty((B, L, d), **kw)
    _matmul(gu, (L * r, r, 1), wd, (r * d, d, 1), gz, (L * d, d, 1), groups, L, r, d)
    gwd = torch.zeros((T, r, d), **kw)
    gbd = torch.zeros((T, r), **kw)
    _wgrad(gu, (L * r, r, 1), z, (L * d, d, 1), groups, L, r, d, y=gwd, y_strides=(r * d, d, 1),
           yb=gbd, yb_stride=r, scale=n, fp64=fp64)

    gh, gw_partial = stream_bwd(h, mask, cu_seqlens, max_seqlen, a, gz, wdp, requests=(order, wsel), z=z)
    # gWdp_t^T (K, L, d): each tenant's per-request partials, summed in segment order.
    gwdp_t = torch.empty((K, L, d), **kw)
    _wgrad(gw_partial, (L * d, 0, 1), None, (0, 0, 0), groups, 1, L * d, 1, yb=gwdp_t, yb_stride=L * d,
           a_pos=True, out_pos=True, fp64=fp64)
    gwp = torch.zeros((T, L, r), **kw)
    # gWp_t = gWdp_t^T Wd_t^T;  gWd_t += Wp_t^T gWdp_t^T.
    _matmul(gwdp_t, (L * d, d, 1), wd, (r * d, 1, d), gwp, (L * r, r, 1), units, L, d, r, x_pos=True)
    _matmul(wp, (L * r, 1, r), gwdp_t, (L * d, d, 1), gwd, (r * d, d, 1), units, r, L, d,
            w_pos=True, accumulate=True)
    return gh, gwd, gbd, gwp, gnum, gden, gwu, gbu


# --------------------------------------------------------------------------- autograd


class MultiTenantGeneratorFunction(torch.autograd.Function):
    """Differentiable multi-tenant generator over the `iapt::multi_tenant_generator_fwd/bwd` ops.

    Saves `A (B, S, L)`, `Z (B, L, d)`, `U`, `G (B, L, r)`, `n (B,)` and `Wdp (K, d, L)` beside the
    inputs: nothing of size `S x r`, no copy of any tenant's weights.
    """

    @staticmethod
    def forward(ctx, h, mask, cu_seqlens, groups, wd, bd, wp, num, den, wu, bu, version, max_seqlen, backend):
        cdt = compute_dtype(h)
        numc, denc = num.to(cdt).contiguous(), den.to(cdt).contiguous()
        weights = [t.contiguous() for t in (wd, bd, wp, wu, bu)]
        wd, bd, wp, wu, bu = weights
        p, a, z, u, g, n, wdp = torch.ops.iapt.multi_tenant_generator_fwd(
            h, mask, cu_seqlens, *groups.tensors(), wd, bd, wp, numc, denc, wu, bu, version, max_seqlen,
            backend)
        ctx.save_for_backward(h, mask, cu_seqlens, *groups.tensors(), wd, wp, numc, denc, wu,
                              a, z, u, g, n, wdp)
        ctx.meta = (version, max_seqlen, backend, [t.dtype for t in (wd, bd, wp, num, den, wu, bu)])
        return p

    @staticmethod
    def backward(ctx, gp):
        (h, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit, wd, wp, num, den, wu,
         a, z, u, g, n, wdp) = ctx.saved_tensors
        version, max_seqlen, backend, dtypes = ctx.meta
        grads = torch.ops.iapt.multi_tenant_generator_bwd(
            gp.contiguous(), h, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit,
            wd, wp, num, den, wu, a, z, u, g, n, wdp, version, max_seqlen, backend)
        gh, *gw = grads
        gwd, gbd, gwp, gnum, gden, gwu, gbu = (t.to(dt) for t, dt in zip(gw, dtypes))
        return gh, None, None, None, gwd, gbd, gwp, gnum, gden, gwu, gbu, None, None, None


# --------------------------------------------------------------------------- launch configurations


def launch_configs():
    """Every (kernel, specialisation) the launchers above use, for the static GPU report."""
    matmul_calls = {
        # name: (flags, pointer kinds: x, w, y) with "io" = input dtype, "c" = compute dtype
        "wdp": (dict(Y_POS=True), ("io", "io", "c")),
        "down+rational": (dict(HAS_BIAS=True, HAS_SCALE=True, EPILOGUE=1), ("c", "io", "c")),
        "up": (dict(HAS_BIAS=True), ("c", "io", "io")),
        "up_bwd+rational": (dict(EPILOGUE=2), ("io", "io", "c")),
        "gz": (dict(), ("c", "io", "c")),
        "gwp": (dict(X_POS=True), ("c", "io", "c")),
        "gwd_pool": (dict(W_POS=True, ACCUMULATE=True), ("io", "c", "c")),
    }
    wgrad_calls = {
        "gwu": (dict(HAS_OUTER=True, HAS_COLSUM=True), ("io", "c")),
        "gwd": (dict(HAS_OUTER=True, HAS_COLSUM=True, HAS_SCALE=True), ("c", "c")),
        "gwdp": (dict(A_POS=True, OUT_POS=True, HAS_COLSUM=True), ("c", "c")),
    }
    defaults_mm = dict(X_POS=False, Y_POS=False, W_POS=False, HAS_BIAS=False, HAS_SCALE=False,
                       ACCUMULATE=False, EPILOGUE=0)
    defaults_wg = dict(A_POS=False, OUT_POS=False, HAS_OUTER=False, HAS_COLSUM=False, HAS_SCALE=False)
    for io in ("fp32", "fp16", "bf16", "fp64"):
        cdt = "fp64" if io == "fp64" else "fp32"
        kind = {"io": io, "c": cdt}
        for call, (flags, (xk, wk, yk)) in matmul_calls.items():
            versions = ("B", "A") if flags.get("EPILOGUE") else ("B",)
            for version in versions:
                block_m, block_k, block_n = MM_BLOCK
                consts = dict(defaults_mm, **flags, VERSION_B=version == "B", FP64=io == "fp64",
                              BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, COEF_PAD=32)
                yield dict(
                    kernel=_multi_tenant_generator_matmul_kernel, name="_multi_tenant_generator_matmul_kernel",
                    pointers=dict(x_ptr=kind[xk], w_ptr=kind[wk], bias_ptr=io, scale_ptr=cdt, y_ptr=kind[yk],
                                  aux_ptr=cdt, y2_ptr=cdt, num_ptr=cdt, den_ptr=cdt, part_ptr=cdt,
                                  list_ptr="i32", seg_ptr="i32", segw_ptr="i32"),
                    constexprs=consts, num_warps=NUM_WARPS,
                    unaligned=("ROWS", "K", "N", "deg_m", "deg_n", "sx_q", "sx_r", "sx_k", "sw_t", "sw_k",
                               "sw_n", "sy_q", "sy_r", "sy_n", "sb_t"),
                    config=dict(dtype=io, call=call, version=version, num_warps=NUM_WARPS,
                                BLOCK=list(MM_BLOCK)),
                )
        for call, (flags, (ak, bk)) in wgrad_calls.items():
            block_f, block_m, block_n = WG_BLOCK if flags.get("HAS_OUTER") else (*COLSUM_BLOCK, 1)
            consts = dict(defaults_wg, **flags, FP64=io == "fp64", BLOCK_F=block_f, BLOCK_M=block_m,
                          BLOCK_N=block_n)
            yield dict(
                kernel=_multi_tenant_generator_wgrad_kernel, name="_multi_tenant_generator_wgrad_kernel",
                pointers=dict(a_ptr=kind[ak], b_ptr=kind[bk], scale_ptr=cdt, y_ptr=cdt, yb_ptr=cdt,
                              list_ptr="i32", seg_ptr="i32", segw_ptr="i32"),
                constexprs=consts, num_warps=NUM_WARPS,
                unaligned=("ROWS", "M", "N", "sa_q", "sa_r", "sa_m", "sb_q", "sb_r", "sb_n", "sy_t", "sy_m",
                           "sy_n", "syb_t"),
                config=dict(dtype=io, call=call, num_warps=NUM_WARPS, BLOCK=[block_f, block_m, block_n]),
            )


__all__ = ["TenantGroups", "MultiTenantGeneratorFunction", "MAX_TOKENS", "block_sizes"]
