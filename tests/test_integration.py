"""IAPT on Hugging Face causal LMs (tiny random Llama, Mistral, Qwen2, GPT-2): the generic hook
mechanism, fused vs reference parity, KV-cache generation, tenants, save/load, the slot layout."""

import json
import os

import pytest
import torch
from helpers import grad_rtol, rel_err

import iapt_kernels as ik

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
L, R = 4, 16
HAS_MT = hasattr(ik, "MultiTenantPromptGenerator")


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    tf = transformers
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            vocab_size=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cls_cfg, cls_model = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[arch]
        cfg = cls_cfg(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = cls_model(cfg)
    model.generation_config.eos_token_id = None  # fixed-length generation: compare token for token
    model.generation_config.pad_token_id = 0
    return model.eval()


def wrap(model, seed: int = 1, **cfg):
    torch.manual_seed(seed)
    w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=L, bottleneck_size=R, **cfg))
    with torch.no_grad():  # nonzero up-projection so the prompts visibly change the logits
        for g in w.generators:
            for name, p in g.named_parameters():
                if name.endswith("up.weight"):
                    p.normal_(0.0, 0.5)
            if g.gate is not None:  # the default gate starts at 0: every gradient but its own would be 0
                g.gate.uniform_(0.5, 1.5)
    return w


INSTR = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
RESP = [[20, 21, 22], [23, 24, 25, 26], [27]]


def batch(padding_side="right", responses=True):
    return ik.insert_prompt_slots(
        INSTR,
        RESP if responses else None,
        num_tokens=L,
        pad_token_id=0,
        slot_token_id=3,
        padding_side=padding_side,
    )


