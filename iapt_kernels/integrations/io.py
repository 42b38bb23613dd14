"""Save and load IAPT adapters: ``adapter_model.safetensors`` + ``iapt_config.json`` in a directory."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .transformers import IAPTConfig, IAPTModel, apply_iapt

__all__ = ["save_iapt", "load_iapt"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "iapt_config.json"
FORMAT_VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    while not isinstance(model, IAPTModel) and hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DistributedDataParallel, DataParallel
    return model


def _tenant_generator(mt: nn.Module, t: int) -> nn.Module:
    """Tenant ``t`` of a multi-tenant generator as a single-tenant ``PromptGenerator``."""
    get = getattr(mt, "generator", None)
    if not callable(get):
        raise NotImplementedError(f"{type(mt).__name__} has no .generator(t)")
    return get(t)


def _set_tenant(mt: nn.Module, t: int, gen: nn.Module) -> None:
    """Write single-tenant generator ``gen`` into tenant slot ``t`` of ``mt``."""
    for name in ("set_generator", "load_generator", "set_tenant"):
        fn = getattr(mt, name, None)
        if callable(fn):
            fn(t, gen)
            return
    # Generic fallback: stacked parameters named like the single generator's with a leading tenant axis.
    src = dict(gen.named_parameters())
    dst = dict(mt.named_parameters())
    with torch.no_grad():
        for name, p in src.items():
            if name in dst and dst[name].dim() >= 1 and dst[name][t].numel() == p.numel():
                dst[name][t].copy_(p.reshape(dst[name][t].shape))
            else:
                raise NotImplementedError(
                    f"cannot write tenant {t} of {type(mt).__name__}: no set_generator and no stacked "
                    f"parameter for {name!r}")


def _check_tenant(t, T: int) -> int:
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < T:
        raise ValueError(f"tenant must be an int in [0, {T}), got {t!r}")
    return t


def save_iapt(model: nn.Module, path: str | os.PathLike, tenant: int | None = None) -> None:
    """Save the generators of an :class:`IAPTModel` (or a DDP-wrapped one) to directory ``path``.

    Writes ``adapter_model.safetensors`` (the generators' state_dict, keys ``<layer>.<param>``) and
    ``iapt_config.json`` (the :class:`IAPTConfig`, ``hidden_size`` and ``num_layers``). With
    ``tenant=t`` on a multi-tenant model, saves only tenant ``t``, as a single-tenant adapter.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    if not isinstance(model, IAPTModel):
        raise TypeError(f"save_iapt needs an IAPTModel (from apply_iapt), got {type(model).__name__}")
    cfg = model.iapt_config
    T = cfg.num_tenants
    if tenant is None:
        state = {f"{l}.{k}": v for l, g in enumerate(model.generators) for k, v in g.state_dict().items()}
        out_cfg = IAPTConfig.from_dict(cfg.to_dict())
    elif T == 1:
        _check_tenant(tenant, 1)
        state = {f"{l}.{k}": v for l, g in enumerate(model.generators) for k, v in g.state_dict().items()}
        out_cfg = IAPTConfig.from_dict(cfg.to_dict())
    else:
        _check_tenant(tenant, T)
        state = {f"{l}.{k}": v for l, g in enumerate(model.generators)
                 for k, v in _tenant_generator(g, tenant).state_dict().items()}
        out_cfg = IAPTConfig.from_dict({**cfg.to_dict(), "num_tenants": 1, "share_projections": False})
    # clone: shared projections are the same tensor under several keys, which safetensors refuses
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": "iapt_kernels", "format_version": FORMAT_VERSION, "iapt_config": out_cfg.to_dict(),
            "hidden_size": model.hidden_size, "num_layers": model.num_layers}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def read_iapt_config(path: str | os.PathLike) -> tuple[IAPTConfig, dict[str, Any]]:
    """``(config, metadata)`` of an adapter saved by :func:`save_iapt`."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no IAPT adapter at {path!r} (missing {CONFIG_NAME})")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != "iapt_kernels":
        raise ValueError(f"{file} is not an iapt_kernels adapter config")
    return IAPTConfig.from_dict(meta["iapt_config"]), meta


def _layer_states(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in state.items():
        l, _, rest = k.partition(".")
        out[int(l)][rest] = v
    return out


def load_iapt(model: nn.Module, path: str | os.PathLike, tenant: int | None = None) -> IAPTModel:
    """Load an adapter saved by :func:`save_iapt` into ``model``; returns the :class:`IAPTModel`.

    ``model`` is an :class:`IAPTModel`, or a bare causal LM (it is then wrapped with the saved
    config). ``tenant`` names a tenant slot on the multi-tenant side: a single-tenant adapter loads
    into tenant ``tenant`` of a multi-tenant model; tenant ``tenant`` of a multi-tenant adapter loads
    into a single-tenant model (or into the same slot of a multi-tenant one). Without ``tenant``,
    adapter and model must have the same number of tenants.
    """
    from safetensors.torch import load_file

    saved_cfg, meta = read_iapt_config(path)
    model = _unwrap(model)
    if not isinstance(model, IAPTModel):
        model = apply_iapt(model, saved_cfg)
    cfg = model.iapt_config
    for what, a, b in (("hidden_size", meta["hidden_size"], model.hidden_size),
                       ("num_layers", meta["num_layers"], model.num_layers),
                       ("num_tokens", saved_cfg.num_tokens, cfg.num_tokens),
                       ("bottleneck_size", saved_cfg.bottleneck_size, cfg.bottleneck_size),
                       ("degrees", tuple(saved_cfg.degrees), tuple(cfg.degrees))):
        if a != b:
            raise ValueError(f"adapter at {path!r} has {what}={a}, the model has {b}")
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    layers = _layer_states(state, model.num_layers)
    Ts, Tm = saved_cfg.num_tenants, cfg.num_tenants
    gens = model.generators
    if tenant is None:
        if Ts != Tm:
            raise ValueError(f"adapter has num_tenants={Ts}, the model {Tm}: pass tenant= to pick a slot")
        for g, sd in zip(gens, layers):
            g.load_state_dict(sd)
        return model
    if Ts == 1 and Tm == 1:
        _check_tenant(tenant, 1)
        for g, sd in zip(gens, layers):
            g.load_state_dict(sd)
    elif Ts == 1:
        _check_tenant(tenant, Tm)
        import iapt_kernels

        for g, sd in zip(gens, layers):
            single = iapt_kernels.PromptGenerator(model.hidden_size, cfg.bottleneck_size, cfg.num_tokens,
                                                  tuple(cfg.degrees), cfg.activation_init, cfg.version)
            single.load_state_dict(sd)
            p0 = next(g.parameters())
            _set_tenant(g, tenant, single.to(device=p0.device, dtype=p0.dtype))
    else:
        _check_tenant(tenant, Ts)
        import iapt_kernels

        for g, sd in zip(gens, layers):
            mt = iapt_kernels.MultiTenantPromptGenerator(
                Ts, model.hidden_size, saved_cfg.bottleneck_size, saved_cfg.num_tokens, tuple(saved_cfg.degrees),
                saved_cfg.activation_init, saved_cfg.version)
            mt.load_state_dict(sd)
            single = _tenant_generator(mt, tenant)
            p0 = next(g.parameters())
            single = single.to(device=p0.device, dtype=p0.dtype)
            if Tm == 1:
                g.load_state_dict(single.state_dict())
            else:
                _check_tenant(tenant, Tm)
                _set_tenant(g, tenant, single)
    return model
