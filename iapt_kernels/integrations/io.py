"""The adapter files: ``adapter_model.safetensors`` + ``iapt_config.json`` in a directory.

``iapt_config.json`` records the :class:`IAPTConfig` and the base model (``model_type``, class name,
hidden size, layer count), so an adapter refuses to load into a model it was not trained on. Every
load error names the file it comes from. Files are written with the process umask, like any other
file the user writes. :func:`read_iapt_config` also reads the ``model.safetensors`` a
``transformers.Trainer`` writes for an :class:`IAPTModel` (``save_model()`` and its checkpoints): the
module's state_dict is the generators plus the adapter metadata under ``_extra_state``.

This layer knows the configuration, the metadata, tensors and generator modules, never the model that
holds them: :mod:`.model` builds :func:`save_iapt` and :func:`load_iapt` on it, and the vLLM plugin
reads adapters through it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..modules import MultiTenantPromptGenerator, PromptGenerator
from .config import IAPTConfig, new_generator

__all__ = ["read_iapt_config"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "iapt_config.json"
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer writes for a non-PreTrainedModel
EXTRA_STATE_KEY = "_extra_state"
UNTRAINED_KEY = "untrained_tenants"  # adapter metadata: tenants saved with their initial weights
FORMAT_VERSION = 1


def _gate_mismatch(what: str) -> ValueError:
    return ValueError(
        f"{what} has a gate (IAPTConfig.gate_init) and the model's generators have none: load it into a "
        "model built with the adapter's own config (load_iapt on the bare backbone, or IAPTModel."
        "from_pretrained)"
    )


def set_tenant(mt: MultiTenantPromptGenerator, t: int, gen: PromptGenerator) -> None:
    """Write single-tenant generator ``gen`` into tenant slot ``t`` of ``mt``: each stacked parameter
    is named like the single generator's, with a leading tenant axis. An ungated ``gen`` in a gated
    ``mt`` gets gate 1, which reproduces it exactly (``x * 1 == x``); a gated one in an ungated
    ``mt`` is refused."""
    stacked = dict(mt.named_parameters())
    if gen.gate is not None and mt.gate is None:
        raise _gate_mismatch("the adapter")
    with torch.no_grad():
        for name, p in gen.named_parameters():
            stacked[name][t].copy_(p.reshape(stacked[name][t].shape))
        if gen.gate is None and mt.gate is not None:
            mt.gate[t] = 1.0


def load_generator(gen: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """``gen.load_state_dict(sd)``, where a state dict without ``gate`` (saved ungated, e.g. before
    the gate existed) loads into a gated ``gen`` with gate 1, exactly as it was trained; a gated
    state dict into an ungated ``gen`` is refused."""
    if gen.gate is not None and "gate" not in sd:
        sd = {**sd, "gate": torch.ones_like(gen.gate)}
    elif gen.gate is None and "gate" in sd:
        raise _gate_mismatch("the adapter")
    gen.load_state_dict(sd)


def check_tenant(t, T: int) -> int:
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < T:
        raise ValueError(f"tenant must be an int in [0, {T}), got {t!r}")
    return t


def base_model_info(backbone: nn.Module, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """What the metadata records of the base model, to refuse an adapter trained on another one."""
    config = getattr(backbone, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "class": type(backbone).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
    }


def adapter_metadata(config: IAPTConfig, base: dict[str, Any], untrained: list[int]) -> dict[str, Any]:
    """The ``iapt_config.json`` content of an adapter with ``config`` on base model ``base``
    (:func:`base_model_info`); ``untrained``: the tenants recorded under ``untrained_tenants``."""
    meta = {
        "format": "iapt_kernels",
        "format_version": FORMAT_VERSION,
        "iapt_config": config.to_dict(),
        "hidden_size": base["hidden_size"],
        "num_layers": base["num_layers"],
        "base_model": base,
    }
    if untrained:  # absent (adapters of earlier versions too): every tenant holds weights
        meta[UNTRAINED_KEY] = untrained
    return meta


def decode_metadata(state, where: str) -> dict[str, Any]:
    """Metadata from :meth:`IAPTModel.get_extra_state`'s uint8 JSON tensor (or bytes/str/dict)."""
    if isinstance(state, dict):
        return state
    try:
        if torch.is_tensor(state):
            state = bytes(state.detach().cpu().to(torch.uint8).tolist())
        if isinstance(state, (bytes, bytearray)):
            state = state.decode()
        meta = json.loads(state)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: the IAPT metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: the IAPT metadata is not a JSON object")
    return meta


