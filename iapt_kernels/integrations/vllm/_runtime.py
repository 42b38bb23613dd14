"""The worker side: the request tracker (a vLLM logits processor), the per-step plan and the layer hooks.

Imported by vLLM (the model classes are registered lazily as ``module:Class``), so it imports vLLM.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from vllm.forward_context import get_forward_context
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ...tenants import TenantGroups
from . import _config

# The tracker of this worker process (one model runner, one persistent batch per worker).
_TRACKER: IAPTRequestTracker | None = None


class IAPTRequestTracker(LogitsProcessor):
    """Keeps, for every row of the model runner's persistent batch, the row's ``(tenant_id,
    instruction_length)``: the tenant its ``SamplingParams.extra_args`` names, the length from its
    prompt, which the frontend laid out (rows without a tenant are absent: no adapter).

    It changes no logits (argmax invariant). vLLM calls :meth:`update_state` after it has added,
    removed, condensed and reordered the batch for the step and before the step's forward, and the
    step's tokens are laid out in the batch's row order, so row ``r`` of the table describes the
    ``r``-th request of the forward. Preempted requests leave the batch and re-enter as added rows
    with their parameters, so they are tracked again when they resume. :meth:`validate_params` runs in
    the frontend at admission: an unknown tenant fails that request alone (HTTP 400).
    """

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        global _TRACKER
        hf = vllm_config.model_config.hf_config
        self.tenants, self.layout = None, None
        if getattr(hf, _config.CONFIG_KEY, None) is not None:
            section = _config.deployment(hf)
            tenants, cfg, _ = _config.read_adapters(section, hf)
            self.tenants = tuple(a.name for a in tenants)
            self.layout = _config.Layout.of(section, cfg, hf)
        self.rows: dict[int, tuple[int, int]] = {}
        _TRACKER = self

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        _config.validate(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.rows
        for i in batch_update.removed:
            rows.pop(i, None)
        for i, params, prompt, _out in batch_update.added:
            tenant = _config.parse_tenant(params.extra_args, self.tenants)
            if tenant is None:
                rows.pop(i, None)
            else:
                rows[i] = (tenant, self.layout.instruction_length(prompt))
        for a, b, direction in batch_update.moved:
            ra, rb = rows.pop(a, None), rows.pop(b, None)
            if ra is not None:
                rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                rows[a] = rb


class _Plan:
    """Where one step's prompts come from and go: packed instruction rows, their request offsets,
    tenants and slot rows, all as index tensors on the model's device."""

    __slots__ = ("instr", "cu", "max_seqlen", "tenant_ids", "slots", "groups")

    def __init__(self, instr, cu, max_seqlen, tenant_ids, slots, groups):
        self.instr, self.cu, self.max_seqlen = instr, cu, max_seqlen
        self.tenant_ids, self.slots, self.groups = tenant_ids, slots, groups


