"""What the Triton ops share: the compute dtype and the rational polynomial by Horner
(docs/design.md sections 2 and 5). One copy, so the rational op and the multi-tenant generator's
fused epilogue cannot drift apart.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._contract import compute_dtype

__all__ = ["compute_dtype", "rational_pq", "rational_terms"]


# Coefficients are read as `tl.load(a + j)`: `a` is a scalar pointer (one coefficient row for the
# whole tile, the rational op) or a `[rows, 1]` block of pointers (a row per tile row, the
# multi-tenant generator, whose rows belong to different tenants). UNROLL: the degrees are constexpr
# and the chains unroll (the rational op specialises per degree); otherwise they are runtime values
# and one compiled kernel serves every degree.


@triton.jit
def _step(p, x, c):
    return p * x + c


@triton.jit
def rational_pq(x, a, b, m, n, VERSION_B: tl.constexpr, UNROLL: tl.constexpr):
    """`P(x)` and `Q(x)`: the forward."""
    p = tl.zeros_like(x) + tl.load(a + m)
    if VERSION_B:
        s = tl.zeros_like(x) + tl.load(b + n - 1)  # A(x) / x
    else:
        ax = tl.where(x < 0, -x, x)
        s = tl.zeros_like(x) + tl.abs(tl.load(b + n - 1))
    if UNROLL:
        for i in tl.static_range(m):
            p = _step(p, x, tl.load(a + (m - 1 - i)))
        for i in tl.static_range(n - 1):
            if VERSION_B:
                s = _step(s, x, tl.load(b + (n - 2 - i)))
            else:
                s = _step(s, ax, tl.abs(tl.load(b + (n - 2 - i))))
    else:
        for i in range(m):
            p = _step(p, x, tl.load(a + (m - 1 - i)))
        for i in range(n - 1):
            if VERSION_B:
                s = _step(s, x, tl.load(b + (n - 2 - i)))
            else:
                s = _step(s, ax, tl.abs(tl.load(b + (n - 2 - i))))
    if VERSION_B:
        big_a = s * x
        q = 1.0 + tl.where(big_a < 0, -big_a, big_a)
    else:
        q = 1.0 + s * ax
    return p, q


@triton.jit
def rational_terms(x, a, b, m, n, VERSION_B: tl.constexpr, UNROLL: tl.constexpr):
    """`P`, `P'`, `Q`, `Q'`, and for the denominator gradients `sgn` and the power base: `sgn(A)`
    and `x` (version B, `db_k` uses `sgn(A) x^k`) or `sgn(x)` and `|x|` (version A, `sgn(b_k) |x|^k`)."""
    if VERSION_B:
        base = x
    else:
        base = tl.where(x < 0, -x, x)
    p = tl.zeros_like(x) + tl.load(a + m)
    dp = tl.zeros_like(x)
    if VERSION_B:
        s = tl.zeros_like(x) + tl.load(b + n - 1)  # S = A / x,  A' = S + x S'
    else:
        s = tl.zeros_like(x) + tl.abs(tl.load(b + n - 1))
    ds = tl.zeros_like(x)
    if UNROLL:
        for i in tl.static_range(m):
            dp = _step(dp, x, p)
            p = _step(p, x, tl.load(a + (m - 1 - i)))
        for i in tl.static_range(n - 1):
            ds = _step(ds, base, s)
            if VERSION_B:
                s = _step(s, base, tl.load(b + (n - 2 - i)))
            else:
                s = _step(s, base, tl.abs(tl.load(b + (n - 2 - i))))
    else:
        for i in range(m):
            dp = _step(dp, x, p)
            p = _step(p, x, tl.load(a + (m - 1 - i)))
        for i in range(n - 1):
            ds = _step(ds, base, s)
            if VERSION_B:
                s = _step(s, base, tl.load(b + (n - 2 - i)))
            else:
                s = _step(s, base, tl.abs(tl.load(b + (n - 2 - i))))
    if VERSION_B:
        big_a = s * x
        sgn = tl.where(big_a < 0, -1.0, 1.0).to(x.dtype)
        q = 1.0 + big_a * sgn
    else:
        sgn = tl.where(x < 0, -1.0, 1.0).to(x.dtype)
        q = 1.0 + s * base
    dq = sgn * (s + base * ds)
    return p, dp, q, dq, sgn, base
