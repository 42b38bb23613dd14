"""Prompt-slot layout for decoder-only models (DESIGN.md section 1, "Where the soft tokens go").

Every example is laid out as ``[instruction][L slot tokens][response]``; padding goes anywhere the
attention mask says. At every decoder layer the hidden states at the ``L`` slot positions are
replaced by that layer's soft prompts.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["insert_prompt_slots", "slot_positions"]


def insert_prompt_slots(
    instruction_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]] | None = None,
    *,
    num_tokens: int,
    pad_token_id: int,
    slot_token_id: int | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Lay out a batch as ``[instruction][num_tokens slots][response]`` and pad it.

    Args:
        instruction_ids: one list of token ids per example (may be empty).
        response_ids: optional, one list of token ids per example (same length as
            ``instruction_ids``); for training, or ``None`` for generation prompts.
        num_tokens: ``L``, the number of soft tokens (slots) per example.
        pad_token_id: token id written at padding positions.
        slot_token_id: token id written at slot positions (its embedding is replaced before the
            first layer, so any valid id works); defaults to ``pad_token_id``.
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).

    Returns:
        A dict of ``(B, S)`` tensors: ``input_ids`` (long), ``attention_mask`` (long, 1 on real and
        slot tokens), ``instruction_mask`` (bool, True on instruction tokens) and, when
        ``response_ids`` is given, ``labels`` (long, the response ids, ``-100`` on instruction,
        slot and padding positions).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    instruction_ids = [list(map(int, x)) for x in instruction_ids]
    if len(instruction_ids) == 0:
        raise ValueError("insert_prompt_slots needs at least one example")
    if response_ids is not None:
        response_ids = [list(map(int, x)) for x in response_ids]
        if len(response_ids) != len(instruction_ids):
            raise ValueError(f"got {len(instruction_ids)} instructions but {len(response_ids)} responses")
    slot = pad_token_id if slot_token_id is None else slot_token_id
    rows = []
    for i, ins in enumerate(instruction_ids):
        resp = response_ids[i] if response_ids is not None else []
        ids = ins + [slot] * num_tokens + resp
        instr = [True] * len(ins) + [False] * (num_tokens + len(resp))
        labels = [-100] * (len(ins) + num_tokens) + resp
        rows.append((ids, instr, labels))
    S = max(len(r[0]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, S), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    instruction_mask = torch.zeros((B, S), dtype=torch.bool)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for b, (ids, instr, lab) in enumerate(rows):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(S - n, S)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, sl] = 1
        instruction_mask[b, sl] = torch.tensor(instr, dtype=torch.bool)
        labels[b, sl] = torch.tensor(lab, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "instruction_mask": instruction_mask}
    if response_ids is not None:
        out["labels"] = labels
    return out


def slot_positions(
    instruction_mask: torch.Tensor,
    num_tokens: int,
    attention_mask: torch.Tensor | None = None,
    slot_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, L)`` long positions of the slot tokens of each row.

    By default the ``L`` positions right after the last instruction token of each row; for a row
    with no instruction token, the first ``L`` attended positions (per ``attention_mask``, else
    positions ``0..L-1``). With ``slot_mask`` ``(B, S)`` bool, exactly ``L`` True positions per row,
    those positions (in increasing order) are used instead.
    """
    if instruction_mask.dim() != 2:
        raise ValueError(f"instruction_mask must be (B, S), got shape {tuple(instruction_mask.shape)}")
    B, S = instruction_mask.shape
    device = instruction_mask.device
    if slot_mask is not None:
        if slot_mask.shape != (B, S):
            raise ValueError(f"slot_mask must have shape {(B, S)} like instruction_mask, got {tuple(slot_mask.shape)}")
        slot_mask = slot_mask.bool()
        counts = slot_mask.sum(1)
        if not bool((counts == num_tokens).all()):
            raise ValueError(f"slot_mask must have exactly num_tokens={num_tokens} True positions per row, "
                             f"got {counts.tolist()}")
        pos = torch.arange(S, device=device).expand(B, S)
        return pos[slot_mask].view(B, num_tokens)
    instr = instruction_mask.bool()
    ar = torch.arange(S, device=device)
    has_instr = instr.any(1)
    last = torch.where(instr, ar, torch.full_like(ar, -1)).amax(1)  # (B,)
    start = last + 1
    if not bool(has_instr.all()):
        if attention_mask is not None:
            att = attention_mask.bool()
            first = torch.where(att, ar, torch.full_like(ar, S)).amin(1)
            first = torch.where(first == S, torch.zeros_like(first), first)
        else:
            first = torch.zeros_like(start)
        start = torch.where(has_instr, start, first)
    index = start[:, None] + torch.arange(num_tokens, device=device)
    if bool((index >= S).any()):
        bad = (index >= S).any(1).nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} have no room for {num_tokens} slot tokens after the instruction "
                         f"(sequence length {S}); lay inputs out with insert_prompt_slots")
    return index
