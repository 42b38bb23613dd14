"""Self-attention pooling with projections, fused by reassociation (docs/design.md sections 1 and 3).

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
    gE   = A (gA - delta),   delta_l = sum_s A_sl gA_sl = <Z_l, gZ_l>
    gH   = A gZ + gE Wdp^T                    exactly 0 at masked positions
    gWdp = sum_b H_b^T gE_b,   gWp = (Wd gWdp)^T

(`gc = sum gE = 0`: a constant added to every score leaves a softmax unchanged.)

Each direction reads every instruction row of `H` from memory once, as the C++ twin does.

Forward: `_attention_pool_fwd_kernel` runs one program per (sequence, chunk of `CHUNK` tokens). For
each block of `BLOCK_S` rows it computes the scores over the full `d` (first sweep over `d`), writes
them to E, updates an online softmax per soft token (running max `m`, running sum `l`, as
FlashAttention does) and folds the rows into the chunk's partial `Z = sum_s exp(E_s - m) H_s`, rescaled
when `m` grows (second sweep over `d`). The second sweep re-loads the `BLOCK_S x d` block the same
program loaded just before: on a GPU from L2 (32 rows x d, a few hundred KiB per CTA), so DRAM sees
each row once. The partial `Z` (L x d, fp32) lives in a per-program scratch that only this program
touches; `_attention_pool_combine_kernel` then merges the chunks of each sequence in chunk order
(log-sum-exp: `Z = sum_c exp(m_c - M) Z_c / sum_c exp(m_c - M) l_c`) and writes `Z` and the
log-sum-exp per (sequence, token); `A = exp(E - lse)` is a small elementwise op on `(B, S, L)`.

Backward: `gZ = gU Wd` and `Wdp^T = Wp Wd` come from one product `[gU; Wp] Wd`, so the `(r, d)`
weight is read once for both; `delta = <Z, gZ>` follows, from the saved `Z` (summed in float64). One program
per (sequence, chunk) then reads each block of rows for `gA = H gZ^T` (first sweep over `d`), forms
`gE = A (gA - delta)`, and in a second sweep over the same (L2-hot) rows writes `gH = A gZ + gE Wdp^T`
once and folds `H^T gE` into a per-program `gWdp` partial. Partials are summed over chunks in a fixed
order, then corrected from `delta = <Z, gZ>` to the `sum_s A gA` actually computed, per chunk sums
added in chunk order (as `csrc/attention_pool.cpp` does): `gWdp += Z (delta - sum_s A gA)`, so the
weight gradients are those of the two-pass formulation even where rounding separates the two deltas.

Chunks: `CHUNK` is a power-of-two multiple of `BLOCK_S`, the largest that still gives every SM a
program (`NUM_SMS`), so a short batch fills the GPU and a long one writes few partials: they cost
`L x d x 4` bytes a program each way, 1/8 of H at the default shape in fp32. In a packed
batch a program whose chunk starts past its sequence's end returns at once (backward: after writing
zero partials), so no program walks to `max_seqlen`.

The loops over `d` are `tl.range(..., num_stages=NUM_STAGES)` around `tl.dot`, which Triton software-
pipelines (cp.async, `LDGSTS`, on sm_80 and sm_90: see the static report); L is padded to 16 for the
tensor-core shapes. The two kernels that stream H are tuned over a small set (`stream_configs`: one
more pipeline stage at L <= 16, 8 warps above) with tiles and chunks fixed, timed once per shape on CUDA
(`_launch_stream`); `IAPT_AUTOTUNE=0` pins the default. fp32 products run at `input_precision="ieee"`
(exact fp32, no TF32 rounding); fp16/bf16 rows are converted to fp32 and multiplied at "tf32x3" (a bf16
or fp16 value is exact in TF32, the fp32 weights are split in two), so every input dtype keeps fp32
accumulation. fp64 rows use no `tl.dot` (not every supported Triton lowers it): `_mm` sums a broadcast
product over K in fp64. No atomics: every
reduction has a fixed order and results are bitwise reproducible. Masked positions are never loaded,
so NaN or Inf there cannot leak. Both layouts run the same kernels: padded `(B, S, d)` with a bool
mask, or packed `(N, d)` with `cu_seqlens`; the multi-tenant generator runs them with `requests`
(`HAS_ORDER`). The `L x d x r` matrix products around them are plain torch matmuls.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from .._contract import MAX_TOKENS, compute_dtype
from .._validate import check_max_seqlen

NUM_WARPS = 4
NUM_STAGES = 3  # depth of the software pipeline over d: loads of NUM_STAGES - 1 tiles in flight
BLOCK_S = 32  # rows per block: the M (or K) of every tl.dot
NUM_SMS = 132  # H100 SXM; the chunk size aims for at least one program per SM
TILE_BYTES = 8192  # bytes of H per program per pipeline stage (BLOCK_S x BLOCK_D)


def block_sizes(L: int, itemsize: int = 4) -> tuple[int, int, int]:
    """`(L_PAD, BLOCK_S, BLOCK_D)` for `L` soft tokens and `itemsize`-byte rows of H: L padded to a
    power of two of at least 16 (the tensor-core N and K), and BLOCK_D so a stage loads TILE_BYTES
    of H while the fp32 `L_PAD x BLOCK_D` tiles stay at 4096 values (32 registers a thread)."""
    l_pad = max(16, triton.next_power_of_2(L))
    block_d = min(TILE_BYTES // (BLOCK_S * itemsize), 4096 // l_pad)
    return l_pad, BLOCK_S, block_d


def pipeline_stages(l_pad: int) -> int:
    """Pipeline depth over d: NUM_STAGES, but 2 at L_PAD = 64, where three stages of the backward's
    tiles would need more than sm_80's 163 KiB of shared memory per block."""
    return NUM_STAGES if l_pad < 64 else 2


