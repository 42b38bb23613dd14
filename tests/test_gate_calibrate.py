"""The default recipe (issue 20): a gate at 0 in every generator (``IAPTConfig.gate_init``) and the
data-dependent start ``IAPTModel.calibrate``. Bit-for-bit agreement with the real-task tool's
experiment it replaces, the one-time warning, adapters saved before the gate (no ``gate_init`` key,
no ``gate`` tensor) loading unchanged, gated adapters round-tripping, and the compile path's gate."""

import copy
import json
import warnings

import pytest
import torch
from helpers import rel_err

import iapt_kernels as ik

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from iapt_kernels.integrations.hooks import every_tenant  # noqa: E402
from iapt_kernels.testing import SyntheticTask, tiny_llama  # noqa: E402

L, R, SEED = 4, 16, 7
TASK = SyntheticTask()
CUE = [TASK.SLOT + 1]  # a real token between the slots and the response, as the tool's cue


# ---------------------------------------------------------------- the tool's code (benchmarks/real_task.py)
# Copied as it was when the package took the recipe over, so the package is held to its bits. One
# change: ``_gate`` names its parameter ``tool_gate``, since the package's generators own ``gate`` now
# (assigning ``gate`` would gate twice: the module's own multiply and the hook's).
@torch.no_grad()
def _small_init(net, seed: int) -> None:
    torch.manual_seed(seed)
    for g in net.generators:
        g.down.reset_parameters()
        g.pool.reset_parameters()
        g.up.reset_parameters()
        torch.nn.init.normal_(g.up.weight, std=0.02)
        torch.nn.init.zeros_(g.up.bias)


def _gate(net) -> None:
    for g in net.generators:
        g.tool_gate = torch.nn.Parameter(torch.zeros(()))
        g.register_forward_hook(lambda m, args, out: out * m.tool_gate)


@torch.no_grad()
def _mean_hidden_init(net, rows, pad_id: int) -> None:
    if not rows:
        return
    b = _pad([r[0] + r[3] for r in rows], [r[1] for r in rows], pad_id, "right")
    out = net.model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
    )
    att = b["attention_mask"].bool()
    att[:, 0] = False
    for g, h in zip(net.generators, out.hidden_states):
        g.up.bias.copy_(h[att].mean(0).to(g.up.bias.dtype))


def _pad(ins, resp, pad_id: int, side: str) -> dict:
    rows = [i + (r if resp is not None else []) for i, r in zip(ins, resp or [[]] * len(ins))]
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), S), dtype=torch.long)
    labels = torch.full((len(rows), S), -100, dtype=torch.long)
    for b, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(S - len(row), S)
        ids[b, sl] = torch.tensor(row)
        att[b, sl] = 1
        if resp is not None:
            lab = [-100] * len(ins[b]) + resp[b]
            labels[b, sl] = torch.tensor(lab)
    out = {"input_ids": ids, "attention_mask": att}
    if resp is not None:
        out["labels"] = labels
    return out


# ---------------------------------------------------------------- helpers
def rows(n: int = 6, seed: int = 0):
    """The tool's row layout: ``(instruction, response, _, cue)``."""
    import random

    rng = random.Random(seed)
    return [(*TASK.sample(rng), None, CUE) for _ in range(n)]


def plain(rs) -> dict:
    """The calibration batch: ``[instruction][cue][response]``, no slots, right-padded."""
    return _pad([r[0] + r[3] for r in rs], [r[1] for r in rs], TASK.PAD, "right")


def slotted(rs) -> dict:
    return ik.insert_prompt_slots(
        [r[0] for r in rs],
        [r[1] for r in rs],
        num_tokens=L,
        pad_token_id=TASK.PAD,
        slot_token_id=TASK.SLOT,
        response_prefix_ids=CUE,
    )


def backbone():
    return tiny_llama(TASK.vocab_size, seed=0, initializer_range=0.02)


