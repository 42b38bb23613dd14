"""Sizes the CUDA test subset of scripts/gpu_check.sh (`-m "gpu and not slow"`) without a GPU.

    TRITON_INTERPRET=1 python scripts/gpu_subset_size.py [--compile-s 1.5] [--launch-ms 0.05]

Collects the subset, runs each test's CPU twin (the same test with `cpu` for `cuda` in its id) in the
Triton interpreter, and records per test its wall time and every kernel launch, keyed as the JIT keys
its cache (kernel, argument dtypes, constexprs, the alignment of integer arguments). On a GPU the
subset costs about `cold compiles x compile-s + launches x launch-ms + its host time`; the host time
(float64 references on CPU, model set-up) is bounded by the interpreter wall time minus what the
interpreter spent inside kernels. `--compile-s`: seconds of one cold compile (Triton's own pipeline to
a cubin, as `benchmarks/static_report.py` measures it here, plus the launcher's C build on first use).
Prints the per-file table and the estimate; the twin's interpreter time is an upper bound, since the
interpreter runs each kernel in numpy at far below GPU speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _twin(nodeid: str) -> str:
    head, _, params = nodeid.partition("[")
    if not params:
        return nodeid
    parts = params.rstrip("]").split("-")
    return head + "[" + "-".join("cpu" if p == "cuda" else p for p in parts) + "]"


def _collect(*marker) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "--collect-only", "-q", *marker],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [ln.strip() for ln in out.splitlines() if "::" in ln]


class Recorder:
    """pytest plugin: wall time and the set of JIT cache keys launched, per test."""

    def __init__(self):
        self.keys: dict[str, set] = defaultdict(set)
        self.launches: dict[str, int] = defaultdict(int)
        self.kernel_s: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = {}
        self.current = None

    def pytest_configure(self, config):
        import torch
        from triton.runtime import interpreter as itp

        rec, call = self, itp.GridExecutor.__call__

        def key_of(v):
            if isinstance(v, torch.Tensor):
                return str(v.dtype)
            if isinstance(v, bool) or v is None:
                return v
            if isinstance(v, int):  # the JIT specialises integers on 1 and on divisibility by 16
                return "1" if v == 1 else ("d16" if v % 16 == 0 else "i")
            return v if isinstance(v, (str, float)) else type(v).__name__

        def counted(executor, *args, **kwargs):
            name = getattr(executor.fn, "__name__", str(executor.fn))
            key = (
                name,
                tuple(key_of(a) for a in args),
                tuple(sorted((k, key_of(v)) for k, v in kwargs.items())),
            )
            rec.keys[rec.current].add(key)
            rec.launches[rec.current] += 1
            t0 = time.perf_counter()
            try:
                return call(executor, *args, **kwargs)
            finally:
                rec.kernel_s[rec.current] += time.perf_counter() - t0

        itp.GridExecutor.__call__ = counted

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        self._t0 = time.perf_counter()

    def pytest_runtest_logfinish(self, nodeid, location):
        self.wall[nodeid] = time.perf_counter() - self._t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile-s", type=float, default=1.5, help="seconds per cold compile on the GPU host")
    p.add_argument("--launch-ms", type=float, default=0.05, help="ms per warm launch, host side")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "gpu_subset_size: run with TRITON_INTERPRET=1 (the CPU twins run in the interpreter)",
            file=sys.stderr,
        )
        return 2
    cuda = _collect("-m", "gpu and not slow")
    everything = set(_collect())
    twins = sorted({_twin(n) for n in cuda} & everything - set(cuda))
    no_twin = [n for n in cuda if _twin(n) not in twins]
    import pytest

    rec = Recorder()
    os.chdir(ROOT)
    pytest.main(["-q", "-p", "no:cacheprovider", *twins], plugins=[rec])
    per_file = defaultdict(lambda: [0, 0.0, 0.0, 0])
    all_keys = set()
    for nodeid, wall in rec.wall.items():
        f = per_file[nodeid.split("::")[0]]
        f[0] += 1
        f[1] += wall
        f[2] += rec.kernel_s[nodeid]
        f[3] += rec.launches[nodeid]
        all_keys |= rec.keys[nodeid]
    print(f"\n{len(cuda)} CUDA tests, {len(rec.wall)} CPU twins run, {len(no_twin)} without a twin:")
    for n in no_twin:
        print("  ", n)
    print(f"{'file':45s} {'tests':>5s} {'wall s':>8s} {'kernel s':>8s} {'launches':>8s}")
    for name, (n, wall, ks, launches) in sorted(per_file.items()):
        print(f"{name:45s} {n:5d} {wall:8.1f} {ks:8.1f} {launches:8d}")
    wall = sum(rec.wall.values())
    host = wall - sum(rec.kernel_s.values())
    launches = sum(rec.launches.values())
    compile_s = len(all_keys) * args.compile_s
    print(
        f"distinct JIT specialisations (cold compiles): {len(all_keys)}; launches {launches}; "
        f"interpreter wall {wall:.0f} s of which host (outside kernels) {host:.0f} s"
    )
    # Which test functions bring the cold compiles: each key counted for the first test (in run order)
    # that launches it, so the sum over functions is the total.
    seen, first = set(), defaultdict(lambda: [0, 0])
    for nodeid in rec.wall:
        fn = nodeid.split("[")[0]
        new = rec.keys[nodeid] - seen
        seen |= new
        first[fn][0] += 1
        first[fn][1] += len(new)
    print(f"\n{'test function':80s} {'tests':>5s} {'new compiles':>12s}")
    for fn, (n, k) in sorted(first.items(), key=lambda kv: -kv[1][1]):
        print(f"{fn:80s} {n:5d} {k:12d}")
    est = compile_s + launches * args.launch_ms / 1e3 + host
    print(
        f"estimate on a GPU: {compile_s:.0f} s compiling + {launches * args.launch_ms / 1e3:.1f} s launching "
        f"+ at most {host:.0f} s host = {est:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