class IAPTRuntime:
    """The generators of one served model and the hooks that apply them (docs/design.md section 11)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, vllm_config) -> None:
        _config.check_engine(vllm_config)
        cc = vllm_config.compilation_config
        mode = getattr(cc.mode, "name", str(cc.mode))
        if mode != "NONE":  # enforce_eager sets it; a compilation_config given by hand must not undo it
            raise ValueError(
                f"IAPT on vLLM needs compilation mode NONE (enforce_eager=True, --enforce-eager), got {mode}"
            )
        hf = vllm_config.model_config.hf_config
        section = _config.deployment(hf)
        self.tenants, self.cfg, _ = _config.read_adapters(section, hf)
        self.num_tokens = self.cfg.num_tokens
        self.backend = section.get("backend", "auto")
        self.hidden_size = int(hf.hidden_size)
        self.layers = layers
        self.generators: list[nn.Module] = []  # loaded with the weights (load_adapters)
        self.plan: _Plan | None = None
        self.stats = {
            "steps": 0,
            "generator_steps": 0,
            "prefill_rows": 0,
            "generator_calls": 0,
            "num_layers": len(layers),
        }
        # Hooks on the layers only: vLLM's compile decorator replaces the backbone's __call__, which
        # would bypass a hook on the backbone itself. The first layer's hook plans the step.
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._layer_hook(i))

    def load_adapters(self, device, dtype) -> None:
        if _TRACKER is None or _TRACKER.tenants is None:
            # The model runner builds its logits processors before it loads the model: without the
            # tracker no request would ever get its prompts, silently.
            raise RuntimeError(
                "IAPT: the request tracker (logits processor) is not loaded in this worker; start the "
                "engine through vLLM's configuration (engine_args), whose IAPT hook adds it"
            )
        gens = _config.stacked_generators(
            self.tenants, self.cfg, self.hidden_size, len(self.layers), self.backend
        )
        # fp32 generators, as IAPTModel keeps them under a lower-precision backbone (fp64 stays fp64)
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.generators = [g.to(device=device, dtype=gen_dtype) for g in gens]

    # ------------------------------------------------------------------ per step
    def _prepare(self, positions: torch.Tensor) -> None:
        """Plan the step: which requests start their prefill in it, and where their tokens are."""
        self.stats["steps"] += 1
        self.plan = None
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if not meta or _TRACKER is None or not _TRACKER.rows:
            return
        if isinstance(meta, list):  # micro-batches; never with IAPT's engine settings
            raise RuntimeError("IAPT: micro-batched forward passes are not supported")
        m = next(iter(meta.values()))
        if getattr(m, "max_query_len", 2) == 1:
            return  # every request decodes one token: the prompts are in the KV cache already
        qsl = m.query_start_loc.tolist()
        pos = positions.reshape(-1) if positions.dim() == 1 else positions[0]  # mrope: (3, N)
        # Tracked rows with tokens in this step (query_start_loc may be padded past the requests).
        rows = [(r, t) for r, t in sorted(_TRACKER.rows.items()) if r + 1 < len(qsl) and qsl[r + 1] > qsl[r]]
        if not rows:
            return
        first = pos[torch.tensor([qsl[r] for r, _ in rows], device=pos.device)].tolist()
        L = self.num_tokens
        instr, cu, tids, slots = [], [0], [], []
        for (r, (tenant, n)), p0 in zip(rows, first):
            s, q = qsl[r], qsl[r + 1] - qsl[r]
            if p0 >= n + L:
                continue  # past its slots: a decode step for this request
            if p0 != 0 or q < n + L:
                raise RuntimeError(
                    f"IAPT: request row {r} runs positions [{p0}, {p0 + q}) in one step, but its "
                    f"{n}-token instruction and {L} slots must be computed in one step from position 0 "
                    "(chunked prefill or prefix caching is on: start the engine with "
                    "enable_chunked_prefill=False and enable_prefix_caching=False)"
                )
            instr.append(torch.arange(s, s + n))
            cu.append(cu[-1] + n)
            tids.append(tenant)
            slots.append(torch.arange(s + n, s + n + L))
        if not tids:
            return
        dev = positions.device
        tenant_ids = torch.tensor(tids, device=dev)
        self.plan = _Plan(
            torch.cat(instr).to(dev),
            torch.tensor(cu, dtype=torch.int32, device=dev),
            max(b - a for a, b in zip(cu, cu[1:])),  # known on the host: no layer reads it back
            tenant_ids,
            torch.cat(slots).to(dev),
            TenantGroups.from_valid_ids(tenant_ids, len(self.tenants)),
        )
        self.stats["generator_steps"] += 1
        self.stats["prefill_rows"] += len(tids)

    def _layer_hook(self, index: int):
        def hook(module, args):
            if index == 0:
                self._prepare(args[0])
            plan = self.plan
            if plan is None:
                return None
            positions, hidden, residual = args[0], args[1], args[2]
            # vLLM carries the residual stream as (hidden, residual); the layer's input is their sum
            # (the first layer has no residual yet).
            stream = hidden if residual is None else hidden + residual
            gen = self.generators[index]
            p0 = gen.down.weight
            x = stream.index_select(0, plan.instr).to(p0.dtype)
            prompts = gen(
                x, None, cu_seqlens=plan.cu, groups=plan.groups, max_seqlen=plan.max_seqlen
            )  # (B_p, L, d)
            self.stats["generator_calls"] += 1
            values = prompts.reshape(-1, prompts.shape[-1]).to(hidden.dtype)
            hidden = hidden.index_copy(0, plan.slots, values)
            if residual is not None:
                residual = residual.index_fill(0, plan.slots, 0)
            return (positions, hidden, residual) + tuple(args[3:])

        return hook


def _iapt_class(base: type) -> type:
    """``IAPT<base>``: vLLM's model class with the IAPT runtime attached after construction."""

    class IAPTModelForCausalLM(base):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.iapt_runtime = IAPTRuntime(self, self.model.layers, vllm_config)

        def load_weights(self, weights):
            loaded = super().load_weights(weights)
            p = next(self.parameters())
            self.iapt_runtime.load_adapters(p.device, p.dtype)
            return loaded

    IAPTModelForCausalLM.__name__ = IAPTModelForCausalLM.__qualname__ = "IAPT" + base.__name__
    IAPTModelForCausalLM.__doc__ = (
        f"vLLM's ``{base.__name__}`` serving IAPT tenants (iapt_kernels.integrations.vllm): a forward "
        "pre-hook per decoder layer writes each prefilling request's soft prompts into its slots."
    )
    return IAPTModelForCausalLM


def _families():
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.mistral import MistralForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    return LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


_BASES = _families()
IAPTLlamaForCausalLM, IAPTMistralForCausalLM, IAPTQwen2ForCausalLM, IAPTQwen3ForCausalLM = (
    _iapt_class(b) for b in _BASES
)
TRACKER_PATH = f"{__name__}:IAPTRequestTracker"
del os