def grads(net) -> dict:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def randomised(net, seed: int = 3):
    """Generators far from their start (a trained adapter): random up-projections and gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.generators.named_parameters():
            if name.endswith(("up.weight", "gate")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return net


# ---------------------------------------------------------------- the recipe, against the tool
def test_recipe_matches_the_tool_bit_for_bit():
    """``apply_iapt`` (default gate 0) + ``calibrate`` = the tool's ``--iapt-init mean --iapt-gate``:
    the same parameters, then the same loss and gradients over three AdamW steps, to the bit."""
    base, rs = backbone(), rows()
    torch.manual_seed(SEED)
    tool = ik.apply_iapt(copy.deepcopy(base), ik.IAPTConfig(num_tokens=L, bottleneck_size=R, gate_init=None))
    _small_init(tool, SEED)
    _mean_hidden_init(tool, rs, TASK.PAD)
    _gate(tool)
    torch.manual_seed(SEED)
    pkg = ik.apply_iapt(copy.deepcopy(base), num_tokens=L, bottleneck_size=R)
    b = plain(rs)
    assert pkg.calibrate(b["input_ids"], b["attention_mask"]) is pkg
    # the tool's gate is 0-d, the package's (1,) (FSDP2 shards no 0-d parameter): the same values
    want = {k.replace("tool_gate", "gate"): v for k, v in tool.generators.state_dict().items()}
    got = pkg.generators.state_dict()
    assert want.keys() == got.keys() and any(k.endswith("gate") for k in got)
    for k in want:
        assert torch.equal(want[k].reshape(got[k].shape), got[k]), k
    assert float(got["0.up.bias"].abs().max()) > 0  # calibrated, not the zero start
    opts = [torch.optim.AdamW(n.param_groups(3e-3)) for n in (tool, pkg)]
    for step in range(3):
        batch = slotted(rows(6, seed=step + 1))
        losses, gs = [], []
        for net, opt in zip((tool, pkg), opts):
            net.train()
            opt.zero_grad(set_to_none=True)
            loss = net(**batch).loss
            loss.backward()
            losses.append(loss.detach())
            gs.append(grads(net))
            opt.step()
        assert torch.equal(*losses), step
        assert [k.replace("tool_gate", "gate") for k in gs[0]] == list(gs[1])  # the optimizer's order
        for (k, a), b in zip(gs[0].items(), gs[1].values()):
            assert torch.equal(a.reshape(b.shape), b), (step, k)
        if step == 0:  # zero prompts: only the gates get a gradient
            assert [k for k, g in gs[1].items() if bool(g.ne(0).any())] == [
                "generators.0.gate",
                "generators.1.gate",
            ]
        else:  # the gates moved: every part learns
            assert all(bool(g.ne(0).any()) for g in gs[1].values())


def test_fresh_default_adapter_writes_zero_prompts():
    net = ik.apply_iapt(backbone(), num_tokens=L)
    assert net.iapt_config.gate_init == 0.0 and net.iapt_config.bottleneck_size == 16
    seen = []
    for g in net.generators:
        g.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        net(**slotted(rows()))
    assert len(seen) == 2 and all(torch.equal(p, torch.zeros_like(p)) for p in seen)


def test_calibrate_multi_tenant_and_shared_projections():
    base, b = backbone(), plain(rows())
    single = ik.apply_iapt(copy.deepcopy(base), num_tokens=L, bottleneck_size=R)
    single.calibrate(b["input_ids"], b["attention_mask"])
    mt = ik.apply_iapt(copy.deepcopy(base), num_tokens=L, bottleneck_size=R, num_tenants=3)
    mt.calibrate(b["input_ids"], b["attention_mask"])
    for gs, gm in zip(single.generators, mt.generators):
        assert gm.up.bias.shape == (3, base.config.hidden_size)
        assert all(torch.equal(gm.up.bias[t], gs.up.bias) for t in range(3))  # every tenant
    shared = ik.apply_iapt(copy.deepcopy(base), num_tokens=L, bottleneck_size=R, share_projections=True)
    shared.calibrate(b["input_ids"], b["attention_mask"])
    g0, g1 = shared.generators
    assert g0.up is g1.up
    means = torch.stack([g.up.bias for g in single.generators]).mean(0)
    assert torch.equal(g0.up.bias, means)  # the average of the layers' means, not the last layer's


def test_calibrate_leaves_out_sink_and_padding_whatever_the_side():
    """Left padding: each row's first attended token is the sink, not column 0."""
    base, rs = backbone(), rows(5)
    right = plain(rs)
    left = _pad([r[0] + r[3] for r in rs], [r[1] for r in rs], TASK.PAD, "left")
    nets = [ik.apply_iapt(copy.deepcopy(base), num_tokens=L, bottleneck_size=R) for _ in range(2)]
    nets[0].calibrate(right["input_ids"], right["attention_mask"])
    nets[1].calibrate(left["input_ids"], left["attention_mask"].bool())
    for a, b in zip(*(n.generators for n in nets)):
        assert rel_err(a.up.bias, b.up.bias) < 1e-5  # same tokens, same positions (position ids)


