"""`torch.library` custom ops, namespace `iapt`: one op name per kernel, dispatched on the device.

CUDA tensors run the Triton launchers. CPU tensors run the C++ kernels, or the Triton launchers in the
interpreter when the caller asks for `backend="triton"` (tests do, to check the Triton code on CPU).
Each op has a fake implementation so `torch.compile` can trace through it, and no autograd of its own:
the `<Op>Function` classes in `ops/` pair the forward and backward ops.
"""

from __future__ import annotations

import torch

from . import _backend
from .ops import attention_pool as _attention_pool
from .ops import multi_tenant_generator as _multi_tenant
from .ops import rational as _rational


def _cpu_or_triton(backend: str, triton_fn, cpp_name: str):
    if backend == "triton":
        return triton_fn
    if backend != "cpp":
        raise ValueError(f"iapt ops run backend 'triton' or 'cpp', got {backend!r}")
    if not _backend.HAS_CPP:
        raise RuntimeError(f"the C++ extension is not available: {_backend.CPP_ERROR}")
    return getattr(_backend._C, cpp_name)


# --------------------------------------------------------------------------- rational


@torch.library.custom_op("iapt::rational_fwd", mutates_args=())
def rational_fwd(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, version: str, backend: str
) -> torch.Tensor:
    """Rational activation forward; see `iapt_kernels.ops.rational` for the formula."""
    raise NotImplementedError(f"iapt::rational_fwd has no kernel for device {x.device}")


@rational_fwd.register_kernel("cpu")
def _(x, numerator, denominator, version, backend):
    fn = _cpu_or_triton(backend, _rational.rational_fwd, "rational_fwd")
    if backend == "cpp":
        return fn(x.contiguous(), numerator, denominator, version == "B")
    return fn(x.contiguous(), numerator, denominator, version)


@rational_fwd.register_kernel("cuda")
def _(x, numerator, denominator, version, backend):
    return _rational.rational_fwd(x.contiguous(), numerator, denominator, version)


@rational_fwd.register_fake
def _(x, numerator, denominator, version, backend):
    return x.new_empty(x.shape)


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


@rational_bwd.register_kernel("cpu")
def _(grad, x, numerator, denominator, version, backend):
    fn = _cpu_or_triton(backend, _rational.rational_bwd, "rational_bwd")
    if backend == "cpp":
        return tuple(fn(grad.contiguous(), x.contiguous(), numerator, denominator, version == "B"))
    return fn(grad.contiguous(), x.contiguous(), numerator, denominator, version)


@rational_bwd.register_kernel("cuda")
def _(grad, x, numerator, denominator, version, backend):
    return _rational.rational_bwd(grad.contiguous(), x.contiguous(), numerator, denominator, version)


@rational_bwd.register_fake
def _(grad, x, numerator, denominator, version, backend):
    return x.new_empty(x.shape), torch.empty_like(numerator), torch.empty_like(denominator)


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


@attention_pool_fwd.register_kernel("cpu")
def _(hidden_states, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen, backend):
    fn = _cpu_or_triton(backend, _attention_pool.attention_pool_fwd, "attention_pool_fwd")
    return tuple(fn(hidden_states, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen))


@attention_pool_fwd.register_kernel("cuda")
def _(hidden_states, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen, backend):
    return _attention_pool.attention_pool_fwd(
        hidden_states, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen)


@attention_pool_fwd.register_fake
def _(hidden_states, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen, backend):
    cdt = _attention_pool.compute_dtype(hidden_states)
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else hidden_states.shape[0]
    S = max_seqlen if cu_seqlens is not None else hidden_states.shape[1]
    L, r = pool_weight.shape
    d = down_weight.shape[1]
    new = hidden_states.new_empty
    return new((B, L, r)), new((B, S, L), dtype=cdt), new((B, L, d), dtype=cdt), new((B,), dtype=cdt)


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


@attention_pool_bwd.register_kernel("cpu")
def _(grad, hidden_states, mask, cu_seqlens, down_weight, pool_weight, weights, pooled_inputs, nonempty,
      max_seqlen, backend):
    fn = _cpu_or_triton(backend, _attention_pool.attention_pool_bwd, "attention_pool_bwd")
    return tuple(fn(grad, hidden_states, mask, cu_seqlens, down_weight, pool_weight, weights, pooled_inputs,
                    nonempty, max_seqlen))


