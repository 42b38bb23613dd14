"""The backbone-independent half of the layer hooks: where a causal LM's decoder layers are, what one
backbone call needs to write the soft prompts (:class:`SlotState`), and how a call inside ``generate``
is classified (prefill or decode step). Plain PyTorch; :mod:`.model` puts it on a backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional
from ..tenants import TenantGroups

__all__ = ["find_decoder_layers"]


def text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the decoder layers of ``model``, found by search.

    The candidate is an ``nn.ModuleList`` of identically-typed blocks whose length equals
    ``config.num_hidden_layers`` (the longest such list when the config does not say); the shallowest
    one wins. Raises ``ValueError`` when none or several equally shallow ones are found.
    """
    config = getattr(model, "config", None)
    n = getattr(text_config(config), "num_hidden_layers", None) if config is not None else None
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and not isinstance(mod[0], (nn.ModuleList, nn.ModuleDict)):
                cands.append((name, mod))
    if n is not None:
        cands = [(name, m) for name, m in cands if len(m) == n]
    elif cands:
        longest = max(len(m) for _, m in cands)
        cands = [(name, m) for name, m in cands if len(m) == longest]
    if not cands:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}: expected an nn.ModuleList of "
            f"{n if n is not None else 'N'} identical blocks (config.num_hidden_layers)"
        )
    depth = min(name.count(".") for name, _ in cands)
    cands = [(name, m) for name, m in cands if name.count(".") == depth]
    if len(cands) > 1:
        raise ValueError(f"ambiguous decoder layers in {type(model).__name__}: {[c[0] for c in cands]}")
    return cands[0]


class SlotState:
    """What the layer hooks need for one backbone call: where the prompts go and whose they are."""

    __slots__ = ("instruction_mask", "slot_index", "tenant_ids", "groups", "rows", "cols", "keep")

    def __init__(self, instruction_mask, slot_index, tenant_ids, groups):
        self.instruction_mask = instruction_mask
        self.slot_index = slot_index
        self.tenant_ids = tenant_ids
        self.groups = groups
        B, L = slot_index.shape
        self.rows = torch.arange(B, device=slot_index.device)[:, None].expand(-1, L).reshape(-1)
        self.cols = slot_index.reshape(-1)
        # Rows of tenant -1 keep their hidden states. They are selected with `where`, not by indexing
        # the kept rows out, so no shape depends on the data: no host sync, nothing for torch.compile
        # to break on.
        self.keep = None if tenant_ids is None else (tenant_ids >= 0).repeat_interleave(L)[:, None]

    def expand(self, k: int, num_tenants: int) -> "SlotState":
        """The same state for a batch whose rows are each repeated ``k`` times (beams, samples)."""
        t = None if self.tenant_ids is None else self.tenant_ids.repeat_interleave(k)
        return SlotState(
            self.instruction_mask.repeat_interleave(k, 0),
            self.slot_index.repeat_interleave(k, 0),
            t,
            build_groups(t, num_tenants) if self.groups is not None else None,
        )

    def widen(self, q: int) -> "SlotState":
        """The same state for a call over the prompt followed by ``q - S`` generated tokens."""
        B, S = self.instruction_mask.shape
        if q == S:
            return self
        pad = self.instruction_mask.new_zeros((B, q - S))
        return SlotState(
            torch.cat([self.instruction_mask, pad], 1), self.slot_index, self.tenant_ids, self.groups
        )


def build_groups(tenant_ids, num_tenants):
    if tenant_ids is None or num_tenants <= 1:
        return None
    # The ids were checked in-graph by IAPTModel._make_state: checking them again would sync the host.
    return TenantGroups.from_valid_ids(tenant_ids, num_tenants)


def every_tenant(
    gen: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, tenant_ids: torch.Tensor
) -> torch.Tensor:
    """``P (B, L, d)`` of a stacked multi-tenant generator, for code under ``torch.compile``.

    Grouping requests by tenant (``TenantGroups``) makes shapes depend on the data, which a
    ``fullgraph=True`` compile cannot trace. Here every tenant's generator runs on the whole batch
    and each row keeps its own tenant's prompts (rows of tenant -1 get zeros): ``T`` times the
    generator's work, static shapes, no host synchronisation. Gradients reach only the tenant of
    each row. Eager mode keeps the grouped kernels.
    """
    F_ = functional
    backend = gen.backend
    out = None
    for t in range(gen.num_tenants):
        u = F_.attention_pool(
            hidden, mask, gen.down.weight[t], gen.down.bias[t], gen.pool.weight[t], backend=backend
        )
        g = F_.rational(u, gen.act.numerator[t], gen.act.denominator[t], version=gen.version, backend=backend)
        p = torch.nn.functional.linear(g, gen.up.weight[t], gen.up.bias[t])
        if gen.gate is not None:
            p = p * gen.gate[t]
        out = torch.zeros_like(p) if out is None else out
        out = torch.where((tenant_ids == t)[:, None, None], p, out)
    return out


def _cache_length(pkv) -> int:
    if pkv is None:
        return 0
    get = getattr(pkv, "get_seq_length", None)
    if callable(get):
        return int(get())
    try:  # legacy tuple-of-tuples cache
        return int(pkv[0][0].shape[-2]) if len(pkv) else 0
    except Exception:
        return 0


def call_start(kwargs) -> int:
    """The position a backbone call starts at: the length of the cache it is given (0 without one).

    The cache's keyword differs across ``transformers`` versions (``past_key_values``, later ``cache``);
    ``cache_position`` says it directly where it is passed.
    """
    for name in ("past_key_values", "cache", "past_key_value"):
        if kwargs.get(name) is not None:
            return _cache_length(kwargs[name])
    cp = kwargs.get("cache_position")
    if torch.is_tensor(cp) and cp.numel():
        return int(cp.reshape(-1)[0])
    return 0


def checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def max_positions(config) -> int | None:
    """The longest sequence the backbone's position embeddings cover (``None``: no stated limit)."""
    tcfg = text_config(config) if config is not None else None
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(tcfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def without_slots(L: int, free, input_ids, attention_mask, inputs_embeds, state):
    """Move the slot tokens of rows ``free`` (tenant -1) into their left padding (generate).

    The slots need not end the row: a response prefix after them (insert_prompt_slots,
    ``response_prefix_ids``) keeps its place after the instruction."""
    B, S = state.instruction_mask.shape
    device = state.slot_index.device
    if attention_mask is None:
        attention_mask = torch.ones((B, S), dtype=torch.long, device=device)
    pos = torch.arange(S, device=device).expand(B, S)
    is_slot = torch.zeros((B, S), dtype=torch.bool, device=device).scatter(1, state.slot_index, True)
    # Slots first, then every other position in its order; rows with an adapter stay as they are.
    key = torch.where(is_slot & free[:, None], pos - S, pos)
    perm = key.argsort(dim=1)  # keys are distinct: the order is fully determined

    def move(x):
        index = perm.view(B, S, *([1] * (x.dim() - 2))).expand_as(x)
        return x.gather(1, index)

    attention_mask = move(attention_mask).clone()
    attention_mask[free, :L] = 0
    state = SlotState(move(state.instruction_mask), state.slot_index, state.tenant_ids, state.groups)
    return (
        None if input_ids is None else move(input_ids),
        attention_mask,
        None if inputs_embeds is None else move(inputs_embeds),
        state,
    )
