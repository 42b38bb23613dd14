"""Drop-in soft-prompt generator on the fused kernels: same constructor, parameter names and
state_dict as `iapt_kernels.reference.PromptGenerator`."""

from __future__ import annotations

import torch

from .._validate import check_backend
from ..functional import attention_pool
from ..reference.generator import PromptGenerator as _ReferencePromptGenerator
from .rational import Rational

__all__ = ["PromptGenerator"]


class PromptGenerator(_ReferencePromptGenerator):
    """IAPT soft-prompt generator on the fused kernels (docs/design.md sections 1 and 3).

    Composes :func:`iapt_kernels.attention_pool` (never forms the ``(B, S, r)`` down-projection),
    :class:`iapt_kernels.Rational` and the up-projection. Constructor, parameters and state_dict are
    those of :class:`iapt_kernels.reference.PromptGenerator`; ``backend`` is ``"auto"``,
    ``"triton"``, ``"cpp"`` or ``"reference"``.
    """

    _activation_cls = Rational

    _check_backend = staticmethod(check_backend)

    def pooled(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        return attention_pool(
            hidden_states,
            mask,
            self.down.weight,
            self.down.bias,
            self.pool.weight,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=self.backend,
        )