@attention_pool_bwd.register_kernel("cuda")
def _(grad, hidden_states, mask, cu_seqlens, down_weight, pool_weight, weights, pooled_inputs, nonempty,
      max_seqlen, backend):
    return _attention_pool.attention_pool_bwd(
        grad, hidden_states, mask, cu_seqlens, down_weight, pool_weight, weights, pooled_inputs, nonempty,
        max_seqlen)


@attention_pool_bwd.register_fake
def _(grad, hidden_states, mask, cu_seqlens, down_weight, pool_weight, weights, pooled_inputs, nonempty,
      max_seqlen, backend):
    return (hidden_states.new_empty(hidden_states.shape), torch.empty_like(down_weight),
            down_weight.new_empty(down_weight.shape[0]), torch.empty_like(pool_weight))


# --------------------------------------------------------------------------- multi_tenant_generator
# CPU tensors run the one-pass C++ kernels (csrc/multi_tenant.cpp), or Triton in the interpreter.


def _multi_tenant_cpp(backend: str, device: torch.device, name: str):
    """The C++ kernel `name` for CPU tensors with backend "cpp"; None where Triton runs."""
    if device.type != "cpu" or backend == "triton":
        return None
    return _cpu_or_triton(backend, None, name)


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
    cpp = _multi_tenant_cpp(backend, hidden_states.device, "multi_tenant_generator_fwd")
    if cpp is not None:
        return tuple(cpp(hidden_states, mask, cu_seqlens, order, seg_start, seg_tenant, down_weight, down_bias,
                         pool_weight, numerator, denominator, up_weight, up_bias, version == "B", max_seqlen))
    return _multi_tenant.multi_tenant_generator_fwd(
        hidden_states, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit, down_weight, down_bias,
        pool_weight, numerator, denominator, up_weight, up_bias, version, max_seqlen)


@multi_tenant_generator_fwd.register_fake
def _(hidden_states, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit, down_weight, down_bias,
      pool_weight, numerator, denominator, up_weight, up_bias, version, max_seqlen, backend):
    cdt = _multi_tenant.compute_dtype(hidden_states)
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else hidden_states.shape[0]
    S = max_seqlen if cu_seqlens is not None else hidden_states.shape[1]
    T, r, d = down_weight.shape
    L = pool_weight.shape[1]
    K = seg_tenant.shape[0]
    new = hidden_states.new_empty
    return (new((B, L, d)), new((B, S, L), dtype=cdt), new((B, L, d), dtype=cdt), new((B, L, r), dtype=cdt),
            new((B, L, r), dtype=cdt), new((B,), dtype=cdt), new((K, d, L), dtype=cdt))


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Multi-tenant generator backward: `(gH, gWd, gbd, gWp, gnum, gden, gWu, gbu)`, the weight gradients
    in their weights' dtypes (`gnum`, `gden` in the compute dtype); `absent` (TenantGroups.absent), the
    tenants whose gradient slices are only zero-filled."""
    cpp = _multi_tenant_cpp(backend, hidden_states.device, "multi_tenant_generator_bwd")
    if cpp is not None:
        gh, gwd, gbd, gwp, gnum, gden, gwu, gbu = cpp(
            grad, hidden_states, mask, cu_seqlens, order, seg_start, seg_tenant, down_weight, pool_weight,
            numerator, denominator, up_weight, weights, pooled_inputs, pooled, activated, nonempty, pool_product,
            version == "B", max_seqlen)
        wdt, pdt, udt = down_weight.dtype, pool_weight.dtype, up_weight.dtype
        return gh, gwd.to(wdt), gbd.to(wdt), gwp.to(pdt), gnum, gden, gwu.to(udt), gbu.to(udt)
    return _multi_tenant.multi_tenant_generator_bwd(
        grad, hidden_states, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit, down_weight,
        pool_weight, numerator, denominator, up_weight, weights, pooled_inputs, pooled, activated, nonempty,
        pool_product, version, max_seqlen, absent)


@multi_tenant_generator_bwd.register_fake
def _(grad, hidden_states, mask, cu_seqlens, order, seg_start, seg_tenant, wsel, unit, down_weight,
      pool_weight, numerator, denominator, up_weight, weights, pooled_inputs, pooled, activated, nonempty,
      pool_product, version, max_seqlen, backend, absent=None):
    T, r, d = down_weight.shape
    L = pool_weight.shape[1]
    wd, wp, wu = down_weight.new_empty, pool_weight.new_empty, up_weight.new_empty
    return (hidden_states.new_empty(hidden_states.shape), wd((T, r, d)), wd((T, r)), wp((T, L, r)),
            torch.empty_like(numerator), torch.empty_like(denominator), wu((T, d, r)), wu((T, d)))
