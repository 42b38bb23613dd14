"""IAPT on Hugging Face ``transformers`` causal LMs, through one generic hook mechanism: the model
(:class:`IAPTModel`, :func:`apply_iapt`) and its adapter API (:func:`save_iapt`, :func:`load_iapt`).

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
from typing import Any

import torch
from torch import nn

from .._validate import check_backend
from ..modules import MultiTenantPromptGenerator, PromptGenerator, Rational
from .config import IAPTConfig, check_tokens_for_backend, new_generator
from .hooks import (
    SlotState,
    build_groups,
    call_start,
    checkpointing,
    every_tenant,
    find_decoder_layers,
    max_positions,
    text_config,
    without_slots,
)
from .io import (
    CONFIG_NAME,
    UNTRAINED_KEY,
    WEIGHTS_NAME,
    adapter_metadata,
    base_model_info,
    check_metadata,
    check_tenant,
    decode_metadata,
    full_tensor,
    layer_states,
    load_layers,
    rank0,
    read_iapt_config,
    read_weights,
    write_adapter,
)
from .slots import check_unrecorded_slots, explain_slot_labels, require, slot_positions

__all__ = ["IAPTConfig", "IAPTModel", "apply_iapt", "find_decoder_layers", "save_iapt", "load_iapt"]


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
        tcfg = text_config(getattr(model, "config", None))
        hidden = getattr(tcfg, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"cannot find hidden_size in the config of {type(model).__name__}")
        self.hidden_size = int(hidden)
        self.num_layers = len(layers)
        self.max_positions = max_positions(getattr(model, "config", None))
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
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._position_ids_kw = "position_ids" in params
        self._logits_to_keep_kw = "logits_to_keep" in params
        self._state: SlotState | None = None  # armed: layer hooks replace slots
        self._calling = False  # inside forward's own backbone call
        self._gen: SlotState | None = None  # inside generate: the prompt's state
        self._gen_states: dict = {}
        self._gen_applied = False
        self._disabled = False  # inside disable_adapter(): the bare backbone
        self._hooks_removed = False
        # Per tenant: "initial" (apply_iapt's random weights), "trained" (a call with gradients used it)
        # or "loaded" (load_iapt, load_state_dict); see tenant_weights.
        self._tenant_weights = ["initial"] * config.num_tenants
        self._warned_initial = False
        # A gate at 0 over a zero up.bias trains far worse than over a calibrated one (design.md
        # section 1): the first training call warns once unless calibrate() ran or weights were loaded.
        self._uncalibrated = config.gate_init is not None
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
        return new_generator(config, self.hidden_size, config.num_tenants, config.backend)

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
        check_tokens_for_backend(self.iapt_config.num_tokens, backend)
        for m in self.generators.modules():
            if isinstance(m, (PromptGenerator, MultiTenantPromptGenerator, Rational)):
                m.backend = backend
        self.iapt_config.backend = backend
        return self

    def num_trainable_parameters(self) -> int:
        """Number of parameters that require grad (the generators' parameters, shared ones once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def param_groups(self, lr: float, up_lr_ratio: float = 1.0) -> list[dict]:
        """Optimizer parameter groups: the generators' up-projections (``up.weight``, ``up.bias``)
        at ``lr * up_lr_ratio``, every other trainable parameter (``down``, ``pool``, ``act`` and the
        gates) at ``lr``; pass the result to any ``torch.optim`` optimizer, e.g.
        ``torch.optim.AdamW(model.param_groups(3e-3))``.

        A separate rate for ``up`` is LoRA+'s remedy for a zero-initialised ``B``; the measured runs
        (docs/design.md section 1, "Initialisation") found no gain from it for IAPT (a larger rate
        for ``up`` trained worse over a zero ``up``), so the default ratio 1 is one group's rate.
        """
        if not (lr > 0 and up_lr_ratio > 0):
            raise ValueError(f"lr and up_lr_ratio must be > 0, got {lr!r} and {up_lr_ratio!r}")
        up, rest = [], []
        for name, p in self.generators.named_parameters():
            if p.requires_grad:
                (up if name.split(".")[-2] == "up" else rest).append(p)
        return [{"params": rest, "lr": lr}, {"params": up, "lr": lr * up_lr_ratio}]

    @torch.no_grad()
    def calibrate(self, input_ids, attention_mask=None, *, slot_token_id: int | None = None) -> "IAPTModel":
        """Data-dependent start: set each generator's ``up.bias`` to the mean hidden state entering
        its layer, over a batch of training text; returns ``self``.

        Call it once, after :func:`apply_iapt` and before training, with a batch as the frozen model
        sees it without IAPT: the plain ``[instruction][response]`` token ids, **no slots**
        (``input_ids (B, S)`` integer, ``attention_mask (B, S)`` 0/1 or bool, right padding as for
        training). The backbone runs once in eval mode, without gradients; the mean leaves out each
        row's first attended token (the attention sink, with outsized activations) and padding. A
        slot then starts as an average token rather than a near-zero vector that the next RMSNorm
        scales up, and with the default gate (``IAPTConfig.gate_init=0``) it fades in from there.

        Multi-tenant: every tenant's ``up.bias`` gets the layer's mean. With ``share_projections``
        the one shared ``up.bias`` gets the average of the layers' means. ``slot_token_id``: the id
        :func:`iapt_kernels.insert_prompt_slots` wrote at slots (default: the backbone config's
        ``pad_token_id``, its default too); a row holding ``num_tokens`` attended such ids in a row
        is refused as a batch with slots (``num_tokens=1`` cannot be told from a lone token).
        """
        self._check_hooked()
        if isinstance(input_ids, dict) or not torch.is_tensor(input_ids):
            raise TypeError(
                "calibrate takes input_ids as a (B, S) tensor (and attention_mask), not "
                f"{type(input_ids).__name__}: pass the plain batch without slots, e.g. "
                "model.calibrate(batch['input_ids'], batch['attention_mask']) of a tokenizer's output"
            )
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(
                f"calibrate needs integer input_ids of shape (B, S), got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            att = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        else:
            if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask)
                raise ValueError(
                    f"calibrate: attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}"
                )
            att = attention_mask.bool()
        L = self.iapt_config.num_tokens
        slot = slot_token_id
        if slot is None:
            slot = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if slot is not None and 1 < L <= input_ids.shape[1]:
            runs = ((input_ids == slot) & att).unfold(1, L, 1).all(-1).any(1)
            if bool(runs.any()):
                raise ValueError(
                    f"calibrate takes the batch without slots, but rows {runs.nonzero().flatten().tolist()} "
                    f"hold {L} attended slot tokens (id {slot}) in a row: a batch from insert_prompt_slots "
                    "or IAPTDataCollator, or padding without its attention_mask. Pass the plain "
                    "instruction + response ids and their attention_mask"
                )
        keep = att.clone()
        keep[torch.arange(keep.shape[0], device=keep.device), att.long().argmax(1)] = False  # the sink
        if not bool(keep.any()):
            raise ValueError(
                "calibrate: no token left to average (each row's first attended token, the attention "
                "sink, is left out): pass rows of at least two tokens"
            )
        kwargs = {"output_hidden_states": True}
        if self._logits_to_keep_kw:
            kwargs["logits_to_keep"] = 1  # the hidden states are all it needs
        self._position_ids(attention_mask, kwargs)
        was_training = self.model.training
        self.model.eval()  # no dropout in the statistics
        try:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).hidden_states
        finally:
            self.model.train(was_training)
        if hidden is None or len(hidden) < self.num_layers:
            raise RuntimeError(
                f"calibrate: {type(self.model).__name__} returned {0 if hidden is None else len(hidden)} "
                f"hidden states for output_hidden_states=True, not the {self.num_layers} layer inputs it needs"
            )
        means = [h[keep].mean(0) for h in hidden[: self.num_layers]]  # hidden_states[l] enters layer l
        if self.iapt_config.share_projections:
            means = [torch.stack(means).mean(0)] * self.num_layers
        for g, m in zip(self.generators, means):
            g.up.bias.copy_(m.to(g.up.bias.dtype))  # broadcast over the tenants of a stacked bias
        self._uncalibrated = False
        return self

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
        meta = adapter_metadata(self.iapt_config, _base_model(self), _untrained(self))
        data = json.dumps(meta, sort_keys=True).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Check that metadata saved by :meth:`get_extra_state` fits this model (``load_state_dict``)."""
        meta = decode_metadata(state, "the state_dict's _extra_state")
        check_metadata(meta, self.iapt_config, _base_model(self), "the state_dict")
        self._uncalibrated = False  # trained weights, not a fresh start
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

    def _replace(self, index: int, hidden: torch.Tensor, state: SlotState) -> torch.Tensor:
        gen = self.generators[index]
        p0 = next(gen.parameters())
        h = hidden if hidden.dtype == p0.dtype else hidden.to(p0.dtype)
        if self._mt_call:
            if torch.compiler.is_compiling():
                prompts = every_tenant(gen, h, state.instruction_mask, state.tenant_ids)
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
        past = call_start(kwargs)
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
            require(
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
            require(
                (tenant_ids >= -1) & (tenant_ids < T), f"tenant_ids must be in [-1, {T}) (-1: no adapter)"
            )
        L = self.iapt_config.num_tokens
        slot_index = slot_positions(
            instruction_mask, L, attention_mask, None if slot_mask is None else slot_mask.to(ref.device)
        )
        fix = f"lay each row out as [instruction][{L} slot tokens][response] with insert_prompt_slots(num_tokens={L})"
        if slot_mask is not None:
            require(
                ~instruction_mask.gather(1, slot_index), f"slot_mask is True on instruction tokens; {fix}"
            )
        if attention_mask is not None:
            require(
                attended.gather(1, slot_index),
                f"slot positions fall on padding (attention_mask 0): fewer than {L} slot tokens after the "
                f"instruction? {fix}",
            )
        has_labels = labels is not None and torch.is_tensor(labels) and tuple(labels.shape) == shape
        if has_labels:
            labels = labels.to(ref.device)
            at_slots = labels.gather(1, slot_index)
            require(
                at_slots == -100,
                f"slot positions hold labels (not -100): either the labels are not IAPT labels or the rows "
                f"have fewer than {L} slot tokens after the instruction; {fix}",
                lambda: explain_slot_labels(
                    L, input_ids, instruction_mask, labels, slot_index, at_slots, fix
                ),
            )
        if slot_mask is None and input_ids is not None:
            check_unrecorded_slots(
                L,
                input_ids,
                slot_index,
                attended if attention_mask is not None else None,
                labels if has_labels else None,
                fix,
            )
        # Grouping has data-dependent shapes; compiled code runs every tenant instead (every_tenant).
        groups = build_groups(tenant_ids, T) if not torch.compiler.is_compiling() else None
        if groups is not None:
            self._check_tenant_weights(groups.seg_tenant)
        elif T == 1 and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            if self._tenant_weights[0] == "initial":
                self._tenant_weights[0] = "trained"
        return SlotState(instruction_mask, slot_index, tenant_ids, groups)

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
        if self._uncalibrated and self.training and torch.is_grad_enabled():
            self._uncalibrated = False
            warnings.warn(
                "IAPT: training a gated adapter (IAPTConfig.gate_init) whose up.bias was never "
                "calibrated: call model.calibrate(input_ids, attention_mask) once on a training batch "
                "without slots before training (a gate at 0 over a zero up.bias trained far worse; "
                "docs/design.md section 1). Warned once per model.",
                UserWarning,
                stacklevel=4,  # forward, nn.Module's two call frames, the caller
            )
        self._position_ids(attention_mask, kwargs)
        self._state = state
        self._calling = True
        keep = False
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            # Gradient checkpointing re-runs the layers (and so their hooks) during backward: keep the
            # slot state until the next call so the recomputation sees the same prompts. The backbone
            # pre-hook drops it if the backbone is then called directly.
            keep = torch.is_grad_enabled() and self.model.training and checkpointing(self.model)
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
                input_ids, attention_mask, inputs_embeds, state = without_slots(
                    self.iapt_config.num_tokens, free, input_ids, attention_mask, inputs_embeds, state
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


def _unwrap(model: nn.Module) -> nn.Module:
    while (
        not isinstance(model, IAPTModel) and hasattr(model, "module") and isinstance(model.module, nn.Module)
    ):
        model = model.module  # DistributedDataParallel, DataParallel
    return model


def _base_model(model: IAPTModel) -> dict[str, Any]:
    return base_model_info(model.model, model.hidden_size, model.num_layers)


def _untrained(model: IAPTModel) -> list[int]:
    """The tenants of a multi-tenant ``model`` that still hold their initial random weights."""
    if model.iapt_config.num_tenants == 1:
        return []
    return [t for t, how in enumerate(model.tenant_weights) if how == "initial"]


def save_iapt(
    model: nn.Module,
    path: str | os.PathLike,
    tenant: int | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the generators of an :class:`IAPTModel` (or a DDP/FSDP-wrapped one) to directory ``path``.

    Writes ``adapter_model.safetensors`` (the generators' state_dict, keys ``<layer>.<param>``) and
    ``iapt_config.json`` (the :class:`IAPTConfig`, ``hidden_size``, ``num_layers`` and ``base_model``:
    the backbone's ``model_type``, class, ``name_or_path``, hidden size and layer count). With
    ``tenant=t`` on a multi-tenant model, saves only tenant ``t``, as a single-tenant adapter.
    ``state_dict``: a full state dict of the :class:`IAPTModel` to take the generator weights from.

    Under ``torch.distributed`` every rank must call it (FSDP gathers sharded parameters
    collectively); only rank 0 writes.
    """
    model = _unwrap(model)
    if not isinstance(model, IAPTModel):
        raise TypeError(f"save_iapt needs an IAPTModel (from apply_iapt), got {type(model).__name__}")
    cfg = model.iapt_config
    T = cfg.num_tenants
    if state_dict is not None:  # e.g. the full state dict FSDP or a Trainer gathered
        prefix = next((k[: k.index("generators.")] for k in state_dict if "generators." in k), None)
        if prefix is None:
            raise ValueError("the state_dict given to save_iapt holds no generators.* entries")
        layers = [
            {k: state_dict[f"{prefix}generators.{l}.{k}"] for k in g.state_dict()}
            for l, g in enumerate(model.generators)
        ]
    else:
        layers = [g.state_dict() for g in model.generators]
    untrained = _untrained(model)
    if tenant is not None and T > 1:
        check_tenant(tenant, T)
        # tenant t of every stacked (T, ...) parameter, in the single-tenant generator's shapes
        shapes = {k: v.shape for k, v in model.generators[0].generator(0).state_dict().items()}
        layers = [{k: full_tensor(v)[tenant].reshape(shapes[k]) for k, v in sd.items()} for sd in layers]
        out_cfg = IAPTConfig.from_dict({**cfg.to_dict(), "num_tenants": 1, "share_projections": False})
        untrained, out_untrained = [t for t in untrained if t == tenant], [0] if tenant in untrained else []
    else:
        if tenant is not None:
            check_tenant(tenant, 1)
        out_cfg = IAPTConfig.from_dict(cfg.to_dict())
        out_untrained = untrained
    if untrained and rank0():
        warnings.warn(
            f"save_iapt: tenants {untrained} hold their initial random weights (neither trained nor "
            f"loaded); the adapter records them under {UNTRAINED_KEY!r}, and load_iapt will not count "
            "them as loaded",
            UserWarning,
            stacklevel=2,
        )
    state = {f"{l}.{k}": full_tensor(v) for l, sd in enumerate(layers) for k, v in sd.items()}
    if not rank0():
        return
    meta = adapter_metadata(out_cfg, _base_model(model), out_untrained)
    write_adapter(path, state, meta)