def stream_configs(l_pad: int) -> list[dict]:
    """The autotune set of the two kernels that stream H: `(num_warps, num_stages)` members, the
    default first. Tiles (`block_sizes`) and chunks (`chunk_size`) are the same for every member, so
    the order of every sum over d and over chunks is too. At L_PAD 16 (L <= 16, the method's L = 4)
    the alternative is one more pipeline stage: 32 to 64 KiB of H in flight per SM instead of 48
    (static report: fewer CTAs fit, each with more loads outstanding). 8 warps is not offered there:
    registers stay at 255 a thread, so one CTA fits, 24 KiB in flight. At L_PAD 32 and 64 the
    alternative is 8 warps (no bound to meet there; the tuner decides)."""
    stages = pipeline_stages(l_pad)
    default = dict(num_warps=NUM_WARPS, num_stages=stages)
    if l_pad == 16:
        return [default, dict(num_warps=NUM_WARPS, num_stages=stages + 1)]
    return [default, dict(num_warps=2 * NUM_WARPS, num_stages=stages)]


def chunk_size(programs_per_chunk: int, S: int, block_s: int = BLOCK_S) -> int:
    """Tokens per program: the largest power-of-two multiple of `block_s` for which the
    `programs_per_chunk * cdiv(S, chunk)` programs still cover `NUM_SMS`, and no longer than needed
    for one chunk to hold all S positions."""
    chunk = block_s
    while chunk < S and programs_per_chunk * triton.cdiv(S, 2 * chunk) >= NUM_SMS:
        chunk *= 2
    return chunk


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
    `wsel` the present-tenant slot of each (docs/design.md section 1, "Multi-tenant")."""
    if HAS_ORDER:
        b = tl.load(order_ptr + p)
        w = tl.load(wsel_ptr + p).to(tl.int64)
    else:
        b = p
        w = p.to(tl.int64) * 0
    return b, w


@triton.jit
def _length(b, S, cu_ptr, PACKED: tl.constexpr):
    """Positions of sequence `b`: its token count when packed, S when padded."""
    if PACKED:
        return tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)
    return S


@triton.jit
def _chunk(S, L, CHUNK, cu_ptr, order_ptr, wsel_ptr, PACKED: tl.constexpr, HAS_ORDER: tl.constexpr,
           L_PAD: tl.constexpr):
    """What program (p, k) of a streaming kernel covers: sequence `b` with weight set `w`, tokens
    `[s_lo, s_hi)`, the soft-token lanes and their mask, and its partials' slot `p * nchunk + k`."""
    p = tl.program_id(0)
    k = tl.program_id(1)
    b, w = _request(p, order_ptr, wsel_ptr, HAS_ORDER)
    s_lo = k * CHUNK
    s_hi = tl.minimum(s_lo + CHUNK, _length(b, S, cu_ptr, PACKED))
    lanes = tl.arange(0, L_PAD)
    slot = p.to(tl.int64) * tl.num_programs(1) + k
    return p, b, w, s_lo, s_hi, lanes, lanes < L, slot


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr):
    """`acc + a b` on the tensor cores (or exact fp32 FMAs for "ieee"). fp64 (chosen at trace time by
    the dtype) is a broadcast product summed over K instead: not every supported Triton lowers an fp64
    `tl.dot` (3.6 asserts on an fp64 accumulator, and without that its sm_80 backend rejects the K of
    these tiles), and this sum has one fixed order on every version, so fp64 results stay bitwise
    reproducible and the same on each."""
    if acc.dtype == tl.float64:  # one branch only: Triton 3.6 still compiles what follows a static `return`
        out = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _attention_pool_fwd_kernel(
    h_ptr, mask_ptr, cu_ptr, order_ptr, wsel_ptr, w_ptr, c_ptr, e_ptr, zp_ptr, st_ptr,
    S, D, L, CHUNK,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (p, k): tokens [k CHUNK, (k+1) CHUNK) of sequence b. Writes E there, the chunk's
    # softmax statistics st[p, k] = (m, l) and its partial Z zp[p, k] = sum_s exp(E_s - m) H_s.
    p, b, wi, s_lo, s_hi, lanes, lmask, slot = _chunk(S, L, CHUNK, cu_ptr, order_ptr, wsel_ptr, PACKED,
                                                      HAS_ORDER, L_PAD)
    w_ptr += wi * D * L
    cdt = w_ptr.dtype.element_ty
    c = tl.load(c_ptr + wi * L + lanes, mask=lmask, other=0.0)
    zp_ptr += slot * L * D
    m = tl.full([L_PAD], float("-inf"), dtype=cdt)
    l_sum = tl.zeros([L_PAD], dtype=cdt)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        row, valid = _rows(b, s, S, cu_ptr, mask_ptr, PACKED)
        acc = tl.zeros([BLOCK_S, L_PAD], dtype=cdt)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
            w = tl.load(w_ptr + dd[:, None] * L + lanes[None, :], mask=dmask[:, None] & lmask[None, :], other=0.0)
            acc = _mm(h.to(cdt), w, acc, PRECISION)
        e = tl.where(valid[:, None], acc + c[None, :], float("-inf"))
        tl.store(e_ptr + (b.to(tl.int64) * S + s)[:, None] * L + lanes[None, :], e,
                 mask=(s < S)[:, None] & lmask[None, :])
        m_new = tl.maximum(m, tl.max(e, axis=0))
        # While a token has seen only masked rows its max is -inf; shift by 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        pe = tl.exp(e - m_safe[None, :])  # 0 at masked rows and padded lanes
        l_sum = l_sum * alpha + tl.sum(pe, axis=0)
        m = m_new
        pt = tl.trans(pe)
        keep = (lmask & (lanes * 0 + s0 > s_lo))[:, None]  # the first block starts the partial at 0
        for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
            zoff = lanes[:, None] * D + dd[None, :]
            z = tl.load(zp_ptr + zoff, mask=keep & dmask[None, :], other=0.0)
            z = _mm(pt, h.to(cdt), z * alpha[:, None], PRECISION)
            tl.store(zp_ptr + zoff, z, mask=lmask[:, None] & dmask[None, :])
        tl.debug_barrier()  # the next block reads back what every thread stored
    tl.store(st_ptr + slot * 2 * L_PAD + lanes, m)
    tl.store(st_ptr + slot * 2 * L_PAD + L_PAD + lanes, l_sum)


@triton.jit
def _attention_pool_combine_kernel(
    cu_ptr, order_ptr, wsel_ptr, zp_ptr, st_ptr, z_ptr, lse_ptr,
    S, D, L, CHUNK, NCHUNK,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Z[b, :, d-block] = sum_k exp(m_k - M) zp[p, k] / sum_k exp(m_k - M) l_k over the chunks of b, in
    # order; the d-block-0 program writes lse[b] = M + log(sum ...).
    p = tl.program_id(0)
    pd = tl.program_id(1)
    b, _ = _request(p, order_ptr, wsel_ptr, HAS_ORDER)
    nk = tl.cdiv(_length(b, S, cu_ptr, PACKED), CHUNK)
    cdt = zp_ptr.dtype.element_ty
    lanes = tl.arange(0, L_PAD)
    lmask = lanes < L
    dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    st_ptr += p.to(tl.int64) * NCHUNK * 2 * L_PAD
    zp_ptr += p.to(tl.int64) * NCHUNK * L * D
    big_m = tl.full([L_PAD], float("-inf"), dtype=cdt)
    for k in range(nk):
        big_m = tl.maximum(big_m, tl.load(st_ptr + k * 2 * L_PAD + lanes))
    big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
    total = tl.zeros([L_PAD], dtype=cdt)
    z = tl.zeros([L_PAD, BLOCK_D], dtype=cdt)
    for k in range(nk):
        scale = tl.exp(tl.load(st_ptr + k * 2 * L_PAD + lanes) - big_m)
        total += scale * tl.load(st_ptr + k * 2 * L_PAD + L_PAD + lanes)
        zk = tl.load(zp_ptr + k * L * D + lanes[:, None] * D + dd[None, :], mask=lmask[:, None] & dmask[None, :],
                     other=0.0)
        z += scale[:, None] * zk
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # an empty instruction pools to U = 0
    out = (b.to(tl.int64) * L + lanes)[:, None] * D + dd[None, :]
    tl.store(z_ptr + out, z * inv[:, None], mask=lmask[:, None] & dmask[None, :])
    # An empty sequence has E = -inf everywhere: lse 0 keeps A = exp(E - lse) at 0, not NaN.
    lse = tl.where(total > 0, big_m + tl.log(tl.where(total > 0, total, 1.0)), 0.0)
    tl.store(lse_ptr + b.to(tl.int64) * L + lanes, lse, mask=lmask & (lanes * 0 + pd == 0))


@triton.jit
def _attention_pool_bwd_kernel(
    h_ptr, mask_ptr, cu_ptr, order_ptr, wsel_ptr, a_ptr, gz_ptr, w_ptr, delta_ptr, gh_ptr, gw_ptr, ds_ptr,
    S, D, L, CHUNK,
    PACKED: tl.constexpr, HAS_ORDER: tl.constexpr, L_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (p, k), tokens [k CHUNK, (k+1) CHUNK) of sequence b: gH there, the chunk's partial
    # gWdp^T gw[p, k] = gE^T H and ds[p, k] = sum_s A gA, with gE = A (gA - delta), delta = <Z, gZ>.
    p, b, wi, s_lo, s_hi, lanes, lmask, slot = _chunk(S, L, CHUNK, cu_ptr, order_ptr, wsel_ptr, PACKED,
                                                      HAS_ORDER, L_PAD)
    w_ptr += wi * D * L
    cdt = gz_ptr.dtype.element_ty
    gw_ptr += slot * L * D
    gz_ptr += b.to(tl.int64) * L * D
    delta = tl.load(delta_ptr + p.to(tl.int64) * L + lanes, mask=lmask, other=0.0)
    dsum = tl.zeros([L_PAD], dtype=cdt)
    if s_lo >= s_hi:
        # Past the end of a packed sequence: nothing to read, zero partials for the fixed-order sum.
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            tl.store(gw_ptr + lanes[:, None] * D + dd[None, :], tl.zeros([L_PAD, BLOCK_D], dtype=cdt),
                     mask=lmask[:, None] & (dd < D)[None, :])
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        row, valid = _rows(b, s, S, cu_ptr, mask_ptr, PACKED)
        smask = (s < S)[:, None] & lmask[None, :]
        a = tl.load(a_ptr + (b.to(tl.int64) * S + s)[:, None] * L + lanes[None, :], mask=smask & valid[:, None],
                    other=0.0)
        ga = tl.zeros([BLOCK_S, L_PAD], dtype=cdt)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
            g = tl.load(gz_ptr + lanes[None, :] * D + dd[:, None], mask=dmask[:, None] & lmask[None, :], other=0.0)
            ga = _mm(h.to(cdt), g, ga, PRECISION)
        dsum += tl.sum(a * ga, axis=0)
        ge = a * (ga - delta[None, :])  # 0 wherever a is: masked tokens, empty rows
        get = tl.trans(ge)
        # Padded layout: every position of the row is written (0 at masked ones, so NaN there
        # never reaches the gradient). Packed: only this sequence's own rows.
        if PACKED:
            keep = valid
        else:
            keep = s < S
        keep_gw = (lmask & (lanes * 0 + s0 > s_lo))[:, None]  # the first block starts the partial at 0
        for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            ld_mask = lmask[:, None] & dmask[None, :]
            gzt = tl.load(gz_ptr + lanes[:, None] * D + dd[None, :], mask=ld_mask, other=0.0)
            wt = tl.load(w_ptr + dd[None, :] * L + lanes[:, None], mask=ld_mask, other=0.0)  # Wdp^T tile
            gh = _mm(ge, wt, _mm(a, gzt, tl.zeros([BLOCK_S, BLOCK_D], dtype=cdt), PRECISION), PRECISION)
            tl.store(gh_ptr + row[:, None] * D + dd[None, :], gh.to(gh_ptr.dtype.element_ty),
                     mask=keep[:, None] & dmask[None, :])
            h = tl.load(h_ptr + row[:, None] * D + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
            goff = lanes[:, None] * D + dd[None, :]
            gw = tl.load(gw_ptr + goff, mask=keep_gw & dmask[None, :], other=0.0)
            tl.store(gw_ptr + goff, _mm(get, h.to(cdt), gw, PRECISION), mask=ld_mask)
        tl.debug_barrier()  # the next block reads back what every thread stored
    tl.store(ds_ptr + slot * L_PAD + lanes, dsum)


# --------------------------------------------------------------------------- launchers


def _layout(h, mask, cu_seqlens, max_seqlen):
    """`(B, S, D, packed, mask_arg, cu_arg)` with dummy pointers for the layout not in use."""
    if cu_seqlens is not None:
        if cu_seqlens.device.type == "cpu":
            check_max_seqlen(cu_seqlens, max_seqlen)
        elif cu_seqlens.numel() > 1:
            # On the device, without a host read: a caller passes max_seqlen to avoid exactly that.
            longest = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
            torch._assert_async(longest <= max_seqlen, "a packed sequence is longer than max_seqlen")
        B, S, D = cu_seqlens.numel() - 1, max_seqlen, h.shape[1]
        return B, S, D, True, cu_seqlens, cu_seqlens
    B, S, D = h.shape
    m = mask.contiguous().view(torch.uint8)
    return B, S, D, False, m, m


def stream_fwd(h, mask, cu_seqlens, max_seqlen, wdp, c, requests=None):
    """The forward pass over `H`: scores, online softmax and partial `Z` per (sequence, chunk), then
    the fixed-order combine of the chunks and `A = exp(E - lse)`.

    `wdp (W, d, L)` and `c (W, L)` in the compute dtype; `requests` is `None` (every sequence, `W = 1`)
    or `(order, wsel)`: only the sequences in `order`, sequence `order[p]` with `wdp[wsel[p]]`.
    Returns `A (B, S, L)` and `Z (B, L, d)`; rows of `A` of sequences not in `order` are 0, rows of
    `Z` left unwritten.
    """
    cdt = wdp.dtype
    B, S, D, L, rows, args, chunk, meta = _stream_setup(h, mask, cu_seqlens, max_seqlen, wdp, requests)
    # -inf: positions no program reaches (past a packed sequence's end, sequences not in order)
    # come out of A as 0.
    e = torch.full((B, S, L), float("-inf"), dtype=cdt, device=h.device)
    lse = torch.zeros((B, L), dtype=cdt, device=h.device)
    z = torch.empty((B, L, D), dtype=cdt, device=h.device)
    if rows > 0 and S > 0:
        nchunk = triton.cdiv(S, chunk)
        zp = torch.empty((rows, nchunk, L, D), dtype=cdt, device=h.device)
        st = torch.empty((rows, nchunk, 2, meta["L_PAD"]), dtype=cdt, device=h.device)
        _launch_stream(_attention_pool_fwd_kernel, (rows, nchunk), (h, *args, wdp, c, e, zp, st, S, D, L, chunk),
                       meta, h.dtype, D, S, rows, chunk)
        _attention_pool_combine_kernel[(rows, triton.cdiv(D, meta["BLOCK_D"]))](
            args[1], args[2], args[3], zp, st, z, lse, S, D, L, chunk, nchunk, PACKED=meta["PACKED"],
            HAS_ORDER=meta["HAS_ORDER"], L_PAD=meta["L_PAD"], BLOCK_D=meta["BLOCK_D"], num_warps=NUM_WARPS,
            num_stages=pipeline_stages(meta["L_PAD"]))
    elif rows > 0:
        z.zero_()  # S = 0: every sequence is empty
    a = torch.exp(e - lse[:, None, :])  # exp(-inf - lse) = 0 at masked positions; lse is finite there
    return a, z


def stream_bwd(h, mask, cu_seqlens, max_seqlen, a, gz, wdp, requests=None, *, z):
    """The backward pass over `H`: per (sequence, chunk) `gA = H gZ^T`, `gE`, `gH`, and the chunk's
    partial of `gWdp^T`; returns `gH` and those partials summed per program row, laid out `(P, L, d)`
    (sequence `p`, or `order[p]` with `requests`). `z (B, L, d)` is the forward's `Z`: `delta = <Z, gZ>`.

    `gH` is exactly 0 at masked positions; rows of sequences not in `order` come back 0.
    """
    cdt = wdp.dtype
    B, S, D, L, rows, args, chunk, meta = _stream_setup(h, mask, cu_seqlens, max_seqlen, wdp, requests)
    # Sequences the kernels skip (no adapter) get gradient 0; otherwise every element is written.
    gh = torch.empty_like(h) if rows == B else torch.zeros_like(h)
    if rows == 0:
        return gh, torch.empty((0, L, D), dtype=cdt, device=h.device)
    zr, gzr = (z, gz) if requests is None else (z.index_select(0, requests[0]), gz.index_select(0, requests[0]))
    # delta = <Z, gZ>, summed in float64 and rounded once: gE subtracts it from every gA.
    delta = (zr * gzr).sum(dim=-1, dtype=torch.float64).to(cdt)
    if S == 0:
        return gh, torch.zeros((rows, L, D), dtype=cdt, device=h.device)
    nchunk = triton.cdiv(S, chunk)
    gw = torch.empty((rows, nchunk, L, D), dtype=cdt, device=h.device)
    ds = torch.empty((rows, nchunk, meta["L_PAD"]), dtype=cdt, device=h.device)
    _launch_stream(_attention_pool_bwd_kernel, (rows, nchunk),
                   (h, *args, a, gz, wdp, delta, gh, gw, ds, S, D, L, chunk), meta, h.dtype, D, S, rows, chunk)
    # The chunk partials in chunk order, then Z (delta - sum_s A gA): gWdp of gE = A (gA - sum_s A gA),
    # the sums also in chunk order (csrc/attention_pool.cpp, bwd_finish).
    corr = delta - ds[:, :, :L].sum(dim=1, dtype=torch.float64).to(cdt)
    return gh, gw.sum(dim=1) + zr * corr[:, :, None]


def _stream_setup(h, mask, cu_seqlens, max_seqlen, wdp, requests):
    """What both directions' launches share: sizes, the program-row count, the leading kernel
    arguments `(mask, cu_seqlens, order, wsel)` (dummies for what is not in use), the chunk size and
    the constexprs."""
    B, S, D, packed, mask_arg, cu_arg = _layout(h, mask, cu_seqlens, max_seqlen)
    L = wdp.shape[-1]
    if requests is None:
        rows, order = B, torch.empty(1, dtype=torch.int32, device=h.device)
        wsel = order
    else:
        order, wsel = requests
        rows = order.numel()
    l_pad, block_s, block_d = block_sizes(L, h.element_size())
    meta = dict(PACKED=packed, HAS_ORDER=requests is not None, L_PAD=l_pad, BLOCK_S=block_s,
                BLOCK_D=block_d, PRECISION=precision(h.dtype))
    return B, S, D, L, rows, (mask_arg, cu_arg, order, wsel), chunk_size(max(rows, 1), S), meta


_TUNED: dict = {}


def _launch_stream(kernel, grid, args, meta, dtype, D, S, rows, chunk):
    """Launch a kernel that streams H with a member of `stream_configs`. On CUDA the first launch of
    each (kernel, device, constexprs, d, chunk, S and program rows to the next power of two) times every
    member once (`do_bench`, a few ms) and keeps the fastest for the process; the powers of two keep a
    batch whose length changes every step from tuning every step. Both kernels only overwrite their
    outputs, so the timing runs leave them as one launch would. The interpreter, a CUDA graph capture
    and `IAPT_AUTOTUNE=0` use the default member: the member can change how `tl.sum` spreads a block's
    rows over threads, so pin it where results must match bit for bit across processes (within one
    process they always do)."""

    def launch(cfg):
        kernel[grid](*args, **meta, NUM_STAGES=cfg["num_stages"], **cfg)

    configs = stream_configs(meta["L_PAD"])
    cfg = configs[0]
    h = args[0]
    if h.is_cuda and os.environ.get("IAPT_AUTOTUNE", "1") != "0" and not torch.cuda.is_current_stream_capturing():
        key = (kernel.fn.__name__, h.device.index, *sorted(meta.items()), dtype, D, chunk,
               triton.next_power_of_2(S), triton.next_power_of_2(rows))
        if key not in _TUNED:
            _TUNED[key] = _fastest(launch, configs)
        cfg = _TUNED[key]
    launch(cfg)


def _fastest(launch, configs):
    """The member of `configs` with the least `do_bench` time (the first on a tie); members this GPU
    cannot launch (e.g. one stage more than its shared memory) are skipped."""
    from triton.testing import do_bench

    times = []
    for i, cfg in enumerate(configs):
        try:
            times.append((do_bench(functools.partial(launch, cfg), warmup=2, rep=10), i))
        except triton.runtime.errors.OutOfResources:
            continue
    return configs[min(times)[1]] if times else configs[0]


def precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision for rows of `dtype`: exact fp32 products ("ieee") for fp32 (fp64 rows use no
    `tl.dot`, see `_mm`); for fp16/bf16 rows, exact in TF32, "tf32x3" (the fp32 operand split in two)
    on the tensor cores."""
    return "tf32x3" if dtype in (torch.float16, torch.bfloat16) else "ieee"


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
    gu = gu.to(cdt).contiguous()
    r, D = wd.shape
    B, L = gu.shape[0], wp.shape[0]
    # gZ = gU Wd and Wdp^T = Wp Wd as one product: the (r, d) weight is read once for both.
    gz_wdp = torch.cat([gu.reshape(B * L, r), wp]) @ wd
    gz = gz_wdp[: B * L].view(B, L, D)  # (B, L, d)
    wdp = gz_wdp[B * L:].t().contiguous()  # (d, L)
    gh, gw_partial = stream_bwd(h, mask, cu_seqlens, max_seqlen, a, gz, wdp, z=z)
    gwdp_t = gw_partial.sum(dim=0)  # (L, d); a fixed-order sum over sequences, no atomics
    gwdp = gwdp_t.t()
    # gWd = sum_b gU_b^T Z_b + Wp^T gWdp^T as one product, so the (r, d) result is written once.
    g_down_weight = torch.cat([gu.reshape(-1, r), wp]).t() @ torch.cat([z.reshape(-1, D), gwdp_t])
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


# --------------------------------------------------------------------------- launch configurations


def launch_configs():
    """Every (kernel, specialisation) the launchers above can launch, for the static GPU report:
    each input dtype, both layouts, single- and multi-tenant, and every padded token count up to
    MAX_TOKENS. `h_stage_bytes`: bytes of H one program loads per pipeline stage (0: no H)."""
    kernels = (
        (_attention_pool_fwd_kernel, "_attention_pool_fwd_kernel",
         dict(w_ptr="c", c_ptr="c", e_ptr="c", zp_ptr="c", st_ptr="c"), True),
        (_attention_pool_combine_kernel, "_attention_pool_combine_kernel",
         dict(zp_ptr="c", st_ptr="c", z_ptr="c", lse_ptr="c"), False),
        (_attention_pool_bwd_kernel, "_attention_pool_bwd_kernel",
         dict(a_ptr="c", gz_ptr="c", w_ptr="c", delta_ptr="c", gh_ptr="io", gw_ptr="c", ds_ptr="c"), True),
    )
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    l_pads = sorted({block_sizes(L)[0] for L in range(1, MAX_TOKENS + 1)})
    for io in ("fp32", "fp16", "bf16", "fp64"):
        cdt = "fp64" if io == "fp64" else "fp32"
        for packed, has_order in itertools.product((False, True), (False, True)):
            index_ty = "i32" if packed else "u8"
            for l_pad in l_pads:
                _, block_s, block_d = block_sizes(l_pad, itemsize[io])
                for fn, name, pointers, streams in kernels:
                    types = {"h_ptr": io, "mask_ptr": index_ty, "cu_ptr": index_ty,
                             "order_ptr": "i32", "wsel_ptr": "i32"}
                    types.update({k: cdt if v == "c" else io for k, v in pointers.items()})
                    members = stream_configs(l_pad) if streams else [
                        dict(num_warps=NUM_WARPS, num_stages=pipeline_stages(l_pad))]
                    for member in members:
                        warps, stages = member["num_warps"], member["num_stages"]
                        constexprs = dict(PACKED=packed, HAS_ORDER=has_order, L_PAD=l_pad, BLOCK_D=block_d)
                        if streams:
                            constexprs.update(BLOCK_S=block_s, NUM_STAGES=stages,
                                              PRECISION=precision(torch_dtype[io]))
                        yield dict(
                            kernel=fn, name=name, pointers={k: v for k, v in types.items() if k in fn.arg_names},
                            constexprs=constexprs, num_warps=warps, num_stages=stages,
                            h_stage_bytes=block_s * block_d * itemsize[io] if streams else 0,
                            unaligned=("L", "CHUNK", "NCHUNK"),
                            config=dict(dtype=io, packed=packed, multi_tenant=has_order, L_PAD=l_pad,
                                        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
                                        default=member == members[0]),
                        )