def count_generator_calls(w):
    calls = [0]
    for g in w.generators:
        g.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_matches_reference_logits_and_grads(arch):
    model = tiny_model(arch)
    w = wrap(model)
    # only generator parameters train
    gen_ids = {id(p) for p in w.generators.parameters()}
    for p in w.parameters():
        assert p.requires_grad == (id(p) in gen_ids)
    assert w.num_trainable_parameters() == sum(p.numel() for p in w.generators.parameters())
    assert len(w.generators) == 2

    b = batch("right")
    results = {}
    for backend in ("auto", "reference"):
        w.set_backend(backend)
        w.zero_grad(set_to_none=True)
        out = w(**b)
        out.loss.backward()
        results[backend] = (
            out.logits.detach(),
            {n: p.grad.clone() for n, p in w.generators.named_parameters()},
        )
    (la, ga), (lr, gr) = results["auto"], results["reference"]
    assert rel_err(la, lr) < 1e-5
    for n in gr:
        assert rel_err(ga[n], gr[n]) < grad_rtol(n, 1e-5), n
        assert gr[n].abs().sum() > 0, n
    with torch.no_grad():
        base = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (la - base).abs().max() > 1e-2  # prompts matter


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_steps_never_call_generators(arch):
    w = wrap(tiny_model(arch))
    calls = count_generator_calls(w)
    g = batch("left", responses=False)
    seen = []
    for n in (1, 6):
        calls[0] = 0
        out = w.generate(**g, max_new_tokens=n, do_sample=False)
        assert out.shape[1] == g["input_ids"].shape[1] + n
        seen.append(calls[0])
    assert seen == [w.num_layers, w.num_layers]
    assert w._state is None and w._gen is None


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_generation_equals_single(arch):
    w = wrap(tiny_model(arch))
    g = batch("left", responses=False)
    S, n = g["input_ids"].shape[1], 5
    out = w.generate(**g, max_new_tokens=n, do_sample=False)
    for i in range(len(INSTR)):
        one = ik.insert_prompt_slots([INSTR[i]], num_tokens=L, pad_token_id=0, slot_token_id=3)
        alone = w.generate(**one, max_new_tokens=n, do_sample=False)
        assert torch.equal(out[i, S:], alone[0, one["input_ids"].shape[1] :]), (i, out[i], alone[0])
    # and generation is not the backbone's
    base = w.model.generate(
        input_ids=g["input_ids"], attention_mask=g["attention_mask"], max_new_tokens=n, do_sample=False
    )
    assert not torch.equal(base, out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tenant_minus_one_is_frozen_backbone(arch):
    model = tiny_model(arch)
    w = wrap(model)
    b = batch("right")
    with torch.no_grad():
        base = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out = w(**b, tenant_ids=torch.tensor([0, -1, 0])).logits
        none = w(**b, tenant_ids=torch.tensor([-1, -1, -1])).logits
    assert torch.equal(out[1], base[1])
    assert torch.equal(none, base)
    assert (out[0] - base[0]).abs().max() > 1e-2


def test_save_load_roundtrip_bit_identical(tmp_path):
    b = batch("right")
    w = wrap(tiny_model("llama"))
    with torch.no_grad():
        ref = w(**b).logits
    ik.save_iapt(w, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "iapt_config.json").read_text())
    assert meta["iapt_config"]["num_tokens"] == L and meta["num_layers"] == 2
    fresh = wrap(tiny_model("llama"), seed=7)  # same backbone, different generators
    with torch.no_grad():
        assert not torch.equal(fresh(**b).logits, ref)
        ik.load_iapt(fresh, tmp_path / "a")
        assert torch.equal(fresh(**b).logits, ref)
        bare = ik.load_iapt(tiny_model("llama"), tmp_path / "a")  # a bare model gets wrapped
        assert isinstance(bare, ik.IAPTModel) and torch.equal(bare(**b).logits, ref)
    with pytest.raises(ValueError, match="bottleneck_size"):
        ik.load_iapt(ik.apply_iapt(tiny_model("llama"), bottleneck_size=8), tmp_path / "a")


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"share_projections": True},
        pytest.param(
            {"num_tenants": 3}, marks=pytest.mark.skipif(not HAS_MT, reason="no multi-tenant generator")
        ),
    ],
)
def test_param_groups_put_every_up_projection_at_its_own_rate(cfg):
    w = wrap(tiny_model("llama"), **cfg)
    rest, up = w.param_groups(2e-3, 8.0)
    assert rest["lr"] == 2e-3 and up["lr"] == pytest.approx(1.6e-2)
    ups = {id(p) for g in w.generators for p in g.up.parameters()}
    assert {id(p) for p in up["params"]} == ups and len(up["params"]) == len(ups)  # shared ones once
    assert not ups & {id(p) for p in rest["params"]}
    trainable = [p for p in w.parameters() if p.requires_grad]
    assert len(rest["params"]) + len(up["params"]) == len(trainable)
    torch.optim.AdamW(w.param_groups(1e-3))  # a valid optimizer argument
    with pytest.raises(ValueError, match="up_lr_ratio"):
        w.param_groups(1e-3, 0.0)


def test_share_projections(tmp_path):
    w = wrap(tiny_model("qwen2"), share_projections=True)
    g0, g1 = w.generators
    assert g0.down is g1.down and g0.up is g1.up and g0.pool is not g1.pool and g0.act is not g1.act
    per_layer = sum(p.numel() for n, p in g0.named_parameters() if not n.startswith(("down", "up")))
    shared = sum(p.numel() for n, p in g0.named_parameters() if n.startswith(("down", "up")))
    assert w.num_trainable_parameters() == shared + 2 * per_layer
    b = batch("right")
    w(**b).loss.backward()
    assert g0.down.weight.grad is not None and g1.pool.weight.grad is not None
    with torch.no_grad():
        ref = w(**b).logits
    ik.save_iapt(w, tmp_path / "s")
    fresh = ik.load_iapt(tiny_model("qwen2"), tmp_path / "s")
    assert fresh.generators[0].down is fresh.generators[1].down
    with torch.no_grad():
        assert torch.equal(fresh(**b).logits, ref)


