"""Public functional API, one entry per op: validate once, resolve the backend once, run.

The fused backends call the `iapt::` ops (`iapt_kernels.library`), which are differentiable by
themselves and pick their kernel by device; here the inputs get the layout the op contract wants
(coefficients in the compute dtype, contiguous weights), so autograd maps the gradients back.
The modules (`iapt_kernels.modules`) hold parameters and call these; nothing else picks a backend.
"""

from __future__ import annotations

import torch

from . import _backend
from . import library as _library  # noqa: F401  (registers the iapt:: ops called below)
from . import reference as _reference
from ._contract import MAX_TOKENS, compute_dtype
from ._validate import (
    check_attention_pool_inputs,
    check_max_seqlen,
    check_multi_tenant_inputs,
    check_rational_inputs,
)
from .tenants import TenantGroups

__all__ = ["rational", "attention_pool", "multi_tenant_generator"]


def _max_seqlen(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> int:
    """The kernels' `S`: the padded length, the caller's `max_seqlen`, or the longest packed sequence
    read from `cu_seqlens` (a device-to-host copy: the one a caller avoids by passing `max_seqlen`)."""
    if cu_seqlens is None:
        return hidden_states.shape[1]
    if max_seqlen is not None:
        if not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be an int >= 0, got {max_seqlen!r}")
        if cu_seqlens.device.type == "cpu":  # free to check here; on a GPU the kernels check it
            check_max_seqlen(cu_seqlens, max_seqlen)
        return max_seqlen
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def rational(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    *,
    version: str = "B",
    backend: str = "auto",
) -> torch.Tensor:
    """Learned rational activation ``R(x) = P(x) / Q(x)`` (docs/design.md section 2).

    Args:
        x: input of any shape, float16 / bfloat16 / float32 / float64.
        numerator: ``(G, m+1)`` or ``(m+1,)`` coefficients ``a_0..a_m``, ``m`` in 1..8.
        denominator: ``(G, n)`` or ``(n,)`` coefficients ``b_1..b_n``, ``n`` in 1..8.
            ``G`` groups split the last dimension of ``x`` into equal contiguous chunks.
        version: ``"B"``: ``Q = 1 + |sum_k b_k x^k|``; ``"A"``: ``Q = 1 + sum_k |b_k||x|^k``.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU when built, else reference), ``"triton"``,
            ``"cpp"`` or ``"reference"``.

    Returns:
        ``R(x)`` with the shape and dtype of ``x``, differentiable in ``x``, ``numerator`` and
        ``denominator``. Kernels compute in float32 (float64 for float64 ``x``); coefficient
        gradients come back in the coefficients' dtype.
    """
    check_rational_inputs(x, numerator, denominator, version)
    which = _backend.resolve_backend(backend, x.device)
    if which == "reference":
        return _reference.rational(x, numerator, denominator, version=version)
    cdt = compute_dtype(x)
    num = (numerator.unsqueeze(0) if numerator.dim() == 1 else numerator).to(cdt).contiguous()
    den = (denominator.unsqueeze(0) if denominator.dim() == 1 else denominator).to(cdt).contiguous()
    return torch.ops.iapt.rational_fwd(x.contiguous(), num, den, version)


def attention_pool(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    pool_weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention pooling of instruction tokens into ``L`` bottleneck vectors (docs/design.md section 1).

    ``U = A^T (H Wd^T + bd)`` with ``A = softmax over S of ((H Wd^T + bd) Wp^T)``, restricted to
    instruction tokens. The fused backends never form ``H Wd^T`` (docs/design.md section 3).

    Args:
        hidden_states: padded ``(B, S, d)`` with ``mask``, or packed ``(N, d)`` (instruction tokens
            only, sequences back to back) with ``cu_seqlens``.
        mask: ``(B, S)`` bool, True at instruction tokens; ``None`` with ``cu_seqlens``. Masked
            positions never influence the result, even if they hold NaN or Inf.
        down_weight: ``Wd (r, d)``. down_bias: ``bd (r,)``. pool_weight: ``Wp (L, r)``. Same dtype
            and device as ``hidden_states``.
        cu_seqlens: ``(B+1,)`` int32 offsets of the packed sequences: starts at 0, non-decreasing,
            ends at ``N``.
        max_seqlen: with ``cu_seqlens``, the longest packed sequence's length or more (as
            flash-attn's); given, a call on CUDA tensors reads nothing back to the host. ``None``:
            read from ``cu_seqlens`` (one device-to-host copy). A value below the longest sequence
            is an error.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        ``U (B, L, r)`` in the dtype of ``hidden_states``, differentiable in ``hidden_states`` and the
        three weights. A sequence with no instruction token gives ``U = 0``.
    """
    B, d, r, L = check_attention_pool_inputs(
        hidden_states, mask, down_weight, down_bias, pool_weight, cu_seqlens, max_seqlen
    )
    which = _backend.resolve_backend(backend, hidden_states.device)
    if which == "reference":
        return _reference.attention_pool(
            hidden_states, mask, down_weight, down_bias, pool_weight, cu_seqlens=cu_seqlens
        )
    if L > MAX_TOKENS:
        raise ValueError(f"the fused attention_pool supports up to {MAX_TOKENS} soft tokens, got L={L}")
    u, *_ = torch.ops.iapt.attention_pool_fwd(
        hidden_states,
        mask,
        cu_seqlens,
        down_weight.contiguous(),
        down_bias.contiguous(),
        pool_weight.contiguous(),
        _max_seqlen(hidden_states, cu_seqlens, max_seqlen),
    )
    return u


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
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``T`` tenants' soft-prompt generators over one batch that mixes tenants (docs/design.md section 8).

    Request ``b`` of tenant ``t`` gets ``P_b = R_t(attention_pool_t(H_b)) Wu_t^T + bu_t``; requests of
    tenant ``-1`` get 0.

    Args:
        hidden_states, mask, cu_seqlens, max_seqlen: as :func:`attention_pool` (padded or packed).
        groups: the batch grouped by tenant, ``TenantGroups.build(tenant_ids, T)`` (checks the ids;
            build it once per batch and reuse it for every layer).
        down_weight ``(T, r, d)``, down_bias ``(T, r)``, pool_weight ``(T, L, r)``: in the dtype of
            ``hidden_states``. numerator ``(T, m+1)``, denominator ``(T, n)``: each tenant's rational
            coefficients. up_weight ``(T, d, r)``, up_bias ``(T, d)``.
        version: of the rational activation, ``"B"`` or ``"A"``.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU when built, else reference), ``"triton"``,
            ``"cpp"`` or ``"reference"``.

    Returns:
        ``P (B, L, d)`` in the dtype of ``hidden_states``, differentiable in ``hidden_states`` and every
        stacked weight (tenants absent from the batch get gradient 0).
    """
    weights = (down_weight, down_bias, pool_weight, numerator, denominator, up_weight, up_bias)
    n, b = groups.num_tenants, groups.batch_size
    L = check_multi_tenant_inputs(hidden_states, mask, cu_seqlens, n, b, *weights, version, max_seqlen)[3]
    which = _backend.resolve_backend(backend, hidden_states.device)
    if which == "reference":
        return _reference.multi_tenant_generator(
            hidden_states, mask, groups, *weights, version=version, cu_seqlens=cu_seqlens
        )
    if which == "triton" and L > MAX_TOKENS:
        raise ValueError(f"the fused generator supports up to {MAX_TOKENS} soft tokens, got L={L}")
    # The contract's layout: contiguous weights, coefficients (3 and 4) in the compute dtype.
    cdt = compute_dtype(hidden_states)
    weights = [w.to(cdt) if i in (3, 4) else w for i, w in enumerate(weights)]
    p, *_ = torch.ops.iapt.multi_tenant_generator_fwd(
        hidden_states,
        mask,
        cu_seqlens,
        list(groups.tensors()),
        [w.contiguous() for w in weights],
        version,
        _max_seqlen(hidden_states, cu_seqlens, max_seqlen),
    )
    return p
