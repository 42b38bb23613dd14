"""Save and load IAPT adapters: ``adapter_model.safetensors`` + ``iapt_config.json`` in a directory.

``iapt_config.json`` records the :class:`IAPTConfig` and the base model (``model_type``, class name,
hidden size, layer count), so an adapter refuses to load into a model it was not trained on. Every
load error names the file it comes from. Files are written with the process umask, like any other
file the user writes. :func:`load_iapt` also reads the ``model.safetensors`` a ``transformers.Trainer``
writes for an :class:`IAPTModel` (``save_model()`` and its checkpoints): the module's state_dict is the
generators plus the adapter metadata under ``_extra_state``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..modules import MultiTenantPromptGenerator, PromptGenerator
from .transformers import UNTRAINED_KEY, IAPTConfig, IAPTModel, _new_generator, apply_iapt

__all__ = ["save_iapt", "load_iapt", "read_iapt_config"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "iapt_config.json"
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer writes for a non-PreTrainedModel
EXTRA_STATE_KEY = "_extra_state"
FORMAT_VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    while (
        not isinstance(model, IAPTModel) and hasattr(model, "module") and isinstance(model.module, nn.Module)
    ):
        model = model.module  # DistributedDataParallel, DataParallel
    return model


def _set_tenant(mt: MultiTenantPromptGenerator, t: int, gen: PromptGenerator) -> None:
    """Write single-tenant generator ``gen`` into tenant slot ``t`` of ``mt``: each stacked parameter
    is named like the single generator's, with a leading tenant axis."""
    stacked = dict(mt.named_parameters())
    with torch.no_grad():
        for name, p in gen.named_parameters():
            stacked[name][t].copy_(p.reshape(stacked[name][t].shape))


def _check_tenant(t, T: int) -> int:
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < T:
        raise ValueError(f"tenant must be an int in [0, {T}), got {t!r}")
    return t


def _base_model_info(model: IAPTModel) -> dict[str, Any]:
    config = getattr(model.model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "class": type(model.model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
    }


def _untrained(model: IAPTModel) -> list[int]:
    """The tenants of a multi-tenant ``model`` that still hold their initial random weights."""
    if model.iapt_config.num_tenants == 1:
        return []
    return [t for t, how in enumerate(model.tenant_weights) if how == "initial"]


def adapter_metadata(
    model: IAPTModel, config: IAPTConfig | None = None, untrained: list[int] | None = None
) -> dict[str, Any]:
    """The ``iapt_config.json`` content for ``model`` (``config`` replaces its :class:`IAPTConfig`;
    ``untrained``, default the model's own, the tenants recorded under ``untrained_tenants``)."""
    cfg = model.iapt_config if config is None else config
    meta = {
        "format": "iapt_kernels",
        "format_version": FORMAT_VERSION,
        "iapt_config": cfg.to_dict(),
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "base_model": _base_model_info(model),
    }
    untrained = _untrained(model) if untrained is None else untrained
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


def check_metadata(model: IAPTModel, meta: dict[str, Any], where: str) -> IAPTConfig:
    """The saved :class:`IAPTConfig`, after checking that the adapter fits ``model``.

    Refuses another base model (``model_type``, or the class where there is none), another hidden
    size or layer count, and another ``num_tokens``, ``bottleneck_size`` or ``degrees``.
    """
    saved = _parse_config(meta, where)
    cfg = model.iapt_config
    base, here = meta.get("base_model") or {}, _base_model_info(model)
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
        ("hidden_size", meta["hidden_size"], model.hidden_size),
        ("num_layers", meta["num_layers"], model.num_layers),
        ("num_tokens", saved.num_tokens, cfg.num_tokens),
        ("bottleneck_size", saved.bottleneck_size, cfg.bottleneck_size),
        ("degrees", tuple(saved.degrees), tuple(cfg.degrees)),
    ):
        if a != b:
            raise ValueError(
                f"{where}: the adapter has {what}={a}, the model has {b}; {fix}, with its IAPTConfig"
            )
    return saved


def _full_tensor(v: torch.Tensor) -> torch.Tensor:
    full = getattr(v, "full_tensor", None)  # a DTensor (FSDP2 fully_shard): gather the whole parameter
    return full() if callable(full) else v


