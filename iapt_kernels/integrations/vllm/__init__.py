"""IAPT served by vLLM: one engine, many tenants' instruction-aware prompts (docs/design.md section 11).

The ``vllm.general_plugins`` entry point :func:`register` adds, for each supported decoder family, an
architecture ``IAPT<Family>ForCausalLM`` (``IAPTLlamaForCausalLM``, ``IAPTQwen2ForCausalLM``,
``IAPTQwen3ForCausalLM``, ``IAPTMistralForCausalLM``): vLLM's own model class with one forward
pre-hook per decoder layer, no copied modeling code. A deployment names its adapters (saved by
:func:`iapt_kernels.save_iapt`) in the model's config; :func:`engine_args` builds the engine arguments
and :class:`IAPTPrompts` the per-request prompts and sampling parameters (the tenant travels in
``SamplingParams.extra_args``, over HTTP ``vllm_xargs``).

Importing this module does not import vLLM; :func:`register` does, and refuses vLLM versions other than
:data:`SUPPORTED_VLLM`, whose internals the plugin relies on.
"""

from __future__ import annotations

from ._prompts import IAPTPrompts, engine_args
from ._register import SUPPORTED_VLLM, register

__all__ = ["IAPTPrompts", "engine_args", "register", "SUPPORTED_VLLM", "iapt_stats"]


def iapt_stats(model):
    """Counters of the IAPT runtime inside a worker: ``LLM.apply_model(iapt_stats)`` returns one dict
    per worker with ``steps`` (forward passes seen), ``generator_steps`` (passes that ran the
    generators, i.e. held a request's first prefill step), ``prefill_rows`` (tenant requests whose
    prompts were computed), ``generator_calls`` (layer generator launches) and ``num_layers``."""
    runtime = getattr(model, "iapt_runtime", None)
    if runtime is None:
        raise TypeError(f"{type(model).__name__} is not an IAPT model")
    return dict(runtime.stats)
