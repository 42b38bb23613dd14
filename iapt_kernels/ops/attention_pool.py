"""Self-attention pooling with projections, fused by reassociation (DESIGN.md sections 1 and 3).

    U = A^T (H Wd^T + bd),   A = softmax over S of (H Wd^T + bd) Wp^T, masked

is computed without ever forming `H Wd^T` (B, S, r):

    Wdp = Wd^T Wp^T (d, L),   c = Wp bd (L)
    E   = H Wdp + c                          (B, S, L)   scores, -inf at masked positions
    A   = softmax_S(E)                       (B, S, L)   0 at masked positions, 0 for empty rows
    Z   = A^T H                              (B, L, d)
    U   = Z Wd^T + n bd                      (B, L, r)   n_b = 1 if row b has any token, else 0

Backward, for an upstream gradient gU:

    gZ   = gU Wd,   gWd = sum_b gU_b^T Z_b + (gWdp Wp)^T,   gbd = sum_b n_b sum_l gU_bl
    gA   = H gZ^T                             (B, S, L)
    gE   = A (gA - delta),   delta_l = sum_s A_sl gA_sl
    gH   = A gZ + gE Wdp^T                    exactly 0 at masked positions
    gWdp = sum_b H_b^T gE_b,   gWp = (Wd gWdp)^T

(`gc = sum gE = 0`: a constant added to every score leaves a softmax unchanged.)

Four Triton kernels stream `H`: `_attention_pool_scores_kernel` (E) and `_attention_pool_fwd_kernel`
(softmax and Z) forward, `_attention_pool_bwd_scores_kernel` (gA) and `_attention_pool_bwd_kernel`
(gH and per-batch gWdp partials) backward. The score kernels run one program per (sequence, block of
tokens) and reduce over `d`; the others run one program per (sequence, block of `d`) and walk the
tokens in order, so every reduction has a fixed order and no atomics. The `L`-wide products are
broadcast-multiply-reduce on CUDA cores, exact fp32 with no TF32 rounding: with `L = 4` they are far
from the compute roof, the kernels are bound by reading `H`. The `L x d x r` matrix products around
them are plain torch matmuls. Masked positions are never loaded, so NaN or Inf there cannot leak.
Both layouts run the same kernels: padded `(B, S, d)` with a bool mask, or packed `(N, d)` with
`cu_seqlens`.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64  # largest L the kernels are compiled for (L is padded to a power of two)
NUM_WARPS = 4


def block_sizes(L: int) -> tuple[int, int, int]:
    """`(L_PAD, BLOCK_S, BLOCK_D)`: the 3-D products hold BLOCK_S x L_PAD x BLOCK_D values per
    program, kept at 4096 (32 fp32 registers a thread at 4 warps) so nothing spills."""
    l_pad = triton.next_power_of_2(L)
    block_s = 16
    block_d = max(4, 4096 // (block_s * l_pad))
    return l_pad, block_s, min(block_d, 128)


@triton.jit
def _rows(b, s, S, cu_ptr, mask_ptr, PACKED: tl.constexpr):
    """Row index into H of token `s` of sequence `b`, and whether it is an instruction token."""
    if PACKED:
        start = tl.load(cu_ptr + b)
        valid = s < tl.load(cu_ptr + b + 1) - start
        row = start.to(tl.int64) + s
    else:
        in_range = s < S
        valid = in_range & (tl.load(mask_ptr + b.to(tl.int64) * S + s, mask=in_range, other=0) != 0)
        row = b.to(tl.int64) * S + s
    return row, valid


@triton.jit
def _request(p, order_ptr, wsel_ptr, HAS_ORDER: tl.constexpr):
    """Sequence `b` that program row `p` pools, and which `Wdp` it uses. Single-tenant: `b = p`, one
    `Wdp`. Multi-tenant: `order` lists the requests that have an adapter, grouped by tenant, and
    `wsel` the present-tenant slot of each (DESIGN.md section 1, "Multi-tenant")."""
    if HAS_ORDER:
        b = tl.load(order_ptr + p)
        w = tl.load(wsel_ptr + p).to(tl.int64)
    else:
        b = p
        w = p.to(tl.int64) * 0
    return b, w


@triton.jit
def _attention_pool_scores_kernel(
    h_ptr, mask_ptr, cu_ptr, order_ptr, wsel_ptr, w_ptr, c_ptr, e_ptr,
    S, D, L,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # E[b, s, l] = sum_d H[row, d] Wdp[d, l] + c[l];  -inf where s is not an instruction token.
    b, wi = _request(tl.program_id(0), order_ptr, wsel_ptr, HAS_ORDER)
    w_ptr += wi * D * L
    c_ptr += wi * L
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    row, valid = _rows(b, s, S, cu_ptr, mask_ptr, PACKED)
    cdt = w_ptr.dtype.element_ty
    lanes = tl.arange(0, L_PAD)
    lmask = lanes < L
    acc = tl.zeros([BLOCK_S, L_PAD], dtype=cdt)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        w = tl.load(w_ptr + dd[:, None] * L + lanes[None, :], mask=dmask[:, None] & lmask[None, :], other=0.0)
        acc += tl.sum(h.to(cdt)[:, :, None] * w[None, :, :], axis=1)
    c = tl.load(c_ptr + lanes, mask=lmask, other=0.0)
    e = tl.where(valid[:, None], acc + c[None, :], float("-inf"))
    out = (b.to(tl.int64) * S + s)[:, None] * L + lanes[None, :]
    tl.store(e_ptr + out, e, mask=(s < S)[:, None] & lmask[None, :])


@triton.jit
def _attention_pool_fwd_kernel(
    h_ptr, mask_ptr, cu_ptr, order_ptr, wsel_ptr, e_ptr, a_ptr, z_ptr,
    S, D, L,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Softmax statistics over all S (every program of sequence b recomputes them from the small E),
    # then Z[b, :, d-block] = A^T H[b, :, d-block]. The d-block-0 program also writes A.
    b, _ = _request(tl.program_id(0), order_ptr, wsel_ptr, HAS_ORDER)
    pd = tl.program_id(1)
    cdt = e_ptr.dtype.element_ty
    lanes = tl.arange(0, L_PAD)
    lmask = lanes < L
    dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    e_base = e_ptr + b.to(tl.int64) * S * L

    m = tl.full([L_PAD], float("-inf"), dtype=cdt)
    den = tl.zeros([L_PAD], dtype=cdt)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        e = tl.load(e_base + s[:, None] * L + lanes[None, :], mask=(s < S)[:, None] & lmask[None, :],
                    other=float("-inf"))
        m_new = tl.maximum(m, tl.max(e, axis=0))
        # While a row has seen only masked tokens its max is -inf; shift by 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(e - m_safe[None, :]), axis=0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(den > 0, 1.0 / den, 0.0)  # an empty instruction pools to U = 0

    z = tl.zeros([L_PAD, BLOCK_D], dtype=cdt)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        row, valid = _rows(b, s, S, cu_ptr, mask_ptr, PACKED)
        smask = (s < S)[:, None] & lmask[None, :]
        e = tl.load(e_base + s[:, None] * L + lanes[None, :], mask=smask, other=float("-inf"))
        a = tl.exp(e - m[None, :]) * inv[None, :]
        tl.store(a_ptr + (b.to(tl.int64) * S + s)[:, None] * L + lanes[None, :], a, mask=smask & (s[:, None] * 0 + pd == 0))
        h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        z += tl.sum(a[:, :, None] * h.to(cdt)[:, None, :], axis=0)
    out = (b.to(tl.int64) * L + lanes)[:, None] * D + dd[None, :]
    tl.store(z_ptr + out, z, mask=lmask[:, None] & dmask[None, :])


@triton.jit
def _attention_pool_bwd_scores_kernel(
    h_ptr, mask_ptr, cu_ptr, order_ptr, wsel_ptr, gz_ptr, ga_ptr,
    S, D, L,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # gA[b, s, l] = sum_d H[row, d] gZ[b, l, d];  0 where s is not an instruction token.
    b, _ = _request(tl.program_id(0), order_ptr, wsel_ptr, HAS_ORDER)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    row, valid = _rows(b, s, S, cu_ptr, mask_ptr, PACKED)
    cdt = gz_ptr.dtype.element_ty
    lanes = tl.arange(0, L_PAD)
    lmask = lanes < L
    gz_base = gz_ptr + b.to(tl.int64) * L * D
    acc = tl.zeros([BLOCK_S, L_PAD], dtype=cdt)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        g = tl.load(gz_base + lanes[None, :] * D + dd[:, None], mask=dmask[:, None] & lmask[None, :], other=0.0)
        acc += tl.sum(h.to(cdt)[:, :, None] * g[None, :, :], axis=1)
    out = (b.to(tl.int64) * S + s)[:, None] * L + lanes[None, :]
    tl.store(ga_ptr + out, tl.where(valid[:, None], acc, 0.0), mask=(s < S)[:, None] & lmask[None, :])


@triton.jit
def _attention_pool_bwd_kernel(
    h_ptr, mask_ptr, cu_ptr, order_ptr, wsel_ptr, a_ptr, ga_ptr, gz_ptr, w_ptr, gh_ptr, gw_ptr,
    S, D, L,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # gH[b, :, d-block] = A gZ + gE Wdp^T and this sequence's partial gWdp[p, :, d-block] = gE^T H,
    # stored at the program row p (= b single-tenant) so a tenant's partials sit side by side.
    p = tl.program_id(0)
    b, wi = _request(p, order_ptr, wsel_ptr, HAS_ORDER)
    w_ptr += wi * D * L
    pd = tl.program_id(1)
    cdt = gz_ptr.dtype.element_ty
    lanes = tl.arange(0, L_PAD)
    lmask = lanes < L
    dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    ld_mask = lmask[:, None] & dmask[None, :]
    sl_base = b.to(tl.int64) * S * L

    delta = tl.zeros([L_PAD], dtype=cdt)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = (s < S)[:, None] & lmask[None, :]
        a = tl.load(a_ptr + sl_base + s[:, None] * L + lanes[None, :], mask=smask, other=0.0)
        ga = tl.load(ga_ptr + sl_base + s[:, None] * L + lanes[None, :], mask=smask, other=0.0)
        delta += tl.sum(a * ga, axis=0)

    gz = tl.load(gz_ptr + (b.to(tl.int64) * L + lanes)[:, None] * D + dd[None, :], mask=ld_mask, other=0.0)
    w = tl.load(w_ptr + dd[None, :] * L + lanes[:, None], mask=ld_mask, other=0.0)  # Wdp^T block
    gw = tl.zeros([L_PAD, BLOCK_D], dtype=cdt)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        row, valid = _rows(b, s, S, cu_ptr, mask_ptr, PACKED)
        smask = (s < S)[:, None] & lmask[None, :]
        a = tl.load(a_ptr + sl_base + s[:, None] * L + lanes[None, :], mask=smask, other=0.0)
        ga = tl.load(ga_ptr + sl_base + s[:, None] * L + lanes[None, :], mask=smask, other=0.0)
        ge = a * (ga - delta[None, :])  # 0 wherever a is: masked tokens, empty rows
        gh = tl.sum(a[:, :, None] * gz[None, :, :] + ge[:, :, None] * w[None, :, :], axis=1)
        # Padded layout: every position of the row is written (0 at masked ones, so NaN there
        # never reaches the gradient). Packed: only this sequence's own rows.
        if PACKED:
            keep = valid
        else:
            keep = s < S
        tl.store(gh_ptr + row[:, None] * D + dd[None, :], gh.to(gh_ptr.dtype.element_ty),
                 mask=keep[:, None] & dmask[None, :])
        h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        gw += tl.sum(ge[:, :, None] * h.to(cdt)[:, None, :], axis=0)
    out = (p.to(tl.int64) * L + lanes)[:, None] * D + dd[None, :]
    tl.store(gw_ptr + out, gw, mask=ld_mask)


# --------------------------------------------------------------------------- launchers


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _layout(h, mask, cu_seqlens, max_seqlen):
    """`(B, S, D, packed, mask_arg, cu_arg)` with dummy pointers for the layout not in use."""
    if cu_seqlens is not None:
        B, S, D = cu_seqlens.numel() - 1, max_seqlen, h.shape[1]
        return B, S, D, True, cu_seqlens, cu_seqlens
    B, S, D = h.shape
    m = mask.contiguous().view(torch.uint8)
    return B, S, D, False, m, m


def stream_fwd(h, mask, cu_seqlens, max_seqlen, wdp, c, requests=None):
    """The two forward passes over `H`: scores, then softmax and `Z = A^T H`.

    `wdp (W, d, L)` and `c (W, L)` in the compute dtype; `requests` is `None` (every sequence, `W = 1`)
    or `(order, wsel)`: only the sequences in `order`, sequence `order[p]` with `wdp[wsel[p]]`.
    Returns `A (B, S, L)` and `Z (B, L, d)`; rows of sequences not in `order` are left unwritten.
    """
    cdt = wdp.dtype
    B, S, D, L, rows, args, block_s, block_d, meta = _stream_setup(h, mask, cu_seqlens, max_seqlen, wdp, requests)
    e = torch.empty((B, S, L), dtype=cdt, device=h.device)
    a = torch.empty((B, S, L), dtype=cdt, device=h.device)
    z = torch.empty((B, L, D), dtype=cdt, device=h.device)
    if rows > 0:
        if S > 0:
            _attention_pool_scores_kernel[(rows, triton.cdiv(S, block_s))](
                h, *args, wdp, c, e, S, D, L, **meta)
        _attention_pool_fwd_kernel[(rows, triton.cdiv(D, block_d))](
            h, *args, e, a, z, S, D, L, **meta)
    return a, z


def stream_bwd(h, mask, cu_seqlens, max_seqlen, a, gz, wdp, requests=None):
    """The two backward passes over `H`: `gA = H gZ^T`, then `gH` and the per-sequence partials of
    `gWdp^T`, laid out `(P, L, d)` by program row (sequence `p`, or `order[p]` with `requests`).

    `gH` is exactly 0 at masked positions; rows of sequences not in `order` come back 0.
    """
    cdt = wdp.dtype
    B, S, D, L, rows, args, block_s, block_d, meta = _stream_setup(h, mask, cu_seqlens, max_seqlen, wdp, requests)
    ga = torch.empty((B, S, L), dtype=cdt, device=h.device)
    # Sequences the kernels skip (no adapter) get gradient 0; otherwise every element is written.
    gh = torch.empty_like(h) if rows == B else torch.zeros_like(h)
    gw_partial = torch.empty((rows, L, D), dtype=cdt, device=h.device)
    if rows > 0:
        if S > 0:
            _attention_pool_bwd_scores_kernel[(rows, triton.cdiv(S, block_s))](
                h, *args, gz, ga, S, D, L, **meta)
        _attention_pool_bwd_kernel[(rows, triton.cdiv(D, block_d))](
            h, *args, a, ga, gz, wdp, gh, gw_partial, S, D, L, **meta)
    return gh, gw_partial


def _stream_setup(h, mask, cu_seqlens, max_seqlen, wdp, requests):
    """What both directions' launches share: sizes, the program-row count, the leading kernel
    arguments `(mask, cu_seqlens, order, wsel)` (dummies for what is not in use), blocks, constexprs."""
    B, S, D, packed, mask_arg, cu_arg = _layout(h, mask, cu_seqlens, max_seqlen)
    L = wdp.shape[-1]
    if requests is None:
        rows, order = B, torch.empty(1, dtype=torch.int32, device=h.device)
        wsel = order
    else:
        order, wsel = requests
        rows = order.numel()
    l_pad, block_s, block_d = block_sizes(L)
    meta = dict(PACKED=packed, HAS_ORDER=requests is not None, L_PAD=l_pad, BLOCK_S=block_s,
                BLOCK_D=block_d, num_warps=NUM_WARPS)
    return B, S, D, L, rows, (mask_arg, cu_arg, order, wsel), block_s, block_d, meta


def attention_pool_fwd(h, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen):
    """Triton forward. Returns `(U (B, L, r) in h.dtype, A (B, S, L), Z (B, L, d), n (B,))`, the last
    three in the compute dtype, saved for the backward."""
    cdt = compute_dtype(h)
    h = h.contiguous()
    B, D = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1, h.shape[-1]
    L, r = pool_weight.shape
    wd, wp = down_weight.to(cdt), pool_weight.to(cdt)
    wdp = (wd.t() @ wp.t()).contiguous()  # (d, L)
    c = wp @ down_bias.to(cdt)  # (L,)
    a, z = stream_fwd(h, mask, cu_seqlens, max_seqlen, wdp, c)
    n = nonempty(mask, cu_seqlens, cdt, B, h.device)
    u = torch.baddbmm(n[:, None, None] * down_bias.to(cdt), z, wd.t().expand(B, D, r))
    return u.to(h.dtype), a, z, n


def attention_pool_bwd(gu, h, mask, cu_seqlens, down_weight, pool_weight, a, z, n, max_seqlen):
    """Triton backward: `(gH like h, g_down_weight, g_down_bias, g_pool_weight)` in h.dtype."""
    cdt = compute_dtype(h)
    h = h.contiguous()
    wd, wp = down_weight.to(cdt), pool_weight.to(cdt)
    wdp = (wd.t() @ wp.t()).contiguous()
    gu = gu.to(cdt).contiguous()
    gz = (gu @ wd).contiguous()  # (B, L, d)
    gh, gw_partial = stream_bwd(h, mask, cu_seqlens, max_seqlen, a, gz, wdp)
    gwdp = gw_partial.sum(dim=0).t()  # (d, L); a fixed-order sum over sequences, no atomics
    g_down_weight = torch.einsum("blr,bld->rd", gu, z) + (gwdp @ wp).t()
    g_down_bias = torch.einsum("blr,b->r", gu, n)
    g_pool_weight = (wd @ gwdp).t()
    return gh, g_down_weight.to(h.dtype), g_down_bias.to(h.dtype), g_pool_weight.to(h.dtype)


def nonempty(mask, cu_seqlens, cdt, B, device):
    """`n (B,)`: 1 for a sequence with at least one instruction token, else 0 (it pools to U = 0)."""
    if cu_seqlens is not None:
        return (cu_seqlens[1:] > cu_seqlens[:-1]).to(cdt)
    if mask.shape[1] == 0:
        return torch.zeros(B, dtype=cdt, device=device)
    return mask.any(dim=1).to(cdt)


# --------------------------------------------------------------------------- autograd


class AttentionPoolFunction(torch.autograd.Function):
    """Differentiable attention pooling over the `iapt::attention_pool_fwd/bwd` library ops.

    Saves only `A (B, S, L)`, `Z (B, L, d)` and `n (B,)` beside the inputs: nothing of size `S x r`.
    """

    @staticmethod
    def forward(ctx, h, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen, backend,
                full_precision=False):
        u, a, z, n = torch.ops.iapt.attention_pool_fwd(
            h, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen, backend)
        if full_precision and u.dtype != z.dtype:
            # U again from the saved fp32 Z, unrounded, for callers that keep fusing after the pool
            # (the multi-tenant CPU path); L x d x r per sequence, next to nothing.
            cdt = z.dtype
            u = torch.baddbmm(n[:, None, None] * down_bias.to(cdt), z, down_weight.to(cdt).t().expand(z.shape[0], -1, -1))
        ctx.save_for_backward(h, mask, cu_seqlens, down_weight, pool_weight, a, z, n)
        ctx.meta = (max_seqlen, backend)
        ctx.mark_non_differentiable(a, z, n)
        return u, a, z, n

    @staticmethod
    def backward(ctx, gu, _ga, _gz, _gn):
        h, mask, cu_seqlens, down_weight, pool_weight, a, z, n = ctx.saved_tensors
        max_seqlen, backend = ctx.meta
        gh, gwd, gbd, gwp = torch.ops.iapt.attention_pool_bwd(
            gu.contiguous(), h, mask, cu_seqlens, down_weight, pool_weight, a, z, n, max_seqlen, backend)
        return gh, None, None, gwd, gbd, gwp, None, None, None


# --------------------------------------------------------------------------- launch configurations


def launch_configs():
    """Every (kernel, specialisation) the launchers above can launch, for the static GPU report:
    each input dtype, both layouts, and every padded token count up to MAX_TOKENS."""
    kernels = (
        (_attention_pool_scores_kernel, "_attention_pool_scores_kernel",
         dict(w_ptr="c", c_ptr="c", e_ptr="c")),
        (_attention_pool_fwd_kernel, "_attention_pool_fwd_kernel", dict(e_ptr="c", a_ptr="c", z_ptr="c")),
        (_attention_pool_bwd_scores_kernel, "_attention_pool_bwd_scores_kernel", dict(gz_ptr="c", ga_ptr="c")),
        (_attention_pool_bwd_kernel, "_attention_pool_bwd_kernel",
         dict(a_ptr="c", ga_ptr="c", gz_ptr="c", w_ptr="c", gh_ptr="io", gw_ptr="c")),
    )
    for io in ("fp32", "fp16", "bf16", "fp64"):
        cdt = "fp64" if io == "fp64" else "fp32"
        for packed, has_order in itertools.product((False, True), (False, True)):
            index_ty = "i32" if packed else "u8"
            for l_pad in (1 << i for i in range(MAX_TOKENS.bit_length())):
                _, block_s, block_d = block_sizes(l_pad)
                for fn, name, pointers in kernels:
                    types = {"h_ptr": io, "mask_ptr": index_ty, "cu_ptr": index_ty,
                             "order_ptr": "i32", "wsel_ptr": "i32"}
                    types.update({k: cdt if v == "c" else io for k, v in pointers.items()})
                    yield dict(
                        kernel=fn, name=name, pointers=types,
                        constexprs=dict(PACKED=packed, HAS_ORDER=has_order, L_PAD=l_pad, BLOCK_S=block_s,
                                        BLOCK_D=block_d),
                        num_warps=NUM_WARPS, unaligned=("L",),
                        config=dict(dtype=io, packed=packed, multi_tenant=has_order, L_PAD=l_pad,
                                    BLOCK_S=block_s, BLOCK_D=block_d, num_warps=NUM_WARPS),
                    )
