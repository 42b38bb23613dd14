"""A model of GPU cost (docs/design.md section 7): bytes moved, FLOPs and kernel launches of each op, for the
reference (counted) and the fused kernels (from their formulas), and the time each implies on an H100
at its roofline.

Reference: :class:`CostCounter`, a ``TorchDispatchMode``, sees every aten operator the reference
actually runs (forward, and backward when autograd runs it) and adds, per operator:

- bytes: every tensor argument read plus every tensor result written, each counted over the memory
  it spans (a broadcast, stride-0 dimension counts once);
- FLOPs: ``2 M N K`` for ``mm``/``bmm``/``addmm``/``baddbmm``/``mv``/``dot`` (plus ``M N`` for the
  added term), the result's element count for every other computing operator (elementwise and
  reductions take the larger of input and result), 0 for pure data movement (copies, fills, cat);
- launches: operators that launch a kernel; views, reshapes and allocations
  (``is_view`` ops, ``_unsafe_view``, ``empty*``, ``detach``, ``alias``) move nothing and launch nothing.

Fused: :func:`fused_cost` writes down what the launchers in :mod:`iapt_kernels.ops` read and write
from DRAM (each tensor once: re-reads of small per-sequence tensors by several programs are served by
L2), the FLOPs they do, and how many kernels and torch ops they launch.

Roofline: ``max(bytes / 3.35e12 B/s, flops / peak)`` with ``peak = 990e12`` FLOP/s for fp16/bf16 (dense
tensor cores) and ``67e12`` FLOP/s for fp32 (CUDA cores, no TF32). ``h100_launch_ms`` adds 3 us per
launch, an assumption about launch overhead, not a measurement.
"""

from __future__ import annotations

import math

import torch

# TorchDispatchMode has no public home in torch; it is the only way to see every aten op the reference
# really runs (forward and backward). Only this counter uses it (docs/design.md section 7).
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import iapt_kernels
from iapt_kernels import reference
from iapt_kernels.ops.attention_pool import chunk_size
from iapt_kernels.tenants import TenantGroups

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H100_PEAK = {"float16": 990e12, "bfloat16": 990e12, "float32": 67e12, "float64": 67e12}
LAUNCH_OVERHEAD_S = 3e-6

_aten = torch.ops.aten
_FREE = {
    "_unsafe_view",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "lift_fresh_copy",
    "_local_scalar_dense",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "record_stream",
    "set_",
}
_MOVE_ONLY = {
    "copy_",
    "_to_copy",
    "clone",
    "cat",
    "stack",
    "fill_",
    "fill",
    "zero_",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "scalar_tensor",
    "index",
    "index_select",
    "gather",
    "scatter",
    "masked_fill_",
    "constant_pad_nd",
    "new_zeros",
    "new_ones",
    "new_full",
    "contiguous",
    "expand_copy",
    "_copy_from",
    "_copy_from_and_resize",
    "slice_scatter",
    "select_scatter",
    "as_strided_scatter",
    "repeat",
    "arange",
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read or write all of `t`: stride-0 (broadcast) dimensions count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _matmul_flops(name: str, args) -> int | None:
    if name == "mm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "addmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1] + a.shape[0] * b.shape[1]
    if name == "bmm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "baddbmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] + a.shape[0] * a.shape[1] * b.shape[2]
    if name == "mv":
        return 2 * args[0].shape[0] * args[0].shape[1]
    if name == "addmv":
        return 2 * args[1].shape[0] * args[1].shape[1] + args[1].shape[0]
    if name == "dot" or name == "vdot":
        return 2 * args[0].numel()
    return None


