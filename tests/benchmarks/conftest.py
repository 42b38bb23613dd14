"""tests/benchmarks/: the tests of the top-level benchmarks/ (README, "Benchmarks"). They need the
`bench` extra (plots, PEFT, progress bars), which the test command installs; where it is missing each
test is skipped with the reason and the install command, rather than failing deep inside a plot."""

import importlib.util

import pytest

MISSING = [m for m in ("matplotlib", "peft", "tqdm") if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def _needs_the_bench_extra():
    if MISSING:
        pytest.skip(
            f"needs the bench extra ({', '.join(MISSING)} missing): "
            "pip install --no-build-isolation -e '.[test,bench]'"
        )
