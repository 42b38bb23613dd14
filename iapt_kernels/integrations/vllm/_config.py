"""The deployment's IAPT section (``hf_config.iapt``), its adapters, and the engine-argument checks.

Plain Python and PyTorch: nothing here imports vLLM, so the checks are testable without an engine.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from ...modules import MultiTenantPromptGenerator
from ..config import IAPTConfig, generator_args, new_generator
from ..io import (
    CONFIG_NAME,
    UNTRAINED_KEY,
    WEIGHTS_NAME,
    layer_states,
    open_safetensors,
    read_iapt_config,
    set_tenant,
)

# Keys of SamplingParams.extra_args (over HTTP: vllm_xargs) and of the model config.
TENANT_KEY = "iapt_tenant"
CONFIG_KEY = "iapt"

# Tenant names and prompt layout of the IAPT engine configured last in this process: the frontend's
# per-request checks (which vLLM calls with the request alone) read them.
_FRONTEND: tuple[tuple[str, ...], "Layout"] | None = None


@dataclass(frozen=True)
class Adapter:
    """One served tenant: its name, the adapter directory, and the tenant slot in it (0 for a
    single-tenant adapter)."""

    name: str
    path: str
    tenant: int


def deployment(hf_config) -> dict[str, Any]:
    """The ``iapt`` section of a served model's config, checked for shape."""
    section = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(section, dict) or not isinstance(section.get("adapters"), dict):
        raise ValueError(
            f"an IAPT architecture needs the model config section {CONFIG_KEY!r} = "
            '{"adapters": {name: adapter_dir | [adapter_dir, tenant]}}: build the engine arguments with '
            "iapt_kernels.integrations.vllm.engine_args(model, adapters)"
        )
    if not section["adapters"]:
        raise ValueError(f"the model config section {CONFIG_KEY!r} names no adapters")
    return section


def adapters(section: dict[str, Any]) -> list[Adapter]:
    """The served tenants in their order (tenant id = position), each naming a directory and a slot."""
    out = []
    for name, spec in section["adapters"].items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tenant names must be non-empty strings, got {name!r}")
        if isinstance(spec, (list, tuple)) and len(spec) == 2:
            path, t = spec
        else:
            path, t = spec, None
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                f"tenant {name!r}: expected an adapter directory or [directory, tenant], got {spec!r}"
            )
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            raise ValueError(f"tenant {name!r}: the tenant slot must be an int >= 0, got {t!r}")
        out.append(Adapter(name, os.fspath(path), -1 if t is None else t))
    return out


def read_adapters(section: dict[str, Any], hf_config) -> tuple[list[Adapter], IAPTConfig, list[dict]]:
    """Check every adapter against the served model (as :func:`iapt_kernels.load_iapt` does) and
    against each other; returns the tenants (slots resolved), the shared config and the metadata."""
    items = adapters(section)
    cfg0, metas, resolved = None, [], []
    here_type = getattr(hf_config, "model_type", None)
    hidden = getattr(hf_config, "hidden_size", None)
    layers = getattr(hf_config, "num_hidden_layers", None)
    for a in items:
        cfg, meta = read_iapt_config(a.path)
        where = os.path.join(a.path, CONFIG_NAME)
        base = meta.get("base_model") or {}
        fix = "serve the adapter with the base model it was trained on"
        if base.get("model_type") is not None and here_type is not None and base["model_type"] != here_type:
            raise ValueError(
                f"{where} (tenant {a.name!r}): the adapter was trained on a {base['model_type']} model "
                f"({base.get('class')}{', ' + base['name_or_path'] if base.get('name_or_path') else ''}), "
                f"the served model is a {here_type} model; {fix}"
            )
        for what, saved, served in (
            ("hidden_size", meta["hidden_size"], hidden),
            ("num_layers", meta["num_layers"], layers),
        ):
            if saved != served:
                raise ValueError(
                    f"{where} (tenant {a.name!r}): the adapter has {what}={saved}, the served model {served}; {fix}"
                )
        T = cfg.num_tenants
        t = a.tenant
        if t < 0:
            if T != 1:
                raise ValueError(
                    f"{where} (tenant {a.name!r}): a multi-tenant adapter ({T} tenants); name the slot "
                    f"as [directory, tenant] with tenant in [0, {T})"
                )
            t = 0
        elif t >= T:
            raise ValueError(f"{where} (tenant {a.name!r}): tenant slot {t} out of range [0, {T})")
        if t in meta.get(UNTRAINED_KEY, []):
            # save_iapt recorded this slot as holding its initial random weights: served, it writes
            # arbitrary prompts. Said, not refused: a benchmark or a smoke test serves such adapters.
            warnings.warn(
                f"{where} (tenant {a.name!r}): slot {t} was saved with its initial random weights "
                f"(neither trained nor loaded: {UNTRAINED_KEY!r}); its requests get arbitrary prompts",
                UserWarning,
                stacklevel=2,
            )
        if cfg0 is None:
            cfg0 = cfg
        else:
            for what in ("num_tokens", "bottleneck_size", "degrees", "version"):
                x, y = getattr(cfg0, what), getattr(cfg, what)
                if x != y:
                    raise ValueError(
                        f"{where} (tenant {a.name!r}): {what}={y}, but tenant {items[0].name!r} has "
                        f"{what}={x}; the tenants of one engine share num_tokens, bottleneck_size, "
                        "degrees and version"
                    )
        metas.append(meta)
        resolved.append(Adapter(a.name, a.path, t))
    return resolved, cfg0, metas