def _rank0() -> bool:
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
    from safetensors.torch import save

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
        _check_tenant(tenant, T)
        # tenant t of every stacked (T, ...) parameter, in the single-tenant generator's shapes
        shapes = {k: v.shape for k, v in model.generators[0].generator(0).state_dict().items()}
        layers = [{k: _full_tensor(v)[tenant].reshape(shapes[k]) for k, v in sd.items()} for sd in layers]
        out_cfg = IAPTConfig.from_dict({**cfg.to_dict(), "num_tenants": 1, "share_projections": False})
        untrained, out_untrained = [t for t in untrained if t == tenant], [0] if tenant in untrained else []
    else:
        if tenant is not None:
            _check_tenant(tenant, 1)
        out_cfg = IAPTConfig.from_dict(cfg.to_dict())
        out_untrained = untrained
    if untrained and _rank0():
        warnings.warn(
            f"save_iapt: tenants {untrained} hold their initial random weights (neither trained nor "
            f"loaded); the adapter records them under {UNTRAINED_KEY!r}, and load_iapt will not count "
            "them as loaded",
            UserWarning,
            stacklevel=2,
        )
    state = {f"{l}.{k}": _full_tensor(v) for l, sd in enumerate(layers) for k, v in sd.items()}
    if not _rank0():
        return
    # clone: shared projections are the same tensor under several keys, which safetensors refuses
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _write(os.path.join(path, WEIGHTS_NAME), save(state, metadata={"format": "pt"}))
    meta = adapter_metadata(model, out_cfg, out_untrained)
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
        meta = decode_metadata(_open_safetensors(trainer, keys=[EXTRA_STATE_KEY])[EXTRA_STATE_KEY], trainer)
        return _parse_config(meta, trainer), meta
    raise FileNotFoundError(
        f"no IAPT adapter at {path!r}: neither {CONFIG_NAME} (save_iapt, save_pretrained) nor "
        f"{TRAINER_WEIGHTS_NAME} (transformers.Trainer) is there"
    )


def _open_safetensors(file: str, keys=None, prefix: str | None = None) -> dict[str, torch.Tensor]:
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


def _layer_states(state: dict[str, torch.Tensor], n: int, file: str) -> list[dict[str, torch.Tensor]]:
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
    config_file = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(config_file):
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} is missing: the adapter at {path!r} has a config but no weights")
        state = _open_safetensors(file)
    else:
        file = os.path.join(path, TRAINER_WEIGHTS_NAME)
        state = {k[len("generators.") :]: v for k, v in _open_safetensors(file, prefix="generators.").items()}
    where = config_file if os.path.isfile(config_file) else file
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
    check_metadata(model, meta, where)
    layers = _layer_states(state, model.num_layers, file)
    Tm = cfg.num_tenants
    gens = model.generators
    try:
        _load_layers(model, gens, layers, saved_cfg, cfg, Ts, Tm, tenant)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
        raise ValueError(f"{file}: the weights do not fit the adapter's config ({exc})") from None
    if tenant is None:
        model._set_tenant_weights(range(Tm), "loaded")
        model._set_tenant_weights(untrained, "initial")
    elif Tm > 1:
        model._set_tenant_weights([tenant], "initial" if Ts == 1 and untrained else "loaded")
    return model


def _load_layers(model, gens, layers, saved_cfg, cfg, Ts, Tm, tenant):
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
        for g, sd in zip(gens, layers):
            single = _new_generator(cfg, model.hidden_size)
            single.load_state_dict(sd)
            p0 = next(g.parameters())
            _set_tenant(g, tenant, single.to(device=p0.device, dtype=p0.dtype))
    else:
        _check_tenant(tenant, Ts)
        for g, sd in zip(gens, layers):
            mt = _new_generator(saved_cfg, model.hidden_size, Ts)
            mt.load_state_dict(sd)
            single = mt.generator(tenant)
            p0 = next(g.parameters())
            single = single.to(device=p0.device, dtype=p0.dtype)
            if Tm == 1:
                g.load_state_dict(single.state_dict())
            else:
                _check_tenant(tenant, Tm)
                _set_tenant(g, tenant, single)
    return model
