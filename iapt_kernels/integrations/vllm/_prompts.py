"""Building an IAPT deployment's engine arguments and its requests (no vLLM import until used)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ._config import CONFIG_KEY, TENANT_KEY


def engine_args(
    model: str | os.PathLike,
    adapters: Mapping,
    *,
    slot_token_id: int | None = None,
    response_prefix_ids=(),
    architecture: str | None = None,
    backend: str = "auto",
    **overrides,
) -> dict:
    """Keyword arguments of ``vllm.LLM`` (or ``EngineArgs``) serving ``model`` with IAPT ``adapters``.

    Args:
        model: the base model's directory (or hub name), the one the adapters were trained on.
        adapters: ``{tenant name: adapter directory}`` for adapters saved by :func:`iapt_kernels.save_iapt`
            (single-tenant), or ``{name: [directory, t]}`` for tenant ``t`` of a multi-tenant adapter.
            Tenant ids follow this order. Every adapter is checked against the model when the engine starts.
        slot_token_id: the id the frontend writes at slot positions (its embedding is replaced at every
            layer, so any valid id works); default the model's ``pad_token_id``, else 0.
        response_prefix_ids: the real tokens the adapters were trained with after the slots
            (:func:`iapt_kernels.insert_prompt_slots`), e.g. a chat template's assistant header.
        architecture: the served architecture, default ``IAPT`` + the model's own (read from its
            ``config.json``; ``LlamaForCausalLM`` becomes ``IAPTLlamaForCausalLM``).
        backend: the generators' kernel backend (``"auto"``: ``"cpp"`` on CPU, ``"triton"`` on CUDA).
        overrides: other engine arguments; they replace the defaults set here (``enforce_eager=True``,
            ``enable_chunked_prefill=False``, ``enable_prefix_caching=False``, which IAPT needs: the engine
            refuses to start without them).
    """
    model = os.fspath(model)
    if architecture is None:
        architecture = "IAPT" + _base_architecture(model)
    section = {
        "adapters": {str(k): _adapter_spec(v) for k, v in adapters.items()},
        "backend": backend,
        "slot_token_id": None if slot_token_id is None else int(slot_token_id),
        "response_prefix_ids": [int(t) for t in response_prefix_ids],
    }
    hf_overrides = dict(overrides.pop("hf_overrides", None) or {})
    hf_overrides.update({"architectures": [architecture], CONFIG_KEY: section})
    args = dict(
        model=model,
        hf_overrides=hf_overrides,
        enforce_eager=True,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
    )
    args.update(overrides)
    return args


def _adapter_spec(v):
    if isinstance(v, (list, tuple)):
        return [os.path.abspath(os.fspath(v[0])), int(v[1])]
    return os.path.abspath(os.fspath(v))


def _base_architecture(model: str) -> str:
    import json

    file = os.path.join(model, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"no config.json in {model!r}: pass architecture='IAPT<Family>ForCausalLM'")
    with open(file) as f:
        archs = json.load(f).get("architectures") or []
    if len(archs) != 1:
        raise ValueError(f"{file} names architectures {archs}: pass architecture= explicitly")
    return archs[0]


class IAPTPrompts:
    """Requests for an IAPT engine, laid out ``[instruction][L slots][response prefix]``.

    Args:
        num_tokens: ``L``, the adapters' ``IAPTConfig.num_tokens``.
        slot_token_id: the id written at slot positions (its embedding is replaced at every layer, so
            any valid id works; the pad or end-of-text id is a good choice).
        response_prefix_ids: the real tokens the adapters were trained with after the slots
            (:func:`iapt_kernels.insert_prompt_slots`' ``response_prefix_ids``); ``()`` for none.
        tokenizer: optional, to accept instructions as text (encoded without special tokens).

    :meth:`request` returns ``(prompt, params)`` for ``LLM.generate(prompts, params)``; a request
    without a tenant is the frozen backbone on ``[instruction][response prefix]``, as rows of
    tenant ``-1`` in :meth:`iapt_kernels.IAPTModel.generate`.
    """

    def __init__(
        self, num_tokens: int, slot_token_id: int, response_prefix_ids: Sequence[int] = (), tokenizer=None
    ):
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        self.num_tokens = num_tokens
        self.slot_token_id = int(slot_token_id)
        self.response_prefix_ids = [int(t) for t in response_prefix_ids]
        self.tokenizer = tokenizer

    def token_ids(self, instruction, tenant: str | None = None) -> tuple[list[int], int]:
        """``(prompt token ids, instruction length)``."""
        if isinstance(instruction, str):
            if self.tokenizer is None:
                raise TypeError(
                    "instruction is text: construct IAPTPrompts with tokenizer=, or pass token ids"
                )
            ids = list(self.tokenizer(instruction, add_special_tokens=False)["input_ids"])
        else:
            ids = [int(t) for t in instruction]
        if not ids:
            raise ValueError("the instruction is empty: IAPT's prompts are computed from at least one token")
        slots = [self.slot_token_id] * self.num_tokens if tenant is not None else []
        return ids + slots + self.response_prefix_ids, len(ids)

    def extra_args(self, tenant: str | None) -> dict:
        """The ``SamplingParams.extra_args`` (HTTP: ``vllm_xargs``) naming the tenant, or ``{}``."""
        if tenant is None:
            return {}
        return {TENANT_KEY: tenant}

    def request(self, instruction, tenant: str | None = None, params=None):
        """``(TokensPrompt, SamplingParams)``: ``params`` (default greedy ``SamplingParams()``) copied,
        with the tenant added to its ``extra_args``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids, _ = self.token_ids(instruction, tenant)
        params = SamplingParams() if params is None else params.clone()
        extra = dict(params.extra_args or {})
        extra.pop(TENANT_KEY, None)
        extra.update(self.extra_args(tenant))
        params.extra_args = extra or None
        return TokensPrompt(prompt_token_ids=ids), params
