"""IAPT on Hugging Face ``transformers`` causal LMs, through one generic hook mechanism.

:func:`apply_iapt` finds the decoder layers of any causal LM by search (the ``nn.ModuleList`` of
``config.num_hidden_layers`` identical blocks), freezes the backbone and registers a forward
pre-hook on every layer. Before layer ``l`` runs, the hook computes that layer's soft prompts
``P (B, L, d)`` from the layer's incoming hidden states at the instruction positions and writes them,
out of place, at the ``L`` slot positions (DESIGN.md section 1). No modeling code is copied; the
same code path serves Llama, Mistral, Qwen2, GPT-2 and any model whose layers take the hidden
states as their first argument (or as ``hidden_states=``).

With a KV cache only the prefill contains slots: a pre-hook on the backbone arms the layer hooks
for the prefill call of :meth:`IAPTModel.generate` only, so decode steps never call a generator.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import _backend
from .slots import slot_positions

__all__ = ["IAPTConfig", "IAPTModel", "apply_iapt", "find_decoder_layers"]


@dataclass
class IAPTConfig:
    """Configuration of IAPT on a causal LM.

    Attributes:
        num_tokens: ``L``, soft tokens per layer (4 in the paper).
        bottleneck_size: ``r``, the generator's bottleneck width.
        degrees: ``(m, n)`` of the rational activation.
        activation_init: function the rational activation starts as (``"gelu"``, ``"identity"``, ...).
        version: rational activation version, ``"B"`` or ``"A"``.
        share_projections: share the ``down``/``up`` projections across layers (pooling and
            activation stay per layer).
        num_tenants: ``1`` for one adapter; ``T > 1`` for a multi-tenant model where each request
            picks its adapter with ``tenant_ids``.
        backend: kernel backend of the generators, ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.
    """

    num_tokens: int = 4
    bottleneck_size: int = 256
    degrees: tuple[int, int] = (5, 4)
    activation_init: str = "gelu"
    version: str = "B"
    share_projections: bool = False
    num_tenants: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.degrees = tuple(int(x) for x in self.degrees)
        for name in ("num_tokens", "bottleneck_size", "num_tenants"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"IAPTConfig.{name} must be a positive int, got {v!r}")
        if len(self.degrees) != 2:
            raise ValueError(f"IAPTConfig.degrees must be (m, n), got {self.degrees!r}")
        if self.version not in ("A", "B"):
            raise ValueError(f"IAPTConfig.version must be 'A' or 'B', got {self.version!r}")
        if self.backend not in _backend.BACKENDS:
            raise ValueError(f"IAPTConfig.backend must be one of {_backend.BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``degrees`` as a list)."""
        d = dataclasses.asdict(self)
        d["degrees"] = list(self.degrees)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IAPTConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown IAPTConfig keys: {sorted(unknown)}")
        return cls(**d)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the decoder layers of ``model``, found by search.

    The candidate is an ``nn.ModuleList`` of identically-typed blocks whose length equals
    ``config.num_hidden_layers`` (the longest such list when the config does not say); the shallowest
    one wins. Raises ``ValueError`` when none or several equally shallow ones are found.
    """
    config = getattr(model, "config", None)
    n = getattr(_text_config(config), "num_hidden_layers", None) if config is not None else None
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
            f"{n if n is not None else 'N'} identical blocks (config.num_hidden_layers)")
    depth = min(name.count(".") for name, _ in cands)
    cands = [(name, m) for name, m in cands if name.count(".") == depth]
    if len(cands) > 1:
        raise ValueError(f"ambiguous decoder layers in {type(model).__name__}: {[c[0] for c in cands]}")
    return cands[0]


class _SlotState:
    """What the layer hooks need for one forward (or the prefill of one generate)."""

    __slots__ = ("instruction_mask", "slot_index", "tenant_ids", "groups", "rows", "cols", "keep")

    def __init__(self, instruction_mask, slot_index, tenant_ids, groups):
        self.instruction_mask = instruction_mask
        self.slot_index = slot_index
        self.tenant_ids = tenant_ids
        self.groups = groups
        B, L = slot_index.shape
        rows = torch.arange(B, device=slot_index.device)
        self.keep = None
        if tenant_ids is not None:
            keep = tenant_ids >= 0
            if not bool(keep.all()):
                self.keep = keep
                rows = rows[keep]
                slot_index = slot_index[keep]
        self.rows = rows[:, None].expand(-1, L).reshape(-1)
        self.cols = slot_index.reshape(-1)

    def expand(self, k: int, num_tenants: int) -> "_SlotState":
        """The same state for a batch whose rows are each repeated ``k`` times (beams, samples)."""
        t = None if self.tenant_ids is None else self.tenant_ids.repeat_interleave(k)
        return _SlotState(self.instruction_mask.repeat_interleave(k, 0), self.slot_index.repeat_interleave(k, 0),
                          t, _build_groups(t, num_tenants) if self.groups is not None else None)


def _build_groups(tenant_ids, num_tenants):
    if tenant_ids is None or num_tenants <= 1:
        return None
    import iapt_kernels

    tg = getattr(iapt_kernels, "TenantGroups", None)
    if tg is None:
        return None
    return tg.build(tenant_ids, num_tenants)


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


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class IAPTModel(nn.Module):
    """A frozen causal LM with one IAPT soft-prompt generator per decoder layer.

    Build it with :func:`apply_iapt`. Attributes: ``model`` (the wrapped backbone, all parameters
    frozen), ``generators`` (``nn.ModuleList``, one per decoder layer), ``iapt_config``.
    Unknown attributes are looked up on the backbone (``config``, ``device``, ...).

    :meth:`forward` and :meth:`generate` take, besides the backbone's own arguments,
    ``instruction_mask (B, S)`` bool (True on instruction tokens), optionally ``slot_mask (B, S)``
    (exactly ``L`` True per row; default: the ``L`` positions right after each row's last instruction
    token) and ``tenant_ids (B,)`` long (required when ``num_tenants > 1``; ``-1`` leaves a row
    untouched: the frozen backbone exactly).
    """

    def __init__(self, model: nn.Module, config: IAPTConfig) -> None:
        super().__init__()
        if not isinstance(config, IAPTConfig):
            raise TypeError(f"config must be an IAPTConfig, got {type(config).__name__}")
        self.model = model
        self.iapt_config = config
        self._layer_name, layers = find_decoder_layers(model)
        tcfg = _text_config(getattr(model, "config", None))
        hidden = getattr(tcfg, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"cannot find hidden_size in the config of {type(model).__name__}")
        self.hidden_size = int(hidden)
        self.num_layers = len(layers)
        for p in model.parameters():
            p.requires_grad_(False)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        gen_dtype = torch.float64 if (param is not None and param.dtype == torch.float64) else torch.float32
        self.generators = nn.ModuleList(
            [self._make_generator(config) for _ in range(self.num_layers)]).to(device=device, dtype=gen_dtype)
        if config.share_projections:
            first = self.generators[0]
            if not (hasattr(first, "down") and hasattr(first, "up")):
                raise NotImplementedError(
                    f"share_projections is not supported by {type(first).__name__}")
            for g in self.generators[1:]:
                g.down, g.up = first.down, first.up
        self._mt_call = config.num_tenants > 1
        self._groups_kw = False
        if self._mt_call:
            try:
                self._groups_kw = "groups" in inspect.signature(self.generators[0].forward).parameters
            except (TypeError, ValueError):
                self._groups_kw = False
        self._state: _SlotState | None = None  # armed: layer hooks replace slots
        self._pending: _SlotState | None = None  # generate: armed at the prefill call
        self._pending_len = 0
        self._handles = [layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]
        self._handles.append(model.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._backbone_post_hook))

    # ----------------------------------------------------------------- construction
    def _make_generator(self, config: IAPTConfig) -> nn.Module:
        import iapt_kernels

        args = (self.hidden_size, config.bottleneck_size, config.num_tokens, tuple(config.degrees),
                config.activation_init, config.version, config.backend)
        if config.num_tenants == 1:
            return iapt_kernels.PromptGenerator(*args)
        mt = getattr(iapt_kernels, "MultiTenantPromptGenerator", None)
        if mt is None:
            raise NotImplementedError("num_tenants > 1 needs iapt_kernels.MultiTenantPromptGenerator, "
                                      "which this installation does not provide")
        return mt(config.num_tenants, *args)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def remove_hooks(self) -> nn.Module:
        """Detach every hook and return the bare backbone (its parameters stay frozen)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model

    def set_backend(self, backend: str) -> "IAPTModel":
        """Switch every generator (and its activation) to ``backend``; returns ``self``."""
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        for m in self.generators.modules():
            if hasattr(m, "backend") and isinstance(getattr(m, "backend"), str):
                m.backend = backend
        self.iapt_config.backend = backend
        return self

    def num_trainable_parameters(self) -> int:
        """Number of parameters that require grad (the generators' parameters, shared ones once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----------------------------------------------------------------- hooks
    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            state = self._state
            if state is None:
                return None
            if args:
                hidden = args[0]
            elif "hidden_states" in kwargs:
                hidden = kwargs["hidden_states"]
            else:
                raise RuntimeError(f"IAPT: cannot find the hidden states among the arguments of decoder "
                                   f"layer {index} ({type(module).__name__})")
            if hidden.shape[:2] != state.instruction_mask.shape:
                raise RuntimeError(
                    f"IAPT: decoder layer {index} got hidden states of shape {tuple(hidden.shape)} but the "
                    f"instruction_mask has shape {tuple(state.instruction_mask.shape)}")
            new = self._replace(index, hidden, state)
            if args:
                return (new,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = new
            return args, kwargs

        return hook

    def _replace(self, index: int, hidden: torch.Tensor, state: _SlotState) -> torch.Tensor:
        gen = self.generators[index]
        p0 = next(gen.parameters())
        h = hidden if hidden.dtype == p0.dtype else hidden.to(p0.dtype)
        if self._mt_call:
            if self._groups_kw and state.groups is not None:
                prompts = gen(h, state.instruction_mask, state.tenant_ids, groups=state.groups)
            else:
                prompts = gen(h, state.instruction_mask, state.tenant_ids)
        else:
            prompts = gen(h, state.instruction_mask)
        if state.keep is not None:
            prompts = prompts[state.keep]
        values = prompts.reshape(-1, prompts.shape[-1]).to(hidden.dtype)
        return hidden.index_put((state.rows, state.cols), values)  # out of place

    def _backbone_pre_hook(self, module, args, kwargs):
        pending = self._pending
        if pending is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        q = ids.shape[1]
        if q == pending.instruction_mask.shape[1] and _cache_length(kwargs.get("past_key_values")) == 0:
            B = pending.instruction_mask.shape[0]
            nb = ids.shape[0]
            if nb % B:
                raise RuntimeError(f"IAPT generate: prefill batch {nb} is not a multiple of {B}")
            self._state = pending if nb == B else pending.expand(nb // B, self.iapt_config.num_tenants)
            self._pending = None  # one prefill per generate call
        return None

    def _backbone_post_hook(self, module, args, output):
        if self._pending_len:  # inside generate: disarm after the prefill
            self._state = None
        return None

    # ----------------------------------------------------------------- inputs
    def _make_state(self, input_ids, attention_mask, instruction_mask, tenant_ids, slot_mask, inputs_embeds=None):
        if instruction_mask is None:
            raise ValueError("IAPT needs instruction_mask (B, S) bool, True on instruction tokens "
                             "(see iapt_kernels.insert_prompt_slots)")
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        shape = tuple(ref.shape[:2])
        if not torch.is_tensor(instruction_mask) or tuple(instruction_mask.shape) != shape:
            got = tuple(instruction_mask.shape) if torch.is_tensor(instruction_mask) else type(instruction_mask).__name__
            raise ValueError(f"instruction_mask must have shape {shape} like input_ids, got {got}")
        instruction_mask = instruction_mask.to(device=ref.device, dtype=torch.bool)
        if attention_mask is not None and tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask must have shape {shape}, got {tuple(attention_mask.shape)}")
        T = self.iapt_config.num_tenants
        if tenant_ids is None and T > 1:
            raise ValueError(f"tenant_ids (B,) is required: this model has num_tenants={T}")
        if tenant_ids is not None:
            tenant_ids = torch.as_tensor(tenant_ids, device=ref.device).long().reshape(-1)
            if tenant_ids.shape[0] != shape[0]:
                raise ValueError(f"tenant_ids must have shape ({shape[0]},), got {tuple(tenant_ids.shape)}")
            if bool(((tenant_ids < -1) | (tenant_ids >= T)).any()):
                raise ValueError(f"tenant_ids must be in [-1, {T}), got {tenant_ids.tolist()}")
        slot_index = slot_positions(instruction_mask, self.iapt_config.num_tokens, attention_mask,
                                    None if slot_mask is None else slot_mask.to(ref.device))
        groups = _build_groups(tenant_ids, T) if self._groups_kw else None
        return _SlotState(instruction_mask, slot_index, tenant_ids, groups)

    # ----------------------------------------------------------------- public
    def forward(self, input_ids=None, attention_mask=None, instruction_mask=None, tenant_ids=None, labels=None,
                slot_mask=None, **kwargs):
        """Run the backbone with soft prompts at the slot positions of every layer.

        Everything except ``instruction_mask``, ``tenant_ids`` and ``slot_mask`` is passed to the
        backbone; returns its usual output (with ``loss`` when ``labels`` is given).
        """
        state = self._make_state(input_ids, attention_mask, instruction_mask, tenant_ids, slot_mask,
                                 kwargs.get("inputs_embeds"))
        if labels is not None:
            kwargs["labels"] = labels
        self._state = state
        keep = False
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            # Gradient checkpointing re-runs the layers (and so their hooks) during backward: keep the
            # slot state until the next call so the recomputation sees the same prompts.
            keep = torch.is_grad_enabled() and self.model.training and _checkpointing(self.model)
            return out
        finally:
            if not keep:
                self._state = None

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, instruction_mask=None, tenant_ids=None,
                 slot_mask=None, **kwargs):
        """``model.generate`` with soft prompts in the prefill; decode steps never call a generator.

        ``input_ids`` hold ``[instruction][L slots]`` per row (left padding for batches, see
        :func:`iapt_kernels.insert_prompt_slots`); other arguments go to the backbone's ``generate``.
        """
        state = self._make_state(input_ids, attention_mask, instruction_mask, tenant_ids, slot_mask,
                                 kwargs.get("inputs_embeds"))
        self._state = None
        self._pending, self._pending_len = state, 1
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if self._pending is not None:
                warnings.warn("IAPT generate: no prefill call over the whole prompt was seen (a pre-filled "
                              "past_key_values?), so no soft prompts were applied", RuntimeWarning, stacklevel=2)
            return out
        finally:
            self._pending, self._pending_len, self._state = None, 0, None

    def extra_repr(self) -> str:
        return (f"layers={self._layer_name!r} x {self.num_layers}, num_tokens={self.iapt_config.num_tokens}, "
                f"num_tenants={self.iapt_config.num_tenants}")


def apply_iapt(model: nn.Module, config: IAPTConfig | None = None, **overrides) -> IAPTModel:
    """Wrap a ``transformers`` causal LM for IAPT: freeze it and add one generator per decoder layer.

    Args:
        model: a causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...).
        config: an :class:`IAPTConfig` (default ``IAPTConfig()``); keyword ``overrides`` replace its
            fields (``apply_iapt(model, num_tokens=4, bottleneck_size=64)``).

    Returns:
        An :class:`IAPTModel` whose only trainable parameters are the generators'.
    """
    config = IAPTConfig() if config is None else config
    if overrides:
        config = dataclasses.replace(config, **overrides)
    else:
        config = dataclasses.replace(config)
    return IAPTModel(model, config)
