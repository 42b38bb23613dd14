"""The `iapt::` ops: one contract per kernel pair, no backend in it (docs/design.md section 4).

Each op is declared once, in `iapt_kernels/schemas.py`, which the C++ extension compiles in
(csrc/registration.cpp: `TORCH_LIBRARY(iapt)` with the C++ kernels as the CPU implementations); where
the extension is not built, this module defines the same schemas from the same file. Here each op
gets, once:

- its fake (shapes and dtypes, for `torch.compile` and `opcheck`);
- for a forward op, its autograd formula (`torch.library.register_autograd`: `setup_context` saves
  what the backward op needs, and the backward calls it), so `torch.ops.iapt.<op>_fwd` is
  differentiable by itself;
- its CUDA implementation, the Triton launcher of `ops/`, when Triton imports.

The device picks the kernel: CPU tensors run C++, CUDA tensors Triton. Running the Triton launchers
on CPU tensors (the interpreter, ``TRITON_INTERPRET=1``) is the tests' business: `triton_on_cpu`
registers them as the CPU kernels for the duration of a `with` block, and `_backend` knows it.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import _backend
from ._contract import compute_dtype
from .schemas import SCHEMAS

__all__ = ["OPS", "triton_on_cpu"]

# The names of the iapt:: ops, in the order of schemas.py.
OPS = tuple(schema.split("(", 1)[0] for schema in SCHEMAS)

if not _backend.HAS_CPP:
    _DEF = torch.library.Library("iapt", "DEF")
    for _schema in SCHEMAS:
        _DEF.define(_schema)

    def _no_cpu_kernel(name):
        def kernel(*args):
            raise RuntimeError(
                f"iapt::{name} has no kernel here: CPU tensors run the C++ extension, which is not "
                f"available ({_backend.CPP_ERROR}); use backend='reference' or build the extension"
            )

        return kernel

    # Under CompositeExplicitAutograd, not CPU: the CPU key stays free for `triton_on_cpu`, which
    # torch.library versions before 2.13 would refuse to override from Python.
    for _name in OPS:
        _DEF.impl(_name, _no_cpu_kernel(_name), "CompositeExplicitAutograd")


def _op(name: str):
    return getattr(torch.ops.iapt, name).default


# --------------------------------------------------------------------------- fakes


def _rational_fwd_fake(x, num, den, version):
    return x.new_empty(x.shape)


def _rational_bwd_fake(grad, x, num, den, version):
    return x.new_empty(x.shape), torch.empty_like(num), torch.empty_like(den)


def _attention_pool_fwd_fake(h, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen):
    cdt = compute_dtype(h)
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else h.shape[0]
    S = max_seqlen if cu_seqlens is not None else h.shape[1]
    L, r = pool_weight.shape
    d = down_weight.shape[1]
    new = h.new_empty
    return new((B, L, r)), new((B, S, L), dtype=cdt), new((B, L, d), dtype=cdt), new((B,), dtype=cdt)


def _attention_pool_bwd_fake(grad, h, mask, cu_seqlens, down_weight, pool_weight, a, z, n, max_seqlen):
    return (
        h.new_empty(h.shape),
        torch.empty_like(down_weight),
        down_weight.new_empty(down_weight.shape[0]),
        torch.empty_like(pool_weight),
    )


def _multi_tenant_fwd_fake(h, mask, cu_seqlens, groups, weights, version, max_seqlen):
    cdt = compute_dtype(h)
    B = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else h.shape[0]
    S = max_seqlen if cu_seqlens is not None else h.shape[1]
    down_weight, pool_weight = weights[0], weights[2]
    T, r, d = down_weight.shape
    L = pool_weight.shape[1]
    K = groups[2].shape[0]
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


def _multi_tenant_bwd_fake(grad, h, mask, cu_seqlens, groups, weights, saved, version, max_seqlen):
    wd, wp, num, den, wu = weights
    T, r, d = wd.shape
    L = wp.shape[1]
    return (
        h.new_empty(h.shape),
        wd.new_empty((T, r, d)),
        wd.new_empty((T, r)),
        wp.new_empty((T, L, r)),
        torch.empty_like(num),
        torch.empty_like(den),
        wu.new_empty((T, d, r)),
        wu.new_empty((T, d)),
    )


# --------------------------------------------------------------------------- autograd
# `setup_context` saves what the backward op reads; the saved forward outputs (A, Z, ...) are not
# differentiable. Inputs without a gradient (masks, offsets, groups, strings, ints) get None.


def _rational_setup(ctx, inputs, output):
    x, num, den, version = inputs
    ctx.save_for_backward(x, num, den)
    ctx.version = version


def _rational_backward(ctx, grad):
    x, num, den = ctx.saved_tensors
    dx, dnum, dden = _op("rational_bwd")(grad.contiguous(), x, num, den, ctx.version)
    return dx, dnum, dden, None


def _attention_pool_setup(ctx, inputs, output):
    h, mask, cu_seqlens, down_weight, down_bias, pool_weight, max_seqlen = inputs
    _, a, z, n = output
    ctx.save_for_backward(h, mask, cu_seqlens, down_weight, pool_weight, a, z, n)
    ctx.max_seqlen = max_seqlen
    ctx.mark_non_differentiable(a, z, n)


def _attention_pool_backward(ctx, gu, _ga, _gz, _gn):
    h, mask, cu_seqlens, down_weight, pool_weight, a, z, n = ctx.saved_tensors
    gh, gwd, gbd, gwp = _op("attention_pool_bwd")(
        gu.contiguous(), h, mask, cu_seqlens, down_weight, pool_weight, a, z, n, ctx.max_seqlen
    )
    return gh, None, None, gwd, gbd, gwp, None


def _multi_tenant_setup(ctx, inputs, output):
    h, mask, cu_seqlens, groups, weights, version, max_seqlen = inputs
    wd, bd, wp, num, den, wu, bu = weights
    saved = output[1:]
    ctx.save_for_backward(h, mask, cu_seqlens, wd, wp, num, den, wu, *saved, *groups)
    ctx.meta = (version, max_seqlen, len(saved))
    ctx.mark_non_differentiable(*saved)


def _multi_tenant_backward(ctx, gp, *_saved_grads):
    version, max_seqlen, num_saved = ctx.meta
    h, mask, cu_seqlens, *rest = ctx.saved_tensors
    weights, saved, groups = rest[:5], rest[5 : 5 + num_saved], rest[5 + num_saved :]
    gh, gwd, gbd, gwp, gnum, gden, gwu, gbu = _op("multi_tenant_generator_bwd")(
        gp.contiguous(), h, mask, cu_seqlens, groups, weights, saved, version, max_seqlen
    )
    no_grads = [None] * len(groups)  # a list input takes a list of gradients, one per tensor
    return gh, None, None, no_grads, [gwd, gbd, gwp, gnum, gden, gwu, gbu], None, None


_FAKES = {
    "rational_fwd": _rational_fwd_fake,
    "rational_bwd": _rational_bwd_fake,
    "attention_pool_fwd": _attention_pool_fwd_fake,
    "attention_pool_bwd": _attention_pool_bwd_fake,
    "multi_tenant_generator_fwd": _multi_tenant_fwd_fake,
    "multi_tenant_generator_bwd": _multi_tenant_bwd_fake,
}
_AUTOGRAD = {
    "rational_fwd": (_rational_backward, _rational_setup),
    "attention_pool_fwd": (_attention_pool_backward, _attention_pool_setup),
    "multi_tenant_generator_fwd": (_multi_tenant_backward, _multi_tenant_setup),
}
assert set(_FAKES) == set(OPS), "every op in schemas.py needs a fake here"

for _name in OPS:
    torch.library.register_fake(f"iapt::{_name}", _FAKES[_name])
for _name, (_backward, _setup) in _AUTOGRAD.items():
    torch.library.register_autograd(f"iapt::{_name}", _backward, setup_context=_setup)

# --------------------------------------------------------------------------- Triton launchers
# op name -> its Triton launcher, taking the op's arguments; empty where Triton does not import.

_TRITON = {}
if _backend.HAS_TRITON:
    from .ops import attention_pool as _ap
    from .ops import multi_tenant_generator as _mt
    from .ops import rational as _ra

    _TRITON = {
        "rational_fwd": lambda x, num, den, version: _ra.rational_fwd(x.contiguous(), num, den, version),
        "rational_bwd": lambda g, x, num, den, version: _ra.rational_bwd(
            g.contiguous(), x.contiguous(), num, den, version
        ),
        "attention_pool_fwd": _ap.attention_pool_fwd,
        # The launcher computes gWp transposed; the op returns every gradient contiguous, as the
        # fake says (a copy of L x r elements).
        "attention_pool_bwd": lambda *args: tuple(t.contiguous() for t in _ap.attention_pool_bwd(*args)),
        "multi_tenant_generator_fwd": _mt.multi_tenant_generator_fwd,
        "multi_tenant_generator_bwd": _mt.multi_tenant_generator_bwd,
    }
_IMPL = torch.library.Library("iapt", "IMPL")
for _name, _launcher in _TRITON.items():
    _IMPL.impl(_name, _launcher, "CUDA")


@contextlib.contextmanager
def triton_on_cpu():
    """Inside the block, the Triton launchers are the CPU kernels of every `iapt::` op (they run in
    Triton's interpreter, so ``TRITON_INTERPRET=1`` must be set before the package is imported), and
    ``backend="triton"`` accepts CPU tensors; on exit the C++ kernels are back. A test route: it
    checks the Triton code on machines without a GPU."""
    if not _backend.HAS_TRITON:
        raise RuntimeError(f"triton_on_cpu needs Triton, which failed to import ({_backend.TRITON_ERROR})")
    if not _backend.triton_interpreted():
        raise RuntimeError("triton_on_cpu needs TRITON_INTERPRET=1 set before iapt_kernels is imported")
    if _backend.cpu_route() == "triton":  # nested: the outer block holds the registration
        yield
        return
    lib = torch.library.Library("iapt", "IMPL")
    try:
        with warnings.catch_warnings():
            # The override is the point; the C++ kernels come back when `lib` is destroyed.
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for name, launcher in _TRITON.items():
                lib.impl(name, launcher, "CPU")
        _backend._set_cpu_route("triton")
        yield
    finally:
        _backend._set_cpu_route(None)
        lib._destroy()