def load_iapt(model: nn.Module, path: str | os.PathLike, tenant: int | None = None) -> IAPTModel:
    """Load an adapter saved by :func:`save_iapt` into ``model``; returns the :class:`IAPTModel`.

    ``path`` is a directory written by :func:`save_iapt` / :meth:`IAPTModel.save_pretrained`, or by
    ``transformers.Trainer`` for an :class:`IAPTModel` (``save_model()``, ``checkpoint-N/``).
    ``model`` is an :class:`IAPTModel`, or a bare causal LM (it is then wrapped with the saved
    config). ``tenant`` names a tenant slot on the multi-tenant side: a single-tenant adapter loads
    into tenant ``tenant`` of a multi-tenant model; tenant ``tenant`` of a multi-tenant adapter loads
    into a single-tenant model (or into the same slot of a multi-tenant one). So a bare causal LM with
    ``tenant=t`` and a multi-tenant adapter gives a single-tenant model holding tenant ``t``. Without
    ``tenant``, adapter and model must have the same number of tenants. An adapter trained on another
    base model (architecture, hidden size, layer count) is refused; every error names the file.

    The loaded tenants count as ``"loaded"`` in :attr:`IAPTModel.tenant_weights`; the others of a
    multi-tenant model keep what they held, and once one tenant is loaded, generating with a tenant
    that holds neither loaded nor trained weights is an error. Tenants the adapter records as saved
    untrained (``untrained_tenants``) stay ``"initial"``, and picking one with ``tenant=`` is refused.
    """
    path = os.fspath(path)
    saved_cfg, meta = read_iapt_config(path)
    state, file, where = read_weights(path)
    Ts = saved_cfg.num_tenants
    untrained = [t for t in meta.get(UNTRAINED_KEY, []) if isinstance(t, int) and 0 <= t < Ts]
    if tenant is not None and tenant in untrained:
        raise ValueError(
            f"{where}: tenant {tenant} of this adapter was saved with its initial random weights "
            f"(untrained_tenants {untrained}); pick a trained tenant"
        )
    model = _unwrap(model)
    if not isinstance(model, IAPTModel):
        if tenant is not None and Ts > 1:  # one tenant of a multi-tenant adapter: a single-tenant model
            single = {**saved_cfg.to_dict(), "num_tenants": 1, "share_projections": False}
            model = apply_iapt(model, IAPTConfig.from_dict(single))
        else:
            model = apply_iapt(model, saved_cfg)
    cfg = model.iapt_config
    check_metadata(meta, cfg, _base_model(model), where)
    layers = layer_states(state, model.num_layers, file)
    Tm = cfg.num_tenants
    try:
        load_layers(model.generators, layers, saved_cfg, cfg, model.hidden_size, tenant)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
        raise ValueError(f"{file}: the weights do not fit the adapter's config ({exc})") from None
    model._uncalibrated = False  # loaded weights are trained: nothing to calibrate
    if tenant is None:
        model._set_tenant_weights(range(Tm), "loaded")
        model._set_tenant_weights(untrained, "initial")
    elif Tm > 1:
        model._set_tenant_weights([tenant], "initial" if Ts == 1 and untrained else "loaded")
    return model