def test_insert_prompt_slots_layouts():
    r = ik.insert_prompt_slots([[5, 6], [7]], [[8], [9, 10]], num_tokens=2, pad_token_id=0, slot_token_id=3)
    assert r["input_ids"].tolist() == [[5, 6, 3, 3, 8], [7, 3, 3, 9, 10]]
    assert r["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert r["instruction_mask"].tolist() == [
        [True, True, False, False, False],
        [True, False, False, False, False],
    ]
    assert r["labels"].tolist() == [[-100, -100, -100, -100, 8], [-100, -100, -100, 9, 10]]
    left = ik.insert_prompt_slots([[5, 6, 7], [8]], num_tokens=2, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7, 0, 0], [0, 0, 8, 0, 0]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert left["instruction_mask"].tolist() == [
        [True, True, True, False, False],
        [False, False, True, False, False],
    ]
    assert "labels" not in left
    right = ik.insert_prompt_slots([[5, 6, 7], [8]], [[1], [2, 4]], num_tokens=1, pad_token_id=0)
    assert right["labels"].tolist() == [[-100, -100, -100, -100, 1], [-100, -100, 2, 4, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    from iapt_kernels.integrations import slot_positions

    assert slot_positions(left["instruction_mask"], 2, left["attention_mask"]).tolist() == [[3, 4], [3, 4]]
    with pytest.raises(ValueError, match="padding_side"):
        ik.insert_prompt_slots([[1]], num_tokens=2, pad_token_id=0, padding_side="middle")


def test_explicit_slot_mask_matches_default():
    w = wrap(tiny_model("mistral"))
    b = batch("right")
    from iapt_kernels.integrations import slot_positions

    idx = slot_positions(b["instruction_mask"], L, b["attention_mask"])
    slot_mask = torch.zeros_like(b["instruction_mask"]).scatter_(1, idx, True)
    assert torch.equal(b.pop("slot_mask"), slot_mask)  # the batch's record of its layout
    with torch.no_grad():
        assert torch.equal(w(**b).logits, w(**b, slot_mask=slot_mask).logits)


def test_config_json_roundtrip():
    c = ik.IAPTConfig(num_tokens=3, degrees=(3, 2), share_projections=True, backend="reference")
    assert ik.IAPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError):
        ik.IAPTConfig(num_tokens=0)
    with pytest.raises(ValueError):
        ik.IAPTConfig(backend="cuda")


def test_bad_input_errors():
    model = tiny_model("llama")
    w = wrap(model)
    b = batch("right")
    with pytest.raises(ValueError, match="instruction_mask must have shape"):
        w(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            instruction_mask=b["instruction_mask"][:, 1:],
        )
    with pytest.raises(ValueError, match="needs instruction_mask"):
        w(input_ids=b["input_ids"])
    with pytest.raises(ValueError, match="tenant_ids"):
        w(**b, tenant_ids=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="no room"):
        ins = torch.ones_like(b["instruction_mask"])
        w(input_ids=b["input_ids"], instruction_mask=ins)
    with pytest.raises(ValueError, match="no decoder layers"):
        ik.apply_iapt(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="backend"):
        w.set_backend("gpu")


needs_mt = pytest.mark.skipif(not HAS_MT, reason="MultiTenantPromptGenerator not available")
TENANTS = torch.tensor([0, 2, -1])


@needs_mt
def test_multi_tenant_requires_tenant_ids():
    w = wrap(tiny_model("llama"), num_tenants=3)
    assert all(isinstance(g, ik.MultiTenantPromptGenerator) for g in w.generators)
    b = batch("right")
    with pytest.raises(ValueError, match="tenant_ids .* is required"):
        w(**b)
    with pytest.raises(ValueError, match="tenant_ids must be in"):
        w(**b, tenant_ids=torch.tensor([0, 3, 0]))


@needs_mt
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_multi_tenant_fused_matches_reference_and_backbone(arch):
    model = tiny_model(arch)
    w = wrap(model, num_tenants=3)
    assert w.num_trainable_parameters() == sum(p.numel() for p in w.generators.parameters())
    b = batch("right")
    res = {}
    for backend in ("auto", "reference"):
        w.set_backend(backend)
        w.zero_grad(set_to_none=True)
        out = w(**b, tenant_ids=TENANTS)
        out.loss.backward()
        res[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in w.generators.named_parameters()})
    assert rel_err(res["auto"][0], res["reference"][0]) < 1e-5
    for n, g in res["reference"][1].items():
        assert rel_err(res["auto"][1][n], g) < grad_rtol(n, 1e-5), n
    with torch.no_grad():
        base = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(res["auto"][0][2], base[2])  # tenant -1: the frozen backbone exactly
    assert (res["auto"][0][:2] - base[:2]).abs().max() > 1e-2