def _parse_config(meta: dict[str, Any], where: str) -> IAPTConfig:
    if meta.get("format") != "iapt_kernels":
        raise ValueError(f'{where} is not an iapt_kernels adapter config (no "format": "iapt_kernels")')
    for key in ("iapt_config", "hidden_size", "num_layers"):
        if key not in meta:
            raise ValueError(f"{where}: the adapter config lacks {key!r}; re-save the adapter with save_iapt")
    try:
        return IAPTConfig.from_dict(meta["iapt_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad iapt_config ({exc})") from None


def check_metadata(meta: dict[str, Any], config: IAPTConfig, here: dict[str, Any], where: str) -> IAPTConfig:
    """The saved :class:`IAPTConfig`, after checking that the adapter fits a model with ``config`` on
    base model ``here`` (:func:`base_model_info`).

    Refuses another base model (``model_type``, or the class where there is none), another hidden
    size or layer count, and another ``num_tokens``, ``bottleneck_size`` or ``degrees``.
    """
    saved = _parse_config(meta, where)
    base = meta.get("base_model") or {}
    fix = "load the adapter into the base model it was trained on"
    for key in (
        ("model_type", "class")
        if base.get("model_type") is None or here["model_type"] is None
        else ("model_type",)
    ):
        if base.get(key) is not None and base[key] != here[key]:
            raise ValueError(
                f"{where}: the adapter was trained on a {base.get('model_type') or base.get('class')} "
                f"model ({base.get('class')}{', ' + base['name_or_path'] if base.get('name_or_path') else ''}"
                f"), this is a {here['model_type'] or here['class']} model ({here['class']}); {fix}"
            )
    for what, a, b in (
        ("hidden_size", meta["hidden_size"], here["hidden_size"]),
        ("num_layers", meta["num_layers"], here["num_layers"]),
        ("num_tokens", saved.num_tokens, config.num_tokens),
        ("bottleneck_size", saved.bottleneck_size, config.bottleneck_size),
        ("degrees", tuple(saved.degrees), tuple(config.degrees)),
    ):
        if a != b:
            raise ValueError(
                f"{where}: the adapter has {what}={a}, the model has {b}; {fix}, with its IAPTConfig"
            )
    return saved


def full_tensor(v: torch.Tensor) -> torch.Tensor:
    full = getattr(v, "full_tensor", None)  # a DTensor (FSDP2 fully_shard): gather the whole parameter
    return full() if callable(full) else v


def rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _write(path: str, data: bytes) -> None:
    # Plain open(): the file gets the process umask like every other file the user writes (a
    # temporary-file-and-rename writer would leave it 0600). Written aside, then renamed, so a crash
    # never leaves a truncated adapter under the real name.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``state`` (keys ``<layer>.<param>``) and ``meta`` (:func:`adapter_metadata`) to ``path``."""
    from safetensors.torch import save

    # clone: shared projections are the same tensor under several keys, which safetensors refuses
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _write(os.path.join(path, WEIGHTS_NAME), save(state, metadata={"format": "pt"}))
    _write(os.path.join(path, CONFIG_NAME), (json.dumps(meta, indent=2) + "\n").encode())


def read_iapt_config(path: str | os.PathLike) -> tuple[IAPTConfig, dict[str, Any]]:
    """``(config, metadata)`` of an adapter saved by :func:`save_iapt` (or a ``Trainer`` output)."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(file):
        try:
            with open(file) as f:
                meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not valid JSON ({exc}); re-save the adapter with save_iapt") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{file}: not an iapt_kernels adapter config (a JSON object)")
        return _parse_config(meta, file), meta
    trainer = os.path.join(path, TRAINER_WEIGHTS_NAME)
    if os.path.isfile(trainer):
        meta = decode_metadata(open_safetensors(trainer, keys=[EXTRA_STATE_KEY])[EXTRA_STATE_KEY], trainer)
        return _parse_config(meta, trainer), meta
    raise FileNotFoundError(
        f"no IAPT adapter at {path!r}: neither {CONFIG_NAME} (save_iapt, save_pretrained) nor "
        f"{TRAINER_WEIGHTS_NAME} (transformers.Trainer) is there"
    )


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """``(state, file, where)`` of the adapter at ``path`` (whose config :func:`read_iapt_config`
    read): the generator tensors keyed ``<layer>.<param>``, the file they come from, and the file
    that holds the metadata, for errors."""
    config_file = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(config_file):
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} is missing: the adapter at {path!r} has a config but no weights")
        return open_safetensors(file), file, config_file
    file = os.path.join(path, TRAINER_WEIGHTS_NAME)
    state = {k[len("generators.") :]: v for k, v in open_safetensors(file, prefix="generators.").items()}
    return state, file, file


def open_safetensors(file: str, keys=None, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (all, ``keys``, or those under ``prefix``); errors name the file."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
            if keys is not None and not set(keys) <= set(names):
                missing = sorted(set(keys) - set(names))
                raise LookupError(
                    f"{file}: no {missing[0]!r} in it; this is not an IAPT model's state_dict (save "
                    "adapters with save_iapt or IAPTModel.save_pretrained)"
                )
            if keys is not None:
                names = list(keys)
            elif prefix is not None:
                names = [k for k in names if k.startswith(prefix)]
            return {k: f.get_tensor(k) for k in names}
    except LookupError as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # safetensors raises its own error types for truncated or garbage files
        raise ValueError(
            f"{file}: cannot read it as safetensors ({type(exc).__name__}: {exc}); the file is damaged "
            "or not an adapter: re-save it"
        ) from None


def layer_states(state: dict[str, torch.Tensor], n: int, file: str) -> list[dict[str, torch.Tensor]]:
    """``state`` (keys ``<layer>.<param>``) split into one state_dict per layer, all ``n`` present."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in state.items():
        l, _, rest = k.partition(".")
        if not l.isdigit() or int(l) >= n or not rest:
            raise ValueError(
                f"{file}: unexpected tensor {k!r} (keys are <layer>.<parameter>, layers 0..{n - 1})"
            )
        out[int(l)][rest] = v
    empty = [l for l, sd in enumerate(out) if not sd]
    if empty:
        raise ValueError(f"{file}: no weights for layers {empty}")
    return out


def load_layers(gens, layers, saved_cfg: IAPTConfig, cfg: IAPTConfig, hidden_size: int, tenant) -> None:
    """Load per-layer state dicts ``layers`` of an adapter with ``saved_cfg`` into generators
    ``gens`` of a model with ``cfg``; ``tenant`` picks the slot on the multi-tenant side (see
    :func:`load_iapt`)."""
    Ts, Tm = saved_cfg.num_tenants, cfg.num_tenants
    if tenant is None:
        if Ts != Tm:
            raise ValueError(f"adapter has num_tenants={Ts}, the model {Tm}: pass tenant= to pick a slot")
        for g, sd in zip(gens, layers):
            load_generator(g, sd)
        return
    if Ts == 1 and Tm == 1:
        check_tenant(tenant, 1)
        for g, sd in zip(gens, layers):
            load_generator(g, sd)
    elif Ts == 1:
        check_tenant(tenant, Tm)
        for g, sd in zip(gens, layers):
            single = new_generator(saved_cfg, hidden_size)
            single.load_state_dict(sd)
            p0 = next(g.parameters())
            set_tenant(g, tenant, single.to(device=p0.device, dtype=p0.dtype))
    else:
        check_tenant(tenant, Ts)
        for g, sd in zip(gens, layers):
            mt = new_generator(saved_cfg, hidden_size, Ts)
            mt.load_state_dict(sd)
            single = mt.generator(tenant)
            p0 = next(g.parameters())
            single = single.to(device=p0.device, dtype=p0.dtype)
            if Tm == 1:
                load_generator(g, single.state_dict())
            else:
                check_tenant(tenant, Tm)
                set_tenant(g, tenant, single)
