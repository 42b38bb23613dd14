"""IAPT on vLLM, offline (LLM.generate and the engine's step loop), against IAPTModel.generate.

Greedy fp32 on CPU: each request's tokens equal the Hugging Face reference token for token, in a
batch mixing three tenants and requests without an adapter, instructions of different lengths,
requests that join while others decode and finish at different steps, and under preemption."""

import pytest
import torch

from iapt_kernels.integrations.vllm import IAPTPrompts, engine_args, iapt_stats

from .conftest import ENGINE, FAMILIES, INSTR, NAMES, NEW, PREFIX, TENANTS, L, reference


def _name(t):
    return None if t < 0 else NAMES[t]


def _requests(instr, tenants, max_tokens):
    from vllm import SamplingParams

    P = IAPTPrompts(L, slot_token_id=0, response_prefix_ids=PREFIX)
    return [
        P.request(i, _name(t), SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
        for i, t, m in zip(instr, tenants, max_tokens)
    ]


def _engine(family_dirs, fam, multi=False, **kw):
    from vllm import LLM

    model, singles, mt, _ = family_dirs[fam]
    adapters = {n: [mt, t] for t, n in enumerate(NAMES)} if multi else singles
    args = engine_args(model, adapters, slot_token_id=0, response_prefix_ids=PREFIX, skip_tokenizer_init=True)
    return LLM(**{**args, **ENGINE, **kw})


def _stop(llm):
    """Stop the engine's processes now (the garbage collector may be late)."""
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, family_dirs):
    fam = request.param
    # Qwen2 serves the tenants of one multi-tenant adapter; the others three single-tenant ones.
    llm = _engine(family_dirs, fam, multi=(fam == "qwen2"))
    yield fam, llm
    _stop(llm)


def test_mixed_batch_equals_hf(served, family_dirs):
    fam, llm = served
    w = family_dirs[fam][3]
    ref = reference(w, INSTR, TENANTS)
    reqs = _requests(INSTR, TENANTS, [NEW] * len(INSTR))
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == ref
    # The prompts matter: each tenant request differs from the bare backbone on its instruction.
    bare = reference(w, INSTR, [-1] * len(INSTR))
    for i, t in enumerate(TENANTS):
        if t >= 0:
            assert got[i] != bare[i], f"request {i} (tenant {t}) equals the bare backbone's output"


