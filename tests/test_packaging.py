"""Install and bench behaviour a new user meets first (issue 15, item 10): setup.py fails loudly when
the extension cannot be built, compiles without debug info in parallel; `iapt-bench --quick` says in
words that it is a smoke test and labels its plots from the run."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_setup(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_setup_without_torch_fails_loudly():
    hide_torch = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    r = _run_setup(hide_torch, IAPT_NO_EXTENSION="0")
    assert r.returncode != 0
    assert "cannot import torch" in r.stderr and "--no-build-isolation" in r.stderr
    assert "IAPT_NO_EXTENSION=1" in r.stderr
    ok = _run_setup(hide_torch, IAPT_NO_EXTENSION="1")  # opting out on purpose installs
    assert ok.returncode == 0, ok.stderr
    assert "skipping the C++ extension" in ok.stderr


def test_setup_compiles_with_ninja_without_debug_info():
    pytest.importorskip("torch.utils.cpp_extension")
    pytest.importorskip("ninja", reason="the test command installs ninja; without it the build is serial")
    code = (
        "import setuptools, runpy; from setuptools.dist import Distribution; seen = {}; "
        "setuptools.setup = lambda **kw: seen.update(kw); "
        "runpy.run_path('setup.py', run_name='__main__'); ext = seen['ext_modules'][0]; "
        "cls = seen['cmdclass']['build_ext']; "
        "print(ext.extra_compile_args, cls.__mro__[1].__name__, cls(Distribution()).use_ninja)"
    )
    r = _run_setup(code, IAPT_NO_EXTENSION="0")
    assert r.returncode == 0, r.stderr
    assert "'-g0'" in r.stdout and "'-O3'" in r.stdout
    assert r.stdout.split()[-2:] == ["BuildExtension", "True"], r.stdout


def _e2e(requests: int) -> dict:
    rec = {"prompt_tokens": 20, "trainable_params_per_tenant": 100, "generate_ms": 3.0, "config": "c"}
    records = [
        {**rec, "method": m, "tenants": t, "tokens_per_s": v, "prefill_ms": 1.0 / v}
        for m, v in (("iapt", 10.0), ("lora", 5.0))
        for t in (1, 2)
    ]
    setup = {
        "model": "tiny",
        "requests": requests,
        "prompt_len": 16,
        "new_tokens": 4,
        "iapt": "L=4",
        "lora_rank": 8,
        "lora_targets": ["q_proj"],
        "iapt_params_per_tenant": 100,
        "lora_params_per_tenant": 100,
        "repeats": 1,
        "threads": 1,
    }
    return {"records": records, "base": None, "setup": setup, "errors": []}


@pytest.mark.parametrize("quick", [True, False])
def test_quick_report_is_a_smoke_test_and_plots_name_the_run(tmp_path, monkeypatch, quick):
    pytest.importorskip("matplotlib")
    from iapt_kernels.bench import report

    labels = []
    monkeypatch.setattr(
        report, "plot_e2e", lambda e2e, key, ylabel, title, path: labels.append((ylabel, title))
    )
    result = {
        "command": "iapt-bench",
        "machine": "m",
        "date": "d",
        "wall_s": 1.0,
        "quick": quick,
        "notes": [],
        "ops": [],
        "model": [],
        "e2e_run": _e2e(requests=4),
    }
    report.write_outputs(str(tmp_path), result)
    text = (tmp_path / "report.md").read_text()
    assert ("smoke test, not a measurement" in text) == quick
    assert ("faster" in text) == (not quick)  # a quick run draws no conclusion
    assert len(labels) == 2 and all("4" in y and "16" not in y for y, _ in labels)
    assert all(("smoke test" in t) == quick for _, t in labels)
