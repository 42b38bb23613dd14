"""Timing: median wall time on CPU, `triton.testing.do_bench` on CUDA, and the records of a run."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

from .cases import Case


def time_cpu(
    fn: Callable[[], object],
    min_time: float = 0.5,
    min_reps: int = 5,
    max_reps: int = 200,
    slow_s: float = 0.4,
) -> float:
    """Median wall time in ms over repeated runs after one warm-up run (which also compiles).

    At least `min_reps` runs and `min_time` seconds; calls slower than `slow_s` get 3 runs.
    """
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times: list[float] = [first * 1e3]
    reps = 3 if first > slow_s else min_reps
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cuda(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def case_steps(cases: list[Case]) -> int:
    return sum(1 + len(c.impls) for c in cases)


def run_cases(cases: list[Case], device: str, progress=True, timer=None) -> list[dict]:
    """Time every implementation of every case; `progress` is True (own bar), False, or a tqdm bar;
    `timer` replaces the device's timing function."""
    import sys

    timer = timer or (time_cuda if device == "cuda" else time_cpu)
    bar, own = progress, False
    if progress is True:
        from tqdm import tqdm

        bar, own = tqdm(total=case_steps(cases), desc="benchmarks", unit="run", file=sys.stderr), True
    elif progress is False:
        bar = None
    records = []
    for case in cases:
        times = {}
        for name in ["copy", *case.impls]:
            if bar is not None:
                bar.set_postfix_str(f"{case.label} {name}")
            fn = case.copy if name == "copy" else case.impls[name]
            times[name] = timer(fn)
            if bar is not None:
                bar.update()
        limit_ms = times["copy"] * case.tensors_moved / 2.0
        for name, ms in times.items():
            if name == "copy":
                continue
            records.append(
                {
                    "op": case.op,
                    "shape": list(case.shape),
                    "dtype": str(case.dtype).replace("torch.", ""),
                    "mode": case.mode,
                    "backend": name,
                    "median_ms": ms,
                    "speedup_vs_reference": times["reference"] / ms,
                    "speedup_vs_compiled": times["compiled"] / ms if "compiled" in times else None,
                    "copy_limit_ms": limit_ms,
                    "fraction_of_copy_limit": limit_ms / ms,
                    "params": {k: list(v) if isinstance(v, tuple) else v for k, v in case.params.items()},
                }
            )
    if own:
        bar.close()
    return records


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"
