"""Batched per-tenant prompt generators: one set of launches serves (and trains) every tenant of a
batch (docs/design.md section 1, "Multi-tenant"; the algebra of section 3).

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
all of tenant `seg_tenant[k]`. Three generic kernels do every product around the attention-pool
passes, as segmented GEMMs on `tl.dot` tiles (in the manner of Punica's SGMV and vLLM's LoRA
shrink/expand kernels):

* `_multi_tenant_generator_matmul_kernel`: one program per (segment, block of output columns, split)
  walks the segment's rows in tiles, `Y[row] = X[row] W_t (+ bias_t)`, reading tenant `t`'s weights in
  place (never a per-request copy). The reductions over `d` (`U`, `gG`, `gWp`) are split-K: split `s`
  covers `d` columns `[s SPLIT_CHUNK, (s+1) SPLIT_CHUNK)` and writes an fp32 partial, so one tenant
  at d = 4096 already has 32 x (r / 32) programs. The short reductions (over `r` or `L`) run whole.
* `_multi_tenant_generator_splitk_kernel`: sums the partials of each output element in split order,
  adds the bias, and applies the rational activation of each row's tenant as the fused epilogue:
  forward (`U` -> `G`) or backward (`gG` -> `gU`, with each row's coefficient partials).
* `_multi_tenant_generator_wgrad_kernel`: one program per (segment, output tile) sums the segment's
  rows in order, `Y_t = sum_rows A^T B (+ A2_t^T B2)` on `tl.dot` and/or `sum_rows s * A` (bias
  gradients); `gWd_t`'s two terms go into one accumulator, so each element is written once.

Precision: fp32 inputs multiply in IEEE fp32 (`input_precision="ieee"`: no TF32), fp16/bf16 inputs
round both operands to their dtype and run on the tensor cores with fp32 accumulation, fp64 multiplies
and reduces in registers. Each gradient element is written by exactly one program after a fixed-order
loop; split partials and coefficient partials are summed in a fixed order (the coefficients in
float64): no atomics, bitwise reproducible. The number of splits depends on `d` alone, so each
tenant's results do not depend on the other tenants of the batch.

Absent tenants cost nothing but the zero-fill of their gradient slices (`TenantGroups.absent`): no
kernel reads their weights, no fp32 copy of any stacked gradient is made or cast; weight gradients are
written in their weights' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .attention_pool import MAX_TOKENS, block_sizes, nonempty, stream_bwd, stream_fwd
from .utils import compute_dtype, rational_terms

NUM_WARPS = 4
# tl.dot wants every tile dimension >= 16: segments shorter than 16 rows (and L < 16) are padded by
# masking. 32 output columns: (1 tenant, r = 256) still gets 8 column blocks x the splits over d.
MM_BLOCK = (16, 32, 32)  # rows, reduction, output columns of the segmented products
SPLIT_CHUNK = 128  # columns of d per split of the reductions over d (d = 4096: 32 splits)
SUM_BLOCK = (16, 64)  # rows, columns of the split-sum kernel
WG_BLOCK = (16, 64, 64)  # rows, output rows, output columns of the weight gradients
# fp64 multiplies and reduces in registers (no fp64 tensor-core path): 4096 products a program.
MM_BLOCK_FP64 = (16, 16, 16)
WG_BLOCK_FP64 = (16, 16, 16)
COLSUM_BLOCK = (16, 256)  # rows, output columns, when only column sums are wanted


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mma(acc, x, w, DOT: tl.constexpr, X_WIDE: tl.constexpr, W_WIDE: tl.constexpr):
    """`acc + x @ w`. DOT 0: fp32 in IEEE fp32 (the fp32 tolerance rules out TF32); 1, 2: on the
    tensor cores in fp16, bf16 with fp32 accumulation, an operand held in fp32 (`*_WIDE`: U, G, gU,
    gWdp, Z) split as hi + lo in that dtype, one more product each, so it is not rounded to 11 (8)
    bits; 3: fp64, multiply and reduce; 4: DOT 2 for the interpreter, whose tl.dot mishandles bf16
    operands: the same bf16-rounded operands multiplied in fp32 (their products are exact there)."""
    if DOT == 1 or DOT == 2:
        mdt = tl.float16 if DOT == 1 else tl.bfloat16
        xh = x.to(mdt)
        wh = w.to(mdt)
        acc = tl.dot(xh, wh, acc)
        if X_WIDE:
            acc = tl.dot((x - xh.to(tl.float32)).to(mdt), wh, acc)
        if W_WIDE:
            acc = tl.dot(xh, (w - wh.to(tl.float32)).to(mdt), acc)
    elif DOT == 4:
        xh = x.to(tl.bfloat16).to(tl.float32)
        wh = w.to(tl.bfloat16).to(tl.float32)
        acc = tl.dot(xh, wh, acc, input_precision="ieee")
        if X_WIDE:
            acc = tl.dot((x - xh).to(tl.bfloat16).to(tl.float32), wh, acc, input_precision="ieee")
        if W_WIDE:
            acc = tl.dot(xh, (w - wh).to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee")
    elif DOT == 3:
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    else:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    return acc


@triton.jit
def _multi_tenant_generator_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, list_ptr, seg_ptr, segw_ptr,
    ROWS, K, N, CHUNK,
    sx_q, sx_r, sx_k, sw_t, sw_k, sw_n, sy_q, sy_r, sy_n, sy_s, sb_t,
    X_POS: tl.constexpr, Y_POS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr, X_WIDE: tl.constexpr,
    W_WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Segment k's rows are (entry i of list[seg[k]:seg[k+1]], row 0..ROWS-1); entry i names request
    # q = list[i]. X, Y are addressed by q, or by the list position i where *_POS says so.
    #   Y[q, row, n] = sum_k X[q, row, k] W[t, k, n] + scale[q] bias[t, n]
    # over k in split s = program_id(2): [s CHUNK, (s+1) CHUNK). SPLIT: Y is the fp32 (fp64) partial
    # buffer (splits, flat row, N), flat row = i ROWS + row, summed by the split-sum kernel.
    seg = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    start = tl.load(seg_ptr + seg)
    total = (tl.load(seg_ptr + seg + 1) - start) * ROWS
    t = tl.load(segw_ptr + seg).to(tl.int64)
    nn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N
    k_lo = ps * CHUNK
    k_hi = tl.minimum(K, k_lo + CHUNK)
    cdt = tl.float64 if DOT == 3 else tl.float32
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
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=cdt)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < k_hi
            x = tl.load(x_ptr + xq[:, None] * sx_q + row[:, None] * sx_r + kk[None, :] * sx_k,
                        mask=fmask[:, None] & kmask[None, :], other=0.0).to(cdt)
            w = tl.load(w_ptr + t * sw_t + kk[:, None] * sw_k + nn[None, :] * sw_n,
                        mask=kmask[:, None] & nmask[None, :], other=0.0).to(cdt)
            acc = _mma(acc, x, w, DOT, X_WIDE, W_WIDE)
        ymask = fmask[:, None] & nmask[None, :]
        if SPLIT:
            flat = (pos * ROWS).to(tl.int64) + row
            tl.store(y_ptr + ps * sy_s + flat[:, None] * N + nn[None, :], acc, mask=ymask)
        else:
            if HAS_BIAS:
                bias = tl.load(bias_ptr + t * sb_t + nn, mask=nmask, other=0.0).to(cdt)
                if HAS_SCALE:
                    acc += tl.load(scale_ptr + q, mask=fmask, other=0.0).to(cdt)[:, None] * bias[None, :]
                else:
                    acc += bias[None, :]
            if Y_POS:
                yq = pos.to(tl.int64)
            else:
                yq = q
            tl.store(y_ptr + yq[:, None] * sy_q + row[:, None] * sy_r + nn[None, :] * sy_n,
                     acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _multi_tenant_generator_splitk_kernel(
    part_ptr, bias_ptr, scale_ptr, y_ptr, aux_ptr, y2_ptr, num_ptr, den_ptr, cpart_ptr,
    list_ptr, rsel_ptr, segw_ptr,
    ROWS, NROWS, N, SPLITS, deg_m, deg_n,
    sy_q, sy_r, sy_n, sb_t,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, EPILOGUE: tl.constexpr, VERSION_B: tl.constexpr,
    FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COEF_PAD: tl.constexpr,
):
    # Flat row f = i ROWS + row of entry i (request q = list[i], segment rsel[i], tenant
    # t = segw[rsel[i]]): Y[q, row, n] = sum over splits s, in order, of PART[s, f, n] (+ scale[q]
    # bias[t, n]). EPILOGUE 1: Y holds U, Y2 gets R_t(U). EPILOGUE 2: the sum is gG; Y gets
    # gU = R_t'(U) gG with U read from AUX, and CPART[f, program column, j] the row's coefficient
    # partials (summed per tenant, in segment order, by the caller).
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    cdt = tl.float64 if FP64 else tl.float32
    f = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    fmask = f < NROWS
    pos = f // ROWS
    row = (f % ROWS).to(tl.int64)
    q = tl.load(list_ptr + pos, mask=fmask, other=0).to(tl.int64)
    t = tl.load(segw_ptr + tl.load(rsel_ptr + pos, mask=fmask, other=0)).to(tl.int64)
    nn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N
    mask = fmask[:, None] & nmask[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=cdt)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + (s * NROWS + f.to(tl.int64))[:, None] * N + nn[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + t[:, None] * sb_t + nn[None, :], mask=mask, other=0.0).to(cdt)
        if HAS_SCALE:
            bias = bias * tl.load(scale_ptr + q, mask=fmask, other=0.0).to(cdt)[:, None]
        acc += bias
    yoff = q[:, None] * sy_q + row[:, None] * sy_r + nn[None, :] * sy_n
    # Each row's coefficients: rows of one tile may belong to different tenants.
    a = (num_ptr + t * (deg_m + 1))[:, None]
    b = (den_ptr + t * deg_n)[:, None]
    if EPILOGUE == 0:
        tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=mask)
        p, _, qv, _, _, _ = rational_terms(acc, a, b, deg_m, deg_n, VERSION_B, False)
        tl.store(y2_ptr + yoff, (p / qv).to(y2_ptr.dtype.element_ty), mask=mask)
    else:
        # Masked lanes have gG = 0 (the partials were loaded as 0), so they add nothing below.
        u = tl.load(aux_ptr + yoff, mask=mask, other=0.0).to(cdt)
        p, dp, qv, dq, sgn, base = rational_terms(u, a, b, deg_m, deg_n, VERSION_B, False)
        rq = 1.0 / qv
        r = p * rq
        tl.store(y_ptr + yoff, (acc * rq * (dp - r * dq)).to(y_ptr.dtype.element_ty), mask=mask)
        lanes = tl.arange(0, COEF_PAD)
        coef = tl.zeros([BLOCK_M, COEF_PAD], dtype=cdt)
        wg = acc * rq
        up = tl.zeros_like(u) + 1.0
        for j in range(deg_m + 1):
            coef += tl.where(lanes[None, :] == j, tl.sum(wg * up, axis=1)[:, None], 0.0)
            up = up * u
        if VERSION_B:
            wb = -(wg * r) * sgn
        else:
            wb = -(wg * r)
        bp = base
        for j in range(deg_n):
            part = tl.sum(wb * bp, axis=1)[:, None]
            if not VERSION_B:
                part = part * tl.where(tl.load(b + j) < 0, -1.0, 1.0).to(cdt)
            coef += tl.where(lanes[None, :] == deg_m + 1 + j, part, 0.0)
            bp = bp * base
        ncoef = deg_m + 1 + deg_n
        out = cpart_ptr + (f.to(tl.int64) * tl.num_programs(1) + pn) * ncoef
        tl.store(out[:, None] + lanes[None, :], coef, mask=fmask[:, None] & (lanes[None, :] < ncoef))


@triton.jit
def _multi_tenant_generator_wgrad_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, scale_ptr, y_ptr, yb_ptr, list_ptr, seg_ptr, segw_ptr,
    ROWS, M, N, ROWS2,
    sa_q, sa_r, sa_m, sb_q, sb_r, sb_n, sa2_t, sa2_r, sa2_m, sb2_k, sb2_r, sb2_n, sy_t, sy_m, sy_n, syb_t,
    A_POS: tl.constexpr, OUT_POS: tl.constexpr, HAS_OUTER: tl.constexpr, HAS_COLSUM: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SECOND: tl.constexpr, DOT: tl.constexpr, A_WIDE: tl.constexpr,
    B_WIDE: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Y[t, m, n] = sum over segment rows of A[., row, m] B[q, row, n]
    #              (+ sum over l < ROWS2 of A2[t, l, m] B2[k, l, n] with HAS_SECOND);
    # YB[t, m] = sum scale[q] A[., row, m] (t = the segment's tenant, or the segment index k with
    # OUT_POS). Rows summed in segment order; each output element written once, by one program.
    seg = tl.program_id(0)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    cdt = tl.float64 if DOT == 3 else tl.float32
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
            acc = _mma(acc, tl.trans(av), bv, DOT, A_WIDE, B_WIDE)
        if HAS_COLSUM:
            if HAS_SCALE:
                av = av * tl.load(scale_ptr + q, mask=fmask, other=0.0).to(cdt)[:, None]
            col += tl.sum(av, axis=0)
    if HAS_SECOND:
        segk = seg.to(tl.int64)
        for l0 in range(0, ROWS2, BLOCK_F):
            ll = l0 + tl.arange(0, BLOCK_F)
            lmask = ll < ROWS2
            a2 = tl.load(a2_ptr + t * sa2_t + ll[:, None] * sa2_r + mm[None, :] * sa2_m,
                         mask=lmask[:, None] & mmask[None, :], other=0.0).to(cdt)
            b2 = tl.load(b2_ptr + segk * sb2_k + ll[:, None] * sb2_r + nn[None, :] * sb2_n,
                         mask=lmask[:, None] & nmask[None, :], other=0.0).to(cdt)
            acc = _mma(acc, tl.trans(a2), b2, DOT, False, True)  # Wp_t (io), gWdp_t (fp32)
    if HAS_OUTER:
        tl.store(y_ptr + t * sy_t + mm[:, None] * sy_m + nn[None, :] * sy_n,
                 acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    if HAS_COLSUM:
        if pn == 0:
            tl.store(yb_ptr + t * syb_t + mm, col.to(yb_ptr.dtype.element_ty), mask=mmask)


# --------------------------------------------------------------------------- launchers


def dot_mode(dtype: torch.dtype) -> int:
    """`DOT` of the kernels for inputs of `dtype`: 0 fp32 (IEEE), 1 fp16, 2 bf16 (tensor cores), 3 fp64;
    bf16 in the Triton interpreter: 4 (see `_mma`)."""
    if dtype == torch.bfloat16 and triton_interpreted():
        return 4
    return {torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}.get(dtype, 0)


def split_count(K: int) -> int:
    """Splits of a reduction of length `K` over `d`: fixed chunks of SPLIT_CHUNK, so the number depends
    on `d` alone, never on the batch: each tenant's sums run in the same order whatever the other
    tenants of the batch (a mixed batch gives each tenant bitwise its own sub-batch's results)."""
    return max(1, triton.cdiv(K, SPLIT_CHUNK))


def _mm_block(dot):
    return MM_BLOCK_FP64 if dot == 3 else MM_BLOCK


def _wide(dot, t) -> bool:
    """Whether operand `t` is held in fp32 while the tensor cores run fp16/bf16 (then it is split)."""
    return dot in (1, 2, 4) and t is not None and t.dtype == torch.float32


def _matmul(x, x_strides, w, w_strides, y, y_strides, lists, rows, K, N, *, dot, bias=None, bias_stride=0,
            scale=None, x_pos=False, y_pos=False):
    """`Y = X W_t (+ bias)` per segment, the reduction (over `r` or `L`, short) in one program:
    launches `_multi_tenant_generator_matmul_kernel` on grid (segments, column blocks, 1)."""
    order, seg, segw = lists
    block_m, block_k, block_n = _mm_block(dot)
    grid = (seg.numel() - 1, triton.cdiv(N, block_n), 1)
    if grid[0] == 0 or grid[1] == 0:
        return
    _multi_tenant_generator_matmul_kernel[grid](
        x, w, bias if bias is not None else y, scale if scale is not None else y, y, order, seg, segw,
        rows, K, N, max(K, 1), *x_strides, *w_strides, *y_strides, 0, bias_stride,
        X_POS=x_pos, Y_POS=y_pos, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        SPLIT=False, DOT=dot, X_WIDE=_wide(dot, x), W_WIDE=_wide(dot, w), BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_N=block_n, num_warps=NUM_WARPS,
    )


def _matmul_split(x, x_strides, w, w_strides, y, y_strides, lists, rsel, rows, K, N, *, dot, x_pos=False,
                  bias=None, bias_stride=0, scale=None, epilogue=0, aux=None, y2=None, coefficients=None,
                  version="B"):
    """`Y = X W_t (+ scale bias)` per segment with the reduction over `d` split (split-K): partial
    products into an fp32 (fp64) buffer, then `_multi_tenant_generator_splitk_kernel` sums the
    splits in order and applies the bias and the epilogue (rational forward, or backward with
    per-row coefficient partials, returned `(rows, column blocks, m+1+n)`). `rsel` maps list
    positions to segments."""
    order, seg, segw = lists
    n_pos = order.numel()
    block_m, block_k, block_n = _mm_block(dot)
    splits = split_count(K)
    cdt = torch.float64 if dot == 3 else torch.float32
    grid = (seg.numel() - 1, triton.cdiv(N, block_n), splits)
    sum_m, sum_n = SUM_BLOCK
    n_cols = triton.cdiv(N, sum_n)
    num, den = coefficients if coefficients is not None else (y, y)
    deg_m, deg_n = (num.shape[1] - 1, den.shape[1]) if coefficients is not None else (0, 0)
    cpart = torch.empty((n_pos * rows, n_cols, deg_m + 1 + deg_n), dtype=cdt, device=y.device) \
        if epilogue == 2 else None
    if grid[0] == 0 or n_pos == 0 or N == 0:
        return cpart
    part = torch.empty((splits, n_pos * rows, N), dtype=cdt, device=y.device)
    _multi_tenant_generator_matmul_kernel[grid](
        x, w, part, part, part, order, seg, segw,
        rows, K, N, SPLIT_CHUNK, *x_strides, *w_strides, 0, 0, 0, part.stride(0), 0,
        X_POS=x_pos, Y_POS=False, HAS_BIAS=False, HAS_SCALE=False, SPLIT=True, DOT=dot,
        X_WIDE=_wide(dot, x), W_WIDE=_wide(dot, w), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=NUM_WARPS,
    )
    _multi_tenant_generator_splitk_kernel[(triton.cdiv(n_pos * rows, sum_m), n_cols)](
        part, bias if bias is not None else y, scale if scale is not None else y, y,
        aux if aux is not None else y, y2 if y2 is not None else y, num, den,
        cpart if cpart is not None else y, order, rsel, segw,
        rows, n_pos * rows, N, splits, deg_m, deg_n, *y_strides, bias_stride,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, EPILOGUE=epilogue, VERSION_B=version == "B",
        FP64=dot == 3, BLOCK_M=sum_m, BLOCK_N=sum_n, COEF_PAD=triton.next_power_of_2(max(deg_m + 1 + deg_n, 2)),
        num_warps=NUM_WARPS,
    )
    return cpart


def _wgrad(a, a_strides, b, b_strides, lists, rows, M, N, *, dot, y=None, y_strides=(0, 0, 0), yb=None,
           yb_stride=0, scale=None, a_pos=False, out_pos=False, second=None):
    """Launch `_multi_tenant_generator_wgrad_kernel`: `y[t] = sum A^T B (+ A2_t^T B2_k)` and/or
    `yb[t] = sum s A`; `second = (a2, a2_strides, b2, b2_strides, rows2)`."""
    order, seg, segw = lists
    k_segments = seg.numel() - 1
    if k_segments == 0 or M == 0:
        return
    if y is not None:
        block_f, block_m, block_n = WG_BLOCK_FP64 if dot == 3 else WG_BLOCK
        grid = (k_segments, triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    else:
        (block_f, block_m), block_n = COLSUM_BLOCK, 1
        grid = (k_segments, triton.cdiv(M, block_m), 1)
    dummy = yb if y is None else y
    a2, a2_strides, b2, b2_strides, rows2 = second if second is not None else (dummy, (0, 0, 0), dummy, (0, 0, 0), 0)
    _multi_tenant_generator_wgrad_kernel[grid](
        a, b if b is not None else a, a2, b2, scale if scale is not None else dummy, dummy,
        yb if yb is not None else dummy, order, seg, segw,
        rows, M, N, rows2, *a_strides, *b_strides, *a2_strides, *b2_strides, *y_strides, yb_stride,
        A_POS=a_pos, OUT_POS=out_pos, HAS_OUTER=y is not None, HAS_COLSUM=yb is not None,
        HAS_SCALE=scale is not None, HAS_SECOND=second is not None, DOT=dot, A_WIDE=_wide(dot, a),
        B_WIDE=_wide(dot, b), BLOCK_F=block_f, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )


def _stacked_grad(shape, dtype, device, absent):
    """A stacked (T, ...) gradient whose absent tenants' slices are exactly 0: only those slices are
    filled (the kernels write every present tenant's slice), or all of it when `absent` is None."""
    if absent is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.index_fill_(0, absent, 0)


def _pool_weights(wd, bd, wp, seg_start_unit, seg_tenant, cdt, dot):
    """`Wdp_t (K, d, L)` and `c_t (K, L)` of the K present tenants, in the compute dtype."""
    T, r, d = wd.shape
    L = wp.shape[1]
    K = seg_tenant.numel()
    wdp = torch.empty((K, d, L), dtype=cdt, device=wd.device)
    units = (seg_tenant, seg_start_unit, seg_tenant)
    # Wdp_t^T (L, d) = Wp_t (L, r) Wd_t (r, d), stored transposed as (d, L) for the score kernel.
    _matmul(wp, (L * r, r, 1), wd, (r * d, d, 1), wdp, (d * L, 1, L), units, L, r, d, dot=dot, y_pos=True)
    c = torch.einsum("klr,kr->kl", wp[seg_tenant.long()].to(cdt), bd[seg_tenant.long()].to(cdt))
    return wdp, c


def multi_tenant_generator_fwd(h, mask, cu_seqlens, groups, weights, version, max_seqlen):
    """Triton forward, the `iapt::multi_tenant_generator_fwd` schema (iapt_kernels/schemas.py):
    `groups` = TenantGroups.tensors(), `weights` = (Wd, bd, Wp, num, den, Wu, bu). Returns
    `(P (B, L, d) in h.dtype, A, Z, U, G, n, Wdp)`, the rest in the compute dtype and saved for the
    backward. Rows of requests without an adapter are 0 in `P`."""
    order, seg_start, seg_tenant, wsel, unit = groups[:5]
    wd, bd, wp, num, den, wu, bu = weights
    cdt = compute_dtype(h)
    dot = dot_mode(h.dtype)
    h = h.contiguous()
    T, r, d = wd.shape
    L = wp.shape[1]
    B = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    wdp, c = _pool_weights(wd, bd, wp, unit, seg_tenant, cdt, dot)
    a, z = stream_fwd(h, mask, cu_seqlens, max_seqlen, wdp, c, requests=(order, wsel))
    n = nonempty(mask, cu_seqlens, cdt, B, h.device)
    u = torch.empty((B, L, r), dtype=cdt, device=h.device)
    g = torch.empty_like(u)
    groups = (order, seg_start, seg_tenant)
    # U = Z Wd_t^T + n bd_t (split over d) and G = R_t(U) in the split-sum's epilogue.
    _matmul_split(z, (L * d, d, 1), wd, (r * d, 1, d), u, (L * r, r, 1), groups, wsel, L, d, r, dot=dot,
                  bias=bd, bias_stride=r, scale=n, epilogue=1, y2=g, coefficients=(num, den), version=version)
    p = (torch.empty if order.numel() == B else torch.zeros)((B, L, d), dtype=h.dtype, device=h.device)
    _matmul(g, (L * r, r, 1), wu, (d * r, 1, r), p, (L * d, d, 1), groups, L, r, d, dot=dot, bias=bu,
            bias_stride=d)
    return p, a, z, u, g, n, wdp


def multi_tenant_generator_bwd(gp, h, mask, cu_seqlens, groups, weights, saved, version, max_seqlen):
    """Triton backward, the `iapt::multi_tenant_generator_bwd` schema: `weights` = (Wd, Wp, num, den,
    Wu), `saved` = the forward's (A, Z, U, G, n, Wdp). Returns `(gH, gWd, gbd, gWp, gnum, gden, gWu,
    gbu)`, the weight gradients in their weights' dtypes (`gnum`, `gden` in the compute dtype), each
    present tenant's slice written once; absent tenants' slices are exactly 0 (filled, never
    computed; the sixth entry of `groups`, TenantGroups.absent, lists them when it is known)."""
    order, seg_start, seg_tenant, wsel, unit = groups[:5]
    absent = groups[5] if len(groups) > 5 else None
    wd, wp, num, den, wu = weights
    a, z, u, g, n, wdp = saved
    cdt = compute_dtype(h)
    dot = dot_mode(h.dtype)
    h = h.contiguous()
    gp = gp.contiguous()
    T, r, d = wd.shape
    L = wp.shape[1]
    B = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    K = seg_tenant.numel()
    kw = dict(dtype=cdt, device=h.device)
    groups = (order, seg_start, seg_tenant)
    units = (seg_tenant, unit, seg_tenant)
    rsel_units = unit[:-1]

    # gU = R_t'(U) (gP Wu_t) (split over d), with each row's coefficient partials.
    gu = torch.empty((B, L, r), **kw)
    cpart = _matmul_split(gp, (L * d, d, 1), wu, (d * r, r, 1), gu, (L * r, r, 1), groups, wsel, L, d, r,
                          dot=dot, epilogue=2, aux=u, coefficients=(num, den), version=version)
    # Per request (fp64), then per tenant in segment order: no atomics, a fixed order.
    k_coef = num.shape[1] + den.shape[1]
    per_request = cpart.view(order.numel(), L * cpart.shape[1], k_coef).sum(dim=1, dtype=torch.float64)
    sums = torch.empty((K, k_coef), dtype=torch.float64, device=h.device)
    _wgrad(per_request, (k_coef, 0, 1), None, (0, 0, 0), groups, 1, k_coef, 1, dot=3, yb=sums, yb_stride=k_coef,
           a_pos=True, out_pos=True)
    gnum = torch.zeros((T, num.shape[1]), **kw)
    gden = torch.zeros((T, den.shape[1]), **kw)
    gnum[seg_tenant.long()] = sums[:, : num.shape[1]].to(cdt)
    gden[seg_tenant.long()] = sums[:, num.shape[1]:].to(cdt)

    gwu = _stacked_grad((T, d, r), wu.dtype, h.device, absent)
    gbu = _stacked_grad((T, d), wu.dtype, h.device, absent)
    _wgrad(gp, (L * d, d, 1), g, (L * r, r, 1), groups, L, d, r, dot=dot, y=gwu, y_strides=(d * r, r, 1),
           yb=gbu, yb_stride=d)

    gz = torch.empty((B, L, d), **kw)
    _matmul(gu, (L * r, r, 1), wd, (r * d, d, 1), gz, (L * d, d, 1), groups, L, r, d, dot=dot)
    gh, gw_partial = stream_bwd(h, mask, cu_seqlens, max_seqlen, a, gz, wdp, requests=(order, wsel), z=z)
    # gWdp_t^T (K, L, d): each tenant's per-request partials, summed in segment order.
    gwdp_t = torch.empty((K, L, d), **kw)
    _wgrad(gw_partial, (L * d, 0, 1), None, (0, 0, 0), groups, 1, L * d, 1, dot=dot, yb=gwdp_t,
           yb_stride=L * d, a_pos=True, out_pos=True)

    # gWd_t = sum gU^T Z + Wp_t^T gWdp_t^T in one program per tile, gbd_t = sum n gU.
    gwd = _stacked_grad((T, r, d), wd.dtype, h.device, absent)
    gbd = _stacked_grad((T, r), wd.dtype, h.device, absent)
    _wgrad(gu, (L * r, r, 1), z, (L * d, d, 1), groups, L, r, d, dot=dot, y=gwd, y_strides=(r * d, d, 1),
           yb=gbd, yb_stride=r, scale=n, second=(wp, (L * r, r, 1), gwdp_t, (L * d, d, 1), L))
    # gWp_t = gWdp_t^T Wd_t^T (split over d).
    gwp = _stacked_grad((T, L, r), wp.dtype, h.device, absent)
    _matmul_split(gwdp_t, (L * d, d, 1), wd, (r * d, 1, d), gwp, (L * r, r, 1), units, rsel_units, L, d, r,
                  dot=dot, x_pos=True)
    return gh, gwd, gbd, gwp, gnum, gden, gwu, gbu


# --------------------------------------------------------------------------- launch configurations


def product_grids(num_present: int, B: int, d: int, r: int, L: int = 4) -> dict[str, tuple[int, int, int]]:
    """The grid each product launches (as the launchers above size it) for `num_present` tenants
    sharing `B` requests evenly: for the static report. The reductions over `d` are `down`, `up_bwd`
    and `gwp` (their split-sum kernels are listed beside them)."""
    block_m, _, block_n = MM_BLOCK
    splits = split_count(d)
    sum_m, sum_n = SUM_BLOCK
    _, wg_m, wg_n = WG_BLOCK
    K, cdiv = num_present, triton.cdiv
    return {
        "wdp (over r)": (K, cdiv(d, block_n), 1),
        "down (over d, split)": (K, cdiv(r, block_n), splits),
        "down split-sum + rational": (cdiv(B * L, sum_m), cdiv(r, sum_n), 1),
        "up (over r)": (K, cdiv(d, block_n), 1),
        "up_bwd (over d, split)": (K, cdiv(r, block_n), splits),
        "up_bwd split-sum + rational'": (cdiv(B * L, sum_m), cdiv(r, sum_n), 1),
        "gz (over r)": (K, cdiv(d, block_n), 1),
        "gwp (over d, split)": (K, cdiv(r, block_n), splits),
        "gwp split-sum": (cdiv(K * L, sum_m), cdiv(r, sum_n), 1),
        "gwu (over rows)": (K, cdiv(d, wg_m), cdiv(r, wg_n)),
        "gwd (over rows + L)": (K, cdiv(r, wg_m), cdiv(d, wg_n)),
    }


def launch_configs():
    """Every (kernel, specialisation) the launchers above use, for the static GPU report."""
    matmul_calls = {
        # name: (flags, pointer kinds: x, w, y) with "io" = input dtype, "c" = compute dtype, "p" = partials
        "wdp": (dict(Y_POS=True), ("io", "io", "c")),
        "down": (dict(SPLIT=True), ("c", "io", "p")),
        "up": (dict(HAS_BIAS=True), ("c", "io", "io")),
        "up_bwd": (dict(SPLIT=True), ("io", "io", "p")),
        "gz": (dict(), ("c", "io", "c")),
        "gwp": (dict(SPLIT=True, X_POS=True), ("c", "io", "p")),
    }
    splitk_calls = {
        # name: (flags, y kind)
        "down+rational": (dict(HAS_BIAS=True, HAS_SCALE=True, EPILOGUE=1), "c"),
        "up_bwd+rational": (dict(EPILOGUE=2), "c"),
        "gwp": (dict(), "io"),
    }
    wgrad_calls = {
        "gwu": (dict(HAS_OUTER=True, HAS_COLSUM=True), ("io", "c", "io")),
        "gwd": (dict(HAS_OUTER=True, HAS_COLSUM=True, HAS_SCALE=True, HAS_SECOND=True), ("c", "c", "io")),
        "gwdp": (dict(A_POS=True, OUT_POS=True, HAS_COLSUM=True), ("c", "c", "c")),
        "coef": (dict(A_POS=True, OUT_POS=True, HAS_COLSUM=True), ("fp64", "fp64", "fp64")),
    }
    defaults_mm = dict(X_POS=False, Y_POS=False, HAS_BIAS=False, HAS_SCALE=False, SPLIT=False)
    defaults_sk = dict(HAS_BIAS=False, HAS_SCALE=False, EPILOGUE=0)
    defaults_wg = dict(A_POS=False, OUT_POS=False, HAS_OUTER=False, HAS_COLSUM=False, HAS_SCALE=False,
                       HAS_SECOND=False)
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    for dtype, io in names.items():
        dot = dot_mode(dtype)
        cdt = "fp64" if io == "fp64" else "fp32"
        kind = {"io": io, "c": cdt, "p": cdt, "fp64": "fp64"}
        block_m, block_k, block_n = _mm_block(dot)
        for call, (flags, (xk, wk, yk)) in matmul_calls.items():
            consts = dict(defaults_mm, **flags, DOT=dot, X_WIDE=dot in (1, 2) and kind[xk] == "fp32",
                          W_WIDE=dot in (1, 2) and kind[wk] == "fp32", BLOCK_M=block_m, BLOCK_K=block_k,
                          BLOCK_N=block_n)
            yield dict(
                kernel=_multi_tenant_generator_matmul_kernel, name="_multi_tenant_generator_matmul_kernel",
                pointers=dict(x_ptr=kind[xk], w_ptr=kind[wk], bias_ptr=io, scale_ptr=cdt, y_ptr=kind[yk],
                              list_ptr="i32", seg_ptr="i32", segw_ptr="i32"),
                constexprs=consts, num_warps=NUM_WARPS,
                unaligned=("ROWS", "K", "N", "sx_q", "sx_r", "sx_k", "sw_t", "sw_k", "sw_n", "sy_q", "sy_r",
                           "sy_n", "sy_s", "sb_t"),
                config=dict(dtype=io, call=call, num_warps=NUM_WARPS, BLOCK=[block_m, block_k, block_n]),
            )
        for call, (flags, yk) in splitk_calls.items():
            versions = ("B", "A") if flags.get("EPILOGUE") else ("B",)
            for version in versions:
                sum_m, sum_n = SUM_BLOCK
                consts = dict(defaults_sk, **flags, VERSION_B=version == "B", FP64=io == "fp64", BLOCK_M=sum_m,
                              BLOCK_N=sum_n, COEF_PAD=32)
                yield dict(
                    kernel=_multi_tenant_generator_splitk_kernel, name="_multi_tenant_generator_splitk_kernel",
                    pointers=dict(part_ptr=cdt, bias_ptr=io, scale_ptr=cdt, y_ptr=kind[yk], aux_ptr=cdt,
                                  y2_ptr=cdt, num_ptr=cdt, den_ptr=cdt, cpart_ptr=cdt, list_ptr="i32",
                                  rsel_ptr="i32", segw_ptr="i32"),
                    constexprs=consts, num_warps=NUM_WARPS,
                    unaligned=("ROWS", "NROWS", "N", "SPLITS", "deg_m", "deg_n", "sy_q", "sy_r", "sy_n", "sb_t"),
                    config=dict(dtype=io, call=call, version=version, num_warps=NUM_WARPS, BLOCK=list(SUM_BLOCK)),
                )
        for call, (flags, (ak, bk, yk)) in wgrad_calls.items():
            if call == "coef" and io != "fp32":
                continue  # one config: the coefficient sums run in fp64 whatever the inputs
            wdot = 3 if call == "coef" else dot
            if flags.get("HAS_OUTER"):
                block_f, wg_m, wg_n = WG_BLOCK_FP64 if wdot == 3 else WG_BLOCK
            else:
                (block_f, wg_m), wg_n = COLSUM_BLOCK, 1
            consts = dict(defaults_wg, **flags, DOT=wdot, A_WIDE=wdot in (1, 2) and kind[ak] == "fp32",
                          B_WIDE=wdot in (1, 2) and flags.get("HAS_OUTER", False) and kind[bk] == "fp32",
                          BLOCK_F=block_f, BLOCK_M=wg_m, BLOCK_N=wg_n)
            yield dict(
                kernel=_multi_tenant_generator_wgrad_kernel, name="_multi_tenant_generator_wgrad_kernel",
                pointers=dict(a_ptr=kind[ak], b_ptr=kind[bk], a2_ptr=io, b2_ptr=cdt, scale_ptr=cdt,
                              y_ptr=kind[yk], yb_ptr=kind[yk], list_ptr="i32", seg_ptr="i32", segw_ptr="i32"),
                constexprs=consts, num_warps=NUM_WARPS,
                unaligned=("ROWS", "M", "N", "ROWS2", "sa_q", "sa_r", "sa_m", "sb_q", "sb_r", "sb_n", "sa2_t",
                           "sa2_r", "sa2_m", "sb2_k", "sb2_r", "sb2_n", "sy_t", "sy_m", "sy_n", "syb_t"),
                config=dict(dtype=io, call=call, num_warps=NUM_WARPS, BLOCK=[block_f, wg_m, wg_n]),
            )


__all__ = ["MAX_TOKENS", "block_sizes", "multi_tenant_generator_fwd", "multi_tenant_generator_bwd"]
