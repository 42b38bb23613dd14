"""CPU acceptance timing of the one-pass C++ multi-tenant generator (issue 12).

    python -m benchmarks.multi_tenant_cpu [--rounds 15] [--T 32 --B 32 --S 256 --d 1024 --r 64 --L 4]

Times, interleaved round by round (so a busy neighbour slows every implementation alike) and reported as
the median over rounds:
  single      the single-tenant `cpp` PromptGenerator on the same H (forward, no_grad)
  mt_1        the multi-tenant `cpp` generator, every request on tenant 0
  mt_T        the multi-tenant `cpp` generator, request b on tenant b mod T (T distinct tenants when B >= T)
  loop_T      the reference's per-tenant loop on the same batch as mt_T
and forward+backward of mt_T and loop_T; then prints the ratios the issue bounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import iapt_kernels
from iapt_kernels import reference

from .cases import random_mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.multi_tenant_cpu", description=__doc__.splitlines()[0]
    )
    for name, default in (("T", 32), ("B", 32), ("S", 256), ("d", 1024), ("r", 64), ("L", 4), ("rounds", 15)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    h = torch.randn(a.B, a.S, a.d)
    mask = random_mask(a.B, a.S, "cpu")
    grad = torch.randn(a.B, a.L, a.d)
    ref = reference.MultiTenantPromptGenerator(a.T, a.d, a.r, a.L)
    mt = iapt_kernels.MultiTenantPromptGenerator(a.T, a.d, a.r, a.L, backend="cpp")
    mt.load_state_dict(ref.state_dict())
    single = mt.generator(0)
    one = torch.zeros(a.B, dtype=torch.long)
    many = torch.arange(a.B) % a.T
    g1 = iapt_kernels.TenantGroups.build(one, a.T)
    gT = iapt_kernels.TenantGroups.build(many, a.T)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def fwd_bwd(mod, groups):
        hh = h.clone().requires_grad_()

        def run():
            for q in mod.parameters():
                q.grad = None
            hh.grad = None
            (mod(hh, mask, groups=groups) * grad).sum().backward()

        return run

    impls = {
        "single": fwd(lambda: single(h, mask)),
        "mt_1": fwd(lambda: mt(h, mask, groups=g1)),
        "mt_T": fwd(lambda: mt(h, mask, groups=gT)),
        "loop_T": fwd(lambda: ref(h, mask, groups=gT)),
        "mt_T fwd+bwd": fwd_bwd(mt, gT),
        "loop_T fwd+bwd": fwd_bwd(ref, gT),
    }
    for run in impls.values():  # warm up (allocations, first-touch pages)
        run()
    times = {k: [] for k in impls}
    load0 = os.getloadavg()[0]
    for _ in range(a.rounds):
        for name, run in impls.items():
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) * 1e3)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"T={a.T} B={a.B} S={a.S} d={a.d} r={a.r} L={a.L} fp32, {torch.get_num_threads()} threads, "
        f"{a.rounds} interleaved rounds; 1-min load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores"
    )
    for k, v in med.items():
        print(f"  {k:<16} median {v:8.2f} ms   (min {min(times[k]):8.2f}, max {max(times[k]):8.2f})")
    checks = [
        ("mt_1 / single", med["mt_1"] / med["single"], "<= 2"),
        ("mt_T / mt_1", med["mt_T"] / med["mt_1"], "<= 1.5"),
        ("loop_T / mt_T", med["loop_T"] / med["mt_T"], ">= 5"),
        ("loop_T / mt_T fwd+bwd", med["loop_T fwd+bwd"] / med["mt_T fwd+bwd"], ">= 3"),
    ]
    for name, ratio, bound in checks:
        ok = ratio <= float(bound[3:]) if bound.startswith("<=") else ratio >= float(bound[3:])
        print(f"  {name:<24}{ratio:7.2f}   bound {bound:<7}{'holds' if ok else 'FAILS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