@needs_mt
def test_multi_tenant_batched_generation_equals_single():
    model = tiny_model("llama")
    w = wrap(model, num_tenants=3)
    g = batch("left", responses=False)
    S, n = g["input_ids"].shape[1], 5
    calls = count_generator_calls(w)
    out = w.generate(**g, tenant_ids=TENANTS, max_new_tokens=n, do_sample=False)
    assert calls[0] == w.num_layers
    for i in range(len(INSTR)):
        one = ik.insert_prompt_slots([INSTR[i]], num_tokens=L, pad_token_id=0, slot_token_id=3)
        alone = w.generate(**one, tenant_ids=TENANTS[i : i + 1], max_new_tokens=n, do_sample=False)
        assert torch.equal(out[i, S:], alone[0, one["input_ids"].shape[1] :]), i
        if TENANTS[i] < 0:  # tenant -1: the base model on the bare instruction, as if no slots were there
            bare = torch.tensor([INSTR[i]])
            base = model.generate(
                input_ids=bare, attention_mask=torch.ones_like(bare), max_new_tokens=n, do_sample=False
            )
            assert torch.equal(alone[0, -n:], base[0, -n:])
            assert torch.equal(out[i, S:], base[0, -n:])
    # the same tenant requests with different tenants generate differently
    other = w.generate(**g, tenant_ids=torch.tensor([1, 0, -1]), max_new_tokens=n, do_sample=False)
    assert not torch.equal(other[:2], out[:2])


@needs_mt
def test_single_tenant_adapter_loads_into_tenant_slot(tmp_path):
    b = batch("right")
    single = wrap(tiny_model("llama"), seed=3)
    with torch.no_grad():
        ref = single(**b).logits
    ik.save_iapt(single, tmp_path / "one")
    mt = wrap(tiny_model("llama"), seed=4, num_tenants=3)
    ik.load_iapt(mt, tmp_path / "one", tenant=2)
    assert mt.tenant_weights == ("initial", "initial", "loaded")
    mt(**b, tenant_ids=torch.tensor([0, 0, 0]))  # a call with gradients: tenant 0 trains from scratch
    with torch.no_grad():
        out = mt(**b, tenant_ids=torch.tensor([2, 2, 2])).logits
        mixed = mt(**b, tenant_ids=torch.tensor([0, 2, -1])).logits
    assert rel_err(out, ref) < 1e-6
    assert rel_err(mixed[1], ref[1]) < 1e-6
    # tenant 2 of the multi-tenant model, saved alone, loads into a single-tenant model
    ik.save_iapt(mt, tmp_path / "t2", tenant=2)
    back = ik.load_iapt(tiny_model("llama"), tmp_path / "t2")
    assert back.iapt_config.num_tenants == 1
    with torch.no_grad():
        assert torch.equal(back(**b).logits, ref)
    # the whole multi-tenant adapter round-trips bit-identically
    ik.save_iapt(mt, tmp_path / "all")
    fresh = ik.load_iapt(wrap(tiny_model("llama"), seed=5, num_tenants=3), tmp_path / "all")
    with torch.no_grad():
        assert torch.equal(fresh(**b, tenant_ids=torch.tensor([0, 2, -1])).logits, mixed)
    # tenant 2 of the saved multi-tenant adapter into a single-tenant model
    st = ik.load_iapt(wrap(tiny_model("llama"), seed=6), tmp_path / "all", tenant=2)
    with torch.no_grad():
        assert torch.equal(st(**b).logits, ref)
    with pytest.raises(ValueError, match="num_tenants"):
        ik.load_iapt(wrap(tiny_model("llama"), seed=6), tmp_path / "all")


