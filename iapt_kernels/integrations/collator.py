"""A data collator for ``transformers.Trainer``: examples in, IAPT batches out (slots, labels, masks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .slots import insert_prompt_slots

__all__ = ["IAPTDataCollator"]

# The response's keys: "output" as in the real-task JSONL (and Alpaca-style data), "response" as before.
RESPONSE_TEXT_KEYS = ("response", "output")
RESPONSE_ID_KEYS = ("response_ids", "output_ids")
PROMPT_KEYS = {"instruction", "instruction_ids", "tenant_id"}  # all a generation prompt may hold


class IAPTDataCollator:
    r"""Turn a list of instruction/response examples into one IAPT batch, for ``Trainer(data_collator=...)``.

    Each example is a mapping with either token ids, ``instruction_ids`` (and ``response_ids`` or
    ``output_ids`` for training), or text, ``instruction`` (and ``response`` or ``output``, the
    real-task JSONL's key), which needs ``tokenizer``: the instruction is tokenized as the tokenizer
    does by default (special tokens such as BOS included), the response without special tokens and
    followed by ``eos_token_id`` (``add_eos``). An optional ``tenant_id`` per example becomes the
    batch's ``tenant_ids`` (multi-tenant models). An example without a response is a generation
    prompt and may hold nothing else; one with other keys but no response key this collator knows
    is refused (the error names its keys), rather than silently becoming a batch without labels.

    The batch is :func:`iapt_kernels.insert_prompt_slots` of the examples: ``input_ids``,
    ``attention_mask``, ``instruction_mask``, ``slot_mask`` (the layout's record, checked against
    the model's ``L``), ``labels`` (``-100`` off the response) and, with tenants, ``tenant_ids``. Pass ``remove_unused_columns=False`` to ``TrainingArguments`` so the
    Trainer hands the raw examples over.

    Args:
        num_tokens: ``L``, the model's ``IAPTConfig.num_tokens``.
        pad_token_id: padding id; default the tokenizer's pad id, else its EOS id.
        tokenizer: a ``transformers`` tokenizer, for text examples (the Trainer also saves it with the model).
        slot_token_id, padding_side, max_length, truncation_side: as for
            :func:`iapt_kernels.insert_prompt_slots` (``padding_side="right"`` for training).
        add_eos: append the tokenizer's EOS id to text responses (default True).
        response_prefix: real tokens between the slots and the response, as text (tokenized without
            special tokens; needs ``tokenizer``) or a list of token ids, e.g. ``"\nAnswer:"`` or the
            chat template's assistant header. Pass it for a pretrained model: without it the first
            response token is predicted at the last slot, whose hidden state IAPT overwrites before
            every layer (see :func:`iapt_kernels.insert_prompt_slots`, ``response_prefix_ids``);
            ``[]`` keeps that layout deliberately. Prompts for generation must end with the same prefix.
    """

    def __init__(
        self,
        num_tokens: int,
        pad_token_id: int | None = None,
        *,
        tokenizer=None,
        slot_token_id: int | None = None,
        padding_side: str = "right",
        max_length: int | None = None,
        truncation_side: str = "left",
        add_eos: bool = True,
        response_prefix=None,
    ) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        if pad_token_id is None:
            raise ValueError("IAPTDataCollator needs pad_token_id (or a tokenizer with a pad or EOS token)")
        self.num_tokens, self.pad_token_id, self.tokenizer = num_tokens, int(pad_token_id), tokenizer
        self.slot_token_id, self.padding_side, self.add_eos = slot_token_id, padding_side, add_eos
        self.max_length, self.truncation_side = max_length, truncation_side
        if isinstance(response_prefix, str):
            if tokenizer is None:
                raise ValueError("response_prefix given as text needs tokenizer= (or pass its token ids)")
            response_prefix = tokenizer(response_prefix, add_special_tokens=False)["input_ids"]
        self.response_prefix_ids = None if response_prefix is None else [int(t) for t in response_prefix]
        # Fail on a bad layout argument now, not at the first batch.
        insert_prompt_slots(
            [[0]],
            num_tokens=num_tokens,
            pad_token_id=self.pad_token_id,
            padding_side=padding_side,
            max_length=max_length,
            truncation_side=truncation_side,
            response_prefix_ids=self.response_prefix_ids,
        )

    @staticmethod
    def _response_key(ex: dict[str, Any], i: int, keys: tuple[str, str]) -> str | None:
        found = [k for k in keys if k in ex]
        if len(found) > 1:
            raise ValueError(f"example {i} has both {found[0]!r} and {found[1]!r}: keep one response")
        if found:
            return found[0]
        if set(ex) - PROMPT_KEYS:
            raise ValueError(
                f"example {i} has keys {sorted(ex)} but no response key IAPTDataCollator knows "
                f"({keys[0]!r} or {keys[1]!r}): name the response so; a generation prompt holds only "
                f"{sorted(PROMPT_KEYS)}"
            )
        return None

    def _ids(self, ex: dict[str, Any], i: int) -> tuple[list[int], list[int] | None]:
        if "instruction_ids" in ex:
            key = self._response_key(ex, i, RESPONSE_ID_KEYS)
            return list(ex["instruction_ids"]), (list(ex[key]) if key else None)
        if "instruction" in ex:
            tok = self.tokenizer
            if tok is None:
                raise ValueError(
                    f"example {i} holds text ('instruction'): pass tokenizer= to IAPTDataCollator"
                )
            key = self._response_key(ex, i, RESPONSE_TEXT_KEYS)
            ins = tok(ex["instruction"])["input_ids"]
            if key is None:
                return ins, None
            resp = tok(ex[key], add_special_tokens=False)["input_ids"]
            if self.add_eos and tok.eos_token_id is not None:
                resp = resp + [tok.eos_token_id]
            return ins, resp
        raise ValueError(
            f"example {i} has keys {sorted(ex)}; each example needs 'instruction_ids' (token ids) or "
            "'instruction' (text), and 'response_ids' / 'output_ids' or 'response' / 'output' for training"
        )

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if isinstance(examples, Mapping) or not all(isinstance(ex, Mapping) for ex in examples):
            raise TypeError(
                "IAPTDataCollator takes a list of examples, each a mapping such as "
                "{'instruction': ..., 'response': ...}; for one example pass [example]"
            )
        pairs = [self._ids(ex, i) for i, ex in enumerate(examples)]
        has_resp = [r is not None for _, r in pairs]
        if any(has_resp) and not all(has_resp):
            raise ValueError(
                "some examples have a response and some do not; a batch is all training or all prompts"
            )
        batch = insert_prompt_slots(
            [p[0] for p in pairs],
            [p[1] for p in pairs] if all(has_resp) else None,
            num_tokens=self.num_tokens,
            pad_token_id=self.pad_token_id,
            slot_token_id=self.slot_token_id,
            padding_side=self.padding_side,
            max_length=self.max_length,
            truncation_side=self.truncation_side,
            response_prefix_ids=self.response_prefix_ids,
        )
        tenants = [ex.get("tenant_id") for ex in examples]
        if any(t is not None for t in tenants):
            if any(t is None for t in tenants):
                raise ValueError(
                    "some examples have a tenant_id and some do not; give every example one (-1: none)"
                )
            batch["tenant_ids"] = torch.tensor([int(t) for t in tenants], dtype=torch.long)
        return batch
