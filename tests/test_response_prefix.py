"""The response prefix (issue 13): on a pretrained model the first response token must be predicted at
a real token, not at a slot. With ``[instruction][slots][response]`` it is predicted at the last slot,
whose hidden state IAPT overwrites before every layer, so the prediction sees the instruction only
through the last layer: on SmolLM2/BBC News that layout left IAPT near the label prior. These tests pin
the layout that avoids it, in every path a user takes (insert_prompt_slots, the collator, generate with
and without an adapter, train.py; the real-task benchmark's in tests/benchmarks/test_real_task.py),
and the warning for the trap itself."""

import warnings

import pytest
import torch
from test_integration import INSTR, RESP, L, tiny_model, wrap

import iapt_kernels as ik
from iapt_kernels.integrations.slots import slot_positions

transformers = pytest.importorskip("transformers")

PRE = [30, 31]


def layout(padding_side="right", responses=True, prefix=PRE):
    return ik.insert_prompt_slots(
        INSTR,
        RESP if responses else None,
        num_tokens=L,
        pad_token_id=0,
        slot_token_id=3,
        padding_side=padding_side,
        response_prefix_ids=prefix,
    )


def test_layout_puts_a_real_token_before_the_response():
    b = layout()
    slots = slot_positions(b["instruction_mask"], L, b["attention_mask"])
    for i, (ins, resp) in enumerate(zip(INSTR, RESP)):
        n = len(ins)
        assert b["input_ids"][i, : n + L + 2 + len(resp)].tolist() == ins + [3] * L + PRE + resp
        assert slots[i].tolist() == list(range(n, n + L))  # the default slots: right after the instruction
        assert not b["instruction_mask"][i, n:].any()  # the prefix is not pooled as instruction
        first = (b["labels"][i] != -100).nonzero()[0].item()
        assert first == n + L + 2 and b["labels"][i, :first].eq(-100).all()
        assert first - 1 not in slots[i].tolist()  # the first label is predicted at the prefix, not a slot


def test_per_row_prefixes_and_truncation_keep_the_prefix():
    rows = [[40], [41, 42], []]
    b = ik.insert_prompt_slots(INSTR, RESP, num_tokens=L, pad_token_id=0, response_prefix_ids=rows)
    for i, pre in enumerate(rows):
        n = len(INSTR[i])
        assert b["input_ids"][i, n + L : n + L + len(pre)].tolist() == pre
    t = ik.insert_prompt_slots(
        [[5, 6, 7, 8, 9]],
        [[20, 21]],
        num_tokens=L,
        pad_token_id=0,
        response_prefix_ids=PRE,
        max_length=L + 2 + 4,
    )
    assert t["input_ids"][0].tolist() == [8, 9] + [0] * L + PRE + [
        20,
        21,
    ]  # instruction cut first, prefix kept
    with pytest.raises(ValueError, match="response prefix"):
        ik.insert_prompt_slots([[5]], num_tokens=L, pad_token_id=0, response_prefix_ids=PRE, max_length=L + 2)
    with pytest.raises(ValueError, match="2 rows for 3 examples"):
        ik.insert_prompt_slots(INSTR, num_tokens=L, pad_token_id=0, response_prefix_ids=[[1], [2]])
    with pytest.raises(TypeError, match="not text"):
        ik.insert_prompt_slots(INSTR, num_tokens=L, pad_token_id=0, response_prefix_ids="Answer:")


def test_the_trap_warns_and_an_explicit_choice_does_not():
    with pytest.warns(UserWarning, match="predicted at the last slot"):
        ik.insert_prompt_slots(INSTR, RESP, num_tokens=L, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ik.insert_prompt_slots(INSTR, RESP, num_tokens=L, pad_token_id=0, response_prefix_ids=[])
        ik.insert_prompt_slots(INSTR, RESP, num_tokens=L, pad_token_id=0, response_prefix_ids=PRE)
        ik.insert_prompt_slots(INSTR, num_tokens=L, pad_token_id=0)  # generation prompts: nothing is trained


@pytest.mark.parametrize("tenants", [1, 3])
def test_generate_with_a_prefix_matches_the_forward_loop(tenants):
    from test_hf_path import greedy_loop
    from test_integration import HAS_MT

    if tenants > 1 and not HAS_MT:
        pytest.skip("MultiTenantPromptGenerator not available")
    w = wrap(tiny_model("llama"), num_tenants=tenants)
    g = layout("left", responses=False)
    kw = {"tenant_ids": torch.tensor([0, 2, 1])} if tenants > 1 else {}
    cached = w.generate(**g, **kw, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = w.generate(**g, **kw, max_new_tokens=4, do_sample=False, use_cache=False)
    loop = greedy_loop(w, g, 4, **kw)
    assert torch.equal(cached, loop) and torch.equal(uncached, loop)


def test_tenant_minus_one_with_a_prefix_is_the_base_model_on_instruction_and_prefix():
    from test_integration import HAS_MT

    if not HAS_MT:
        pytest.skip("MultiTenantPromptGenerator not available")
    model = tiny_model("gpt2")
    w = wrap(model, num_tenants=2)
    g = layout("left", responses=False)
    n = 5
    out = w.generate(**g, tenant_ids=torch.tensor([-1, 0, -1]), max_new_tokens=n, do_sample=False)
    for i in (0, 2):
        bare = torch.tensor([INSTR[i] + PRE])
        base = model.generate(
            input_ids=bare, attention_mask=torch.ones_like(bare), max_new_tokens=n, do_sample=False
        )
        assert torch.equal(out[i, -n:], base[0, -n:]), i
    right = layout("right", responses=False)
    with pytest.raises(ValueError, match="left-padded prompts"):
        w.generate(**right, tenant_ids=torch.tensor([0, -1, 0]), max_new_tokens=2)


def test_collator_takes_the_prefix_as_text_or_ids():
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "Answer:": 4}, unk_token="<pad>")
    )
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")
    ex = [{"instruction": "a b", "response": "b"}]
    for prefix in ("Answer:", [4]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b = ik.IAPTDataCollator(num_tokens=2, tokenizer=tok, response_prefix=prefix)(ex)
        assert b["input_ids"][0].tolist() == [2, 3, 0, 0, 4, 3, 1]
        assert b["labels"][0].tolist() == [-100] * 5 + [3, 1]
    with pytest.warns(UserWarning, match="response_prefix_ids"):
        ik.IAPTDataCollator(num_tokens=2, tokenizer=tok)(ex)
    with pytest.raises(ValueError, match="needs tokenizer"):
        ik.IAPTDataCollator(num_tokens=2, pad_token_id=0, response_prefix="Answer:")


def test_train_cli_puts_a_newline_after_the_slots_for_a_pretrained_model(tmp_path, monkeypatch):
    """python -m iapt_kernels.train --model: the response prefix is on by default ("\\n"), off with ''."""
    pytest.importorskip("tokenizers")
    from iapt_kernels import train
    from iapt_kernels.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Is red warm?", "response": " yes"}\n' * 4)
    seen = []
    real = ik.insert_prompt_slots

    def spy(*args, **kw):
        seen.append(kw.get("response_prefix_ids"))
        return real(*args, **kw)

    monkeypatch.setattr(ik, "insert_prompt_slots", spy)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    for extra, expect in (
        ([], tok("\n", add_special_tokens=False)["input_ids"]),
        (["--response-prefix", ""], []),
    ):
        seen.clear()
        train.main(
            [
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "ad"),
                "--no-progress",
                *extra,
            ]
        )
        assert seen and all(p == expect for p in seen), (extra, seen)
        assert extra or expect  # the default prefix is a real token
