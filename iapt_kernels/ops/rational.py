"""Rational activation (Padé Activation Unit): Triton forward and backward.

    y = P(x) / Q(x),            P(x) = a_0 + a_1 x + ... + a_m x^m
    version B:  Q = 1 + |A|,    A(x) = b_1 x + ... + b_n x^n
    version A:  Q = 1 + |b_1||x| + ... + |b_n||x|^n

    dx   = g (P'/Q - P Q'/Q^2)      Q' = sgn(A) A'  (B)   or   sgn(x) sum_k k |b_k| |x|^(k-1)  (A)
    da_j = sum g x^j / Q
    db_k = sum -g P/Q^2 sgn(A) x^k  (B)   or   sum -g P/Q^2 sgn(b_k) |x|^k  (A)

with `sgn(u) = -1 if u < 0 else +1` and `g` the upstream gradient. The last dimension `C` of `x` is
split into `G` contiguous chunks of `chunk = C / G`; chunk `g` uses coefficient row `g`.

Grid: `(cdiv(N / G, BLOCK), G)`. Program `(p, g)` walks the `N / G` elements of group `g` in order, so
its coefficients are scalars loaded once. With `G = 1` the walk is the flat contiguous tensor, which
lets the compiler emit 128-bit loads and stores. Coefficient gradients are reduced in each program
(fp32, or fp64 for float64 inputs) and written as per-program partials, summed in a fixed order
afterwards: no atomics, so the backward is bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import rational_pq, rational_terms

FWD_BLOCK, FWD_WARPS = 1024, 4
BWD_BLOCK, BWD_WARPS = 1024, 4


@triton.jit
def _group_offsets(pid, g, per_group, C, chunk, BLOCK: tl.constexpr, GROUPED: tl.constexpr):
    # int64: `pid * BLOCK` overflows int32 past 2^31 elements.
    t = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = t < per_group
    if GROUPED:
        offs = (t // chunk) * C + g * chunk + t % chunk
    else:
        offs = t
    return offs, mask


@triton.jit
def _rational_fwd_kernel(
    x_ptr, y_ptr, num_ptr, den_ptr,
    per_group, C, chunk,
    M: tl.constexpr, N: tl.constexpr, VERSION_B: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs, mask = _group_offsets(pid, g, per_group, C, chunk, BLOCK, GROUPED)
    cdt = num_ptr.dtype.element_ty  # fp32, or fp64 for float64 inputs
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(cdt)
    a = num_ptr + g * (M + 1)
    b = den_ptr + g * N
    p, q = rational_pq(x, a, b, M, N, VERSION_B, True)
    tl.store(y_ptr + offs, (p / q).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rational_bwd_kernel(
    grad_ptr, x_ptr, dx_ptr, num_ptr, den_ptr, partial_ptr,
    per_group, C, chunk, num_programs,
    M: tl.constexpr, N: tl.constexpr, VERSION_B: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs, mask = _group_offsets(pid, g, per_group, C, chunk, BLOCK, GROUPED)
    cdt = num_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(cdt)
    # Masked lanes carry gradient 0, so they add nothing to the coefficient sums below.
    go = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(cdt)
    a = num_ptr + g * (M + 1)
    b = den_ptr + g * N

    p, dp, q, dq, sgn, base = rational_terms(x, a, b, M, N, VERSION_B, True)

    rq = 1.0 / q
    r = p * rq
    dx = go * rq * (dp - r * dq)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # Per-program partial sums, laid out (G, num_programs, M + 1 + N).
    out = partial_ptr + (g * num_programs + pid).to(tl.int64) * (M + 1 + N)
    w = go * rq
    xp = tl.zeros_like(x) + 1.0
    for j in tl.static_range(M + 1):
        tl.store(out + j, tl.sum(w * xp, axis=0))
        xp = xp * x
    if VERSION_B:
        wb = -(w * r) * sgn
    else:
        wb = -(w * r)
    bp = base
    for k in tl.static_range(N):
        part = tl.sum(wb * bp, axis=0)
        if not VERSION_B:
            part = part * tl.where(tl.load(b + k) < 0, -1.0, 1.0).to(cdt)
        tl.store(out + M + 1 + k, part)
        bp = bp * base


# --------------------------------------------------------------------------- launchers


def _geometry(x: torch.Tensor, groups: int) -> tuple[int, int, int]:
    """`(per_group, C, chunk)` for contiguous `x` split into `groups` chunks of its last dim."""
    C = x.shape[-1] if x.dim() > 0 else 1
    chunk = C // groups
    return x.numel() // groups, C, chunk


def rational_fwd(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, version: str
) -> torch.Tensor:
    """Triton forward. `x` contiguous; coefficients `(G, m+1)`, `(G, n)` contiguous in the compute
    dtype (float64 for float64 `x`, else float32). Returns `y` like `x`."""
    groups, k = numerator.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    per_group, C, chunk = _geometry(x, groups)
    grid = (triton.cdiv(per_group, FWD_BLOCK), groups)
    _rational_fwd_kernel[grid](
        x, y, numerator, denominator, per_group, C, chunk,
        M=k - 1, N=denominator.shape[1], VERSION_B=version == "B", GROUPED=groups > 1,
        BLOCK=FWD_BLOCK, num_warps=FWD_WARPS,
    )
    return y


def rational_bwd(
    grad: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, version: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: `(dx like x, dnumerator (G, m+1), ddenominator (G, n))`, the coefficient
    gradients in the compute dtype. `grad` and `x` contiguous."""
    groups, k = numerator.shape
    n = denominator.shape[1]
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros_like(numerator), torch.zeros_like(denominator)
    per_group, C, chunk = _geometry(x, groups)
    num_programs = triton.cdiv(per_group, BWD_BLOCK)
    partials = torch.empty((groups, num_programs, k + n), dtype=numerator.dtype, device=x.device)
    _rational_bwd_kernel[(num_programs, groups)](
        grad, x, dx, numerator, denominator, partials, per_group, C, chunk, num_programs,
        M=k - 1, N=n, VERSION_B=version == "B", GROUPED=groups > 1,
        BLOCK=BWD_BLOCK, num_warps=BWD_WARPS,
    )
    # Partials summed in float64, in a fixed order (torch.sum over a fixed shape uses no atomics).
    dnum = partials[:, :, :k].sum(dim=1, dtype=torch.float64).to(numerator.dtype)
    dden = partials[:, :, k:].sum(dim=1, dtype=torch.float64).to(numerator.dtype)
    return dx, dnum, dden


