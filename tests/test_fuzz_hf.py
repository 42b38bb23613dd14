"""Property-based tests (hypothesis) of the Hugging Face layer (docs/design.md section 9) on a tiny Llama
(`iapt_kernels.testing.tiny_llama`): drawn instruction, response and prefix lengths, padding and
truncation sides, tenant mixes (tenant -1 included), `use_cache` on and off.

- ``layout``: `insert_prompt_slots` lays every row out as ``[instruction][L slots][prefix][response]``
  on its padding side, truncates as documented (instruction first, down to one token, from its side;
  then the response from its end; never the slots or the prefix), labels exactly the response, and
  its slots are where `slot_positions` (the model's default) looks for them; `IAPTDataCollator` gives
  the same batch (plus `tenant_ids`);
- ``forward``: every such batch is accepted; the logits are finite, the same bits on a second call,
  the same (to rounding) with the other padding side and for each row run alone (no row influences
  another, whatever the tenant mix);
- ``invalid``: one mutation of a valid batch (instruction on padding, labels on a slot, a slot cut
  off, a tenant id out of range or missing, a wrong shape, a bad slot_mask, a sequence past the
  position embeddings, a bad layout argument) raises the documented ValueError (TypeError for
  non-id rows) before any layer runs;
- ``generate``: greedy generation gives the same tokens with and without a KV cache.

These are written against the documented behaviour of this branch; the slot-count and right-padding
checks of issue 24 may add refusals (adapt `FORWARD_BAD` / the generate strategy at merge).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest
import torch
from fuzz_helpers import PROFILES, run_property, same_bits
from hypothesis import strategies as st

import iapt_kernels as ik
from iapt_kernels.integrations import slot_positions

transformers = pytest.importorskip("transformers")

from iapt_kernels.testing import tiny_llama  # noqa: E402

VOCAB, PAD, SLOT_ID, MAX_POS = 48, 0, 3, 128
TOKENS = st.integers(4, VOCAB - 1)


@functools.cache
def model(num_tenants: int, num_tokens: int, backend: str = "auto"):
    """One wrapped tiny Llama per configuration (a backbone can be hooked by one IAPTModel only), with
    a nonzero up-projection so the prompts visibly change the logits."""
    torch.manual_seed(num_tenants * 10 + num_tokens)
    w = ik.apply_iapt(
        tiny_llama(VOCAB, seed=num_tokens),
        ik.IAPTConfig(num_tokens=num_tokens, bottleneck_size=8, num_tenants=num_tenants, backend=backend),
    )
    with torch.no_grad():
        for g in w.generators:
            for name, p in g.named_parameters():
                if name.endswith("up.weight"):
                    p.normal_(0.0, 0.5)
            if g.gate is not None:  # the default gate starts at 0: zero prompts would hide the writes
                g.gate.uniform_(0.5, 1.5)
    return w.eval()


@dataclass(frozen=True)
class Layout:
    instructions: tuple[tuple[int, ...], ...]
    responses: tuple[tuple[int, ...], ...] | None
    prefix: object  # None, a tuple (one for all rows) or a tuple of tuples (one per row)
    L: int
    padding_side: str
    truncation_side: str
    max_length: int | None
    T: int  # 1 or 3
    tenants: tuple[int, ...] | None
    bad: str = ""

    def kwargs(self):
        prefix = self.prefix
        if isinstance(prefix, tuple) and prefix and isinstance(prefix[0], tuple):
            prefix = [list(p) for p in prefix]
        elif isinstance(prefix, tuple):
            prefix = list(prefix)
        return dict(
            num_tokens=self.L,
            pad_token_id=PAD,
            slot_token_id=SLOT_ID,
            padding_side=self.padding_side,
            max_length=self.max_length,
            truncation_side=self.truncation_side,
            response_prefix_ids=prefix,
        )

    def prefix_of(self, b: int) -> list[int]:
        p = self.prefix
        if p is None or len(p) == 0:
            return []
        return list(p[b]) if isinstance(p[0], tuple) else list(p)


@st.composite
def layouts(draw, responses=True, max_rows=4, max_len=10, bad=(), padding=("left", "right"), tenants=None):
    B = draw(st.integers(1, max_rows))
    L = draw(st.sampled_from([1, 2, 4]))
    ins = tuple(tuple(draw(st.lists(TOKENS, max_size=max_len))) for _ in range(B))
    resp = tuple(tuple(draw(st.lists(TOKENS, max_size=6))) for _ in range(B)) if responses else None
    kind = draw(st.sampled_from(["none", "empty", "shared", "per_row"]))
    prefix = {
        "none": None,
        "empty": (),
        "shared": tuple(draw(st.lists(TOKENS, min_size=1, max_size=3))),
        "per_row": tuple(tuple(draw(st.lists(TOKENS, max_size=3))) for _ in range(B)),
    }[kind]
    longest_prefix = max((len(p) for p in prefix), default=0) if kind == "per_row" else len(prefix or ())
    max_length = draw(st.one_of(st.none(), st.integers(L + 1 + longest_prefix, L + 1 + longest_prefix + 12)))
    T = draw(st.sampled_from([1, 3])) if tenants is None else tenants
    ids = draw(st.one_of(st.none(), st.lists(st.integers(-1, T - 1), min_size=B, max_size=B).map(tuple)))
    if T > 1 and ids is None:
        ids = tuple([0] * B)
    return Layout(
        instructions=ins,
        responses=resp,
        prefix=prefix,
        L=L,
        padding_side=draw(st.sampled_from(padding)),
        truncation_side=draw(st.sampled_from(["left", "right"])),
        max_length=max_length,
        T=T,
        tenants=ids,
        bad=draw(st.sampled_from(bad)) if bad else "",
    )


def build(c: Layout, padding_side: str | None = None) -> dict[str, torch.Tensor]:
    kw = c.kwargs()
    if padding_side is not None:
        kw["padding_side"] = padding_side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the documented no-prefix warning
        return ik.insert_prompt_slots(
            [list(i) for i in c.instructions],
            None if c.responses is None else [list(r) for r in c.responses],
            **kw,
        )


def expected_row(c: Layout, b: int):
    """The documented layout of row `b`: (ids, instruction flags, labels), before padding."""
    ins, resp = list(c.instructions[b]), list(c.responses[b]) if c.responses is not None else []
    pre = c.prefix_of(b)
    if c.max_length is not None:
        over = len(ins) + c.L + len(pre) + len(resp) - c.max_length
        cut = min(max(over, 0), max(len(ins) - 1, 0))
        if cut:
            ins = ins[cut:] if c.truncation_side == "left" else ins[: len(ins) - cut]
        over -= cut
        if over > 0:
            resp = resp[: len(resp) - over]
    ids = ins + [SLOT_ID] * c.L + pre + resp
    flags = [True] * len(ins) + [False] * (len(ids) - len(ins))
    labels = [-100] * (len(ins) + c.L + len(pre)) + resp
    return ids, flags, labels


def check_layout(c: Layout) -> None:
    batch = build(c)
    B, S = batch["input_ids"].shape
    rows = [expected_row(c, b) for b in range(B)]
    assert S == max(len(r[0]) for r in rows), c
    for b, (ids, flags, labels) in enumerate(rows):
        n = len(ids)
        if c.max_length is not None:
            assert n <= c.max_length, c
        sl = slice(0, n) if c.padding_side == "right" else slice(S - n, S)
        att = torch.zeros(S, dtype=torch.long)
        att[sl] = 1
        assert torch.equal(batch["attention_mask"][b], att), c
        assert batch["input_ids"][b, sl].tolist() == ids, c
        assert bool((batch["input_ids"][b][att == 0] == PAD).all()), c
        assert batch["instruction_mask"][b, sl].tolist() == flags, c
        assert not bool(batch["instruction_mask"][b][att == 0].any()), c
        if c.responses is not None:
            assert batch["labels"][b, sl].tolist() == labels, c
            assert bool((batch["labels"][b][att == 0] == -100).all()), c
    if c.responses is None:
        assert "labels" not in batch
    # The model finds the slots where the layout put them.
    slots = slot_positions(batch["instruction_mask"], c.L, batch["attention_mask"])
    assert bool((batch["input_ids"].gather(1, slots) == SLOT_ID).all()), c
    assert not bool(batch["instruction_mask"].gather(1, slots).any()), c
    # The collator: the same batch from examples, with tenant ids when they are given.
    examples = []
    for b in range(B):
        ex = {"instruction_ids": list(c.instructions[b])}
        if c.responses is not None:
            ex["response_ids"] = list(c.responses[b])
        if c.tenants is not None:
            ex["tenant_id"] = c.tenants[b]
        examples.append(ex)
    if not (isinstance(c.prefix, tuple) and c.prefix and isinstance(c.prefix[0], tuple)):
        kw = c.kwargs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            collated = ik.IAPTDataCollator(
                c.L,
                PAD,
                slot_token_id=SLOT_ID,
                padding_side=c.padding_side,
                max_length=c.max_length,
                truncation_side=c.truncation_side,
                response_prefix=kw["response_prefix_ids"],
            )(examples)
        for key, value in batch.items():
            assert torch.equal(collated[key], value), (key, c)
        if c.tenants is not None:
            assert collated["tenant_ids"].tolist() == list(c.tenants), c
        else:
            assert "tenant_ids" not in collated, c


LAYOUT_BAD = (
    "L0",
    "padding_side",
    "truncation_side",
    "max_length_small",
    "count_mismatch",
    "text_rows",
    "padded_tensor",
    "no_rows",
    "collator_mixed_responses",
    "collator_mixed_tenants",
    "collator_no_keys",
)


def check_layout_invalid(c: Layout) -> None:
    ins = [list(i) for i in c.instructions]
    resp = [list(r) for r in c.responses] if c.responses is not None else [[5] for _ in ins]
    kw = c.kwargs()
    kw["response_prefix_ids"] = []
    bad = c.bad
    expected: type[Exception] = ValueError
    if bad == "L0":
        kw["num_tokens"] = 0
    elif bad == "padding_side":
        kw["padding_side"] = "center"
    elif bad == "truncation_side":
        kw["truncation_side"] = "middle"
    elif bad == "max_length_small":
        kw["max_length"] = c.L
    elif bad == "count_mismatch":
        resp = resp + [[7]]
    elif bad == "text_rows":
        ins, expected = ["some text" for _ in ins], TypeError
    elif bad == "padded_tensor":
        ins = torch.tensor([[5, 6, PAD]] * len(ins))  # right-padded rows
    elif bad == "no_rows":
        ins, resp = [], []
    if bad.startswith("collator"):
        examples = [{"instruction_ids": i, "response_ids": r, "tenant_id": 0} for i, r in zip(ins, resp)]
        examples.append({"instruction_ids": [5]})
        if bad == "collator_mixed_responses":
            examples[-1]["tenant_id"] = 0
        elif bad == "collator_mixed_tenants":
            examples[-1]["response_ids"] = [6]
        else:
            examples[-1] = {"ids": [5]}
        collator = ik.IAPTDataCollator(c.L, PAD, response_prefix=[])
        with pytest.raises(ValueError, match=r"\w"):
            collator(examples)
        return
    with pytest.raises(expected, match=r"\w"):
        ik.insert_prompt_slots(ins, resp, **kw)


# --------------------------------------------------------------------------- the model


def run_forward(c: Layout, batch, backend="auto"):
    w = model(c.T, c.L, backend)
    kw = {} if c.tenants is None else {"tenant_ids": torch.tensor(c.tenants)}
    with torch.no_grad():
        return w(**batch, **kw)


def _real(batch, b):
    return batch["attention_mask"][b].bool()


def check_forward(c: Layout) -> None:
    batch = build(c)
    out = run_forward(c, batch)
    assert torch.isfinite(out.logits).all(), c
    if c.responses is not None and bool((batch["labels"][:, 1:] != -100).any()):
        assert torch.isfinite(out.loss), c
    assert same_bits(out.logits, run_forward(c, batch).logits), f"a second call differs: {c}"
    other = build(c, "left" if c.padding_side == "right" else "right")
    flipped = run_forward(c, other).logits
    for b in range(len(c.instructions)):
        a, f = out.logits[b][_real(batch, b)], flipped[b][_real(other, b)]
        assert torch.allclose(a, f, rtol=1e-4, atol=1e-4), f"row {b}: padding side changes the logits: {c}"
        alone = Layout(
            instructions=c.instructions[b : b + 1],
            responses=None if c.responses is None else c.responses[b : b + 1],
            prefix=c.prefix if not (c.prefix and isinstance(c.prefix[0], tuple)) else c.prefix[b : b + 1],
            L=c.L,
            padding_side=c.padding_side,
            truncation_side=c.truncation_side,
            max_length=c.max_length,
            T=c.T,
            tenants=None if c.tenants is None else c.tenants[b : b + 1],
        )
        single = build(alone)
        lone = run_forward(alone, single).logits[0][_real(single, 0)]
        assert torch.allclose(a, lone, rtol=1e-4, atol=1e-4), f"row {b} depends on the other rows: {c}"


FORWARD_BAD = (
    "instruction_on_padding",
    "label_on_slot",
    "slots_cut",
    "tenant_high",
    "tenant_low",
    "tenant_missing",
    "tenant_count",
    "instruction_mask_shape",
    "no_instruction_mask",
    "attention_mask_shape",
    "slot_mask_count",
    "slot_mask_on_instruction",
    "too_long",
)


def check_forward_invalid(c: Layout) -> None:
    batch = build(c)
    B, S = batch["input_ids"].shape
    tenants = None if c.tenants is None else torch.tensor(c.tenants)
    extra = {}
    bad = c.bad
    att, ins = batch["attention_mask"], batch["instruction_mask"]
    if bad == "instruction_on_padding":
        pads = torch.nonzero(att == 0)
        if not len(pads):
            return
        ins[tuple(pads[0])] = True
    elif bad == "label_on_slot":
        if "labels" not in batch:
            return
        slots = slot_positions(ins, c.L, att)
        batch["labels"][0, slots[0, 0]] = 7
    elif bad == "slots_cut":
        # Every row loses its last position; in a prompt batch (left padded, no prefix) those are slots.
        if c.padding_side != "left" or "labels" in batch or any(c.prefix_of(b) for b in range(B)):
            return
        batch = {k: v[:, :-1] for k, v in batch.items()}
    elif bad == "tenant_high":
        tenants = torch.full((B,), c.T)
    elif bad == "tenant_low":
        tenants = torch.full((B,), -2)
    elif bad == "tenant_missing":
        if c.T == 1:
            return
        tenants = None
    elif bad == "tenant_count":
        tenants = torch.zeros(B + 1, dtype=torch.long)
    elif bad == "instruction_mask_shape":
        batch["instruction_mask"] = ins[:, :-1]
    elif bad == "no_instruction_mask":
        del batch["instruction_mask"]
    elif bad == "attention_mask_shape":
        batch["attention_mask"] = torch.cat([att, att[:, :1]], 1)
    elif bad == "slot_mask_count":
        slot_mask = torch.zeros(B, S, dtype=torch.bool)
        slot_mask.scatter_(1, slot_positions(ins, c.L, att)[:, :-1], True)
        extra["slot_mask"] = slot_mask
    elif bad == "slot_mask_on_instruction":
        if not bool(ins.any(1).all()):
            return
        slots = slot_positions(ins, c.L, att).clone()
        slots[:, 0] = torch.where(ins, torch.arange(S), -1).amax(1)  # each row's last instruction token
        extra["slot_mask"] = torch.zeros(B, S, dtype=torch.bool).scatter_(1, slots, True)
    elif bad == "too_long":
        grow = MAX_POS + 1 - S
        fill = {"input_ids": PAD, "attention_mask": 0, "instruction_mask": False, "slot_mask": False}
        batch = {
            k: torch.cat([torch.full((B, grow), fill.get(k, -100), dtype=v.dtype), v], 1)
            for k, v in batch.items()
        }
    w = model(c.T, c.L)
    kw = {} if tenants is None else {"tenant_ids": tenants}
    with torch.no_grad(), pytest.raises(ValueError, match=r"\w"):
        w(**{**batch, **kw, **extra})  # extra's slot_mask replaces the batch's own record


def check_generate(c: Layout, new_tokens: int) -> None:
    batch = build(c)
    w = model(c.T, c.L)
    kw = {} if c.tenants is None else {"tenant_ids": torch.tensor(c.tenants)}
    runs = [
        w.generate(
            **batch, **kw, max_new_tokens=new_tokens, do_sample=False, use_cache=cache, pad_token_id=PAD
        )
        for cache in (True, False)
    ]
    assert runs[0].shape == runs[1].shape, c
    assert torch.equal(runs[0], runs[1]), f"generate differs with and without a cache: {c}"


LAYOUT_EXAMPLES = {"quick": 40, "long": 3000}
LAYOUT_BAD_EXAMPLES = {"quick": 30, "long": 1000}
FORWARD_EXAMPLES = {"quick": 8, "long": 200}
FORWARD_BAD_EXAMPLES = {"quick": 20, "long": 1000}
GENERATE_EXAMPLES = {"quick": 4, "long": 60}


@pytest.mark.parametrize("profile", PROFILES)
def test_insert_prompt_slots_and_collator_layout(profile):
    run_property("HF layout", check_layout, layouts(), profile, LAYOUT_EXAMPLES)


@pytest.mark.parametrize("profile", PROFILES)
def test_prompt_layouts_for_generation(profile):
    run_property("HF layout (prompts)", check_layout, layouts(responses=False), profile, LAYOUT_EXAMPLES)


@pytest.mark.parametrize("profile", PROFILES)
def test_layout_arguments_invalid(profile):
    run_property(
        "HF layout invalid", check_layout_invalid, layouts(bad=LAYOUT_BAD), profile, LAYOUT_BAD_EXAMPLES
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_forward_accepts_every_valid_batch(profile):
    run_property(
        "HF forward",
        check_forward,
        st.one_of(layouts(), layouts(responses=False)),
        profile,
        FORWARD_EXAMPLES,
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_forward_refuses_invalid_batches(profile):
    run_property(
        "HF forward invalid",
        check_forward_invalid,
        st.one_of(layouts(bad=FORWARD_BAD), layouts(responses=False, bad=FORWARD_BAD)),
        profile,
        FORWARD_BAD_EXAMPLES,
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_generate_same_with_and_without_cache(profile):
    run_property(
        "HF generate cache",
        lambda args: check_generate(*args),
        st.tuples(layouts(responses=False, padding=("left",)), st.integers(1, 4)),
        profile,
        GENERATE_EXAMPLES,
    )