def stacked_generators(
    tenants: list[Adapter], cfg: IAPTConfig, hidden_size: int, num_layers: int, backend: str
) -> list[MultiTenantPromptGenerator]:
    """One :class:`MultiTenantPromptGenerator` per layer, tenant ``i`` = ``tenants[i]``, in fp32."""
    T = len(tenants)
    cache: dict[str, tuple[IAPTConfig, list[dict]]] = {}
    for a in tenants:
        if a.path not in cache:
            file = os.path.join(a.path, WEIGHTS_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} is missing: the adapter of tenant {a.name!r} has no weights")
            saved, _ = read_iapt_config(a.path)
            cache[a.path] = (saved, layer_states(open_safetensors(file), num_layers, file))
    # Gated if any tenant is: an ungated tenant (e.g. saved before the gate existed) then gets gate 1,
    # which reproduces it exactly (set_tenant).
    gated = any(saved.gate_init is not None for saved, _ in cache.values())
    # Stacked even for one tenant: the engine's slot writer runs the multi-tenant op for every batch.
    gens = [
        MultiTenantPromptGenerator(
            T, *generator_args(cfg, hidden_size), backend, gate_init=1.0 if gated else None
        )
        for _ in range(num_layers)
    ]
    for i, a in enumerate(tenants):
        saved, layers = cache[a.path]
        for l, sd in enumerate(layers):
            # the tenant's own config: it says whether its state dict has a gate
            single = new_generator(saved, hidden_size, saved.num_tenants)
            single.load_state_dict(sd)
            if saved.num_tenants > 1:
                single = single.generator(a.tenant)
            set_tenant(gens[l], i, single)
    for g in gens:
        g.requires_grad_(False)
    return gens


# The engine arguments IAPT needs, with the reason each one matters (docs/design.md section 11).
REQUIRED_ARGS = (
    (
        "enforce_eager=True (--enforce-eager)",
        "torch.compile and CUDA graphs capture the step's shapes and the slot writer's control flow; "
        "the writer depends on which requests start their prefill in the step",
    ),
    (
        "enable_chunked_prefill=False (--no-enable-chunked-prefill)",
        "a chunk could hold a request's slots without its whole instruction, whose every-layer hidden "
        "states the generators read",
    ),
    (
        "enable_prefix_caching=False (--no-enable-prefix-caching)",
        "a cached prefix inside the instruction would start the request's prefill after position 0, "
        "without the instruction's hidden states",
    ),
)


def check_engine(vllm_config) -> None:
    """Refuse engine settings under which IAPT could be silently wrong, naming the argument to set."""
    mc, sc, cc, pc = (
        vllm_config.model_config,
        vllm_config.scheduler_config,
        vllm_config.cache_config,
        vllm_config.parallel_config,
    )
    bad = []
    if not mc.enforce_eager:
        bad.append(REQUIRED_ARGS[0])
    if sc.enable_chunked_prefill:
        bad.append(REQUIRED_ARGS[1])
    if cc.enable_prefix_caching:
        bad.append(REQUIRED_ARGS[2])
    if bad:
        raise ValueError(
            "IAPT on vLLM needs the engine arguments " + "; ".join(f"{arg}: {why}" for arg, why in bad)
        )
    if pc.pipeline_parallel_size != 1:
        raise ValueError("IAPT on vLLM supports pipeline_parallel_size=1 only (--pipeline-parallel-size 1)")
    if vllm_config.speculative_config is not None:
        raise ValueError("IAPT on vLLM does not support speculative decoding: leave speculative_config unset")
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            "IAPT on vLLM needs the V1 model runner (its per-request state reaches the model through a "
            "logits processor's batch updates): set the environment variable VLLM_USE_V2_MODEL_RUNNER=0"
        )


