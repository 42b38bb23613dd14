"""Drop-in multi-tenant prompt generator on the fused kernels: same constructor, parameter names and
state_dict as `iapt_kernels.reference.MultiTenantPromptGenerator`."""

from __future__ import annotations

import torch

from .. import _backend
from ..ops.multi_tenant_generator import MAX_TOKENS, MultiTenantGeneratorFunction, TenantGroups
from ..reference.multi_tenant import MultiTenantPromptGenerator as _ReferenceMultiTenant
from .generator import PromptGenerator

__all__ = ["MultiTenantPromptGenerator", "TenantGroups"]


def _max_seqlen(hidden_states, cu_seqlens) -> int:
    if cu_seqlens is None:
        return hidden_states.shape[1]
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


class MultiTenantPromptGenerator(_ReferenceMultiTenant):
    """``T`` tenants' soft-prompt generators for one layer, one batch mixing tenants (docs/design.md
    section 1, "Multi-tenant"), on the fused kernels.

    ``backend="triton"`` (CUDA tensors, the default there) runs every tenant in one set of launches:
    requests grouped by tenant (:class:`TenantGroups`, built once per batch and reusable by every
    layer), each present tenant's weights read in place once, per-tenant rational coefficients, and
    a deterministic backward into the stacked parameters. ``backend="cpp"`` (CPU tensors) runs the
    C++ kernels in one pass over the batch for all tenants, each request with its tenant's weights
    read in place. ``"reference"`` loops in plain PyTorch. Constructor, parameters, state_dict and
    ``forward`` are those of :class:`iapt_kernels.reference.MultiTenantPromptGenerator`; ``from_generators`` stacks
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
        if which == "triton" and self.num_tokens > MAX_TOKENS:
            raise ValueError(f"the fused generator supports up to {MAX_TOKENS} soft tokens, got L={self.num_tokens}")
        return MultiTenantGeneratorFunction.apply(
            hidden_states, mask, cu_seqlens, groups, self.down.weight, self.down.bias, self.pool.weight,
            self.act.numerator, self.act.denominator, self.up.weight, self.up.bias, self.version,
            _max_seqlen(hidden_states, cu_seqlens), which)
