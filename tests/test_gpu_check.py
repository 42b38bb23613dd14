"""scripts/gpu_check.sh: the whole script in its CPU smoke mode (so it cannot rot), and its verdict
logic: any failed check makes the run fail and is named in the log and the report."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"install", "tests", "timing", "train-fp32", "train-bf16", "generate"}

pytest.importorskip("transformers")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_smoke_run_passes_every_step_and_writes_at_most_eight_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets its own
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == {"log.txt", "pytest.txt", "report.md", "results.json"} and len(files) <= 8
    results = json.loads((out / "results.json").read_text())
    assert set(results["checks"]) == CHECKS
    assert all(c["ok"] for c in results["checks"].values()), results["checks"]
    timing = results["checks"]["timing"]["rows"]
    assert {r["case"].split("[")[0] for r in timing} == {
        "rational",
        "attention_pool",
        "generator",
        "multi_tenant_generator",
    }
    assert all(r["fused"] == "triton" and r["fraction_of_copy_bandwidth"] > 0 for r in timing)
    # Every figure that stands for a GPU figure came from the Triton kernels (here the interpreter).
    assert all(set(r["backends"]["triton"]) == {"triton"} for r in timing)
    checks = results["checks"]
    for name in ("train-fp32", "train-bf16", "generate"):
        assert set(checks[name]["backends"]) == {"triton"} and checks[name]["backends"]["triton"] > 0, name
    for name in ("train-fp32", "train-bf16"):
        assert set(checks[name]["reference_backends"]) == {"reference"}, name
    assert all(isinstance(c["seconds"], (int, float)) for c in checks.values())
    env = results["environment"]
    assert {"python", "torch", "triton", "transformers", "numpy", "device"} <= set(env)
    assert any("compiled" in r["ms"] for r in timing)  # the torch.compile baseline is exercised too
    assert len(results["checks"]["train-fp32"]["losses_fused"]) == 3
    report = (out / "report.md").read_text()
    assert "smoke" in report and re.search(r"\| generate \| pass \| [0-9.]+ \| triton x[0-9]+ \|", report)
    assert f"numpy {env['numpy']}" in report and f"triton {env['triton']}" in report
    assert "skipped" in (out / "pytest.txt").read_text()  # the CUDA cases: collected, skipped here


def test_a_failed_check_fails_the_run_and_is_named(tmp_path, monkeypatch, capsys):
    mod = _module()
    monkeypatch.setattr(mod, "run_timing", lambda *a: {"ok": True, "detail": "stub", "rows": []})
    monkeypatch.setattr(mod, "run_train", lambda *a: {"ok": True, "detail": "stub"})

    def broken(*a):
        raise RuntimeError("generate exploded")

    monkeypatch.setattr(mod, "run_generate", broken)
    rc = mod.main(["--out", str(tmp_path), "--smoke", "--tests-rc", "1", "--install-rc", "0"])
    assert rc == 1
    log = capsys.readouterr().out
    assert "FAILED: tests, generate" in log
    report = (tmp_path / "report.md").read_text()
    assert "| tests | **FAIL** |" in report and "generate exploded" in report
    assert "| install | pass |" in report


def test_floor_bytes_follow_the_ops_minimum_traffic():
    mod = _module()
    torch = pytest.importorskip("torch")

    class Case:
        dtype = torch.bfloat16

    c = Case()
    c.op, c.mode, c.params = "rational", "fwd", {"numel": 1000}
    assert mod.floor_bytes(c) == 2 * 1000 * 2
    c.mode = "fwd+bwd"
    assert mod.floor_bytes(c) == 5 * 1000 * 2
    c.op, c.mode, c.params = "attention_pool", "fwd", {"B": 2, "S": 10, "d": 8, "mask_fraction": 0.5}
    h = 2 * 10 * 8 * 2
    assert mod.floor_bytes(c) == 0.5 * h
    c.mode = "fwd+bwd"
    assert mod.floor_bytes(c) == 2 * 0.5 * h + h  # H's instruction rows once per direction, gH written


def test_gpu_check_refuses_to_run_without_cuda_unless_smoke(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA is present")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--smoke" in proc.stderr


def _fake_tools(tmp_path, setuptools_version=None):
    """A PATH whose `pip` only records that it ran and fails as a broken build does, and (with
    `setuptools_version`) a PYTHONPATH whose setuptools is that version and whose `wheel` is missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip = bin_dir / "pip"
    pip.write_text(
        f"#!/bin/sh\ntouch {tmp_path}/pip-ran\necho \"error: invalid command 'bdist_wheel'\"\nexit 1\n"
    )
    pip.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    if setuptools_version:
        fake = tmp_path / "site"
        (fake / "setuptools").mkdir(parents=True)
        (fake / "setuptools" / "__init__.py").write_text(f"__version__ = {setuptools_version!r}\n")
        (fake / "wheel").mkdir()
        (fake / "wheel" / "__init__.py").write_text("raise ImportError('no wheel')\n")
        env["PYTHONPATH"] = str(fake)
    return env


@pytest.mark.parametrize("case", ["pip_fails", "old_setuptools_without_wheel"])
def test_a_failed_install_stops_the_check_with_its_reason(tmp_path, case):
    out = tmp_path / "out"
    env = _fake_tools(tmp_path, "69.5.1" if case == "old_setuptools_without_wheel" else None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    if case == "pip_fails":
        assert (tmp_path / "pip-ran").exists()
        assert "FAILED: install: pip exit status 1" in proc.stdout and "bdist_wheel" in proc.stdout
    else:  # named before pip runs
        assert not (tmp_path / "pip-ran").exists()
        assert "setuptools 69.5.1 without the wheel package" in proc.stdout
        assert "FAILED: install: the build tools are missing" in proc.stdout
    # It stopped there: no tests, no timing, and the report says where.
    assert not (out / "pytest.txt").exists() and not (out / "results.json").exists()
    assert "FAILED at install" in (out / "report.md").read_text()