def test_train_script_runs(tmp_path, capsys):
    from iapt_kernels import train

    score = train.main(["--steps", "3", "--out", str(tmp_path / "ad"), "--no-progress", "--eval-size", "20"])
    text = capsys.readouterr().out
    assert "synthetic" in text and "trainable parameters" in text and "held-out exact match" in text
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    # the run saved everything it needs: reloading reproduces its score exactly
    assert train.main(["--evaluate", str(tmp_path / "ad"), "--eval-size", "20"]) == score
    with pytest.raises(SystemExit, match="local directory"):
        train.main(["--model", "some-org/some-model", "--steps", "1"])


@pytest.mark.skipif(
    os.environ.get("IAPT_TEST_SLOW", "0") != "1",
    reason="the default demo trains for minutes on a small CPU: IAPT_TEST_SLOW=1 runs it",
)
def test_train_demo_defaults_learn(tmp_path):
    from iapt_kernels import train

    score = train.main(["--out", str(tmp_path / "demo"), "--no-progress"])
    # Measured with one OpenMP thread: 87.0% (gate + calibrate, 2026-12-05, twice alike); 84.0% before
    # the gate; one seed, and starts differing only in their draws moved it by 4.5 points. "Learns" is
    # far above chance (about a tenth) with that margin, not the README's figure, which the lead re-measures.
    assert score >= 0.8
    assert train.main(["--evaluate", str(tmp_path / "demo")]) == score


def test_gradient_checkpointing_gives_the_same_gradients():
    b = batch("right")
    grads = []
    for ckpt in (False, True):
        w = wrap(tiny_model("llama"))
        w.train()
        if ckpt:
            enable = (
                getattr(w.model, "activation_checkpointing_enable", None)
                or w.model.gradient_checkpointing_enable
            )
            enable()
        w(**b).loss.backward()
        grads.append({n: p.grad.clone() for n, p in w.generators.named_parameters()})
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-6, n


def test_transformers_trainer_trains_only_generators(tmp_path):
    w = wrap(tiny_model("llama"))
    data = [
        {
            k: v[0]
            for k, v in ik.insert_prompt_slots([INSTR[i]], [RESP[i]], num_tokens=L, pad_token_id=0).items()
        }
        for i in range(3)
    ]

    def collate(examples):
        return ik.insert_prompt_slots(
            [e["input_ids"][e["instruction_mask"]].tolist() for e in examples],
            [e["labels"][e["labels"] != -100].tolist() for e in examples],
            num_tokens=L,
            pad_token_id=0,
        )

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        learning_rate=1e-2,
    )
    frozen = {n: p.clone() for n, p in w.model.named_parameters()}
    gens = [p.clone() for p in w.generators.parameters()]
    transformers.Trainer(model=w, args=args, train_dataset=data, data_collator=collate).train()
    assert all(torch.equal(p, frozen[n]) for n, p in w.model.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(gens, w.generators.parameters()))


@pytest.mark.skipif("triton" not in ik.available_backends(), reason="Triton not runnable here")
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("num_tenants", [1, 3])
def test_triton_backend_switch_matches_reference(backend, device, num_tenants):
    w = wrap(tiny_model("llama"), num_tenants=num_tenants).to(device)  # CPU: the Triton interpreter
    b = {k: v.to(device) for k, v in batch("right").items()}
    if num_tenants > 1:
        b["tenant_ids"] = torch.tensor([2, -1, 0], device=device)
    res = []
    for which in (backend, "reference"):
        w.set_backend(which)
        w.zero_grad(set_to_none=True)
        out = w(**b)
        assert out.logits.device.type == device
        out.loss.backward()
        res.append((out.logits.detach(), {n: p.grad.clone() for n, p in w.generators.named_parameters()}))
    assert rel_err(res[0][0], res[1][0]) < 1e-5
    for n, r in res[1][1].items():
        assert rel_err(res[0][1][n], r) < grad_rtol(n, 1e-5), n
