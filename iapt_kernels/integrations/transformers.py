"""IAPT on Hugging Face ``transformers`` causal LMs, through one generic hook mechanism.

:func:`apply_iapt` finds the decoder layers of any causal LM by search (the ``nn.ModuleList`` of
``config.num_hidden_layers`` identical blocks), freezes the backbone and registers a forward
pre-hook on every layer. Before layer ``l`` runs, the hook computes that layer's soft prompts
``P (B, L, d)`` from the layer's incoming hidden states at the instruction positions and writes them,
out of place, at the ``L`` slot positions (docs/design.md section 1). No modeling code is copied; the
same code path serves Llama, Mistral, Qwen2, GPT-2 and any model whose layers take the hidden
states as their first argument (or as ``hidden_states=``).

Inside :meth:`IAPTModel.generate` a pre-hook on the backbone decides per backbone call: a call that
covers the whole prompt from position 0 (the prefill; every step when ``use_cache=False``; the first
call of assisted or prompt-lookup decoding) applies the prompts, a call that starts after the prompt
(a decode step with a KV cache) never calls a generator, and a call that starts inside the prompt is
an error. Outside :meth:`IAPTModel.forward` and :meth:`IAPTModel.generate` the hooks do nothing, so
the backbone called directly is always the bare backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect  # the backbone's forward signature (position_ids), not our own modules
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import functional
from .._validate import check_backend
from ..functional import MAX_TOKENS
from ..modules import MultiTenantPromptGenerator, PromptGenerator, Rational
from ..tenants import TenantGroups
from .slots import _require, slot_positions

__all__ = ["IAPTConfig", "IAPTModel", "apply_iapt", "find_decoder_layers"]

UNTRAINED_KEY = "untrained_tenants"  # adapter metadata: tenants saved with their initial weights


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
        try:
            check_backend(self.backend)
        except ValueError as exc:
            raise ValueError(f"IAPTConfig.{exc}") from None
        _check_tokens_for_backend(self.num_tokens, self.backend)

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


def _check_tokens_for_backend(num_tokens: int, backend: str) -> None:
    # The fused kernels are compiled for L up to MAX_TOKENS: say so when the config is made, not at
    # the first forward.
    if backend != "reference" and num_tokens > MAX_TOKENS:
        raise ValueError(
            f"num_tokens={num_tokens} exceeds the {MAX_TOKENS} soft tokens the fused kernels support "
            f"(backend={backend!r}): use num_tokens <= {MAX_TOKENS}, or backend='reference'"
        )


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
            f"{n if n is not None else 'N'} identical blocks (config.num_hidden_layers)"
        )
    depth = min(name.count(".") for name, _ in cands)
    cands = [(name, m) for name, m in cands if name.count(".") == depth]
    if len(cands) > 1:
        raise ValueError(f"ambiguous decoder layers in {type(model).__name__}: {[c[0] for c in cands]}")
    return cands[0]


class _SlotState:
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

    def expand(self, k: int, num_tenants: int) -> "_SlotState":
        """The same state for a batch whose rows are each repeated ``k`` times (beams, samples)."""
        t = None if self.tenant_ids is None else self.tenant_ids.repeat_interleave(k)
        return _SlotState(
            self.instruction_mask.repeat_interleave(k, 0),
            self.slot_index.repeat_interleave(k, 0),
            t,
            _build_groups(t, num_tenants) if self.groups is not None else None,
        )

    def widen(self, q: int) -> "_SlotState":
        """The same state for a call over the prompt followed by ``q - S`` generated tokens."""
        B, S = self.instruction_mask.shape
        if q == S:
            return self
        pad = self.instruction_mask.new_zeros((B, q - S))
        return _SlotState(
            torch.cat([self.instruction_mask, pad], 1), self.slot_index, self.tenant_ids, self.groups
        )


def _build_groups(tenant_ids, num_tenants):
    if tenant_ids is None or num_tenants <= 1:
        return None
    # The ids were checked in-graph by IAPTModel._make_state: checking them again would sync the host.
    return TenantGroups.from_valid_ids(tenant_ids, num_tenants)


def _every_tenant(
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


def _call_start(kwargs) -> int:
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


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _max_positions(config) -> int | None:
    """The longest sequence the backbone's position embeddings cover (``None``: no stated limit)."""
    tcfg = _text_config(config) if config is not None else None
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(tcfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


_PEFT_HOOKS = (
    "transformers' own adapter methods would act on the frozen backbone. IAPT adapters load with "
    "iapt_kernels.load_iapt or IAPTModel.from_pretrained, and disable_adapter() switches IAPT off"
)
# Backbone methods that would act on the backbone where a user expects the adapter: refused, not lent.
_NOT_FORWARDED = {
    "from_config": "it builds a bare backbone; wrap one with apply_iapt(AutoModelForCausalLM.from_config(...))",
    **{
        name: _PEFT_HOOKS
        for name in (
            "load_adapter",
            "add_adapter",
            "set_adapter",
            "delete_adapter",
            "enable_adapters",
            "disable_adapters",
        )
    },
}


def _adapter_only_state(module, state_dict, prefix, local_metadata) -> None:
    # The backbone is frozen and comes from its own checkpoint: a state_dict (and so every Trainer
    # checkpoint) holds the generators and the adapter metadata only. This also keeps tied backbone
    # weights (GPT-2's embeddings and head) out of safetensors, which refuses shared tensors.
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _backbone_never_missing(module, incompatible_keys) -> None:
    # The counterpart of _adapter_only_state: a state_dict without the backbone loads strictly.
    names = {"model." + k for k in module.model.state_dict(keep_vars=True)}
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not any(k == n or k.endswith("." + n) for n in names)]
    untrained = module.__dict__.pop("_pending_untrained", None)
    if untrained is not None and not any("generators." in k for k in missing):
        # Every tenant's weights came from the state dict: loaded, unless saved untrained.
        T = module.iapt_config.num_tenants
        module._set_tenant_weights(range(T), "loaded")
        module._set_tenant_weights([t for t in untrained if 0 <= t < T], "initial")


