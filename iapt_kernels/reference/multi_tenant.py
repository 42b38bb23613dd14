"""Reference multi-tenant prompt generator (docs/design.md section 1, "Multi-tenant"): `T` tenants' generators
stacked along a leading tenant axis, applied by looping over the tenants present in a batch with the
single-tenant reference (attention_pool, rational, up-projection) on each tenant's sub-batch.

Request `b` of tenant `t = tenant_ids[b]` gets `P_b` of tenant `t`'s generator; `t = -1` means no
adapter: its prompt row is 0 and, when writing into `hidden_states`, its positions are left untouched.
A gated generator (``gate (T,)``) multiplies each row by its tenant's gate after the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import REFERENCE_BACKENDS, check_backend, check_multi_tenant_inputs, check_slot_index
from ..tenants import TenantGroups
from .attention_pool import attention_pool
from .generator import PromptGenerator
from .rational import rational

__all__ = ["MultiTenantPromptGenerator", "multi_tenant_generator", "select_requests", "request_rows"]


def request_rows(mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, index: torch.Tensor):
    """Where the requests `index` (a 1-D long tensor) live: `(rows, mask, cu_seqlens)`, with `rows`
    indexing dimension 0 of `hidden_states`. Padded: the requests themselves and their mask rows.
    Packed: their token rows back to back, with their own offsets."""
    if cu_seqlens is None:
        return index, mask.index_select(0, index), None
    starts, ends = cu_seqlens[:-1].long()[index], cu_seqlens[1:].long()[index]
    rows = torch.cat(
        [torch.arange(s, e, device=index.device) for s, e in zip(starts.tolist(), ends.tolist())]
        + [torch.zeros(0, dtype=torch.long, device=index.device)]
    )
    sub_cu = torch.cat([cu_seqlens.new_zeros(1), torch.cumsum(ends - starts, 0).to(cu_seqlens.dtype)])
    return rows, None, sub_cu


def select_requests(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    index: torch.Tensor,
):
    """The sub-batch of requests `index`: `(hidden_states, mask, cu_seqlens)` in the caller's layout."""
    rows, sub_mask, sub_cu = request_rows(mask, cu_seqlens, index)
    return hidden_states.index_select(0, rows), sub_mask, sub_cu


def multi_tenant_generator(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    groups: TenantGroups,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    pool_weight: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    *,
    version: str = "B",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``P (B, L, d)`` of stacked generators (as :func:`iapt_kernels.functional.multi_tenant_generator`):
    each present tenant's sub-batch through the single-tenant reference; rows of tenant -1 are 0."""
    _, d, _, L = check_multi_tenant_inputs(
        hidden_states,
        mask,
        cu_seqlens,
        groups.num_tenants,
        groups.batch_size,
        down_weight,
        down_bias,
        pool_weight,
        numerator,
        denominator,
        up_weight,
        up_bias,
        version,
    )
    out = hidden_states.new_zeros((groups.batch_size, L, d))
    for t, index in groups.segments():
        h, m, cu = select_requests(hidden_states, mask, cu_seqlens, index)
        u = attention_pool(h, m, down_weight[t], down_bias[t], pool_weight[t], cu_seqlens=cu)
        g = rational(u, numerator[t], denominator[t], version=version)
        out = out.index_copy(0, index, F.linear(g, up_weight[t], up_bias[t]))
    return out


class _Stacked(nn.Module):
    """A holder of stacked parameters, so state_dict keys read `down.weight`, `act.numerator`, ..."""

    def __init__(self, **params: torch.Tensor) -> None:
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))


