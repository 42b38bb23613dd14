"""`torch.library` custom ops, namespace `iapt`: one op name per kernel, dispatched on the device.

Each op is declared once (its schema is the Python signature below) and registered by `_register`:
CUDA tensors run the Triton launcher; CPU tensors run the C++ kernel, or the Triton launcher in the
interpreter when the caller resolved `backend="triton"` (tests do, to check the Triton code on CPU);
a fake implementation lets `torch.compile` trace through. The backend itself is resolved once, in
`functional` (`_backend.resolve_backend`); the ops only read the resolved name. No op has an autograd
of its own: the `<Op>Function` classes in `ops/` pair the forward and backward ops.
"""

from __future__ import annotations

import torch

from . import _backend
from .ops import attention_pool as _attention_pool
from .ops import multi_tenant_generator as _multi_tenant
from .ops import rational as _rational
from .ops.utils import compute_dtype


def _cpp(name: str):
    """The C++ kernel `name` of the extension, or an error saying why it is missing."""
    if not _backend.HAS_CPP:
        raise RuntimeError(f"the C++ extension is not available: {_backend.CPP_ERROR}")
    return getattr(_backend._C, name)


def _register(op, *, triton, cpp, fake, backend_at: int = -1) -> None:
    """Register `op`'s CPU, CUDA and fake implementations. `triton`, `cpp` and `fake` take the op's
    arguments without `backend` (the argument at `backend_at`): CUDA runs `triton`, CPU runs `cpp` or,
    for `backend="triton"`, `triton` in the interpreter."""

    def split(args):
        args = list(args)
        return args.pop(backend_at), args

    def cpu(*args):
        backend, rest = split(args)
        if backend == "triton":
            return triton(*rest)
        if backend != "cpp":
            raise ValueError(f"iapt ops run backend 'triton' or 'cpp' on CPU tensors, got {backend!r}")
        return cpp(*rest)

    op.register_kernel("cpu")(cpu)
    op.register_kernel("cuda")(lambda *args: triton(*split(args)[1]))
    op.register_fake(lambda *args: fake(*split(args)[1]))


# --------------------------------------------------------------------------- rational


@torch.library.custom_op("iapt::rational_fwd", mutates_args=())
def rational_fwd(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, version: str, backend: str
) -> torch.Tensor:
    """Rational activation forward; see `iapt_kernels.ops.rational` for the formula."""
    raise NotImplementedError(f"iapt::rational_fwd has no kernel for device {x.device}")


@torch.library.custom_op("iapt::rational_bwd", mutates_args=())
def rational_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    version: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rational activation backward: `(dx, dnumerator, ddenominator)`."""
    raise NotImplementedError(f"iapt::rational_bwd has no kernel for device {x.device}")


# The C++ kernels take `version_b: bool`; the launchers want contiguous inputs.
_register(
    rational_fwd,
    triton=lambda x, num, den, version: _rational.rational_fwd(x.contiguous(), num, den, version),
    cpp=lambda x, num, den, version: _cpp("rational_fwd")(x.contiguous(), num, den, version == "B"),
    fake=lambda x, num, den, version: x.new_empty(x.shape),
)
_register(
    rational_bwd,
    triton=lambda g, x, num, den, version: _rational.rational_bwd(
        g.contiguous(), x.contiguous(), num, den, version
    ),
    cpp=lambda g, x, num, den, version: tuple(
        _cpp("rational_bwd")(g.contiguous(), x.contiguous(), num, den, version == "B")
    ),
    fake=lambda g, x, num, den, version: (x.new_empty(x.shape), torch.empty_like(num), torch.empty_like(den)),
)


# --------------------------------------------------------------------------- attention_pool


@torch.library.custom_op("iapt::attention_pool_fwd", mutates_args=())
def attention_pool_fwd(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    pool_weight: torch.Tensor,
    max_seqlen: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention pooling forward: `(U, A, Z, n)`; see `iapt_kernels.ops.attention_pool`."""
    raise NotImplementedError(f"iapt::attention_pool_fwd has no kernel for device {hidden_states.device}")


