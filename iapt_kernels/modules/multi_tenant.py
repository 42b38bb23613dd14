"""Drop-in multi-tenant prompt generator on the fused kernels: same constructor, parameter names and
state_dict as `iapt_kernels.reference.MultiTenantPromptGenerator`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ..functional import rational
from ..ops.attention_pool import AttentionPoolFunction
from ..ops.multi_tenant_generator import MAX_TOKENS, MultiTenantGeneratorFunction, TenantGroups
from ..reference.multi_tenant import MultiTenantPromptGenerator as _ReferenceMultiTenant
from ..reference.multi_tenant import request_rows
from .generator import PromptGenerator

__all__ = ["MultiTenantPromptGenerator", "TenantGroups"]


def _max_seqlen(hidden_states, cu_seqlens) -> int:
    if cu_seqlens is None:
        return hidden_states.shape[1]
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


class MultiTenantPromptGenerator(_ReferenceMultiTenant):
    """``T`` tenants' soft-prompt generators for one layer, one batch mixing tenants (DESIGN.md
    section 1, "Multi-tenant"), on the fused kernels.

    ``backend="triton"`` (CUDA tensors, the default there) runs every tenant in one set of launches:
    requests grouped by tenant (:class:`TenantGroups`, built once per batch and reusable by every
    layer), each present tenant's weights read in place once, per-tenant rational coefficients, and
    a deterministic backward into the stacked parameters. ``backend="cpp"`` (CPU tensors) runs the
    C++ single-tenant kernels on each present tenant's sub-batch. ``"reference"`` loops in plain
    PyTorch. Constructor, parameters, state_dict and ``forward`` are those of
    :class:`iapt_kernels.reference.MultiTenantPromptGenerator`; ``from_generators`` stacks
    :class:`iapt_kernels.PromptGenerator` modules and ``generator(t)`` returns one.
    """

    @staticmethod
    def _check_backend(backend: str) -> str:
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        return backend

    @staticmethod
    def _single_cls():
        return PromptGenerator

    def _prompts(self, hidden_states, mask, cu_seqlens, groups: TenantGroups) -> torch.Tensor:
        which = _backend.resolve_backend(self.backend, hidden_states.device)
        if which == "reference":
            return super()._prompts(hidden_states, mask, cu_seqlens, groups)
        if which == "cpp":
            return self._prompts_per_tenant(hidden_states, mask, cu_seqlens, groups)
        if self.num_tokens > MAX_TOKENS:
            raise ValueError(f"the fused generator supports up to {MAX_TOKENS} soft tokens, got L={self.num_tokens}")
        return MultiTenantGeneratorFunction.apply(
            hidden_states, mask, cu_seqlens, groups, self.down.weight, self.down.bias, self.pool.weight,
            self.act.numerator, self.act.denominator, self.up.weight, self.up.bias, self.version,
            _max_seqlen(hidden_states, cu_seqlens), which)

    def _prompts_per_tenant(self, hidden_states, mask, cu_seqlens, groups):
        # unbind (not indexing) so the backward stacks each parameter's gradient once, zeros for the
        # tenants absent from the batch; one split of the batch so gH is assembled once.
        wd, bd, wp = self.down.weight.unbind(0), self.down.bias.unbind(0), self.pool.weight.unbind(0)
        num, den = self.act.numerator.unbind(0), self.act.denominator.unbind(0)
        wu, bu = self.up.weight.unbind(0), self.up.bias.unbind(0)
        segments = groups.segments()
        where = [request_rows(mask, cu_seqlens, index) for _, index in segments]
        parts = _SplitRows.apply(hidden_states, *(rows for rows, _, _ in where)) if segments else ()
        # The activation and up-projection of the few (L, r) rows run in at least fp32, as the fused
        # Triton path does, so half-precision inputs round U once rather than U, G and P each.
        out = hidden_states.new_zeros((groups.batch_size, self.num_tokens, self.hidden_size))
        for (t, index), (_, m, cu), h in zip(segments, where, parts):
            u = AttentionPoolFunction.apply(h, m, cu, wd[t], bd[t], wp[t], _max_seqlen(h, cu), "cpp", True)[0]
            g = rational(u, num[t], den[t], version=self.version, backend="cpp")
            p = F.linear(g, wu[t].to(u.dtype), bu[t].to(u.dtype))
            out = out.index_copy(0, index, p.to(out.dtype))
        return out


class _SplitRows(torch.autograd.Function):
    """`x.index_select(0, rows_k)` for several disjoint `rows_k` at once. Its backward writes every
    part's gradient into one zero-filled tensor (separate index_selects would each allocate a
    full-size gradient and autograd would sum them: T passes over gH instead of one)."""

    @staticmethod
    def forward(ctx, x, *rows):
        ctx.save_for_backward(*rows)
        ctx.shape = x.shape
        return tuple(x.index_select(0, r) for r in rows)

    @staticmethod
    def backward(ctx, *grads):
        rows = ctx.saved_tensors
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return (None,) * (1 + len(rows))
        gx = ref.new_zeros(ctx.shape)
        for r, g in zip(rows, grads):
            if g is not None:
                gx.index_copy_(0, r, g)
        return (gx, *(None,) * len(rows))
