"""The worker's step plan without an engine: which requests get prompts in a step, and the second line
of defence behind the engine-argument refusals (a request whose step starts inside its instruction or
slots, as chunked prefill or a prefix-cache hit would make it, is an error, never silently wrong)."""

import types

import pytest
import torch

from iapt_kernels.integrations.vllm import _runtime

L = 4


@pytest.fixture
def runtime(monkeypatch):
    rt = _runtime.IAPTRuntime.__new__(_runtime.IAPTRuntime)
    rt.num_tokens, rt.tenants, rt.plan = L, ["a", "b"], None
    rt.stats = {"steps": 0, "generator_steps": 0, "prefill_rows": 0, "generator_calls": 0, "num_layers": 1}
    tracker = types.SimpleNamespace(rows={})
    monkeypatch.setattr(_runtime, "_TRACKER", tracker)

    def step(qsl, positions, max_query_len):
        meta = types.SimpleNamespace(query_start_loc=torch.tensor(qsl), max_query_len=max_query_len)
        monkeypatch.setattr(
            _runtime, "get_forward_context", lambda: types.SimpleNamespace(attn_metadata={"layer": meta})
        )
        rt._prepare(torch.tensor(positions))
        return rt.plan

    return rt, tracker, step


def test_plan_selects_rows_that_start_their_prompt(runtime):
    rt, tracker, step = runtime
    # row 0: tenant 1, 3-token instruction, prefill of 3 + 4 slots + 1 prefix token; row 1: no tenant,
    # prefill of 2; row 2: tenant 0 decoding at position 20.
    tracker.rows = {0: (1, 3), 2: (0, 5)}
    plan = step([0, 8, 10, 11], list(range(8)) + [0, 1] + [20], max_query_len=8)
    assert plan.instr.tolist() == [0, 1, 2]
    assert plan.slots.tolist() == [3, 4, 5, 6]
    assert plan.tenant_ids.tolist() == [1] and plan.cu.tolist() == [0, 3]


def test_decode_only_step_plans_nothing(runtime):
    rt, tracker, step = runtime
    tracker.rows = {0: (0, 3), 1: (1, 2)}
    assert step([0, 1, 2], [12, 9], max_query_len=1) is None
    assert rt.stats["generator_steps"] == 0


@pytest.mark.parametrize(
    "qsl, positions",
    [
        # a chunk holding the instruction but not all the slots (chunked prefill)
        pytest.param([0, 4], [0, 1, 2, 3], id="chunk-without-all-slots"),
        # a step starting inside the instruction (a prefix-cache hit)
        pytest.param([0, 5], [2, 3, 4, 5, 6], id="starts-inside-instruction"),
    ],
)
def test_prefill_not_from_position_zero_is_an_error(runtime, qsl, positions):
    _, tracker, step = runtime
    tracker.rows = {0: (0, 3)}
    with pytest.raises(RuntimeError, match="enable_chunked_prefill=False and enable_prefix_caching=False"):
        step(qsl, positions, max_query_len=len(positions))