def _generator_args(config: IAPTConfig, hidden_size: int) -> tuple:
    """The positional arguments a generator module takes for ``config`` (after the tenant count of a
    multi-tenant one): the one place the config's fields map onto the modules' arguments."""
    return (
        hidden_size,
        config.bottleneck_size,
        config.num_tokens,
        tuple(config.degrees),
        config.activation_init,
        config.version,
    )


def _new_generator(
    config: IAPTConfig, hidden_size: int, num_tenants: int = 1, backend: str = "auto"
) -> nn.Module:
    """One layer's generator for ``config``: a :class:`PromptGenerator` for one tenant, else a
    :class:`MultiTenantPromptGenerator` (wrapping and loading build through it)."""
    if num_tenants == 1:
        return PromptGenerator(*_generator_args(config, hidden_size), backend)
    return MultiTenantPromptGenerator(num_tenants, *_generator_args(config, hidden_size), backend)


class IAPTModel(nn.Module):
    """A frozen causal LM with one IAPT soft-prompt generator per decoder layer.

    Build it with :func:`apply_iapt`. Attributes: ``model`` (the wrapped backbone, all parameters
    frozen), ``generators`` (``nn.ModuleList``, one per decoder layer), ``iapt_config``.
    Unknown attributes are looked up on the backbone (``config``, ``device``, ...), except methods
    that would act on the backbone where the adapter is meant (``from_config`` and ``transformers``'
    own adapter methods such as ``load_adapter``: ``AttributeError``). :meth:`save_pretrained`,
    :meth:`from_pretrained` and :meth:`push_to_hub` handle the adapter; :meth:`get_base_model`,
    :meth:`print_trainable_parameters` and :meth:`disable_adapter` work as in PEFT. After
    :meth:`remove_hooks` the wrapper refuses to run.

    :meth:`forward` and :meth:`generate` take, besides the backbone's own arguments,
    ``instruction_mask (B, S)`` bool (True on instruction tokens), optionally ``slot_mask (B, S)``
    (exactly ``L`` True per row; default: the ``L`` positions right after each row's last instruction
    token; :func:`iapt_kernels.insert_prompt_slots` and the collator return it, as the batch's record
    of its layout) and ``tenant_ids (B,)`` long (required when ``num_tenants > 1``; see
    :attr:`tenant_weights` for tenants that hold no trained or loaded weights).

    Tenant ``-1`` means no adapter. In :meth:`forward` such a row is the frozen backbone on the row
    exactly as given, slot tokens included (they keep their token embeddings). In :meth:`generate`
    such a row is the frozen backbone on its instruction alone, as if it had no slot tokens: its slot
    tokens are moved into its (masked) left padding, so its output is the base model's.

    The layout is checked once per batch, before any layer runs: a ``slot_mask`` must hold ``L``
    slots per row (a batch laid out for another ``num_tokens`` is refused, naming both counts); without
    one, the ``L`` positions after the instruction must hold one token id and the next must not hold it
    again (unless labelled or padding); slots must lie inside the sequence, on attended positions, off
    the instruction, and (with ``labels``) on positions without a label; ``instruction_mask`` must not
    be True on padding; the sequence must fit the backbone's position embeddings; ``generate`` needs
    left-padded prompts. Each failure is a ``ValueError`` that names the rows and the fix.

    :meth:`save_pretrained` writes the adapter (as :func:`iapt_kernels.save_iapt`). ``state_dict()``
    holds the adapter only, the generators and their metadata (key ``_extra_state``), never the
    frozen backbone; ``load_state_dict`` of such a dict is strict about the generators and checks the
    metadata. So the ``model.safetensors`` a ``transformers.Trainer`` writes (``save_model()`` and
    every checkpoint) is the adapter, readable by :func:`iapt_kernels.load_iapt`.
    """

    def __init__(self, model: nn.Module, config: IAPTConfig) -> None:
        super().__init__()
        if not isinstance(config, IAPTConfig):
            raise TypeError(f"config must be an IAPTConfig, got {type(config).__name__}")
        if isinstance(model, IAPTModel):
            raise TypeError(
                "apply_iapt got a model that is already an IAPTModel; wrap the backbone once (to start "
                "over with another config: apply_iapt(model.remove_hooks(), config))"
            )
        if getattr(model, "_iapt_hooked", False):
            raise TypeError(
                f"this {type(model).__name__} already carries the hooks of another IAPTModel; call "
                "remove_hooks() on that IAPTModel first"
            )
        self.model = model
        self.iapt_config = config
        self._layer_name, layers = find_decoder_layers(model)
        tcfg = _text_config(getattr(model, "config", None))
        hidden = getattr(tcfg, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"cannot find hidden_size in the config of {type(model).__name__}")
        self.hidden_size = int(hidden)
        self.num_layers = len(layers)
        self.max_positions = _max_positions(getattr(model, "config", None))
        if self.max_positions is not None and config.num_tokens >= self.max_positions:
            raise ValueError(
                f"num_tokens={config.num_tokens} leaves no room for an instruction in the "
                f"{self.max_positions} positions of {type(model).__name__}"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        gen_dtype = torch.float64 if (param is not None and param.dtype == torch.float64) else torch.float32
        self.generators = nn.ModuleList([self._make_generator(config) for _ in range(self.num_layers)]).to(
            device=device, dtype=gen_dtype
        )
        if config.share_projections:
            first = self.generators[0]
            for g in self.generators[1:]:
                g.down, g.up = first.down, first.up
        self._mt_call = config.num_tenants > 1
        try:
            self._position_ids_kw = "position_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._position_ids_kw = False
        self._state: _SlotState | None = None  # armed: layer hooks replace slots
        self._calling = False  # inside forward's own backbone call
        self._gen: _SlotState | None = None  # inside generate: the prompt's state
        self._gen_states: dict = {}
        self._gen_applied = False
        self._disabled = False  # inside disable_adapter(): the bare backbone
        self._hooks_removed = False
        # Per tenant: "initial" (apply_iapt's random weights), "trained" (a call with gradients used it)
        # or "loaded" (load_iapt, load_state_dict); see tenant_weights.
        self._tenant_weights = ["initial"] * config.num_tenants
        self._warned_initial = False
        self._handles = [
            layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        self._handles.append(model.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._backbone_post_hook))
        model._iapt_hooked = True
        self.register_state_dict_post_hook(_adapter_only_state)
        self.register_load_state_dict_post_hook(_backbone_never_missing)

    # ----------------------------------------------------------------- construction
    def _make_generator(self, config: IAPTConfig) -> nn.Module:
        return _new_generator(config, self.hidden_size, config.num_tenants, config.backend)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name in _NOT_FORWARDED:
                raise AttributeError(
                    f"IAPTModel does not lend {name!r} from {type(self.model).__name__}: {_NOT_FORWARDED[name]}"
                ) from None
            return getattr(self.model, name)

    def remove_hooks(self) -> nn.Module:
        """Detach every hook and return the bare backbone (its parameters stay frozen). This wrapper
        then refuses to run: call the returned backbone, or :func:`apply_iapt` it again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooks_removed = True
        if getattr(self.model, "_iapt_hooked", False):
            del self.model._iapt_hooked
        return self.model

    def _check_hooked(self) -> None:
        if self._hooks_removed:
            raise RuntimeError(
                "this IAPTModel's hooks were removed (remove_hooks()), so it can no longer apply IAPT: "
                "call the backbone remove_hooks() returned, or wrap it again with apply_iapt"
            )

    # ----------------------------------------------------------------- PEFT-style helpers
    def get_base_model(self) -> nn.Module:
        """The wrapped backbone (``self.model``), as ``peft.PeftModel.get_base_model``."""
        return self.model

    def print_trainable_parameters(self) -> None:
        """Print the trainable (generator) and total parameter counts, as ``peft.PeftModel`` does."""
        trainable = self.num_trainable_parameters()
        total = sum(p.numel() for p in self.parameters())
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it, :meth:`forward` and :meth:`generate` are the bare backbone,
        exactly. ``instruction_mask``, ``slot_mask`` and ``tenant_ids`` are dropped, nothing is checked
        and no position ids are added: the backbone runs on the batch as given, slot tokens included
        (for the base model's output on the instruction alone, use tenant ``-1`` in ``generate``)."""
        self._check_hooked()
        was, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = was

    @property
    def tenant_weights(self) -> tuple[str, ...]:
        """Per tenant, what its generator weights are: ``"initial"`` (the random initialisation of
        :func:`apply_iapt`), ``"trained"`` (a call with gradients enabled used it) or ``"loaded"``
        (:func:`iapt_kernels.load_iapt`, ``load_state_dict``). On a multi-tenant model, a call without
        gradients (``generate``, evaluation) that names an ``"initial"`` tenant raises when some tenant
        was loaded (a served model with a slot left empty) and otherwise warns once (an untrained
        baseline is legitimate). ``torch.compile``-d calls neither check nor record."""
        return tuple(self._tenant_weights)

    def _set_tenant_weights(self, tenants, how: str) -> None:
        for t in tenants:
            self._tenant_weights[t] = how

    def set_backend(self, backend: str) -> "IAPTModel":
        """Switch every generator (and its activation) to ``backend``; returns ``self``."""
        check_backend(backend)
        _check_tokens_for_backend(self.iapt_config.num_tokens, backend)
        for m in self.generators.modules():
            if isinstance(m, (PromptGenerator, MultiTenantPromptGenerator, Rational)):
                m.backend = backend
        self.iapt_config.backend = backend
        return self

    def num_trainable_parameters(self) -> int:
        """Number of parameters that require grad (the generators' parameters, shared ones once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def param_groups(self, lr: float, up_lr_ratio: float = 1.0) -> list[dict]:
        """Optimizer parameter groups: the generators' up-projections at ``lr * up_lr_ratio``, every
        other trainable parameter at ``lr`` (docs/design.md section 1, "Initialisation").

        ``up`` starts at zero, so at the first step it is the only part with a gradient (as LoRA's
        ``B``); a larger rate for it is LoRA+'s remedy. Pass the result to any ``torch.optim``
        optimizer, e.g. ``torch.optim.AdamW(model.param_groups(3e-3, 4.0))``.
        """
        if not (lr > 0 and up_lr_ratio > 0):
            raise ValueError(f"lr and up_lr_ratio must be > 0, got {lr!r} and {up_lr_ratio!r}")
        up, rest = [], []
        for name, p in self.generators.named_parameters():
            if p.requires_grad:
                (up if name.split(".")[-2] == "up" else rest).append(p)
        return [{"params": rest, "lr": lr}, {"params": up, "lr": lr * up_lr_ratio}]

    # ----------------------------------------------------------------- saving
    def save_pretrained(
        self, save_directory, state_dict=None, is_main_process: bool = True, **kwargs
    ) -> None:
        """Save the adapter to ``save_directory``, as :func:`iapt_kernels.save_iapt` does.

        Writes ``adapter_model.safetensors`` (the generators) and ``iapt_config.json`` (the
        :class:`IAPTConfig` and the base model's architecture, hidden size and layer count); never the
        frozen backbone, which you reload from where it came from. ``state_dict`` (a full state dict of
        this module, as FSDP or ``Trainer`` gather it) supplies the generator weights when given;
        ``is_main_process=False`` writes nothing. Other ``save_pretrained`` arguments of
        ``transformers`` (``safe_serialization``, ``max_shard_size``, ...) are accepted and ignored.
        """
        from .io import save_iapt

        if is_main_process:
            save_iapt(self, save_directory, state_dict=state_dict)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path=None, tenant: int | None = None, **hub_kwargs
    ) -> "IAPTModel":
        """Load an adapter into backbone ``model``: :func:`iapt_kernels.load_iapt`, as
        ``peft.PeftModel.from_pretrained(model, path)``.

        ``path`` is a local adapter directory, or else a Hugging Face Hub repository id: only the
        adapter's two files are downloaded (``huggingface_hub.snapshot_download``, ``hub_kwargs``
        such as ``revision`` or ``token`` passed on). The backbone is never downloaded here; load it
        with its own class.
        """
        from .io import CONFIG_NAME, WEIGHTS_NAME, load_iapt

        if isinstance(model, (str, os.PathLike)) or path is None:
            raise TypeError(
                "IAPTModel.from_pretrained(model, path) takes the backbone first, then the adapter "
                "directory; load the backbone with its own class (AutoModelForCausalLM.from_pretrained)"
            )
        path = os.fspath(path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **hub_kwargs)
        return load_iapt(model, path, tenant=tenant)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload IAPT adapter",
        private: bool | None = None,
        token=None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Upload the adapter, what :meth:`save_pretrained` writes (``adapter_model.safetensors`` and
        ``iapt_config.json``), to Hub repository ``repo_id`` (created if missing); never the backbone.
        Returns ``huggingface_hub``'s commit info."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )

    def get_extra_state(self) -> torch.Tensor:
        """The adapter metadata as a uint8 tensor of JSON (``state_dict`` key ``_extra_state``)."""
        from .io import adapter_metadata

        data = json.dumps(adapter_metadata(self), sort_keys=True).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Check that metadata saved by :meth:`get_extra_state` fits this model (``load_state_dict``)."""
        from .io import check_metadata, decode_metadata

        meta = decode_metadata(state, "the state_dict's _extra_state")
        check_metadata(self, meta, "the state_dict")
        # Applied by _backbone_never_missing once the generators have loaded too.
        self._pending_untrained = list(meta.get(UNTRAINED_KEY, []))

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
                raise RuntimeError(
                    f"IAPT: cannot find the hidden states among the arguments of decoder "
                    f"layer {index} ({type(module).__name__})"
                )
            if hidden.shape[:2] != state.instruction_mask.shape:
                raise RuntimeError(
                    f"IAPT: decoder layer {index} got hidden states of shape {tuple(hidden.shape)} but the "
                    f"instruction_mask has shape {tuple(state.instruction_mask.shape)}"
                )
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
            if torch.compiler.is_compiling():
                prompts = _every_tenant(gen, h, state.instruction_mask, state.tenant_ids)
            elif state.groups is not None:  # built once per batch; no per-layer regrouping or id checks
                prompts = gen(h, state.instruction_mask, groups=state.groups)
            else:
                prompts = gen(h, state.instruction_mask, state.tenant_ids)
        else:
            prompts = gen(h, state.instruction_mask)
        values = prompts.reshape(-1, prompts.shape[-1]).to(hidden.dtype)
        if state.keep is not None:
            values = torch.where(state.keep, values, hidden[state.rows, state.cols])
        return hidden.index_put((state.rows, state.cols), values)  # out of place

    def _backbone_pre_hook(self, module, args, kwargs):
        if self._calling:
            return None
        base = self._gen
        if base is None:
            # The backbone called directly (not through forward/generate), e.g. after a checkpointed
            # training step that kept its state for the backward: always the bare backbone.
            self._state = None
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        nb, q = ids.shape[0], ids.shape[1]
        B, S = base.instruction_mask.shape
        past = _call_start(kwargs)
        if past >= S:  # a decode step: the prompts are in the cache already
            self._state = None
            return None
        if past > 0 or q < S:
            raise RuntimeError(
                f"IAPT generate: a model call covers positions [{past}, {past + q}) of a prompt of length {S}. "
                "The soft prompts are computed from the whole instruction in one call, so a call must start at "
                "position 0 and cover the prompt, or start after it; do not pass a past_key_values that holds "
                "only part of the prompt"
            )
        if nb % B:
            raise RuntimeError(
                f"IAPT generate: model call with batch {nb}, not a multiple of the {B} prompts"
            )
        st = self._gen_states.get(nb)
        if st is None:
            st = base if nb == B else base.expand(nb // B, self.iapt_config.num_tenants)
            self._gen_states[nb] = st
        self._state = st.widen(q)
        self._gen_applied = True
        return None

    def _backbone_post_hook(self, module, args, output):
        if self._gen is not None:  # inside generate: each call arms its own state
            self._state = None
        return None

    # ----------------------------------------------------------------- inputs
    def _make_state(
        self,
        input_ids,
        attention_mask,
        instruction_mask,
        tenant_ids,
        slot_mask,
        inputs_embeds=None,
        labels=None,
    ):
        if instruction_mask is None:
            raise ValueError(
                "IAPT needs instruction_mask (B, S) bool, True on instruction tokens "
                "(see iapt_kernels.insert_prompt_slots)"
            )
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        shape = tuple(ref.shape[:2])
        if not torch.is_tensor(instruction_mask) or tuple(instruction_mask.shape) != shape:
            got = (
                tuple(instruction_mask.shape)
                if torch.is_tensor(instruction_mask)
                else type(instruction_mask).__name__
            )
            raise ValueError(f"instruction_mask must have shape {shape} like input_ids, got {got}")
        instruction_mask = instruction_mask.to(device=ref.device, dtype=torch.bool)
        if self.max_positions is not None and shape[1] > self.max_positions:
            raise ValueError(
                f"sequence length {shape[1]} exceeds the {self.max_positions} positions of "
                f"{type(self.model).__name__}: truncate, e.g. insert_prompt_slots(..., max_length={self.max_positions})"
            )
        if attention_mask is not None:
            if tuple(attention_mask.shape) != shape:
                raise ValueError(f"attention_mask must have shape {shape}, got {tuple(attention_mask.shape)}")
            attended = attention_mask.to(ref.device).bool()
            _require(
                ~(instruction_mask & ~attended),
                "instruction_mask is True on padding (attention_mask 0): were padded tokenizer outputs "
                "passed as instructions? Build batches with insert_prompt_slots from unpadded ids",
            )
        T = self.iapt_config.num_tenants
        if tenant_ids is None and T > 1:
            raise ValueError(f"tenant_ids (B,) is required: this model has num_tenants={T}")
        if tenant_ids is not None:
            tenant_ids = torch.as_tensor(tenant_ids, device=ref.device).long().reshape(-1)
            if tenant_ids.shape[0] != shape[0]:
                raise ValueError(f"tenant_ids must have shape ({shape[0]},), got {tuple(tenant_ids.shape)}")
            _require(
                (tenant_ids >= -1) & (tenant_ids < T), f"tenant_ids must be in [-1, {T}) (-1: no adapter)"
            )
        L = self.iapt_config.num_tokens
        slot_index = slot_positions(
            instruction_mask, L, attention_mask, None if slot_mask is None else slot_mask.to(ref.device)
        )
        fix = f"lay each row out as [instruction][{L} slot tokens][response] with insert_prompt_slots(num_tokens={L})"
        if slot_mask is not None:
            _require(
                ~instruction_mask.gather(1, slot_index), f"slot_mask is True on instruction tokens; {fix}"
            )
        if attention_mask is not None:
            _require(
                attended.gather(1, slot_index),
                f"slot positions fall on padding (attention_mask 0): fewer than {L} slot tokens after the "
                f"instruction? {fix}",
            )
        has_labels = labels is not None and torch.is_tensor(labels) and tuple(labels.shape) == shape
        if has_labels:
            labels = labels.to(ref.device)
            at_slots = labels.gather(1, slot_index)
            _require(
                at_slots == -100,
                f"slot positions hold labels (not -100): either the labels are not IAPT labels or the rows "
                f"have fewer than {L} slot tokens after the instruction; {fix}",
                lambda: self._explain_slot_labels(
                    input_ids, instruction_mask, labels, slot_index, at_slots, fix
                ),
            )
        if slot_mask is None and input_ids is not None:
            self._check_unrecorded_slots(
                input_ids,
                slot_index,
                attended if attention_mask is not None else None,
                labels if has_labels else None,
                fix,
            )
        # Grouping has data-dependent shapes; compiled code runs every tenant instead (_every_tenant).
        groups = _build_groups(tenant_ids, T) if not torch.compiler.is_compiling() else None
        if groups is not None:
            self._check_tenant_weights(groups.seg_tenant)
        elif T == 1 and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            if self._tenant_weights[0] == "initial":
                self._tenant_weights[0] = "trained"
        return _SlotState(instruction_mask, slot_index, tenant_ids, groups)

    def _explain_slot_labels(self, input_ids, instruction_mask, labels, slot_index, at_slots, fix) -> str:
        """What is wrong with a batch whose slot positions hold labels (read only on that failure).

        Every one of the ``L`` slots labelled means the slots are there but labelled: with the
        instruction labelled too, the labels are a copy of ``input_ids``. Otherwise some slot
        position holds a response token: the row has fewer slot tokens than ``L``."""
        L = self.iapt_config.num_tokens
        bad = (at_slots != -100).any(1)
        if input_ids is not None:
            ids = input_ids.gather(1, slot_index)
            slots_labelled = ((at_slots == ids).all(1) & (ids == ids[:, :1]).all(1))[bad]
            if bool(slots_labelled.all()):
                on_instruction = ((labels != -100) & instruction_mask).any(1)[bad]
                if bool(on_instruction.all()):
                    return (
                        "labels copy input_ids (labels = input_ids?): they are set on the instruction and "
                        f"on the {L} slot tokens, whose hidden states IAPT replaces. IAPT labels are the "
                        "response ids and -100 everywhere else: build them with insert_prompt_slots("
                        "instruction_ids, response_ids, ...) or IAPTDataCollator"
                    )
                return (
                    f"labels are set (not -100) on the {L} slot tokens after the instruction: IAPT "
                    "replaces those positions, so they can learn nothing. Set the slots' labels to -100, "
                    "as insert_prompt_slots does"
                )
        return (
            f"slot positions hold labels (not -100): the rows have no or fewer than {L} slot tokens after "
            f"the instruction, so the prompts would overwrite response tokens; {fix}"
        )

    def _check_unrecorded_slots(self, input_ids, slot_index, attended, labels, fix) -> None:
        """A batch without ``slot_mask`` is checked as far as its tokens allow.

        insert_prompt_slots writes one token id at every slot of a row: the ``L`` positions after the
        instruction must hold one id (fewer slot tokens put real tokens there), and the next position
        must not hold it again, unless it is a label or padding (more slot tokens would be read as real
        tokens). A batch made by insert_prompt_slots or IAPTDataCollator carries ``slot_mask`` instead.
        """
        L = self.iapt_config.num_tokens
        ids = input_ids.gather(1, slot_index)
        first = ids[:, :1]
        also = "or pass slot_mask (insert_prompt_slots returns it) when the slots hold different ids"
        _require(
            (ids == first).all(1),
            f"the {L} positions after the instruction do not hold one slot token id: the rows have fewer "
            f"than {L} slot tokens (a batch laid out for a smaller num_tokens?); {fix}, {also}",
        )
        S = input_ids.shape[1]
        after = slot_index[:, -1:] + 1
        at = after.clamp(max=S - 1)
        extra = (after < S) & (input_ids.gather(1, at) == first)
        if attended is not None:
            extra = extra & attended.gather(1, at)
        if labels is not None:
            extra = extra & (labels.gather(1, at) == -100)
        _require(
            ~extra,
            f"the token after the {L} slots is the slot token again: the rows have more than {L} slot "
            f"tokens (a batch laid out for a larger num_tokens?), and the extra ones would be read as real "
            f"tokens; {fix}, {also}",
        )

    def _check_tenant_weights(self, present: torch.Tensor) -> None:
        """Record the tenants a training call uses; refuse (or warn about) tenants without weights.

        ``present``: the batch's tenants (``TenantGroups.seg_tenant``), read on the host only while
        some tenant is still ``"initial"``, so a trained or loaded model pays no synchronisation."""
        status = self._tenant_weights
        if "initial" not in status:
            return
        present = present.tolist()
        if torch.is_grad_enabled():  # a training call: tenants trained from scratch are legitimate
            for t in present:
                if status[t] == "initial":
                    status[t] = "trained"
            return
        empty = [t for t in present if status[t] == "initial"]
        if not empty:
            return
        loaded = [t for t, s in enumerate(status) if s == "loaded"]
        if loaded:
            raise ValueError(
                f"tenant_ids name tenants {empty}, which hold neither loaded nor trained weights (their "
                f"random initialisation) while tenants {loaded} were loaded: their outputs would be "
                "garbage. Load their adapters (load_iapt(model, path, tenant=t)), train them first, or use "
                "tenant -1 for the bare backbone"
            )
        if not self._warned_initial:
            self._warned_initial = True
            warnings.warn(
                f"IAPT: tenants {empty} hold their initial random weights (neither trained nor loaded "
                "since apply_iapt), so their soft prompts are untrained. Expected for a baseline before "
                "training; otherwise load or train them first. (Warned once per model.)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _position_ids(self, attention_mask, kwargs):
        """Position ids that skip left padding, for a call that starts at position 0.

        Hugging Face models number positions ``0..S-1`` whatever the mask says, so a left-padded row
        (batched generation prompts) would sit at shifted positions: absolute-position models (GPT-2)
        then give other logits than the same row unpadded. Right-padded rows get ``0..S-1`` exactly.
        """
        if (
            not self._position_ids_kw
            or attention_mask is None
            or kwargs.get("position_ids") is not None
            or any(kwargs.get(k) is not None for k in ("past_key_values", "cache", "cache_position"))
        ):
            return
        att = attention_mask.bool()
        S = att.shape[1]
        ar = torch.arange(S, device=att.device)
        first = torch.where(att, ar, torch.full_like(ar, S)).amin(1, keepdim=True)
        kwargs["position_ids"] = (ar - first).clamp(min=0)

    def _without_slots(self, free, input_ids, attention_mask, inputs_embeds, state):
        """Move the slot tokens of rows ``free`` (tenant -1) into their left padding (generate).

        The slots need not end the row: a response prefix after them (insert_prompt_slots,
        ``response_prefix_ids``) keeps its place after the instruction."""
        B, S = state.instruction_mask.shape
        L = self.iapt_config.num_tokens
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
        state = _SlotState(move(state.instruction_mask), state.slot_index, state.tenant_ids, state.groups)
        return (
            None if input_ids is None else move(input_ids),
            attention_mask,
            None if inputs_embeds is None else move(inputs_embeds),
            state,
        )

    # ----------------------------------------------------------------- public
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        instruction_mask=None,
        tenant_ids=None,
        labels=None,
        slot_mask=None,
        **kwargs,
    ):
        """Run the backbone with soft prompts at the slot positions of every layer.

        Everything except ``instruction_mask``, ``tenant_ids`` and ``slot_mask`` is passed to the
        backbone; returns its usual output (with ``loss`` when ``labels`` is given). Without
        ``position_ids`` and without a cache, position ids that skip left padding are passed when
        the backbone takes them, so left- and right-padded rows give the same logits.
        """
        self._check_hooked()
        if self._disabled:
            if labels is not None:
                kwargs["labels"] = labels
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        state = self._make_state(
            input_ids,
            attention_mask,
            instruction_mask,
            tenant_ids,
            slot_mask,
            kwargs.get("inputs_embeds"),
            labels,
        )
        if labels is not None:
            kwargs["labels"] = labels
        self._position_ids(attention_mask, kwargs)
        self._state = state
        self._calling = True
        keep = False
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            # Gradient checkpointing re-runs the layers (and so their hooks) during backward: keep the
            # slot state until the next call so the recomputation sees the same prompts. The backbone
            # pre-hook drops it if the backbone is then called directly.
            keep = torch.is_grad_enabled() and self.model.training and _checkpointing(self.model)
            return out
        finally:
            self._calling = False
            if not keep:
                self._state = None

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        instruction_mask=None,
        tenant_ids=None,
        slot_mask=None,
        **kwargs,
    ):
        """``model.generate`` with soft prompts wherever a model call covers the prompt.

        ``input_ids`` hold ``[instruction][L slots]`` per row (left padding for batches, see
        :func:`iapt_kernels.insert_prompt_slots`); other arguments go to the backbone's ``generate``.
        With a KV cache the generators run once, at the prefill; with ``use_cache=False`` every step
        re-runs the whole sequence and applies the same prompts again, so greedy output is the same
        either way. Rows of tenant ``-1`` are generated by the bare backbone on their instruction
        alone (see :class:`IAPTModel`). Right-padded prompts are refused: generation continues from
        each row's last position, so prompts must be left-padded (``padding_side="left"``).
        """
        self._check_hooked()
        if self._disabled:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        state = self._make_state(
            input_ids, attention_mask, instruction_mask, tenant_ids, slot_mask, inputs_embeds
        )
        if attention_mask is not None:
            ends = attention_mask[:, -1].bool()
            if not bool(ends.all()):
                raise ValueError(
                    f"generate needs left-padded prompts, and rows {(~ends).nonzero().flatten().tolist()} "
                    "end in padding: generation would continue after their pad tokens. Pad prompts on "
                    'the left: insert_prompt_slots(..., padding_side="left"), IAPTDataCollator(..., '
                    'padding_side="left") or a tokenizer with padding_side="left"'
                )
        S = state.instruction_mask.shape[1]
        new = kwargs.get("max_new_tokens")
        if self.max_positions is not None and isinstance(new, int) and S + new > self.max_positions:
            raise ValueError(
                f"a prompt of {S} tokens plus max_new_tokens={new} exceeds the {self.max_positions} "
                f"positions of {type(self.model).__name__}: lower max_new_tokens or truncate the prompt"
            )
        if state.tenant_ids is not None:
            free = state.tenant_ids < 0
            if bool(free.any()):
                input_ids, attention_mask, inputs_embeds, state = self._without_slots(
                    free, input_ids, attention_mask, inputs_embeds, state
                )
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        self._state = None
        self._gen, self._gen_states, self._gen_applied = state, {}, False
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if not self._gen_applied:
                warnings.warn(
                    "IAPT generate: no model call covered the prompt from position 0 (a past_key_values "
                    "holding the whole prompt?), so no soft prompts were applied",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return out
        finally:
            self._gen, self._gen_states, self._state = None, {}, None

    def extra_repr(self) -> str:
        return (
            f"layers={self._layer_name!r} x {self.num_layers}, num_tokens={self.iapt_config.num_tokens}, "
            f"num_tenants={self.iapt_config.num_tenants}"
        )


def apply_iapt(model: nn.Module, config: IAPTConfig | None = None, **overrides) -> IAPTModel:
    """Wrap a ``transformers`` causal LM for IAPT: freeze it and add one generator per decoder layer.

    Args:
        model: a causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...); not an :class:`IAPTModel`
            nor a backbone another :class:`IAPTModel` still hooks (``TypeError``).
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
