"""Ahead-of-time compilation for sm_80 and sm_90 (docs/design.md section 6), on a representative sample of
configs: no spills, no float atomics, 128-bit global loads and stores where the layout allows.
The full sweep over every launch config is `python benchmarks/static_report.py --arch 80 90`."""

import json
import os
import subprocess
import sys

import pytest

# Slow tier: one ahead-of-time compile of the sample for two architectures, about 45 s on 2 cores.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "static_report.py"),
            "--arch",
            "80",
            "90",
            "--scope",
            "sample",
            "--json",
            str(out),
            "--no-progress",
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=1200,
    )
    return json.loads(out.read_text())


def test_record_schema(records):
    assert records
    for r in records:
        assert set(r) == {
            "kernel",
            "config",
            "arch",
            "registers",
            "spill_bytes",
            "shared_bytes",
            "instructions",
            "num_warps",
            "num_stages",
            "h_stage_bytes",
            "ctas_per_sm",
            "bytes_in_flight_per_sm",
        }
        assert r["arch"] in (80, 90)
        assert all(
            isinstance(r[k], int)
            for k in (
                "registers",
                "spill_bytes",
                "shared_bytes",
                "num_warps",
                "num_stages",
                "h_stage_bytes",
                "ctas_per_sm",
            )
        )
        assert r["ctas_per_sm"] >= 1, r
        assert r["bytes_in_flight_per_sm"] == r["ctas_per_sm"] * r["h_stage_bytes"] * r["num_stages"]
        assert {"LDG.E.128", "STG.E.128", "LDGSTS", "UTMALDG", "HMMA", "HGMMA", "RED", "ATOM"} <= set(
            r["instructions"]
        )
    assert {r["arch"] for r in records} == {80, 90}
    kernels = {r["kernel"] for r in records}
    assert any("rational" in k for k in kernels) and any("attention_pool" in k for k in kernels)


def test_no_spills_and_no_float_atomics(records):
    for r in records:
        assert r["spill_bytes"] == 0, r
        assert r["registers"] <= 255, r
        if "bwd" in r["kernel"]:
            assert r["instructions"]["RED"] == 0 and r["instructions"]["ATOM"] == 0, r


def test_rational_forward_uses_128_bit_loads_and_stores(records):
    fwd = [r for r in records if r["kernel"] == "_rational_fwd_kernel"]
    assert {r["config"]["dtype"] for r in fwd} == {"fp32", "bf16"}
    for r in fwd:
        assert r["instructions"]["LDG.E.128"] > 0 and r["instructions"]["STG.E.128"] > 0, r


def test_attention_pool_streams_hidden_states_pipelined(records):
    """The kernels that stream H load it asynchronously (cp.async or TMA), at least 32 KiB in flight
    per SM on sm_90 at L <= 4 (issue 11), with no atomics of any kind."""
    streaming = [r for r in records if "attention_pool" in r["kernel"] and r["h_stage_bytes"]]
    assert {r["config"]["dtype"] for r in streaming} == {"fp32", "bf16"}
    for r in records:
        if "attention_pool" in r["kernel"]:
            assert r["instructions"]["RED"] == 0 and r["instructions"]["ATOM"] == 0, r
    for r in streaming:
        assert r["instructions"]["LDGSTS"] + r["instructions"]["UTMALDG"] > 0, r
        if r["arch"] == 90 and r["config"]["L_PAD"] == 16:
            assert r["bytes_in_flight_per_sm"] >= 32 * 1024, r


def test_multi_tenant_products_use_tensor_cores(records):
    # bf16 in the sample: every segmented product (not the colsum-only sums) runs on HMMA/HGMMA.
    products = [
        r
        for r in records
        if r["kernel"] in ("_multi_tenant_generator_matmul_kernel", "_multi_tenant_generator_wgrad_kernel")
        and r["config"]["call"] not in ("gwdp", "coef")
    ]
    assert products
    for r in products:
        assert r["instructions"]["HMMA"] + r["instructions"]["HGMMA"] > 0, r
        assert r["instructions"]["RED"] == 0 and r["instructions"]["ATOM"] == 0, r
