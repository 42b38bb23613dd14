"""`python -m benchmarks`: the benchmark report (docs/design.md section 7).

    python -m benchmarks            # CPU: every op, the GPU cost model, the IAPT-vs-LoRA serving run;
                                    # writes bench-out/{report.md, results.json, results.csv, *.png}
    python -m benchmarks --quick    # a smoke test that every part runs (about a minute; not a measurement)
    python -m benchmarks --device cuda   # times with triton.testing.do_bench

Three parts, one progress bar:

1. Op timings: `rational`, `attention_pool`, `generator` and `multi_tenant_generator`, forward and forward+backward over a sweep of sizes, on every
   implementation of the device: the eager reference, `torch.compile(reference)`, and the fused backend
   (C++ on CPU, Triton on CUDA), against the copy-bandwidth limit (`out.copy_(x)` over the bytes the op
   must move at least).
2. A GPU cost model (:mod:`benchmarks.cost`): bytes, FLOPs and launches of the reference
   (counted by a TorchDispatchMode) and of the fused kernels (formulas), and the H100 roofline time.
3. End to end (:mod:`benchmarks.e2e`): multi-tenant generation on a tiny random Llama, IAPT
   against multi-LoRA (PEFT mixed batch) at equal trainable parameters per tenant.

The case list is shared with the pytest-benchmark suite under `benchmarks/`. A tenant sweep
(:mod:`benchmarks.tenants`: 1, 4, 16, 64 tenants at a fixed batch, fused against the loop)
follows unless `--no-tenant-sweep`; `--tenant-sweep-only` runs it alone.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import functools
import os
import sys
import time

import torch
from tqdm import tqdm

from iapt_kernels._backend import triton_interpreted

from . import cost
from . import e2e as e2e_mod
from .cases import MODES, Case, configure_compile, default_cases, kernel_backends
from .report import format_table, load_result, write_outputs
from .tenants import sweep_steps, tenant_sweep, write_sweep
from .timing import case_steps, machine_description, run_cases, time_cpu

__all__ = ["main", "run", "configure_malloc"]


def _model_specs(cases: list[Case]) -> list[tuple]:
    seen, specs = set(), []
    for c in cases:
        key = (c.op, c.shape, c.params.get("mix"))
        if key not in seen:
            seen.add(key)
            specs.append((c.op, c.shape, c.params))
    return specs


def configure_malloc(mode: str) -> str:
    """With glibc's defaults every tensor of 32 MiB or more is a fresh mmap: each call of an op that
    returns a new tensor page-faults its whole output (a 2^23-element `x.clone()` costs ~6x
    `out.copy_(x)` here). `reuse` raises the mmap and trim thresholds so freed buffers are reused,
    as a caching allocator does; it applies to every implementation alike. Returns a report note."""
    if mode == "default":
        return "Allocator: glibc defaults (large outputs are fresh page-faulting mmaps on every call)."
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "Allocator: glibc mallopt unavailable; large outputs may page-fault on every call."
    return (
        "Allocator: freed buffers are reused (glibc mallopt M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB, "
        "for every implementation alike, as jemalloc/tcmalloc would); `--malloc default` measures "
        "glibc's defaults, where every large output is page-faulted afresh on each call."
    )


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Everything `python -m benchmarks` does, given its parsed arguments; returns the result dict."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    configure_compile()
    notes = []
    if args.device == "cpu":
        notes.append(configure_malloc(args.malloc))
    load0 = _load()
    # --quick is a smoke test: torch.compile alone takes minutes per case on a small CPU machine.
    compiled = not args.no_compile and not args.quick
    if args.quick:
        notes.append(
            "Quick run: a smoke test that every part runs, not a measurement. Sizes are tiny, each "
            "timing is a few calls, torch.compile(reference) is not timed; speedups and throughputs "
            "below are dominated by fixed overheads and noise, so draw no conclusion from them: run "
            "`python -m benchmarks` without --quick for figures."
        )
    cases = default_cases(args.device, quick=args.quick, compiled=compiled) if not args.no_ops else []
    if args.device == "cpu":
        notes.append(
            "Triton is not timed on CPU (its interpreter is not a performance path); the fused "
            "backend timed here is the C++ extension"
            + ("" if "cpp" in kernel_backends("cpu") else ", which is not built: no fused rows")
        )
    specs = _model_specs(cases)
    model_dtypes = (torch.float32, torch.bfloat16)
    e2e_cfg = None
    if not args.no_e2e:
        e2e_cfg = e2e_mod.E2EConfig.quick() if args.quick else e2e_mod.E2EConfig()
    total = case_steps(cases) + len(specs) * len(model_dtypes) * len(MODES)
    total += e2e_mod.e2e_steps(e2e_cfg) if e2e_cfg else 0
    bar = None
    if not args.no_progress:
        bar = tqdm(total=total, desc="benchmarks", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        timer = None
        min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else None)
        if min_time is not None and args.device == "cpu":
            timer = functools.partial(time_cpu, min_time=min_time, min_reps=3 if min_time < 0.1 else 5)
        records = run_cases(cases, args.device, progress=bar if bar is not None else False, timer=timer)
        model = cost.model_rows(specs, model_dtypes, progress=bar)

        def key(rec):
            return rec["op"], tuple(rec["shape"]), rec["dtype"], rec["mode"], rec.get("params", {}).get("mix")

        by_key = {key(m): m for m in model}
        for r in records:
            m = by_key.get(key(r))
            if m is None:
                continue
            r.update({k: v for k, v in m.items() if k not in ("op", "shape", "dtype", "mode", "params")})
            r["h100_ms_modelled"] = (
                m["h100_ms_fused"]
                if r["backend"] in ("cpp", "triton")
                else m["h100_ms_reference"]
                if r["backend"] == "reference"
                else None
            )
        e2e = None
        if e2e_cfg:
            op_threads = torch.get_num_threads()
            torch.set_num_threads(args.e2e_threads)
            try:
                e2e = e2e_mod.run_e2e(e2e_cfg, progress=bar)
            finally:
                torch.set_num_threads(op_threads)
    finally:
        if bar is not None:
            bar.close()
    load1 = _load()
    cores = os.cpu_count() or 1
    if load0 is not None and max(load0, load1) > 0.5 * cores:
        notes.append(
            f"Other processes shared the machine: 1-minute load average {load0:.1f} at the start and "
            f"{load1:.1f} at the end, on {cores} cores (this run's own threads included). "
            "Timings, above all the short ones, are noisy."
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = ("python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    result = {
        "machine": machine_description(args.device),
        "date": stamp,
        "command": command,
        "wall_s": time.perf_counter() - start,
        "quick": bool(args.quick),
        "notes": notes,
        "ops": records,
        "model": model,
        "e2e": e2e["records"] if e2e else [],
        "e2e_base": e2e["base"] if e2e else None,
        "e2e_setup": e2e["setup"] if e2e else None,
        "e2e_errors": e2e["errors"] if e2e else [],
        "e2e_run": e2e,
    }
    return result


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--out",
        metavar="DIR",
        default="bench-out",
        help="write report.md, results.json, results.csv, model.csv, e2e.csv and plots here "
        "(default: bench-out)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test (about a minute): tiny sizes, few calls, no torch.compile timings; "
        "its figures are not a measurement",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--malloc",
        choices=["reuse", "default"],
        default="reuse",
        help="reuse: keep freed large buffers in glibc's heap (mallopt), as a caching allocator "
        "(jemalloc, tcmalloc) would, so no implementation pays page faults for a fresh "
        "output on every call; default: glibc's own thresholds (default: reuse)",
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the IAPT-vs-LoRA serving comparison")
    p.add_argument(
        "--e2e-threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads of the serving comparison (default 1: decoding a tiny model is "
        "latency-bound, and one thread stays stable on a shared machine)",
    )
    p.add_argument("--no-ops", action="store_true", help="skip the op timings and the cost model")
    p.add_argument("--no-compile", action="store_true", help="do not time torch.compile(reference)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        metavar="S",
        help="CPU: least seconds of repeated runs per timing (default 0.5)",
    )
    p.add_argument(
        "--no-tenant-sweep", action="store_true", help="skip the tenant sweep (tenants.csv/.md/.png)"
    )
    p.add_argument("--tenant-sweep-only", action="store_true", help="run the tenant sweep alone")
    p.add_argument(
        "--from-json",
        metavar="FILE",
        help="measure nothing: re-render the report, CSVs and plots of a results.json into --out",
    )
    args = p.parse_args(argv)
    if args.from_json:
        written = write_outputs(args.out, load_result(args.from_json))
        print(f"wrote {', '.join(os.path.basename(w) for w in written)} under {args.out}/")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU; none is visible")
    if triton_interpreted() and args.device == "cpu":
        print("note: TRITON_INTERPRET is set; Triton is not timed on CPU", file=sys.stderr)
    if args.tenant_sweep_only:
        return _tenant_sweep(args, [])
    result = run(args, argv)
    print(f"\n{result['machine']}, {result['date']}, {result['wall_s']:.0f} s\n")
    if result["ops"]:
        print(format_table(result["ops"]))
    written = write_outputs(args.out, result)
    report = os.path.join(args.out, "report.md")
    print(f"\nwrote {', '.join(os.path.basename(w) for w in written)} under {args.out}/ (read {report})")
    if not args.no_tenant_sweep and not args.quick and not args.no_ops:
        return _tenant_sweep(args, written)
    return 0


def _tenant_sweep(args, written) -> int:
    """The tenant sweep (:mod:`benchmarks.tenants`), written beside the report."""
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.device == "cpu":
        configure_malloc(args.malloc)
    bar = None
    if not args.no_progress:
        bar = tqdm(total=sweep_steps(args.device), desc="tenant sweep", unit="step", file=sys.stderr)
    timer = None
    if args.min_time is not None and args.device == "cpu":
        timer = functools.partial(time_cpu, min_time=args.min_time, min_reps=3 if args.min_time < 0.1 else 5)
    load0 = _load()
    try:
        records = tenant_sweep(args.device, timer=timer, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{machine_description(args.device)}, {stamp}; 1-minute load average {load0} at the start, "
        f"{_load()} at the end, on {os.cpu_count()} cores"
    )
    paths = write_sweep(args.out, records, header)
    print(open(paths[1]).read())
    print(f"wrote {', '.join(os.path.basename(w) for w in written + paths)} under {args.out}/")
    return 0
