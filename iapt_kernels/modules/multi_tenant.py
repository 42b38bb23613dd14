"""Drop-in multi-tenant prompt generator on the fused kernels: same constructor, parameter names and
state_dict as `iapt_kernels.reference.MultiTenantPromptGenerator`."""

from __future__ import annotations

import torch

from .._validate import check_backend
from ..functional import multi_tenant_generator
from ..reference.multi_tenant import MultiTenantPromptGenerator as _ReferenceMultiTenant
from ..tenants import TenantGroups
from .generator import PromptGenerator

__all__ = ["MultiTenantPromptGenerator", "TenantGroups"]


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

    _check_backend = staticmethod(check_backend)

    @staticmethod
    def _single_cls():
        return PromptGenerator

    def _prompts(
        self, hidden_states, mask, cu_seqlens, groups: TenantGroups, max_seqlen=None
    ) -> torch.Tensor:
        return multi_tenant_generator(
            hidden_states,
            mask,
            groups,
            *self._stacked_weights(),
            version=self.version,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=self.backend,
        )