class CostCounter(TorchDispatchMode):
    """Counts bytes, FLOPs and kernel-launching aten ops of whatever runs under it.

    >>> with CostCounter() as c:
    ...     torch.mm(torch.ones(2, 3), torch.ones(3, 4))
    >>> c.flops, c.bytes  # 2*2*3*4 and (6 + 12 + 8) * 4
    (48, 104)
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.flops = 0
        self.launches = 0
        self.aten_ops = 0
        self.per_op: dict[str, dict[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.aten_ops += 1
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)
        flops = _matmul_flops(name, args)
        if flops is None:
            if name in _MOVE_ONLY or name.rstrip("_") in _MOVE_ONLY:
                flops = 0
            else:
                flops = max([t.numel() for t in outs + ins] or [0])
        self.bytes += moved
        self.flops += flops
        self.launches += 1
        rec = self.per_op.setdefault(name, {"calls": 0, "bytes": 0, "flops": 0})
        rec["calls"] += 1
        rec["bytes"] += moved
        rec["flops"] += flops
        return out

    def result(self) -> dict:
        return {
            "bytes": self.bytes,
            "flops": self.flops,
            "launches": self.launches,
            "aten_ops": self.aten_ops,
        }


def count(fn) -> dict:
    """Bytes, FLOPs, launches and aten ops of one call of `fn` (no arguments)."""
    with CostCounter() as c:
        fn()
    return c.result()


def roofline_ms(nbytes: float, flops: float, dtype: str) -> float:
    """H100 roofline time in ms: max(bytes / 3.35 TB/s, flops / peak of `dtype`)."""
    return 1e3 * max(nbytes / H100_BANDWIDTH, flops / H100_PEAK.get(dtype, H100_PEAK["float32"]))


# --------------------------------------------------------------------------- fused formulas

C = 4  # bytes of the fp32 compute dtype (saved A, E, Z, partials, weights cast to it)


def _rational_fused(numel: int, s: int, k: int, n: int, mode: str) -> dict:
    """`_rational_fwd_kernel` reads x, writes y (its k + n coefficient scalars are not counted). Backward:
    `_rational_bwd_kernel` reads g and x, writes dx and per-program partials (cdiv(N, 1024), k + n),
    then two fixed-order sums over the partials and two casts of their (k + n)-element results."""
    nbytes = 2 * numel * s
    flops = numel * (2 * (k - 1) + 2 * (n - 1) + 4)  # Horner P and A, |A|, 1+, divide
    launches = 1
    if mode == "fwd+bwd":
        programs = math.ceil(numel / 1024)
        partial = programs * (k + n) * C
        nbytes += 3 * numel * s + 2 * partial + 4 * (k + n) * 8
        flops += numel * (4 * (k - 1) + 4 * (n - 1) + 10 + 2 * (k + n))
        launches += 5
    return {"bytes": nbytes, "flops": flops, "launches": launches}


L2_BYTES = 50 * 2**20  # H100 L2


def _stream_partials(B: int, S: int, d: int, L: int) -> tuple[int, int]:
    """`(programs, partial bytes)` of one attention-pool stream launch: `B x cdiv(S, chunk)` programs
    (the launchers' `chunk_size`), each writing an `L x d` fp32 partial. The next launch reads them
    back from L2 when they fit in half of it (they are written at the end of the previous launch),
    else from DRAM: `_partials_read` says which."""
    programs = B * math.ceil(S / chunk_size(B, S)) if S else 0
    return programs, programs * L * d * C


def _partials_read(nbytes: int) -> int:
    return 0 if nbytes <= L2_BYTES // 2 else nbytes


def _stream_fwd_bytes(B: int, S: int, d: int, L: int, s: int, f: float, wdp: int) -> int:
    """`stream_fwd`: E filled with -inf, lse with 0; `_attention_pool_fwd_kernel` reads the mask, the
    instruction rows of H (fraction f) once and `wdp` bytes of weights, writes E (B, S, L) fp32 and
    per-program softmax statistics and partial Z (`_stream_partials`);
    `_attention_pool_combine_kernel` reads those, writes Z (B, L, d) and lse (B, L);
    A = exp(E - lse), a subtraction and an exp on (B, S, L)."""
    sl, ld, bl = B * S * L * C, B * L * d * C, B * L * C
    programs, partials = _stream_partials(B, S, d, L)
    stats = programs * 2 * max(16, L) * C
    nbytes = sl + bl  # E = -inf, lse = 0
    nbytes += B * S + f * B * S * d * s + wdp + sl + partials + stats  # stream kernel
    nbytes += _partials_read(partials) + stats + ld + bl  # combine
    return nbytes + (sl + bl + sl) + 2 * sl  # A


def _stream_bwd_bytes(B: int, S: int, d: int, L: int, s: int, f: float, wdp: int) -> int:
    """`stream_bwd`: delta = <Z, gZ> (a product, a float64 sum, a cast);
    `_attention_pool_bwd_kernel` reads the mask, H's instruction rows once, A, gZ, `wdp` bytes of
    weights and delta, writes gH (every row of the padded layout), per-program gWdp partials and
    sums of A gA; the sum over chunks and the delta correction Z (delta - sum A gA), a few
    (B, L, d) and (B, L) ops."""
    sl, ld, bl = B * S * L * C, B * L * d * C, B * L * C
    programs, partials = _stream_partials(B, S, d, L)
    dsum = programs * max(16, L) * C
    nbytes = 3 * ld + 3 * bl  # delta
    nbytes += B * S + f * B * S * d * s + sl + ld + wdp + bl + B * S * d * s + partials + dsum  # kernel
    nbytes += _partials_read(partials) + ld  # sum over chunks
    return nbytes + dsum + 3 * bl + 2 * ld + 3 * ld  # correction


def _pool_fused(B: int, S: int, d: int, r: int, L: int, s: int, f: float, mode: str) -> dict:
    """`attention_pool_fwd`: Wdp = Wd^T Wp^T (mm) and c = Wp bd (mv); E filled with -inf and lse with
    0; `_attention_pool_fwd_kernel` reads the mask and the instruction rows of H (fraction f) once,
    writes E (B, S, L) fp32, per-program softmax statistics and partial Z (`_stream_partials`);
    `_attention_pool_combine_kernel` reads those, writes Z (B, L, d) and lse (B, L); A = exp(E - lse)
    (a subtraction and an exp on (B, S, L)); `mask.any` and its cast give n;
    `baddbmm(n bd, Z, Wd^T)` writes U (B, L, r).

    Backward: gZ = gU Wd (B, L, d) and Wdp^T = Wp Wd as one product [gU; Wp] Wd (a cat, one mm reading
    Wd once, a transposed copy of Wdp); delta = <Z, gZ> (a product and a float64 sum, then a
    cast); `_attention_pool_bwd_kernel` reads the mask, H's instruction rows once, A, gZ, Wdp and
    delta, writes gH (every row of the padded layout) and per-program gWdp partials and sums of
    A gA; the sum over chunks, the delta correction (Z (delta - sum A gA): a few (B, L, d) ops), the
    sum over sequences; gWd = [gU; Wp]^T [Z; gWdp^T] (two cats, one mm), gbd, gWp = (Wd gWdp)^T."""
    ld = B * L * d * C
    wd = r * d * C
    # forward
    nbytes = (wd + L * r * C + d * L * C) + (L * r * C + r * C + L * C)  # Wdp, c
    nbytes += _stream_fwd_bytes(B, S, d, L, s, f, d * L * C)
    nbytes += B * S + B + B + B * C  # mask.any + cast
    nbytes += B * C + r * C + B * r * C  # n * bd
    nbytes += B * r * C + ld + wd + B * L * r * C  # baddbmm
    flops = 2 * d * r * L + 2 * r * L + 4 * B * S * d * L + 6 * B * S * L + 2 * B * L * d + B * S
    flops += B * r + 2 * B * L * d * r + B * L * r
    launches = 12
    if mode == "fwd+bwd":
        gu = B * L * r * C
        nbytes += 2 * (gu + L * r * C)  # cat [gU; Wp]
        nbytes += gu + L * r * C + wd + ld + d * L * C  # [gZ; Wdp^T] = [gU; Wp] Wd
        nbytes += 2 * d * L * C  # Wdp, contiguous
        nbytes += _stream_bwd_bytes(B, S, d, L, s, f, d * L * C)
        nbytes += ld + d * L * C  # sum over sequences
        nbytes += 2 * (gu + L * r * C) + 2 * (ld + d * L * C) + wd  # cats and the gWd mm
        nbytes += gu + B * C + r * C  # gbd
        nbytes += wd + d * L * C + r * L * C  # gWp
        flops += 2 * d * r * L + 2 * B * L * r * d + 2 * B * L * d + 2 * B * S * d * L + 6 * B * S * L * d
        flops += 4 * B * L * d + 2 * (B + 1) * L * r * d + 2 * B * L * r + 2 * r * d * L
        launches += 18
    return {"bytes": nbytes, "flops": flops, "launches": launches}


def _add(*parts: dict) -> dict:
    return {k: sum(p[k] for p in parts) for k in ("bytes", "flops", "launches")}


def _generator_fused(B, S, d, r, L, s, f, k, n, mode):
    """attention_pool, then the rational activation on U (B, L, r) and `F.linear` up to P (B, L, d):
    one addmm reading G and Wu, writing P. Backward of the linear: gG = gP Wu, gWu = gP^T G, gbu = sum."""
    pool = _pool_fused(B, S, d, r, L, s, f, mode)
    act = _rational_fused(B * L * r, C, k, n, mode)
    up = {
        "bytes": B * L * r * C + d * r * C + d * C + B * L * d * s,
        "flops": 2 * B * L * r * d + B * L * d,
        "launches": 1,
    }
    if mode == "fwd+bwd":
        up["bytes"] += (
            (B * L * d * s + d * r * C + B * L * r * C)
            + (B * L * d * s + B * L * r * C + d * r * C)
            + (B * L * d * s + d * C)
        )
        up["flops"] += 4 * B * L * r * d + B * L * d
        up["launches"] += 3
    return _add(pool, act, up)


def _group_launches(T: int, B: int) -> int:
    """Launches of `TenantGroups.build` (torch ops on `(B,)` index tensors), counted by running it."""
    return count(lambda: TenantGroups.build(torch.arange(B) % T, T))["launches"]


def _multi_tenant_fused(T, B, S, d, r, L, s, f, k, n, mode, K=None):
    """`multi_tenant_generator_fwd` (Triton launcher), K = present tenants (tenant of request i is
    i mod T), every request with an adapter. Forward: `TenantGroups.build` (small index ops, counted);
    Wdp_t (K, d, L) by `_multi_tenant_generator_matmul_kernel` reading each present tenant's Wp, Wd once,
    and c_t (gathers + einsum); the attention-pool stream (`_stream_fwd_bytes`, each request with its
    tenant's Wdp); `mask.any` + cast; U = Z Wd_t^T split over d (P = ceil(d / 128) fp32
    partials of U written and read back) and the split-sum kernel adding n bd_t and writing U and
    G = R_t(U); one matmul kernel P = G Wu_t^T + bu_t.

    Backward: gG = gP Wu_t split over d, the split-sum kernel with the rational-backward epilogue (gU,
    per-row coefficient partials) and their fixed-order sums and scatter; gWu, gbu, gWd, gbd, gWp
    allocated in the parameter dtype with only the absent tenants' slices zero-filled; the wgrad
    kernel for gWu, gbu (reads gP, G); the matmul kernel gZ = gU Wd_t; the attention-pool backward
    stream (`_stream_bwd_bytes`: gH and per-request gWdp partials); the wgrad kernel summing the partials per
    tenant; the wgrad kernel for gWd (sum gU^T Z and Wp_t^T gWdp_t^T in one accumulator) and gbd;
    gWp_t = gWdp_t^T Wd_t^T split over d and its split-sum.
    `K` = the number of present tenants (default: round robin, min(T, B))."""
    K = min(T, B) if K is None else K
    P = max(1, -(-d // 128))  # splits of the reductions over d (ops.multi_tenant_generator.split_count)
    mask = B * S
    ld = B * L * d * C
    lr = B * L * r * C
    w = r * d * s  # one tenant's Wd (or Wu) in the parameter dtype
    kdl = K * d * L * C
    nbytes = K * (L * r * s + w) + kdl  # Wdp_t
    nbytes += 2 * K * (L * r * s + r * s) + K * (L * r + r) * C + K * L * C  # gathers + einsum for c_t
    nbytes += _stream_fwd_bytes(B, S, d, L, s, f, kdl)
    nbytes += mask + B + B + B * C  # n
    nbytes += ld + K * w + 2 * P * lr + K * r * s + B * C + 2 * lr  # U partials, split-sum, U and G
    nbytes += lr + K * w + K * d * s + B * L * d * s  # P
    flops = 2 * K * L * r * d + 2 * K * L * r + 4 * B * S * d * L + 5 * B * S * L + B * S
    flops += 2 * B * L * d * r + P * B * L * r + B * L * r * (2 * (k + n) + 4) + 2 * B * L * r * d
    launches = _group_launches(T, B) + 15
    if mode == "fwd+bwd":
        gp = B * L * d * s
        nbytes += gp + K * w + 2 * P * lr + lr + lr  # gG partials, split-sum: gU (+ coefficient partials)
        nbytes += 4 * T * (k + n) * C  # coefficient sums, zero fills, scatters (small)
        nbytes += (T - K) * (d * r + d + r * d + r + L * r) * s  # zero-fill the absent tenants' slices
        nbytes += gp + lr + K * d * r * s + K * d * s  # wgrad gWu, gbu
        nbytes += lr + K * w + ld  # gZ
        nbytes += 4 * ld + _stream_bwd_bytes(B, S, d, L, s, f, kdl)  # Z, gZ rows of the requests; stream
        nbytes += ld + K * L * d * C  # per-tenant sum of the partials
        nbytes += (
            lr + ld + B * C + K * L * r * s + K * L * d * C + K * r * d * s + K * r * s
        )  # wgrad gWd, gbd
        nbytes += K * L * d * C + K * w + 2 * P * K * L * r * C + K * L * r * s  # gWp_t split + split-sum
        flops += 2 * B * L * d * r + P * B * L * r + B * L * r * (4 * (k + n) + 10) + 4 * B * L * d * r
        flops += 2 * B * L * r * d + 2 * B * S * d * L + 6 * B * S * L * d + B * L * d + 4 * K * L * d * r
        launches += 32
    return {"bytes": nbytes, "flops": flops, "launches": launches}


def fused_cost(op: str, params: dict, dtype: torch.dtype, mode: str) -> dict:
    """Bytes, FLOPs and launches of the fused path of `op` (formulas above) at `params`."""
    s = torch.empty((), dtype=dtype).element_size()
    k, n = params.get("degrees", (5, 4))
    k += 1
    if op == "rational":
        return _rational_fused(params["numel"], s, k, n, mode)
    f = params.get("mask_fraction", 0.8)
    B, S, d, r, L = (params[x] for x in ("B", "S", "d", "r", "L"))
    if op == "attention_pool":
        return _pool_fused(B, S, d, r, L, s, f, mode)
    if op == "generator":
        return _generator_fused(B, S, d, r, L, s, f, k, n, mode)
    if op == "multi_tenant_generator":
        present = len({t for t in params.get("tenant_ids", range(B)) if t >= 0})
        return _multi_tenant_fused(params["T"], B, S, d, r, L, s, f, k, n, mode, present)
    raise ValueError(f"no fused cost formula for op {op!r}")


def model_record(op: str, params: dict, dtype: torch.dtype, mode: str, reference: dict) -> dict:
    """The cost-model fields of one (op, shape, dtype, mode): reference (counted) against fused."""
    dt = str(dtype).replace("torch.", "")
    fused = fused_cost(op, params, dtype, mode)
    ref_ms = roofline_ms(reference["bytes"], reference["flops"], dt)
    fused_ms = roofline_ms(fused["bytes"], fused["flops"], dt)
    return {
        "bytes_reference": int(reference["bytes"]),
        "bytes_fused": int(fused["bytes"]),
        "flops_reference": int(reference["flops"]),
        "flops_fused": int(fused["flops"]),
        "launches_reference": int(reference["launches"]),
        "aten_ops_reference": int(reference.get("aten_ops", reference["launches"])),
        "launches_fused": int(fused["launches"]),
        "h100_ms_reference": ref_ms,
        "h100_ms_fused": fused_ms,
        "h100_launch_ms_reference": ref_ms + 1e3 * LAUNCH_OVERHEAD_S * reference["launches"],
        "h100_launch_ms_fused": fused_ms + 1e3 * LAUNCH_OVERHEAD_S * fused["launches"],
        "h100_peak_flops": H100_PEAK.get(dt, H100_PEAK["float32"]),
        "bytes_ratio": fused["bytes"] / reference["bytes"] if reference["bytes"] else None,
    }


# --------------------------------------------------------------------------- reference, counted


def _reference_call(op: str, params: dict, dtype: torch.dtype, mode: str, device: str):
    """A no-argument function running the reference of `op` once at `params` on `device`."""
    k, n = params.get("degrees", (5, 4))
    grad_on = mode == "fwd+bwd"
    if op == "rational":
        num, den = iapt_kernels.rational_init("gelu", (k, n))
        x = torch.empty(params["numel"], device=device, dtype=dtype).normal_()
        a = num.float().to(device).requires_grad_(grad_on)
        b = den.float().to(device).requires_grad_(grad_on)
        x.requires_grad_(grad_on)
        fn, args, out_shape = (lambda x, a, b: reference.rational(x, a, b)), (x, a, b), x.shape
    else:
        B, S, d, r, L = (params[x] for x in ("B", "S", "d", "r", "L"))
        h = torch.empty(B, S, d, device=device, dtype=dtype).normal_().requires_grad_(grad_on)
        mask = torch.rand(B, S, device="cpu").lt(params.get("mask_fraction", 0.8)).to(device)
        if op == "multi_tenant_generator":
            T = params["T"]
            gen = reference.MultiTenantPromptGenerator(T, d, r, L).to(device=device, dtype=dtype)
            ids = params.get("tenant_ids", [b % T for b in range(B)])
            args = (h, mask, torch.tensor(ids, dtype=torch.long, device=device))
            fn, out_shape = gen, (B, L, d)
        else:
            gen = reference.PromptGenerator(d, r, L).to(device=device, dtype=dtype)
            fn = gen if op == "generator" else gen.pooled
            args, out_shape = (h, mask), (B, L, d if op == "generator" else r)
        gen.requires_grad_(grad_on)
    if not grad_on:

        def run():
            with torch.no_grad():
                fn(*args)

        return run
    g = torch.empty(out_shape, device=device, dtype=dtype).normal_()
    return lambda: fn(*args).backward(g)


def reference_cost(op: str, params: dict, dtype: torch.dtype, mode: str) -> dict:
    """Bytes, FLOPs, launches and aten ops of the reference, counted by :class:`CostCounter` over
    one call (forward, or forward and backward). Runs on the meta device (shapes only, no data), or
    on CPU at the real size when the reference needs data (then it takes as long as one call)."""
    try:
        run = _reference_call(op, params, dtype, mode, "meta")
        return count(run)
    except Exception:
        run = _reference_call(op, params, dtype, mode, "cpu")
        return count(run)


def model_rows(specs, dtypes=(torch.float32, torch.bfloat16), progress=None) -> list[dict]:
    """One cost-model record per (op, params) in `specs`, dtype and mode."""
    rows = []
    for op, shape, params in specs:
        for dtype in dtypes:
            for mode in ("fwd", "fwd+bwd"):
                if progress is not None:
                    progress.set_postfix_str(
                        f"model {op} {'x'.join(map(str, shape))} {str(dtype)[6:]} {mode}"
                    )
                ref = reference_cost(op, params, dtype, mode)
                rec = {
                    "op": op,
                    "shape": list(shape),
                    "dtype": str(dtype).replace("torch.", ""),
                    "mode": mode,
                }
                if "mix" in params:
                    rec["params"] = {"mix": params["mix"]}
                rec.update(model_record(op, params, dtype, mode, ref))
                s = torch.empty((), dtype=dtype).element_size()
                unit = (
                    params["numel"] * s if op == "rational" else params["B"] * params["S"] * params["d"] * s
                )
                rec["input_bytes"] = unit
                rows.append(rec)
                if progress is not None:
                    progress.update()
    return rows
