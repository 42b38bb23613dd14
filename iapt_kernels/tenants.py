"""Batch metadata for the multi-tenant generator: the requests of a batch grouped by tenant
(docs/design.md section 8.1). Plain PyTorch, no Triton: the reference, the C++ and the Triton paths
all consume it, so it sits below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import check_tenant_ids

__all__ = ["TenantGroups"]


@dataclass(frozen=True)
class TenantGroups:
    """Requests grouped by tenant, computed once per batch and reusable by every layer.

    Build it with :meth:`TenantGroups.build`. Fields (all on the device of ``tenant_ids``):
    ``tenant_ids (B,)`` int64 as given; ``order (B_a,)`` int32, the requests with an adapter, grouped
    by tenant in increasing tenant order and in batch order within a tenant; ``seg_start (K+1,)``
    int32 offsets of the ``K`` present tenants' segments in ``order``; ``seg_tenant (K,)`` int32;
    ``wsel (B_a,)`` int32, the segment of each entry of ``order``; ``unit (K+1,)`` int32 ``0..K``;
    ``absent (T-K,)`` int64, the tenants with no request (their gradient slices are zero-filled;
    ``None`` when built by hand: the whole gradient is then zero-filled).
    """

    num_tenants: int
    tenant_ids: torch.Tensor
    order: torch.Tensor
    seg_start: torch.Tensor
    seg_tenant: torch.Tensor
    wsel: torch.Tensor
    unit: torch.Tensor
    absent: torch.Tensor | None = None

    @classmethod
    def build(cls, tenant_ids: torch.Tensor, num_tenants: int) -> "TenantGroups":
        """Group a batch by tenant. ``tenant_ids (B,)`` integer, each in ``[-1, num_tenants)``;
        ``-1`` = no adapter. Raises ``TypeError`` for non-integer ids, ``ValueError`` naming an id out
        of range. One host synchronisation (the number of present tenants)."""
        check_tenant_ids(tenant_ids, num_tenants)
        return cls.from_valid_ids(tenant_ids, num_tenants)

    @classmethod
    def from_valid_ids(cls, tenant_ids: torch.Tensor, num_tenants: int) -> "TenantGroups":
        """:meth:`build` without the id check, for a caller that has checked the ids already (the
        Hugging Face integration checks them in-graph, where compiled code can see the check)."""
        ids = tenant_ids.long()
        device = ids.device
        active = ids >= 0
        # Stable sort: within a tenant, requests keep their batch order (a fixed reduction order).
        key = torch.where(active, ids, num_tenants)
        order = torch.sort(key, stable=True).indices
        counts = torch.bincount(ids[active], minlength=num_tenants)
        present = torch.nonzero(counts).flatten()
        sizes = counts[present]
        order = order[: int(sizes.sum())]
        seg_start = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
        k = present.numel()
        wsel = torch.repeat_interleave(torch.arange(k, device=device), sizes)
        i32 = torch.int32
        return cls(
            num_tenants,
            ids,
            order.to(i32),
            seg_start.to(i32),
            present.to(i32),
            wsel.to(i32),
            torch.arange(k + 1, device=device, dtype=i32),
            torch.nonzero(counts == 0).flatten(),
        )

    @property
    def num_present(self) -> int:
        """``K``: the number of tenants with at least one request in the batch."""
        return self.seg_tenant.numel()

    @property
    def batch_size(self) -> int:
        return self.tenant_ids.numel()

    def segments(self):
        """``(tenant, request indices)`` per present tenant, on the host (for the CPU path)."""
        bounds = self.seg_start.tolist()
        order = self.order.long()
        return [(t, order[bounds[k] : bounds[k + 1]]) for k, t in enumerate(self.seg_tenant.tolist())]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The ``groups`` argument of the ``iapt::multi_tenant_generator`` ops: ``(order, seg_start,
        seg_tenant, wsel, unit)``, and ``absent`` after them when it is known."""
        fields = (self.order, self.seg_start, self.seg_tenant, self.wsel, self.unit)
        return fields if self.absent is None else (*fields, self.absent)
