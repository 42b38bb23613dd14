"""pytest-benchmark suite: the same cases as the report, `python -m benchmarks` (`cases.default_cases`).

    python -m pytest benchmarks --benchmark-only

Each case is timed for the copy baseline and every implementation: the eager reference,
`torch.compile(reference)` and the fused backend of this device (C++ on CPU, Triton on CUDA). The ops:
rational, attention_pool, generator and multi_tenant_generator; the end-to-end serving comparison and the GPU
cost model are the report's only.
"""

import pytest
import torch

from benchmarks.cases import configure_compile, default_cases
from benchmarks.cli import configure_malloc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
configure_compile()
if DEVICE == "cpu":
    configure_malloc("reuse")  # as `python -m benchmarks` does by default
CASES = default_cases(DEVICE)
PARAMS = [
    pytest.param(case, impl, id=f"{case.label}-{impl}") for case in CASES for impl in ["copy", *case.impls]
]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_bench(benchmark, case, impl):
    fn = case.copy if impl == "copy" else case.impls[impl]
    benchmark.group = case.label
    if DEVICE == "cuda":
        fn = _synchronized(fn)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=2, iterations=1)


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run
