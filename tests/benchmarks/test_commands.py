"""The README's benchmark commands resolve from the repository root: `python -m benchmarks` (the
report), `python -m benchmarks.real_task`, `python -m benchmarks.real_task_study` and `python -m benchmarks.multi_tenant_cpu` start and name
themselves as they are run (`--help`: nothing is timed or trained here; test_bench_model.py and
test_real_task.py run the first two)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "module",
    ["benchmarks", "benchmarks.real_task", "benchmarks.real_task_study", "benchmarks.multi_tenant_cpu"],
)
def test_command_starts_from_the_repository_root(module):
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith(f"usage: python -m {module} "), r.stdout[:500]
