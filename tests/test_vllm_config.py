"""The vLLM plugin's pure-Python parts (no vLLM needed): the version gate, the prompt layout the
frontend builds, tenant parsing, the adapter checks and the engine-argument refusals."""

import types
import warnings

import pytest
import torch
from helpers import rel_err

import iapt_kernels as ik
from iapt_kernels.integrations.vllm import IAPTPrompts, engine_args
from iapt_kernels.integrations.vllm import _config as C
from iapt_kernels.integrations.vllm._register import _check_version


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.32"])
def test_supported_versions_pass(version):
    _check_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "0.320.0", "1.0.0"])
def test_other_versions_refused_naming_them(version):
    with pytest.raises(RuntimeError, match=f"vLLM {version}"):
        _check_version(version)


LAYOUT = C.Layout(num_tokens=3, slot_token_id=0, response_prefix_ids=(40, 41))


@pytest.mark.parametrize(
    "ids, expect",
    [
        ([5, 6], [5, 6, 0, 0, 0, 40, 41]),  # bare instruction: slots and prefix appended
        ([5, 6, 40, 41], [5, 6, 0, 0, 0, 40, 41]),  # trailing prefix (assistant header): slots before it
        ([5, 6, 0, 0, 0, 40, 41], [5, 6, 0, 0, 0, 40, 41]),  # already laid out: kept
    ],
)
def test_layout_build(ids, expect):
    out = LAYOUT.build(ids)
    assert out == expect
    assert LAYOUT.instruction_length(out) == 2


def test_layout_refuses_empty_instruction_and_missing_slots():
    with pytest.raises(ValueError, match="empty"):
        LAYOUT.build([40, 41])
    with pytest.raises(RuntimeError, match="slot tokens"):
        LAYOUT.instruction_length([5, 6, 7, 8, 9, 40, 41])


def test_parse_tenant():
    names = ("a", "b")
    assert C.parse_tenant(None, names) is None
    assert C.parse_tenant({"other": 1}, names) is None
    assert C.parse_tenant({C.TENANT_KEY: "b"}, names) == 1
    with pytest.raises(ValueError, match="'zed'"):
        C.parse_tenant({C.TENANT_KEY: "zed"}, names)
    with pytest.raises(ValueError, match="serves no IAPT"):
        C.parse_tenant({C.TENANT_KEY: "a"}, None)


def test_prompts_helper():
    P = IAPTPrompts(2, slot_token_id=9, response_prefix_ids=[7])
    assert P.token_ids([1, 2, 3], "a") == ([1, 2, 3, 9, 9, 7], 3)
    assert P.token_ids([1, 2, 3], None) == ([1, 2, 3, 7], 3)  # no tenant: the bare instruction
    with pytest.raises(TypeError, match="tokenizer"):
        P.token_ids("text", "a")
    with pytest.raises(ValueError, match="empty"):
        P.token_ids([], "a")


def _engine_config(**over):
    cfg = dict(enforce_eager=True, enable_chunked_prefill=False, enable_prefix_caching=False)
    cfg.update(over)
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(enforce_eager=cfg["enforce_eager"]),
        scheduler_config=types.SimpleNamespace(enable_chunked_prefill=cfg["enable_chunked_prefill"]),
        cache_config=types.SimpleNamespace(enable_prefix_caching=cfg["enable_prefix_caching"]),
        parallel_config=types.SimpleNamespace(pipeline_parallel_size=1),
        speculative_config=None,
        use_v2_model_runner=cfg.get("v2", False),
    )


@pytest.mark.parametrize(
    "over, named",
    [
        ({"enforce_eager": False}, "enforce_eager=True"),
        ({"enable_chunked_prefill": True}, "enable_chunked_prefill=False"),
        ({"enable_prefix_caching": True}, "enable_prefix_caching=False"),
        ({"v2": True}, "VLLM_USE_V2_MODEL_RUNNER=0"),
    ],
)
def test_engine_arguments_refused(over, named):
    C.check_engine(_engine_config())  # the safe settings pass
    with pytest.raises(ValueError, match=named):
        C.check_engine(_engine_config(**over))


def _tiny(tmp_path, layers=2, model_type="llama"):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(cfg)
    w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=2, bottleneck_size=8, num_tenants=2))
    ik.save_iapt(w, tmp_path / "mt")
    ik.save_iapt(w, tmp_path / "t1", tenant=1)
    hf = types.SimpleNamespace(model_type=model_type, hidden_size=32, num_hidden_layers=layers)
    return w, hf


def test_adapters_stack_exactly(tmp_path):
    """Single-tenant adapters and tenants of a multi-tenant one stack into the tenant order given."""
    w, hf = _tiny(tmp_path)
    section = {
        "adapters": {
            "x": str(tmp_path / "t1"),
            "y": [str(tmp_path / "mt"), 0],
            "z": [str(tmp_path / "mt"), 1],
        }
    }
    tenants, cfg, _ = C.read_adapters(section, hf)
    assert [(a.name, a.tenant) for a in tenants] == [("x", 0), ("y", 0), ("z", 1)]
    gens = C.stacked_generators(tenants, cfg, 32, 2, "reference")
    for l, g in enumerate(gens):
        src = w.generators[l]
        for name, p in g.named_parameters():
            ref = src.get_parameter(name)
            assert torch.equal(p[0], ref[1]) and torch.equal(p[1], ref[0]) and torch.equal(p[2], ref[1])