# --------------------------------------------------------------------------- launch configurations


def launch_configs():
    """Every (kernel, specialisation) the launchers above can launch, for the static GPU report.

    Yields dicts: `kernel` (the JIT function), `name`, `pointers` (pointer argument -> element type),
    `constexprs`, `num_warps`, and `config` (a JSON-friendly description).
    """
    io_types = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp64": "fp64"}
    for io, io_ty in io_types.items():
        cdt = "fp64" if io == "fp64" else "fp32"
        for m in range(1, 9):
            for n in range(1, 9):
                for version_b in (True, False):
                    for grouped in (False, True):
                        common = dict(M=m, N=n, VERSION_B=version_b, GROUPED=grouped)
                        label = dict(dtype=io, degrees=[m, n], version="B" if version_b else "A",
                                     grouped=grouped)
                        yield dict(
                            kernel=_rational_fwd_kernel, name="_rational_fwd_kernel",
                            pointers=dict(x_ptr=io_ty, y_ptr=io_ty, num_ptr=cdt, den_ptr=cdt),
                            constexprs=dict(common, BLOCK=FWD_BLOCK), num_warps=FWD_WARPS,
                            config=dict(label, BLOCK=FWD_BLOCK, num_warps=FWD_WARPS),
                        )
                        yield dict(
                            kernel=_rational_bwd_kernel, name="_rational_bwd_kernel",
                            pointers=dict(grad_ptr=io_ty, x_ptr=io_ty, dx_ptr=io_ty, num_ptr=cdt,
                                          den_ptr=cdt, partial_ptr=cdt),
                            constexprs=dict(common, BLOCK=BWD_BLOCK), num_warps=BWD_WARPS,
                            config=dict(label, BLOCK=BWD_BLOCK, num_warps=BWD_WARPS),
                        )
