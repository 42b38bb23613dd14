"""The two test tiers (tests/conftest.py, point 6): plain `pytest` leaves out marker `slow`, `--all` runs
both tiers, `-m` selects by itself and a node id runs whatever its tier. Collection only, in a
subprocess, on a file that holds both tiers (test_fits.py)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = "tests/test_fits.py"
SLOW = FILE + "::test_stored_errors_hold"
FAST = FILE + "::test_every_fit_is_stored"

# Slow tier: each case starts pytest, which imports torch and the package (several seconds).
pytestmark = pytest.mark.slow


def _collected(*args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


@pytest.mark.parametrize(
    "args, fast, slow",
    [
        pytest.param((FILE,), True, False, id="default-is-the-fast-tier"),
        pytest.param((FILE, "--all"), True, True, id="all-runs-both"),
        pytest.param((FILE, "-m", "slow"), False, True, id="m-slow-alone"),
        pytest.param((SLOW,), False, True, id="node-id-runs-whatever-its-tier"),
    ],
)
def test_tier_selection(args, fast, slow):
    got = _collected(*args)
    assert (FAST in got) == fast and (SLOW in got) == slow, sorted(got)