def test_frontend_builds_the_layout(served, family_dirs):
    """A tenant request sent as its bare instruction (or instruction + response prefix) gets its slots
    from the frontend: the same tokens as the prompt IAPTPrompts builds."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    fam, llm = served
    ref = reference(family_dirs[fam][3], INSTR, TENANTS)
    prompts, params = [], []
    for k, (i, t) in enumerate(zip(INSTR, TENANTS)):
        if t < 0:
            continue
        ids = i if k % 2 else i + PREFIX
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        params.append(
            SamplingParams(
                max_tokens=NEW, temperature=0.0, ignore_eos=True, extra_args={"iapt_tenant": NAMES[t]}
            )
        )
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [r for r, t in zip(ref, TENANTS) if t >= 0]
    assert [len(o.prompt_token_ids) for o in outs] == [
        len(i) + L + len(PREFIX) for i, t in zip(INSTR, TENANTS) if t >= 0
    ]


def test_staggered_arrivals_and_finishes(served, family_dirs):
    """Requests join while others decode and finish at different steps; decode steps run no generator."""
    fam, llm = served
    w = family_dirs[fam][3]
    ref = reference(w, INSTR, TENANTS)
    lengths = [NEW, 3, NEW, 7, 5, NEW]
    reqs = _requests(INSTR, TENANTS, lengths)
    engine = llm.llm_engine
    before = llm.apply_model(iapt_stats)[0]
    got = {}
    waves = [[0, 1, 2], [3], [4, 5]]  # request indices joining at steps 0, 2 and 5
    joins = {0: waves[0], 2: waves[1], 5: waves[2]}  # (steps of this loop: others decode meanwhile)
    step = 0
    while step < 100:
        for i in joins.get(step, []):
            engine.add_request(str(i), reqs[i][0], reqs[i][1])
        for out in engine.step():
            if out.finished:
                got[int(out.request_id)] = list(out.outputs[0].token_ids)
        step += 1
        if len(got) == len(reqs) and step > max(joins):
            break
    assert sorted(got) == list(range(len(reqs)))
    for i in range(len(reqs)):
        assert got[i] == ref[i][: lengths[i]], f"request {i} (tenant {TENANTS[i]})"
    after = llm.apply_model(iapt_stats)[0]
    # The engine core schedules on its own clock, so a wave may split across steps: at most one
    # generator step per tenant request, each running every layer's generator once, and none on the
    # steps that only decode (there are at least max(lengths) - 1 of those).
    steps = after["steps"] - before["steps"]
    gen_steps = after["generator_steps"] - before["generator_steps"]
    n_tenant = sum(t >= 0 for t in TENANTS)
    assert after["prefill_rows"] - before["prefill_rows"] == n_tenant
    assert 1 <= gen_steps <= n_tenant
    assert after["generator_calls"] - before["generator_calls"] == gen_steps * after["num_layers"]
    assert steps - gen_steps >= max(lengths) - 1


def test_unknown_tenant_refused_alone(served):
    from vllm import SamplingParams

    fam, llm = served
    P = IAPTPrompts(L, slot_token_id=0, response_prefix_ids=PREFIX)
    prompt, params = P.request(INSTR[0], "nobody", SamplingParams(max_tokens=2))
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="nobody"):
        llm.generate([prompt], [params], use_tqdm=False)
    # The engine keeps serving.
    reqs = _requests(INSTR[:2], TENANTS[:2], [2, 2])
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 2 for o in outs)


def test_preemption_recomputes_prompts(family_dirs):
    """A KV cache too small for the batch forces the scheduler to preempt and recompute requests;
    their outputs still equal the reference (the recomputed prefill runs the generators again)."""
    fam = "llama"
    w = family_dirs[fam][3]
    instr = [list(range(3 + i, 3 + i + 10 + 3 * i)) for i in range(6)]
    tenants = [0, 1, 2, -1, 0, 1]
    new = 120
    ref = reference(w, instr, tenants, new=new)
    # 1 KB of KV per token (2 layers, 1 KV head of 64, k and v, fp32): 3 blocks of 128 tokens hold
    # fewer than the six requests' ~150 tokens each.
    llm = _engine(
        family_dirs,
        fam,
        kv_cache_memory_bytes=3 * 128 * 1024,
        max_model_len=256,
        max_num_seqs=6,
        disable_log_stats=False,
    )
    try:
        reqs = _requests(instr, tenants, [new] * 6)
        outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        assert preempted > 0, "the KV cache held every request: no preemption was exercised"
        assert got == ref
    finally:
        _stop(llm)


@pytest.mark.parametrize(
    "arg, value",
    [("enforce_eager", False), ("enable_chunked_prefill", True), ("enable_prefix_caching", True)],
)
def test_unsafe_engine_arguments_refused(family_dirs, arg, value):
    """Each engine feature that could make IAPT silently wrong is refused before the engine starts,
    with the argument named."""
    with pytest.raises(Exception, match=arg):
        _engine(family_dirs, "llama", **{arg: value})


def test_adapter_for_another_model_refused(family_dirs, tmp_path):
    """The adapters' recorded base model is checked as load_iapt checks it."""
    import iapt_kernels as ik

    from .conftest import tiny_backbone

    other = tiny_backbone("llama")
    other.config.num_hidden_layers = 3
    w = ik.apply_iapt(type(other)(other.config), ik.IAPTConfig(num_tokens=L, bottleneck_size=16))
    ik.save_iapt(w, tmp_path / "three_layers")
    model = family_dirs["llama"][0]
    from vllm import LLM

    with pytest.raises(Exception, match="num_layers=3"):
        LLM(**{**engine_args(model, {"x": tmp_path / "three_layers"}, skip_tokenizer_init=True), **ENGINE})
    qwen = family_dirs["qwen2"][1]["a"]
    with pytest.raises(Exception, match="qwen2"):
        LLM(**{**engine_args(model, {"x": qwen}, skip_tokenizer_init=True), **ENGINE})


def test_stats_reject_plain_models():
    with pytest.raises(TypeError):
        iapt_stats(torch.nn.Linear(2, 2))