class MultiTenantPromptGenerator(nn.Module):
    """``T`` tenants' soft-prompt generators for one layer, applied to a batch that mixes tenants
    (reference implementation: a loop over the tenants present, each through the single-tenant
    reference).

    Args:
        num_tenants: ``T``. hidden_size: ``d``. bottleneck_size: ``r``. num_tokens: ``L``.
        degrees, activation_init, version: of each tenant's rational activation.
        backend: accepted for signature parity with :class:`iapt_kernels.MultiTenantPromptGenerator`;
            must be ``"auto"`` or ``"reference"`` here.
        gate_init: ``None`` (no gate) or each tenant's initial gate, as in
            :class:`iapt_kernels.reference.PromptGenerator`.

    Parameters, stacked on a leading tenant axis: ``down.weight (T, r, d)``, ``down.bias (T, r)``,
    ``pool.weight (T, L, r)``, ``act.numerator (T, m+1)``, ``act.denominator (T, n)``,
    ``up.weight (T, d, r)``, ``up.bias (T, d)``, and ``gate (T,)`` when gated (applied to each row
    by its tenant, after the kernel). Each tenant starts as a fresh
    :class:`iapt_kernels.reference.PromptGenerator` would.
    """

    def __init__(
        self,
        num_tenants: int,
        hidden_size: int,
        bottleneck_size: int,
        num_tokens: int = 4,
        degrees: tuple[int, int] = (5, 4),
        activation_init: str = "gelu",
        version: str = "B",
        backend: str = "auto",
        gate_init: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_tenants, int) or isinstance(num_tenants, bool) or num_tenants < 1:
            raise ValueError(f"num_tenants must be a positive int, got {num_tenants!r}")
        self.backend = self._check_backend(backend)
        gens = [
            PromptGenerator(
                hidden_size,
                bottleneck_size,
                num_tokens,
                degrees,
                activation_init,
                version,
                gate_init=gate_init,
            )
            for _ in range(num_tenants)
        ]
        self._adopt(gens)

    def _adopt(self, gens) -> None:
        first = gens[0]
        self.num_tenants = len(gens)
        self.hidden_size, self.bottleneck_size, self.num_tokens = (
            first.hidden_size,
            first.bottleneck_size,
            first.num_tokens,
        )
        self.degrees, self.version, self.activation_init = (
            first.act.degrees,
            first.act.version,
            first.act.init,
        )

        def stack(get):
            return torch.stack([get(g).detach() for g in gens]).clone()

        self.down = _Stacked(weight=stack(lambda g: g.down.weight), bias=stack(lambda g: g.down.bias))
        self.pool = _Stacked(weight=stack(lambda g: g.pool.weight))
        self.act = _Stacked(
            numerator=stack(lambda g: g.act.numerator[0]), denominator=stack(lambda g: g.act.denominator[0])
        )
        self.up = _Stacked(weight=stack(lambda g: g.up.weight), bias=stack(lambda g: g.up.bias))
        gated = first.gate is not None
        self.register_parameter("gate", nn.Parameter(stack(lambda g: g.gate[0])) if gated else None)

    @staticmethod
    def _check_backend(backend: str) -> str:
        check_backend(backend, REFERENCE_BACKENDS, "reference.MultiTenantPromptGenerator")
        return "reference"

    # ----------------------------------------------------------------- conversions

    @classmethod
    def from_generators(cls, generators, backend: str = "auto") -> "MultiTenantPromptGenerator":
        """Stack a list of single-tenant :class:`PromptGenerator` (all of one configuration, with one
        activation group, all gated or none) into a multi-tenant generator; tenant ``t`` is
        ``generators[t]``, exactly."""
        generators = list(generators)
        if not generators:
            raise ValueError("from_generators needs at least one generator")
        first = generators[0]
        for i, g in enumerate(generators):
            if not isinstance(g, PromptGenerator):
                raise TypeError(f"generators[{i}] is a {type(g).__name__}, not a PromptGenerator")
            same = (g.hidden_size, g.bottleneck_size, g.num_tokens, g.act.degrees, g.act.version) == (
                first.hidden_size,
                first.bottleneck_size,
                first.num_tokens,
                first.act.degrees,
                first.act.version,
            )
            if not same:
                raise ValueError(f"generators[{i}] differs in configuration from generators[0]")
            if (g.gate is None) != (first.gate is None):
                raise ValueError(
                    f"generators[{i}] is {'un' if g.gate is None else ''}gated and generators[0] is "
                    f"{'un' if first.gate is None else ''}gated: stack generators that all have a gate "
                    "(gate_init) or none"
                )
            if g.act.numerator.shape[0] != 1:
                raise ValueError(f"generators[{i}] has a grouped activation; only groups=1 can be stacked")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.backend = cls._check_backend(backend)
        self._adopt(generators)
        ref = first.down.weight
        return self.to(device=ref.device, dtype=ref.dtype)

    def generator(self, tenant: int):
        """Tenant ``tenant`` as a single-tenant ``PromptGenerator`` (a copy, exactly equal)."""
        if not 0 <= tenant < self.num_tenants:
            raise ValueError(f"tenant must be in [0, {self.num_tenants}), got {tenant}")
        gen = self._single_cls()(
            self.hidden_size,
            self.bottleneck_size,
            self.num_tokens,
            self.degrees,
            self.activation_init,
            self.version,
            backend=self.backend,
            gate_init=None if self.gate is None else 0.0,  # the value is copied below
        )
        gen = gen.to(device=self.down.weight.device, dtype=self.down.weight.dtype)
        with torch.no_grad():
            for name, p in gen.named_parameters():
                stacked = self.get_parameter(name)[tenant]
                p.copy_(stacked.reshape(p.shape))
        return gen

    @staticmethod
    def _single_cls():
        return PromptGenerator

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        tenant_ids: torch.Tensor | None = None,
        *,
        slot_index: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        groups: TenantGroups | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Prompts of each request's tenant.

        Args:
            hidden_states: padded ``(B, S, d)`` with ``mask (B, S)`` bool, or packed ``(N, d)`` with
                ``cu_seqlens (B+1,)`` int32 and ``mask=None`` (as :func:`iapt_kernels.attention_pool`).
            tenant_ids: ``(B,)`` integer in ``[-1, T)``; ``-1`` = no adapter. May be omitted when
                ``groups`` is given.
            slot_index: optional ``(B, L)`` long positions (padded layout): each request's prompts are
                written into ``hidden_states`` there, in place, and ``hidden_states`` is returned; rows
                of tenant ``-1`` are left untouched. Positions must lie in ``[0, S)``, be distinct within
                a row and not on an instruction token. (In-place writing is for inference: under autograd, use the returned
                prompts out of place, since the generator saves ``hidden_states`` for its backward.)
            groups: the batch's :class:`TenantGroups` (``TenantGroups.build(tenant_ids, T)``), to build
                the grouping once and reuse it across layers.
            max_seqlen: with ``cu_seqlens``, the longest sequence's length or more: the fused
                modules then read nothing back from the device (as :func:`iapt_kernels.attention_pool`).

        Returns:
            ``P (B, L, d)`` (rows of tenant ``-1`` are 0), or ``hidden_states`` when ``slot_index`` is given.
        """
        if groups is None:
            if tenant_ids is None:
                raise ValueError(
                    "pass tenant_ids (B,) or a prebuilt groups=TenantGroups.build(tenant_ids, T)"
                )
            groups = TenantGroups.build(tenant_ids, self.num_tenants)  # the one check of the ids
        else:
            if groups.num_tenants != self.num_tenants:
                raise ValueError(
                    f"groups were built for {groups.num_tenants} tenants, the generator has "
                    f"{self.num_tenants}"
                )
            if tenant_ids is not None and not torch.equal(tenant_ids.long(), groups.tenant_ids):
                raise ValueError("tenant_ids disagree with the tenant_ids the groups were built from")
        if slot_index is not None and cu_seqlens is not None:
            raise ValueError(
                "slot_index writes into padded (B, S, d) hidden_states; the packed layout "
                "has no slot positions"
            )
        # Validates the inputs against the weights and the groups (batch size) before any kernel runs.
        prompts = self._prompts(hidden_states, mask, cu_seqlens, groups, max_seqlen)
        if self.gate is not None:
            prompts = prompts * self._row_gates(groups.tenant_ids)[:, None, None]
        if slot_index is None:
            return prompts
        check_slot_index(
            slot_index, mask, groups.batch_size, hidden_states.shape[1], self.num_tokens, hidden_states.device
        )
        active = groups.order.long()
        with torch.no_grad() if not hidden_states.requires_grad else torch.enable_grad():
            hidden_states.index_put_(
                (active[:, None], slot_index[active]), prompts[active].to(hidden_states.dtype)
            )
        return hidden_states

    def _row_gates(self, tenant_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)``: each row's tenant's gate, 0 for tenant -1 (whose prompt rows are 0 already)."""
        tid = tenant_ids.long()
        return torch.where(tid >= 0, self.gate.index_select(0, tid.clamp(min=0)), 0.0)

    def _stacked_weights(self) -> tuple[torch.Tensor, ...]:
        return (
            self.down.weight,
            self.down.bias,
            self.pool.weight,
            self.act.numerator,
            self.act.denominator,
            self.up.weight,
            self.up.bias,
        )

    def _prompts(
        self, hidden_states, mask, cu_seqlens, groups: TenantGroups, max_seqlen=None
    ) -> torch.Tensor:
        """``P (B, L, d)``: each present tenant's sub-batch through the single-tenant reference
        (which reads the lengths from ``cu_seqlens`` and ignores ``max_seqlen``)."""
        return multi_tenant_generator(
            hidden_states, mask, groups, *self._stacked_weights(), version=self.version, cu_seqlens=cu_seqlens
        )

    def extra_repr(self) -> str:
        return (
            f"num_tenants={self.num_tenants}, hidden_size={self.hidden_size}, "
            f"bottleneck_size={self.bottleneck_size}, num_tokens={self.num_tokens}, backend={self.backend!r}, "
            f"gated={self.gate is not None}"
        )