@torch.library.custom_op("iapt::attention_pool_bwd", mutates_args=())
def attention_pool_bwd(
    grad: torch.Tensor,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    down_weight: torch.Tensor,
    pool_weight: torch.Tensor,
    weights: torch.Tensor,
    pooled_inputs: torch.Tensor,
    nonempty: torch.Tensor,
    max_seqlen: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention pooling backward: `(g_hidden_states, g_down_weight, g_down_bias, g_pool_weight)`."""
    raise NotImplementedError(f"iapt::attention_pool_bwd has no kernel for device {hidden_states.device}")


def _attention_pool_fwd_fake(h, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen):
    cdt = compute_dtype(h)
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else h.shape[0]
    S = max_seqlen if cu_seqlens is not None else h.shape[1]
    L, r = pool_weight.shape
    d = down_weight.shape[1]
    new = h.new_empty
    return new((B, L, r)), new((B, S, L), dtype=cdt), new((B, L, d), dtype=cdt), new((B,), dtype=cdt)


def _attention_pool_bwd_fake(grad, h, mask, cu_seqlens, down_weight, pool_weight, *saved_and_max_seqlen):
    return (
        h.new_empty(h.shape),
        torch.empty_like(down_weight),
        down_weight.new_empty(down_weight.shape[0]),
        torch.empty_like(pool_weight),
    )


_register(
    attention_pool_fwd,
    triton=_attention_pool.attention_pool_fwd,
    cpp=lambda *args: tuple(_cpp("attention_pool_fwd")(*args)),
    fake=_attention_pool_fwd_fake,
)
# The Triton launcher computes gWp transposed; the op returns every gradient contiguous, as the fake says
# (a copy of L x r elements).
_register(
    attention_pool_bwd,
    triton=lambda *args: tuple(t.contiguous() for t in _attention_pool.attention_pool_bwd(*args)),
    cpp=lambda *args: tuple(_cpp("attention_pool_bwd")(*args)),
    fake=_attention_pool_bwd_fake,
)


# --------------------------------------------------------------------------- multi_tenant_generator
# CPU tensors run the one-pass C++ kernels (csrc/multi_tenant.cpp), or Triton in the interpreter.


@torch.library.custom_op("iapt::multi_tenant_generator_fwd", mutates_args=())
def multi_tenant_generator_fwd(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    order: torch.Tensor,
    seg_start: torch.Tensor,
    seg_tenant: torch.Tensor,
    wsel: torch.Tensor,
    unit: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    pool_weight: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    version: str,
    max_seqlen: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-tenant generator forward: `(P, A, Z, U, G, n, Wdp)`; see `iapt_kernels.ops.multi_tenant_generator`."""
    raise NotImplementedError(
        f"iapt::multi_tenant_generator_fwd has no kernel for device {hidden_states.device}"
    )


@torch.library.custom_op("iapt::multi_tenant_generator_bwd", mutates_args=())
def multi_tenant_generator_bwd(
    grad: torch.Tensor,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    order: torch.Tensor,
    seg_start: torch.Tensor,
    seg_tenant: torch.Tensor,
    wsel: torch.Tensor,
    unit: torch.Tensor,
    down_weight: torch.Tensor,
    pool_weight: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    up_weight: torch.Tensor,
    weights: torch.Tensor,
    pooled_inputs: torch.Tensor,
    pooled: torch.Tensor,
    activated: torch.Tensor,
    nonempty: torch.Tensor,
    pool_product: torch.Tensor,
    version: str,
    max_seqlen: int,
    backend: str,
    absent: torch.Tensor | None = None,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Multi-tenant generator backward: `(gH, gWd, gbd, gWp, gnum, gden, gWu, gbu)`, the weight gradients
    in their weights' dtypes (`gnum`, `gden` in the compute dtype); `absent` (TenantGroups.absent), the
    tenants whose gradient slices are only zero-filled."""
    raise NotImplementedError(
        f"iapt::multi_tenant_generator_bwd has no kernel for device {hidden_states.device}"
    )


def _multi_tenant_fwd_cpp(
    h,
    mask,
    cu_seqlens,
    order,
    seg_start,
    seg_tenant,
    wsel,
    unit,
    down_weight,
    down_bias,
    pool_weight,
    numerator,
    denominator,
    up_weight,
    up_bias,
    version,
    max_seqlen,
):
    # The C++ pass walks `order` by segment itself: `wsel` and `unit` are the Triton launch lists.
    return tuple(
        _cpp("multi_tenant_generator_fwd")(
            h,
            mask,
            cu_seqlens,
            order,
            seg_start,
            seg_tenant,
            down_weight,
            down_bias,
            pool_weight,
            numerator,
            denominator,
            up_weight,
            up_bias,
            version == "B",
            max_seqlen,
        )
    )


def _multi_tenant_bwd_cpp(
    grad,
    h,
    mask,
    cu_seqlens,
    order,
    seg_start,
    seg_tenant,
    wsel,
    unit,
    down_weight,
    pool_weight,
    numerator,
    denominator,
    up_weight,
    a,
    z,
    u,
    g,
    n,
    wdp,
    version,
    max_seqlen,
    absent=None,
):
    gh, gwd, gbd, gwp, gnum, gden, gwu, gbu = _cpp("multi_tenant_generator_bwd")(
        grad,
        h,
        mask,
        cu_seqlens,
        order,
        seg_start,
        seg_tenant,
        down_weight,
        pool_weight,
        numerator,
        denominator,
        up_weight,
        a,
        z,
        u,
        g,
        n,
        wdp,
        version == "B",
        max_seqlen,
    )
    wdt, pdt, udt = down_weight.dtype, pool_weight.dtype, up_weight.dtype
    return gh, gwd.to(wdt), gbd.to(wdt), gwp.to(pdt), gnum, gden, gwu.to(udt), gbu.to(udt)


def _multi_tenant_fwd_fake(
    h,
    mask,
    cu_seqlens,
    order,
    seg_start,
    seg_tenant,
    wsel,
    unit,
    down_weight,
    down_bias,
    pool_weight,
    numerator,
    denominator,
    up_weight,
    up_bias,
    version,
    max_seqlen,
):
    cdt = compute_dtype(h)
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else h.shape[0]
    S = max_seqlen if cu_seqlens is not None else h.shape[1]
    T, r, d = down_weight.shape
    L = pool_weight.shape[1]
    K = seg_tenant.shape[0]
    new = h.new_empty
    return (
        new((B, L, d)),
        new((B, S, L), dtype=cdt),
        new((B, L, d), dtype=cdt),
        new((B, L, r), dtype=cdt),
        new((B, L, r), dtype=cdt),
        new((B,), dtype=cdt),
        new((K, d, L), dtype=cdt),
    )


def _multi_tenant_bwd_fake(
    grad,
    h,
    mask,
    cu_seqlens,
    order,
    seg_start,
    seg_tenant,
    wsel,
    unit,
    down_weight,
    pool_weight,
    numerator,
    denominator,
    up_weight,
    *saved_and_meta,
):
    T, r, d = down_weight.shape
    L = pool_weight.shape[1]
    wd, wp, wu = down_weight.new_empty, pool_weight.new_empty, up_weight.new_empty
    return (
        h.new_empty(h.shape),
        wd((T, r, d)),
        wd((T, r)),
        wp((T, L, r)),
        torch.empty_like(numerator),
        torch.empty_like(denominator),
        wu((T, d, r)),
        wu((T, d)),
    )


_register(
    multi_tenant_generator_fwd,
    triton=_multi_tenant.multi_tenant_generator_fwd,
    cpp=_multi_tenant_fwd_cpp,
    fake=_multi_tenant_fwd_fake,
)
# `backend` is the last required argument; `absent` (optional) follows it.
_register(
    multi_tenant_generator_bwd,
    triton=_multi_tenant.multi_tenant_generator_bwd,
    cpp=_multi_tenant_bwd_cpp,
    fake=_multi_tenant_bwd_fake,
    backend_at=22,
)