def test_calibrate_refuses_bad_batches():
    net = ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R)
    rs = rows()
    with_slots = ik.insert_prompt_slots(
        [r[0] for r in rs], [r[1] for r in rs], num_tokens=L, pad_token_id=TASK.PAD, response_prefix_ids=CUE
    )
    with pytest.raises(ValueError, match="without slots"):
        net.calibrate(with_slots["input_ids"], with_slots["attention_mask"])
    other = slotted(rs)  # slots hold SLOT, not the pad id: named by slot_token_id
    with pytest.raises(ValueError, match=f"id {TASK.SLOT}"):
        net.calibrate(other["input_ids"], other["attention_mask"], slot_token_id=TASK.SLOT)
    short = _pad([[1, 4, 6], [1, 4, 6, 7, 8, 9, 10, 11]], [[6, 2], [7, 2]], TASK.PAD, "right")
    with pytest.raises(ValueError, match="without slots"):  # padded but no mask: pads look like slots
        net.calibrate(short["input_ids"])
    b = plain(rs)
    with pytest.raises(TypeError, match="tensor"):
        net.calibrate(b)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        net.calibrate(b["input_ids"][0])
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        net.calibrate(b["input_ids"].float())
    with pytest.raises(ValueError, match="attention_mask"):
        net.calibrate(b["input_ids"], b["attention_mask"][:, 1:])
    with pytest.raises(ValueError, match="no token left"):
        net.calibrate(torch.tensor([[1], [1]]))
    assert net._uncalibrated  # nothing was set by a refused call
    mask = b["attention_mask"].bool()
    before = mask.clone()
    net.train()
    net.calibrate(b["input_ids"], mask)
    assert torch.equal(mask, before) and net.model.training  # the caller's mask and mode untouched


def _train_call(net):
    net.train()
    net(**slotted(rows())).loss.backward()


def test_uncalibrated_gated_adapter_warns_once(tmp_path):
    net = ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            net(**slotted(rows()))  # evaluation is not training
    with pytest.warns(UserWarning, match=r"calibrate\(") as record:
        _train_call(net)
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_call(net)  # once per model
        b = plain(rows())
        calibrated = ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R)
        calibrated.calibrate(b["input_ids"], b["attention_mask"])
        _train_call(calibrated)
        _train_call(ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, gate_init=None))
        ik.save_iapt(net, tmp_path / "a")
        _train_call(ik.load_iapt(backbone(), tmp_path / "a"))  # loaded: trained already
        fresh = ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R)
        fresh.load_state_dict(net.state_dict())  # a Trainer resuming a checkpoint
        _train_call(fresh)


# ---------------------------------------------------------------- config and adapter files
def test_config_gate_init():
    assert ik.IAPTConfig().gate_init == 0.0 and ik.IAPTConfig().bottleneck_size == 16
    assert ik.IAPTConfig(gate_init=1).gate_init == 1.0 and ik.IAPTConfig(gate_init=None).gate_init is None
    for bad in (float("nan"), float("inf"), "0", True):
        with pytest.raises(ValueError, match="gate_init"):
            ik.IAPTConfig(gate_init=bad)
    d = ik.IAPTConfig(gate_init=0.5).to_dict()
    assert d["gate_init"] == 0.5 and ik.IAPTConfig.from_dict(d) == ik.IAPTConfig(gate_init=0.5)
    old = {k: v for k, v in ik.IAPTConfig().to_dict().items() if k != "gate_init"}
    assert ik.IAPTConfig.from_dict(old).gate_init is None  # saved before the gate: ungated


