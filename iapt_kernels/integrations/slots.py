"""Prompt-slot layout for decoder-only models (docs/design.md section 1, "Slot layout").

Every example is laid out as ``[instruction][L slot tokens][response prefix][response]``; padding goes
anywhere the attention mask says. At every decoder layer the hidden states at the ``L`` slot positions
are replaced by that layer's soft prompts.

The response prefix (optional, e.g. a chat template's assistant header or a newline) matters on a
pretrained model: without it the first response token is predicted at the last slot, a position whose
hidden state IAPT overwrites before every layer, so that prediction sees the instruction only through the
last layer's generator and one layer of attention. With it, a real token predicts the response after
attending, through every layer, to both the instruction and the soft prompts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

__all__ = ["insert_prompt_slots", "slot_positions"]


def _rows(ids, what: str, pad_token_id: int) -> list[list[int]]:
    """Token-id rows from lists, a tensor, or tokenizer output; padding is refused or stripped."""
    if isinstance(ids, Mapping):  # a tokenizer's BatchEncoding / dict: strip its padding by its mask
        if "input_ids" not in ids:
            raise ValueError(
                f"{what} is a mapping without 'input_ids'; pass token-id lists or tokenizer output"
            )
        rows, mask = ids["input_ids"], ids.get("attention_mask")
        if mask is None:
            return _rows(rows, what, pad_token_id)
        rows = rows.tolist() if torch.is_tensor(rows) else [list(r) for r in rows]
        mask = mask.tolist() if torch.is_tensor(mask) else [list(m) for m in mask]
        return [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
    if torch.is_tensor(ids):
        if ids.dim() != 2:
            raise ValueError(f"{what} as a tensor must be (B, n), got shape {tuple(ids.shape)}")
        rows = ids.tolist()
        # A (B, n) tensor is almost always a padded batch, and pad tokens taken for instruction or
        # response tokens would silently shift the slots: refuse it unless no row touches a pad id.
        padded = [i for i, r in enumerate(rows) if r and (r[0] == pad_token_id or r[-1] == pad_token_id)]
        if padded:
            raise ValueError(
                f"{what} is a (B, n) tensor whose rows {padded} start or end with pad_token_id="
                f"{pad_token_id}: it looks padded, and the padding would count as tokens. Pass "
                "unpadded lists, or the tokenizer output itself (with its attention_mask)"
            )
        return [[int(t) for t in r] for r in rows]
    if isinstance(ids, str) or (len(ids) and isinstance(ids[0], str)):
        raise TypeError(f"{what} must hold token ids, not text: tokenize first")
    if len(ids) and _is_id(ids[0]):
        raise TypeError(
            f"{what} must be a list of rows, one list of token ids per example; got a flat list of "
            f"{type(ids[0]).__name__}s. For one example pass [ids]"
        )
    out = []
    for i, r in enumerate(ids):
        if isinstance(r, (str, bytes)):
            raise TypeError(f"{what} must hold lists of token ids, got a {type(r).__name__} row")
        try:
            out.append([int(t) for t in (r.tolist() if torch.is_tensor(r) else r)])
        except TypeError:
            raise TypeError(
                f"{what} row {i} is a {type(r).__name__}, not a list of token ids; pass one list per example"
            ) from None
    _refuse_padded_lists(out, what, pad_token_id)
    return out


def _is_id(x) -> bool:
    return isinstance(x, int) or (torch.is_tensor(x) and x.dim() == 0)


def _pad_run(row: list[int], pad: int, end: int) -> int:
    """How many ``pad`` ids ``row`` starts (``end=0``) or ends (``end=-1``) with."""
    seq = row if end == 0 else row[::-1]
    n = 0
    while n < len(seq) and seq[n] == pad:
        n += 1
    return n


def _refuse_padded_lists(rows: list[list[int]], what: str, pad: int) -> None:
    """Refuse token-id lists that look padded: the pad ids would silently count as tokens.

    Padding a batch adds pad ids at one end of the shorter rows until all rows have one length. So
    lists look padded when, at the start or at the end, a row has a run of two or more pad ids (a real
    row ends with at most one: an EOS that doubles as the pad id, as for most causal LMs), or when the
    rows all have one length and some row has a longer run than another.
    """
    same_length = len(rows) > 1 and len({len(r) for r in rows}) == 1
    for end, side in ((-1, "end"), (0, "start")):
        runs = [_pad_run(r, pad, end) for r in rows]
        low = min(runs)
        bad = [i for i, n in enumerate(runs) if n >= 2 or (same_length and n > low)]
        if bad:
            raise ValueError(
                f"{what} rows {bad} {side} with pad_token_id={pad} ({max(runs[i] for i in bad)} at most): "
                "they look padded, and the padding would count as tokens. Pass unpadded lists, or the "
                "tokenizer output itself (with its attention_mask)"
            )


_NO_PREFIX_WARNING = (
    "insert_prompt_slots: no response_prefix_ids, so the first response token is predicted at the last slot "
    "position, whose hidden state IAPT overwrites before every layer: on a pretrained model that prediction "
    "barely sees the instruction. Pass real tokens to put between the slots and the response (e.g. "
    "response_prefix_ids=tok('\\nAnswer:', add_special_tokens=False)['input_ids'], or the chat template's "
    "assistant header), or response_prefix_ids=[] to keep this layout deliberately"
)


def _prefix_rows(prefix, n: int, pad_token_id: int) -> list[list[int]] | None:
    """One list of ids for each of ``n`` rows from a shared list, per-row lists, or ``None``."""
    if prefix is None:
        return None
    if torch.is_tensor(prefix) and prefix.dim() == 1:
        prefix = prefix.tolist()
    if isinstance(prefix, str):
        raise TypeError("response_prefix_ids must hold token ids, not text: tokenize first")
    items = list(prefix)
    if all(not isinstance(t, (list, tuple)) and not torch.is_tensor(t) for t in items):
        shared = [int(t) for t in items]  # one prefix for every row ([] included)
        return [shared] * n
    rows = _rows(items, "response_prefix_ids", pad_token_id)
    if len(rows) != n:
        raise ValueError(
            f"response_prefix_ids has {len(rows)} rows for {n} examples; pass one list for every "
            "row, or one list per row"
        )
    return rows


def insert_prompt_slots(
    instruction_ids,
    response_ids=None,
    *,
    num_tokens: int,
    pad_token_id: int,
    slot_token_id: int | None = None,
    padding_side: str = "right",
    max_length: int | None = None,
    truncation_side: str = "left",
    response_prefix_ids=None,
) -> dict[str, torch.Tensor]:
    r"""Lay out a batch as ``[instruction][num_tokens slots][response prefix][response]`` and pad it.

    Args:
        instruction_ids: one list of token ids per example (may be empty), or a tokenizer's output
            (``BatchEncoding`` / dict with ``input_ids`` and ``attention_mask``: its padding is
            stripped by the mask). A padded ``(B, n)`` tensor without its mask is refused.
        response_ids: optional, the same forms, one row per example; for training, or ``None`` for
            generation prompts.
        num_tokens: ``L``, the number of soft tokens (slots) per example; must be the model's
            ``IAPTConfig.num_tokens`` (the model refuses slots that fall on labels, padding or past the end).
        pad_token_id: token id written at padding positions.
        slot_token_id: token id written at slot positions (its embedding is replaced before the
            first layer, so any valid id works); defaults to ``pad_token_id``.
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
        max_length: optional cap on each row's length (instruction + slots + response), e.g. the
            model's ``max_position_embeddings``. Longer rows lose instruction tokens first, from
            ``truncation_side``, down to one; then response tokens from the end. The slots are never cut.
        truncation_side: ``"left"`` (default: drop the start of the instruction, keep the part next
            to the slots) or ``"right"`` (drop the end of the instruction).
        response_prefix_ids: real tokens placed after the slots and before the response, e.g. the
            tokens of ``"\nAnswer:"`` or of a chat template's assistant header: one list of ids for
            every row, or one list per row. They are attended, not instruction tokens, never
            labels and never cut. On a pretrained model pass them: without them the first response
            token is predicted at the last slot, whose hidden state IAPT overwrites before every
            layer, so the prediction barely sees the instruction (see the module docstring).
            ``None`` (default) means no prefix and, when ``response_ids`` is given, warns once;
            ``[]`` means no prefix, deliberately (e.g. a model trained from scratch), without warning.
            Generation prompts must end with the same prefix the model was trained with.

    Returns:
        A dict of ``(B, S)`` tensors: ``input_ids`` (long), ``attention_mask`` (long, 1 on real and
        slot tokens), ``instruction_mask`` (bool, True on instruction tokens), ``slot_mask`` (bool,
        True on the ``num_tokens`` slots of each row: the batch's record of its layout, so a model
        whose ``L`` differs refuses it) and, when ``response_ids`` is given, ``labels`` (long, the
        response ids, ``-100`` on instruction, slot, response-prefix and padding positions).

    Token-id lists that look padded are refused (a run of two or more ``pad_token_id`` at either end
    of a row, or rows of one length whose runs differ): the pad ids would count as tokens. Pass the
    tokenizer's output with its ``attention_mask`` instead, or unpadded lists.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < num_tokens + 1):
        raise ValueError(
            f"max_length must be an int >= num_tokens + 1 = {num_tokens + 1} (one instruction token "
            f"and the slots), got {max_length!r}"
        )
    instruction_ids = _rows(instruction_ids, "instruction_ids", pad_token_id)
    if len(instruction_ids) == 0:
        raise ValueError("insert_prompt_slots needs at least one example")
    if response_ids is not None:
        response_ids = _rows(response_ids, "response_ids", pad_token_id)
        if len(response_ids) != len(instruction_ids):
            raise ValueError(f"got {len(instruction_ids)} instructions but {len(response_ids)} responses")
    prefixes = _prefix_rows(response_prefix_ids, len(instruction_ids), pad_token_id)
    if prefixes is None:
        prefixes = [[]] * len(instruction_ids)
        if response_ids is not None:
            warnings.warn(_NO_PREFIX_WARNING, UserWarning, stacklevel=2)
    slot = pad_token_id if slot_token_id is None else slot_token_id
    rows = []
    for i, ins in enumerate(instruction_ids):
        resp = response_ids[i] if response_ids is not None else []
        pre = prefixes[i]
        if max_length is not None:
            if num_tokens + 1 + len(pre) > max_length:
                raise ValueError(
                    f"row {i}: max_length={max_length} cannot hold one instruction token, {num_tokens} "
                    f"slots and the {len(pre)}-token response prefix"
                )
            over = len(ins) + num_tokens + len(pre) + len(resp) - max_length
            cut = min(max(over, 0), max(len(ins) - 1, 0))
            if cut:
                ins = ins[cut:] if truncation_side == "left" else ins[: len(ins) - cut]
            over -= cut
            if over > 0:
                resp = resp[: len(resp) - over]
        ids = ins + [slot] * num_tokens + pre + resp
        instr = [True] * len(ins) + [False] * (num_tokens + len(pre) + len(resp))
        labels = [-100] * (len(ins) + num_tokens + len(pre)) + resp
        slots = [False] * len(ins) + [True] * num_tokens + [False] * (len(pre) + len(resp))
        rows.append((ids, instr, labels, slots))
    S = max(len(r[0]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, S), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    instruction_mask = torch.zeros((B, S), dtype=torch.bool)
    slot_mask = torch.zeros((B, S), dtype=torch.bool)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for b, (ids, instr, lab, slots) in enumerate(rows):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(S - n, S)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, sl] = 1
        instruction_mask[b, sl] = torch.tensor(instr, dtype=torch.bool)
        labels[b, sl] = torch.tensor(lab, dtype=torch.long)
        slot_mask[b, sl] = torch.tensor(slots, dtype=torch.bool)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "instruction_mask": instruction_mask,
        "slot_mask": slot_mask,
    }
    if response_ids is not None:
        out["labels"] = labels
    return out