def test_gated_and_legacy_adapters_stack_exactly(tmp_path):
    """A gated adapter beside one saved before the gate (no gate_init key, no gate tensors): the stack
    is gated, the legacy tenant gets gate 1, and each row is its adapter's generator."""
    import json

    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(cfg)
    hf = types.SimpleNamespace(model_type="llama", hidden_size=32, num_hidden_layers=2)
    nets = {}
    for name, gate in (("old", None), ("new", 0.0)):
        w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=2, bottleneck_size=8, gate_init=gate))
        with torch.no_grad():
            for g in w.generators:
                g.up.weight.normal_()
                if g.gate is not None:
                    g.gate.fill_(0.75)
        ik.save_iapt(w, tmp_path / name)
        nets[name] = w
        model = w.remove_hooks()
    meta_file = tmp_path / "old" / "iapt_config.json"
    meta = json.loads(meta_file.read_text())
    del meta["iapt_config"]["gate_init"]
    meta_file.write_text(json.dumps(meta))
    tenants, cfg, _ = C.read_adapters(
        {"adapters": {"a": str(tmp_path / "old"), "b": str(tmp_path / "new")}}, hf
    )
    gens = C.stacked_generators(tenants, cfg, 32, 2, "reference")
    h = torch.randn(3, 5, 32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    for l, g in enumerate(gens):
        assert g.gate.tolist() == [1.0, 0.75]
        out = g(h, mask, torch.tensor([0, 1, -1]))
        with torch.no_grad():
            assert rel_err(out[0], nets["old"].generators[l](h[:1], mask[:1])[0]) < 1e-6
            assert rel_err(out[1], nets["new"].generators[l](h[1:2], mask[1:2])[0]) < 1e-6
        assert torch.equal(out[2], torch.zeros_like(out[2]))
    only_old = C.stacked_generators(tenants[:1], cfg, 32, 2, "reference")
    assert all(g.gate is None for g in only_old)  # no gated tenant: the stack stays ungated


def test_adapter_checks(tmp_path):
    _, hf = _tiny(tmp_path)
    with pytest.raises(ValueError, match="multi-tenant adapter"):
        C.read_adapters({"adapters": {"x": str(tmp_path / "mt")}}, hf)
    with pytest.raises(ValueError, match="out of range"):
        C.read_adapters({"adapters": {"x": [str(tmp_path / "mt"), 2]}}, hf)
    with pytest.raises(ValueError, match="num_layers=2, the served model 3"):
        C.read_adapters(
            {"adapters": {"x": str(tmp_path / "t1")}},
            types.SimpleNamespace(**{**vars(hf), "num_hidden_layers": 3}),
        )
    with pytest.raises(ValueError, match="trained on a llama model"):
        C.read_adapters(
            {"adapters": {"x": str(tmp_path / "t1")}},
            types.SimpleNamespace(**{**vars(hf), "model_type": "qwen2"}),
        )
    with pytest.raises(ValueError, match="names no adapters"):
        C.deployment(types.SimpleNamespace(iapt={"adapters": {}}))


def test_engine_args(tmp_path):
    w, _ = _tiny(tmp_path)
    w.model.save_pretrained(tmp_path / "model")
    args = engine_args(
        tmp_path / "model", {"x": tmp_path / "t1"}, response_prefix_ids=[3], enforce_eager=True
    )
    assert args["hf_overrides"]["architectures"] == ["IAPTLlamaForCausalLM"]
    assert args["hf_overrides"]["iapt"]["adapters"] == {"x": str((tmp_path / "t1").resolve())}
    assert (args["enforce_eager"], args["enable_chunked_prefill"], args["enable_prefix_caching"]) == (
        True,
        False,
        False,
    )


def test_launcher_flags(tmp_path):
    from iapt_kernels.integrations.vllm.__main__ import server_argv

    args = engine_args(tmp_path, {"x": tmp_path}, architecture="IAPTLlamaForCausalLM")
    argv = server_argv(args)
    assert (
        "--enforce-eager" in argv
        and "--no-enable-chunked-prefill" in argv
        and "--no-enable-prefix-caching" in argv
    )
    import json

    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == args["hf_overrides"]


def test_untrained_tenant_is_named(tmp_path):
    """A slot that save_iapt recorded as untrained is served with a warning naming it (issue 24's
    record reaches the engine); a trained one loads silently."""
    w, hf = _tiny(tmp_path)
    with pytest.warns(UserWarning, match=r"tenant 'x'.*initial random weights"):
        C.read_adapters({"adapters": {"x": [str(tmp_path / "mt"), 1]}}, hf)
    b = ik.insert_prompt_slots([[3, 4, 5], [6, 7]], num_tokens=2, pad_token_id=0, padding_side="left")
    w(**b, tenant_ids=torch.tensor([0, 1])).logits.sum().backward()  # a call with gradients: trained
    ik.save_iapt(w, tmp_path / "trained")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.read_adapters({"adapters": {"x": [str(tmp_path / "trained"), 1]}}, hf)
