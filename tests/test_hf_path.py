"""The Hugging Face flows a user runs every day, where IAPT must not go silently wrong: generation
without a cache, save_pretrained and Trainer checkpoints, slot layouts, tenant -1, adapter files,
stale state, padding and lengths, torch.compile (issue 15)."""

import copy
import json
import os
import stat

import pytest
import torch
from helpers import grad_rtol, rel_err
from test_integration import HAS_MT, INSTR, RESP, L, batch, tiny_model, wrap

import iapt_kernels as ik
from iapt_kernels.testing import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
needs_mt = pytest.mark.skipif(not HAS_MT, reason="MultiTenantPromptGenerator not available")


def greedy_loop(w, prompt, n, **kw):
    """Greedy decoding by hand: the whole sequence through IAPTModel.forward at every step."""
    ids, att, ins = prompt["input_ids"], prompt["attention_mask"], prompt["instruction_mask"]
    with torch.no_grad():
        for _ in range(n):
            logits = w(input_ids=ids, attention_mask=att, instruction_mask=ins, **kw).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            att = torch.cat([att, torch.ones_like(nxt)], 1)
            ins = torch.cat([ins, torch.zeros_like(nxt, dtype=torch.bool)], 1)
    return ids


# ----------------------------------------------------------------------------- 1. generate without a cache
@pytest.mark.parametrize("tenants", [1, pytest.param(3, marks=needs_mt)])
def test_generate_without_cache_equals_cached_and_forward_loop(tenants):
    w = wrap(tiny_model("llama"), num_tenants=tenants)
    g = batch("left", responses=False)
    kw = {"tenant_ids": torch.tensor([0, 2, 1])} if tenants > 1 else {}
    n = 6
    cached = w.generate(**g, **kw, max_new_tokens=n, do_sample=False, use_cache=True)
    uncached = w.generate(**g, **kw, max_new_tokens=n, do_sample=False, use_cache=False)
    loop = greedy_loop(w, g, n, **kw)
    assert torch.equal(cached, loop)
    assert torch.equal(uncached, loop)
    base = w.model.generate(
        input_ids=g["input_ids"], attention_mask=g["attention_mask"], max_new_tokens=n, do_sample=False
    )
    assert not torch.equal(base, cached)  # the prompts do matter


def test_generate_refuses_a_cache_that_ends_inside_the_prompt():
    w = wrap(tiny_model("llama"))
    g = batch("left", responses=False)
    with torch.no_grad():
        pkv = w.model(
            input_ids=g["input_ids"][:, :3], attention_mask=g["attention_mask"][:, :3], use_cache=True
        ).past_key_values
    with pytest.raises(RuntimeError, match="covers positions \\[3,"):
        w.generate(**g, past_key_values=pkv, max_new_tokens=2, do_sample=False)