def require(ok: torch.Tensor, message: str, explain=None) -> None:
    """Raise ``ValueError(message)`` unless every element of the bool tensor ``ok`` is True.

    Eager: one host read per check, once per batch, and the message names the failing rows; on a
    failure ``explain()``, when given, returns a message that says more than ``message`` can (it may
    read the data). Under ``torch.compile`` the check becomes an asynchronous assert in the graph
    with ``message``, so validation neither breaks the graph nor synchronises.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
        return
    if bool(ok.all()):
        return
    if explain is not None:
        message = explain()
    if ok.dim() >= 1:
        bad = (~ok).reshape(ok.shape[0], -1).any(1).nonzero().flatten().tolist()
        message = f"{message} (rows {bad})"
    raise ValueError(message)


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
            raise ValueError(
                f"slot_mask must have shape {(B, S)} like instruction_mask, got {tuple(slot_mask.shape)}"
            )
        slot_mask = slot_mask.bool()
        counts = slot_mask.sum(1)

        def explain():
            got = sorted({int(c) for c in counts.tolist()} - {num_tokens})
            return (
                f"the batch was laid out for {' or '.join(map(str, got))} slot tokens per row (its "
                f"slot_mask), but this model has num_tokens={num_tokens}: build the batch with "
                f"insert_prompt_slots(num_tokens={num_tokens}) or IAPTDataCollator(num_tokens={num_tokens})"
            )

        require(
            counts == num_tokens,
            f"slot_mask must have exactly num_tokens={num_tokens} True positions per row",
            explain,
        )
        # The first num_tokens True positions of each row, in order, without a data-dependent shape.
        pos = torch.arange(S, device=device).expand(B, S)
        key = torch.where(slot_mask, pos, pos + S)
        return key.sort(1).values[:, :num_tokens]
    instr = instruction_mask.bool()
    ar = torch.arange(S, device=device)
    has_instr = instr.any(1)
    last = torch.where(instr, ar, torch.full_like(ar, -1)).amax(1)  # (B,)
    start = last + 1
    if attention_mask is not None:
        att = attention_mask.bool()
        first = torch.where(att, ar, torch.full_like(ar, S)).amin(1)
        first = torch.where(first == S, torch.zeros_like(first), first)
    else:
        first = torch.zeros_like(start)
    start = torch.where(has_instr, start, first)
    index = start[:, None] + torch.arange(num_tokens, device=device)
    require(
        index < S,
        f"no room for {num_tokens} slot tokens after the instruction (sequence length {S}); lay "
        f"inputs out with insert_prompt_slots(num_tokens={num_tokens})",
    )
    return index


def explain_slot_labels(L: int, input_ids, instruction_mask, labels, slot_index, at_slots, fix) -> str:
    """What is wrong with a batch whose slot positions hold labels (read only on that failure).

    Every one of the ``L`` slots labelled means the slots are there but labelled: with the
    instruction labelled too, the labels are a copy of ``input_ids``. Otherwise some slot
    position holds a response token: the row has fewer slot tokens than ``L``."""
    bad = (at_slots != -100).any(1)
    if input_ids is not None:
        ids = input_ids.gather(1, slot_index)
        slots_labelled = ((at_slots == ids).all(1) & (ids == ids[:, :1]).all(1))[bad]
        if bool(slots_labelled.all()):
            on_instruction = ((labels != -100) & instruction_mask).any(1)[bad]
            if bool(on_instruction.all()):
                return (
                    "labels copy input_ids (labels = input_ids?): they are set on the instruction and "
                    f"on the {L} slot tokens, whose hidden states IAPT replaces. IAPT labels are the "
                    "response ids and -100 everywhere else: build them with insert_prompt_slots("
                    "instruction_ids, response_ids, ...) or IAPTDataCollator"
                )
            return (
                f"labels are set (not -100) on the {L} slot tokens after the instruction: IAPT "
                "replaces those positions, so they can learn nothing. Set the slots' labels to -100, "
                "as insert_prompt_slots does"
            )
    return (
        f"slot positions hold labels (not -100): the rows have no or fewer than {L} slot tokens after "
        f"the instruction, so the prompts would overwrite response tokens; {fix}"
    )


def check_unrecorded_slots(L: int, input_ids, slot_index, attended, labels, fix) -> None:
    """A batch without ``slot_mask`` is checked as far as its tokens allow.

    insert_prompt_slots writes one token id at every slot of a row: the ``L`` positions after the
    instruction must hold one id (fewer slot tokens put real tokens there), and the next position
    must not hold it again, unless it is a label or padding (more slot tokens would be read as real
    tokens). A batch made by insert_prompt_slots or IAPTDataCollator carries ``slot_mask`` instead.
    """
    ids = input_ids.gather(1, slot_index)
    first = ids[:, :1]
    also = "or pass slot_mask (insert_prompt_slots returns it) when the slots hold different ids"
    require(
        (ids == first).all(1),
        f"the {L} positions after the instruction do not hold one slot token id: the rows have fewer "
        f"than {L} slot tokens (a batch laid out for a smaller num_tokens?); {fix}, {also}",
    )
    S = input_ids.shape[1]
    after = slot_index[:, -1:] + 1
    at = after.clamp(max=S - 1)
    extra = (after < S) & (input_ids.gather(1, at) == first)
    if attended is not None:
        extra = extra & attended.gather(1, at)
    if labels is not None:
        extra = extra & (labels.gather(1, at) == -100)
    require(
        ~extra,
        f"the token after the {L} slots is the slot token again: the rows have more than {L} slot "
        f"tokens (a batch laid out for a larger num_tokens?), and the extra ones would be read as real "
        f"tokens; {fix}, {also}",
    )