def test_param_groups_put_the_gate_with_the_rest():
    net = ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, num_tenants=2)
    rest, up = net.param_groups(1e-3, 2.0)
    gates = {id(g.gate) for g in net.generators}
    assert len(gates) == 2 and gates <= {id(p) for p in rest["params"]}
    assert not gates & {id(p) for p in up["params"]}


def _legacy_adapter(tmp_path):
    """An adapter as saved before the gate existed: no ``gate_init`` key, no ``gate`` tensors."""
    old = randomised(ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, gate_init=None))
    ik.save_iapt(old, tmp_path / "old")
    file = tmp_path / "old" / "iapt_config.json"
    meta = json.loads(file.read_text())
    del meta["iapt_config"]["gate_init"]
    file.write_text(json.dumps(meta))
    return old


def test_adapter_saved_before_the_gate_loads_bit_for_bit(tmp_path):
    old = _legacy_adapter(tmp_path)
    b = slotted(rows())
    with torch.no_grad():
        want = old(**b).logits
        back = ik.load_iapt(backbone(), tmp_path / "old")
        assert back.iapt_config.gate_init is None and all(g.gate is None for g in back.generators)
        assert torch.equal(back(**b).logits, want)
        via = ik.IAPTModel.from_pretrained(backbone(), tmp_path / "old")
        assert torch.equal(via(**b).logits, want)
        # into a model built with today's default (gated): gate 1, the same bits
        gated = ik.load_iapt(ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R), tmp_path / "old")
        assert all(float(g.gate) == 1.0 for g in gated.generators)
        assert torch.equal(gated(**b).logits, want)
        # into a tenant slot of a gated multi-tenant model (another kernel: to rounding)
        mt = ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, num_tenants=3)
        ik.load_iapt(mt, tmp_path / "old", tenant=1)
        assert all(g.gate[1] == 1.0 and g.gate[0] == 0.0 for g in mt.generators)
        assert rel_err(mt(**b, tenant_ids=torch.tensor([1] * 6)).logits, want) < 1e-6


def test_gated_adapter_round_trips(tmp_path):
    net = randomised(ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R))
    b = slotted(rows())
    with torch.no_grad():
        want = net(**b).logits
    ik.save_iapt(net, tmp_path / "g")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "g" / "adapter_model.safetensors"))
    assert {"0.gate", "1.gate"} <= set(keys) and keys["0.gate"].shape == (1,)
    assert json.loads((tmp_path / "g" / "iapt_config.json").read_text())["iapt_config"]["gate_init"] == 0.0
    with torch.no_grad():
        back = ik.load_iapt(backbone(), tmp_path / "g")
        assert torch.equal(back(**b).logits, want)
    with pytest.raises(ValueError, match="gate"):
        ik.load_iapt(
            ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, gate_init=None), tmp_path / "g"
        )
    # one tenant of a gated multi-tenant adapter, saved alone and into a single-tenant model
    mt = randomised(ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, num_tenants=2), seed=4)
    with pytest.warns(UserWarning, match="calibrate"):  # a call with gradients: both tenants trained
        mt(**b, tenant_ids=torch.tensor([0, 1] * 3))
    ik.save_iapt(mt, tmp_path / "mt")
    ik.save_iapt(mt, tmp_path / "t1", tenant=1)
    with torch.no_grad():
        ref = mt(**b, tenant_ids=torch.tensor([1] * 6)).logits
        for single in (
            ik.load_iapt(backbone(), tmp_path / "t1"),
            ik.load_iapt(backbone(), tmp_path / "mt", tenant=1),
        ):
            assert float(single.generators[0].gate) == float(mt.generators[0].gate[1])
            assert rel_err(single(**b).logits, ref) < 1e-6


def test_every_tenant_applies_the_gate():
    """The torch.compile path (every tenant on the whole batch) gates as the grouped kernels do."""
    net = randomised(ik.apply_iapt(backbone(), num_tokens=L, bottleneck_size=R, num_tenants=3))
    gen = net.generators[0]
    h = torch.randn(4, 9, net.hidden_size)
    mask = torch.rand(4, 9) < 0.7
    mask[:, 0] = True
    ids = torch.tensor([2, -1, 0, 2])
    with torch.no_grad():
        assert rel_err(every_tenant(gen, h, mask, ids), gen(h, mask, ids)) < 1e-6