@dataclass(frozen=True)
class Layout:
    """The deployment's prompt layout ``[instruction][L slots][response prefix]``."""

    num_tokens: int
    slot_token_id: int
    response_prefix_ids: tuple[int, ...]

    @classmethod
    def of(cls, section: dict[str, Any], cfg: IAPTConfig, hf_config) -> "Layout":
        slot = section.get("slot_token_id")
        if slot is None:
            pad = getattr(hf_config, "pad_token_id", None)
            slot = pad if isinstance(pad, int) else 0
        return cls(cfg.num_tokens, int(slot), tuple(int(t) for t in section.get("response_prefix_ids") or ()))

    def build(self, ids: list[int]) -> list[int]:
        """The layout of a tenant request from its prompt ids: kept when it already ends with the
        slots and the response prefix; otherwise the slots go before a trailing response prefix (a chat
        template's assistant header), or the slots and the prefix after the instruction."""
        L, pre = self.num_tokens, list(self.response_prefix_ids)
        tail = [self.slot_token_id] * L + pre
        if len(ids) >= len(tail) and ids[len(ids) - len(tail) :] == tail:
            out = list(ids)
        elif pre and ids[len(ids) - len(pre) :] == pre:
            out = ids[: len(ids) - len(pre)] + tail
        else:
            out = list(ids) + tail
        if len(out) - len(tail) < 1:
            raise ValueError("the instruction is empty: IAPT's prompts are computed from at least one token")
        return out

    def instruction_length(self, ids) -> int:
        """``n`` of a prompt laid out by :meth:`build` (checked: the slots are where they must be)."""
        L, P = self.num_tokens, len(self.response_prefix_ids)
        n = len(ids) - L - P
        if n < 1 or any(t != self.slot_token_id for t in ids[n : n + L]):
            raise RuntimeError(
                f"IAPT: a tenant request reached the model without its {L} slot tokens before the "
                f"{P}-token response prefix; requests must enter through the engine's frontend"
            )
        return n


def set_frontend(tenants, layout: Layout) -> None:
    global _FRONTEND
    _FRONTEND = (tuple(tenants), layout)


def parse_tenant(extra_args, tenants) -> int | None:
    """The tenant id a request's ``extra_args`` names, or ``None`` (no adapter).

    ``tenants``: the served names in order, or ``None`` where this process serves no IAPT engine.
    Raises ``ValueError`` naming the problem: vLLM turns it into an HTTP 400 for that request alone.
    """
    if not extra_args or extra_args.get(TENANT_KEY) is None:
        return None
    name = extra_args[TENANT_KEY]
    if tenants is None:
        raise ValueError(f"{TENANT_KEY}={name!r}, but this engine serves no IAPT adapters")
    if not isinstance(name, str) or name not in tenants:
        raise ValueError(f"unknown IAPT tenant {name!r}; this engine serves {list(tenants)}")
    return tenants.index(name)


def validate(extra_args) -> None:
    """The frontend check of one request's tenant."""
    parse_tenant(extra_args, None if _FRONTEND is None else _FRONTEND[0])


def prepare(engine_input, params) -> None:
    """In the frontend, after tokenization and before the length check: lay a tenant request's prompt
    out as ``[instruction][L slots][response prefix]`` (docs/design.md section 11)."""
    extra = getattr(params, "extra_args", None)
    if _FRONTEND is None or parse_tenant(extra, _FRONTEND[0]) is None:
        return
    if not isinstance(engine_input, dict) or engine_input.get("type") not in ("token", None):
        raise ValueError(
            "IAPT tenant requests take a text or token-id prompt (no embeddings or multimodal input)"
        )
    ids = engine_input.get("prompt_token_ids")
    if ids is None:
        raise ValueError("IAPT tenant requests need a prompt")
    engine_input["prompt_token_ids"] = _FRONTEND[1].build(list(ids))