# ----------------------------------------------------------------------------- 2. save_pretrained, Trainer
def test_save_pretrained_writes_the_adapter(tmp_path):
    w = wrap(tiny_model("llama"))
    b = batch("right")
    with torch.no_grad():
        ref = w(**b).logits
    w.save_pretrained(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_model.safetensors", "iapt_config.json"]
    meta = json.loads((tmp_path / "a" / "iapt_config.json").read_text())
    assert meta["base_model"]["model_type"] == "llama" and meta["base_model"]["num_layers"] == 2
    back = ik.load_iapt(tiny_model("llama"), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(back(**b).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_save_model_and_checkpoints_reload(tmp_path, arch):
    w = wrap(tiny_model(arch))
    data = [{"instruction_ids": INSTR[i], "response_ids": RESP[i]} for i in range(3)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=3,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=1,
        remove_unused_columns=False,
        learning_rate=1e-2,
    )
    trainer = transformers.Trainer(
        model=w,
        args=args,
        train_dataset=data,
        data_collator=ik.IAPTDataCollator(num_tokens=L, pad_token_id=0),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    b = batch("right")
    w.eval()
    with torch.no_grad():
        ref = w(**b).logits
    for where in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        back = ik.load_iapt(tiny_model(arch), where)
        with torch.no_grad():
            assert torch.equal(back(**b).logits, ref), where
    first = ik.load_iapt(tiny_model(arch), tmp_path / "run" / "checkpoint-1")
    with torch.no_grad():
        assert not torch.equal(first(**b).logits, ref)  # a checkpoint holds its own step's generators


def test_state_dict_roundtrip_checks_the_metadata():
    w = wrap(tiny_model("llama"))
    sd = w.state_dict()
    assert sd["_extra_state"].dtype == torch.uint8
    other = wrap(tiny_model("llama"), seed=5)
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.generators.parameters(), w.generators.parameters()))
    small = ik.apply_iapt(tiny_model("llama"), num_tokens=2, bottleneck_size=R_SMALL)
    with pytest.raises(ValueError, match="num_tokens=4, the model has 2"):
        small.load_state_dict({"_extra_state": sd["_extra_state"]}, strict=False)


R_SMALL = 16


# ----------------------------------------------------------------------------- 3. slot layouts
def test_batch_without_slots_is_refused():
    w = wrap(tiny_model("llama"))
    ids = [INSTR[i] + RESP[i] for i in range(3)]  # a user who forgot the slots
    S = max(map(len, ids)) + L  # room enough: only the labels show the slots are missing
    input_ids = torch.zeros(3, S, dtype=torch.long)
    instr = torch.zeros(3, S, dtype=torch.bool)
    labels = torch.full((3, S), -100)
    att = torch.zeros(3, S, dtype=torch.long)
    for i in range(3):
        n, k = len(ids[i]), len(INSTR[i])
        input_ids[i, :n], att[i, :n], instr[i, :k] = torch.tensor(ids[i]), 1, True
        labels[i, k:n] = torch.tensor(RESP[i])
    with pytest.raises(ValueError, match="slot positions fall on padding"):
        w(input_ids=input_ids, attention_mask=att, instruction_mask=instr, labels=labels)
    with pytest.raises(ValueError, match="slot positions hold labels .*rows \\[0, 1, 2\\]"):
        w(input_ids=input_ids, instruction_mask=instr, labels=labels)


def test_too_few_slot_tokens_is_refused():
    w = wrap(tiny_model("llama"))
    train = ik.insert_prompt_slots(INSTR, RESP, num_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="laid out for 3 slot tokens .*num_tokens=4"):
        w(**train)
    del train["slot_mask"]  # a batch without its record: the layout itself shows the slots missing
    with pytest.raises(ValueError, match="slot positions (hold labels|fall on padding)"):
        w(**train)
    for side in ("left", "right"):
        prompt = ik.insert_prompt_slots(INSTR, num_tokens=3, pad_token_id=0, padding_side=side)
        del prompt["slot_mask"]
        with pytest.raises(ValueError, match="no room|fall on padding"):
            w.generate(**prompt, max_new_tokens=2)


def test_padded_inputs_to_insert_prompt_slots():
    padded = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(ValueError, match="looks padded"):
        ik.insert_prompt_slots(padded, num_tokens=2, pad_token_id=0)
    enc = transformers.BatchEncoding(
        {"input_ids": padded, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    )
    got = ik.insert_prompt_slots(enc, num_tokens=2, pad_token_id=0)
    want = ik.insert_prompt_slots([[5, 6, 7], [8, 9]], num_tokens=2, pad_token_id=0)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(TypeError, match="not text"):
        ik.insert_prompt_slots(["hello"], num_tokens=2, pad_token_id=0)
    w = wrap(tiny_model("llama"))
    b = batch("right")
    on_pad = b["instruction_mask"] | (b["attention_mask"] == 0)
    with pytest.raises(ValueError, match="instruction_mask is True on padding"):
        w(**{**b, "instruction_mask": on_pad})


def test_slot_mask_on_instruction_is_refused():
    w = wrap(tiny_model("llama"))
    b = batch("right")
    sm = torch.zeros_like(b["instruction_mask"])
    sm[:, :L] = True  # row 1 has 2 instruction tokens: these slots overlap the instruction
    with pytest.raises(ValueError, match="slot_mask is True on instruction tokens"):
        w(**{**b, "slot_mask": sm})


# ----------------------------------------------------------------------------- 4. tenant -1
@needs_mt
def test_tenant_minus_one_generates_like_the_base_model_on_the_bare_instruction():
    model = tiny_model("gpt2")
    w = wrap(model, num_tenants=2)
    g = batch("left", responses=False)
    n = 5
    out = w.generate(**g, tenant_ids=torch.tensor([-1, 0, -1]), max_new_tokens=n, do_sample=False)
    for i in (0, 2):
        bare = torch.tensor([INSTR[i]])
        base = model.generate(
            input_ids=bare, attention_mask=torch.ones_like(bare), max_new_tokens=n, do_sample=False
        )
        assert torch.equal(out[i, -n:], base[0, -n:]), i
    right = batch("right", responses=False)
    with pytest.raises(ValueError, match="left-padded prompts"):
        w.generate(**right, tenant_ids=torch.tensor([0, -1, 0]), max_new_tokens=2)


# ----------------------------------------------------------------------------- 7. adapter files
def test_adapter_refuses_another_base_model(tmp_path):
    llama = wrap(tiny_model("llama"))
    ik.save_iapt(llama, tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a llama model .* this is a gpt2 model"):
        ik.load_iapt(tiny_model("gpt2"), tmp_path / "a")  # same hidden size and depth
    with pytest.raises(ValueError, match="iapt_config.json"):
        ik.load_iapt(wrap(tiny_model("gpt2")), tmp_path / "a")


def test_bad_adapter_files_name_the_file(tmp_path):
    w = wrap(tiny_model("llama"))
    ik.save_iapt(w, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    config = tmp_path / "a" / "iapt_config.json"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read it as safetensors"):
        ik.load_iapt(tiny_model("llama"), tmp_path / "a")
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        ik.load_iapt(tiny_model("llama"), tmp_path / "a")
    weights.write_bytes(data)
    text = config.read_text()
    config.write_text(text[:20])
    with pytest.raises(ValueError, match="iapt_config.json: not valid JSON"):
        ik.load_iapt(tiny_model("llama"), tmp_path / "a")
    config.write_text(json.dumps({"format": "iapt_kernels"}))
    with pytest.raises(ValueError, match="iapt_config.json: the adapter config lacks 'iapt_config'"):
        ik.load_iapt(tiny_model("llama"), tmp_path / "a")


def test_adapter_files_follow_the_umask(tmp_path):
    w = wrap(tiny_model("llama"))
    old = os.umask(0o022)
    try:
        ik.save_iapt(w, tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "iapt_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "a" / name).st_mode) == 0o644, name


# ----------------------------------------------------------------------------- 8. stale state, double wrap
def test_backbone_called_directly_after_a_checkpointed_step_is_bare():
    model = tiny_model("llama")
    bare = copy.deepcopy(model)
    w = wrap(model)
    w.train()
    enable = (
        getattr(w.model, "activation_checkpointing_enable", None) or w.model.gradient_checkpointing_enable
    )
    enable()
    b = batch("right")
    w(**b).loss.backward()
    w.eval()
    bare.eval()
    with torch.no_grad():
        direct = w.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref = bare(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(direct, ref)


def test_double_wrap_is_refused():
    w = wrap(tiny_model("llama"))
    with pytest.raises(TypeError, match="already an IAPTModel"):
        ik.apply_iapt(w)
    with pytest.raises(TypeError, match="remove_hooks"):
        ik.apply_iapt(w.model)
    again = ik.apply_iapt(w.remove_hooks(), num_tokens=L, bottleneck_size=8)
    assert isinstance(again, ik.IAPTModel)


# ----------------------------------------------------------------------------- 9. padding, lengths
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_and_right_padding_give_the_same_logits(arch):
    w = wrap(tiny_model(arch))
    right, left = batch("right", responses=False), batch("left", responses=False)
    with torch.no_grad():
        lr, ll = w(**right).logits, w(**left).logits
    for i in range(3):
        n = int(right["attention_mask"][i].sum())
        assert rel_err(lr[i, :n], ll[i, -n:]) < 1e-5, i


def test_lengths_are_checked():
    with pytest.raises(ValueError, match="num_tokens=100 exceeds the 64"):
        ik.IAPTConfig(num_tokens=100)
    assert ik.IAPTConfig(num_tokens=100, backend="reference").num_tokens == 100
    w = wrap(tiny_model("gpt2"))  # 128 positions
    long = ik.insert_prompt_slots([list(range(5, 125)) * 2], [[7, 8]], num_tokens=L, pad_token_id=0)
    with pytest.raises(ValueError, match="exceeds the 128 positions .* max_length=128"):
        w(**long)
    cut = ik.insert_prompt_slots(
        [list(range(5, 125)) * 2], [[7, 8]], num_tokens=L, pad_token_id=0, max_length=128
    )
    assert cut["input_ids"].shape[1] == 128
    assert cut["input_ids"][0, -L - 3].item() == 124  # left truncation keeps the instruction's end
    assert cut["labels"][0, -2:].tolist() == [7, 8]
    w(**cut).loss.backward()
    right = ik.insert_prompt_slots(
        [[9, 10, 11, 12]], [[7]], num_tokens=2, pad_token_id=0, max_length=5, truncation_side="right"
    )
    assert right["input_ids"].tolist() == [[9, 10, 0, 0, 7]]
    with pytest.raises(ValueError, match="max_new_tokens=200"):
        w.generate(**ik.insert_prompt_slots([[5, 6]], num_tokens=L, pad_token_id=0), max_new_tokens=200)


# ----------------------------------------------------------------------------- 6. torch.compile
# fullgraph=True is about the traced graph, which every backend shares; "aot_eager" also traces the
# backward and runs in seconds. Inductor's C++ codegen takes minutes on a small CPU machine: run it with
# IAPT_TEST_COMPILE_BACKEND=inductor.
COMPILE_BACKEND = os.environ.get("IAPT_TEST_COMPILE_BACKEND", "aot_eager")


# record: with the batch's slot_mask (True), or checked by its tokens (False). Each case compiles the
# model afresh (3 to 7 s here), so the fast tier keeps two that between them hold both values of each
# argument; the other pairs are `slow`.
@pytest.mark.parametrize(
    "record, tenants",
    [
        pytest.param(True, 1, id="True-1"),
        pytest.param(False, 3, id="False-3", marks=needs_mt),
        pytest.param(True, 3, id="True-3", marks=[needs_mt, pytest.mark.slow]),
        pytest.param(False, 1, id="False-1", marks=pytest.mark.slow),
    ],
)
def test_compile_fullgraph_forward_backward_equals_eager(record, tenants):
    torch._dynamo.reset()
    w = wrap(tiny_model("llama"), num_tenants=tenants)
    b = batch("right")
    if not record:
        del b["slot_mask"]
    kw = {"tenant_ids": torch.tensor([0, 2, -1])} if tenants > 1 else {}
    res = []
    for net in (w, torch.compile(w, fullgraph=True, backend=COMPILE_BACKEND)):
        w.zero_grad(set_to_none=True)
        out = net(**b, **kw)
        out.loss.backward()
        res.append((out.logits.detach(), {n: p.grad.clone() for n, p in w.generators.named_parameters()}))
    (le, ge), (lc, gc) = res
    assert rel_err(lc, le) < 1e-5
    for n, e in ge.items():
        assert rel_err(gc[n], e) < grad_rtol(n, 1e-4), n
    assert sum(float(g.abs().sum()) for g in gc.values()) > 0


@pytest.mark.gpu  # host synchronisation is a CUDA matter: skipped with "needs CUDA" elsewhere
@pytest.mark.parametrize("tenants", [1, pytest.param(3, marks=needs_mt)])
def test_no_host_sync_per_layer_on_cuda(tenants):
    """Checks and tenant grouping run once per batch: the number of host synchronisations of a
    training step must not grow with the number of layers."""
    import warnings

    counts = []
    for layers in (2, 4):
        model = tiny_llama(
            128,
            initializer_range=0.02,
            num_hidden_layers=layers,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        w = wrap(model.cuda(), num_tenants=tenants)
        b = {k: v.cuda() for k, v in batch("right").items()}
        kw = {"tenant_ids": torch.tensor([0, 2, -1], device="cuda")} if tenants > 1 else {}
        w(**b, **kw).loss.backward()  # warm-up: kernel compilation, allocator
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                w(**b, **kw).loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(r.message) for r in rec))
    assert counts[0] == counts[1], counts
