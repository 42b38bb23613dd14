"""`iapt-bench`: time every op against the eager reference, `torch.compile(reference)` and the copy
bandwidth limit (DESIGN.md section 7).

    iapt-bench                      # CPU, default sizes, prints the table
    iapt-bench --out bench-out      # also writes bench-out/report.md and bench-out/results.json
    iapt-bench --device cuda        # times with triton.testing.do_bench

On CPU the kernel backend is the C++ extension (Triton in the interpreter is not worth timing); on CUDA
it is Triton. The "copy limit" is `out.copy_(x)` timed over the same bytes the op must move at least,
so `fraction of copy limit` = 1.0 means the op runs as fast as a memory copy of its inputs and outputs.
The case list here is shared with the pytest-benchmark suite under `benchmarks/`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MODES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    """One benchmark: an op at a shape, dtype and mode, with a runnable closure per implementation.

    `impls` maps an implementation name (`reference`, `compiled`, `cpp`, `triton`) to a function of no
    arguments that runs the op once; `tensors_moved` is how many `x`-sized tensors the op must read
    and write at least, which scales the copy limit.
    """

    op: str
    shape: tuple
    dtype: torch.dtype
    mode: str
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    tensors_moved: float = 2.0
    copy: Callable[[], object] | None = None

    @property
    def label(self) -> str:
        return f"{self.op}[{'x'.join(map(str, self.shape))},{str(self.dtype).replace('torch.', '')},{self.mode}]"


# --------------------------------------------------------------------------- cases


def _runner(fn, inputs, mode, grad):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
    else:
        def run():
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    t.grad = None
            fn(*inputs).backward(grad)
    return run


def rational_cases(device: str, sizes=(1 << 16, 1 << 20, 1 << 23), dtypes=(torch.float32,),
                   backends=None, compiled=True) -> list[Case]:
    """Rational activation, degrees (5, 4), version B, one group."""
    import iapt_kernels
    from iapt_kernels import reference

    backends = backends if backends is not None else _kernel_backends(device)
    num0, den0 = iapt_kernels.rational_init("gelu", (5, 4))
    cases = []
    for numel in sizes:
        for dtype in dtypes:
            for mode in MODES:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(numel, generator=gen).to(device=device, dtype=dtype)
                out = torch.empty_like(x)
                num = num0.float().to(device)
                den = den0.float().to(device)
                if mode == "fwd+bwd":
                    x.requires_grad_()
                    num.requires_grad_()
                    den.requires_grad_()
                grad = torch.randn_like(x)
                case = Case("rational", (numel,), dtype, mode, tensors_moved=2.0 if mode == "fwd" else 5.0)
                case.copy = lambda out=out, x=x: out.copy_(x.detach())
                ref = lambda x, a, b: reference.rational(x, a, b)  # noqa: E731
                case.impls["reference"] = _runner(ref, (x, num, den), mode, grad)
                if compiled:
                    case.impls["compiled"] = _runner(_compile(ref), (x, num, den), mode, grad)
                for backend in backends:
                    fn = lambda x, a, b, backend=backend: iapt_kernels.rational(x, a, b, backend=backend)  # noqa: E731
                    case.impls[backend] = _runner(fn, (x, num, den), mode, grad)
                cases.append(case)
    return cases


def generator_cases(device: str, shapes=((8, 512, 2048, 256, 4),), dtypes=(torch.float32,),
                    backends=None, compiled=True) -> list[Case]:
    """attention_pool alone and the whole prompt generator (pool + rational + up-projection), at
    `(B, S, d, r, L)`, with a random instruction mask covering ~80% of the positions."""
    import iapt_kernels
    from iapt_kernels import reference

    backends = backends if backends is not None else _kernel_backends(device)
    cases = []
    for B, S, d, r, L in shapes:
        for dtype in dtypes:
            for mode in MODES:
                torch.manual_seed(0)
                h = torch.randn(B, S, d).to(device=device, dtype=dtype)
                mask = (torch.rand(B, S) < 0.8).to(device)
                out = torch.empty_like(h)
                if mode == "fwd+bwd":
                    h.requires_grad_()
                # Minimum traffic in units of H: read it once forward; read it again and write gH backward.
                moved = 1.0 if mode == "fwd" else 3.0
                gens = {"reference": reference.PromptGenerator(d, r, L)}
                for backend in backends:
                    gens[backend] = iapt_kernels.PromptGenerator(d, r, L, backend=backend)
                for g in gens.values():
                    g.load_state_dict(gens["reference"].state_dict())
                    g.to(device=device, dtype=dtype)
                    g.requires_grad_(mode == "fwd+bwd")
                ref_gen = gens["reference"]
                for op in ("attention_pool", "generator"):
                    case = Case(op, (B, S, d, r, L), dtype, mode, tensors_moved=moved)
                    case.copy = lambda out=out, h=h: out.copy_(h.detach())
                    for name, g in gens.items():
                        fn = g if op == "generator" else g.pooled
                        grad = torch.randn(B, L, d if op == "generator" else r, device=device, dtype=dtype)
                        case.impls[name] = _runner(fn, (h, mask), mode, grad)
                        if name == "reference" and compiled:
                            fn_ref = ref_gen if op == "generator" else ref_gen.pooled
                            case.impls["compiled"] = _runner(_compile(fn_ref), (h, mask), mode, grad)
                    cases.append(case)
    return cases


def configure_compile() -> None:
    """Let torch.compile keep one graph per benchmark shape and mode instead of giving up."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096


def _compile(fn):
    # dynamic=False: one specialised graph per shape, the best torch.compile can do for the baseline.
    return torch.compile(fn, dynamic=False)


def _kernel_backends(device: str) -> list[str]:
    import iapt_kernels

    avail = iapt_kernels.available_backends()
    if device == "cuda":
        return ["triton"] if "triton" in avail else []
    return ["cpp"] if "cpp" in avail else []


def default_cases(device: str, quick: bool = False) -> list[Case]:
    """The cases `iapt-bench` runs by default (and the pytest-benchmark suite runs)."""
    if quick:
        return (rational_cases(device, sizes=(1 << 16, 1 << 20))
                + generator_cases(device, shapes=((2, 128, 512, 64, 4),)))
    return rational_cases(device) + generator_cases(device)


# --------------------------------------------------------------------------- timing


def time_cpu(fn: Callable[[], object], min_time: float = 0.5, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median wall time in ms over repeated runs after one warm-up run."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cuda(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def run_cases(cases: list[Case], device: str, progress: bool = True) -> list[dict]:
    timer = time_cuda if device == "cuda" else time_cpu
    work = [(case, name) for case in cases for name in ["copy", *case.impls]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(work), desc="iapt-bench", unit="run", file=sys.stderr)
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
            records.append({
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
            })
    if bar is not None:
        bar.close()
    return records


# --------------------------------------------------------------------------- report


def format_table(records: list[dict]) -> str:
    head = ["op", "shape", "dtype", "mode", "backend", "median ms", "vs eager ref", "vs compiled ref",
            "of copy limit"]
    rows = [head]
    for r in records:
        rows.append([
            r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"], r["backend"],
            f"{r['median_ms']:.3f}", f"{r['speedup_vs_reference']:.2f}x",
            "-" if r["speedup_vs_compiled"] is None else f"{r['speedup_vs_compiled']:.2f}x",
            f"{r['fraction_of_copy_limit']:.2f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iapt-bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", metavar="DIR", help="write report.md and results.json here")
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU; none is visible")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and args.device == "cpu":
        print("note: TRITON_INTERPRET is set; Triton is not timed on CPU", file=sys.stderr)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    configure_compile()

    cases = default_cases(args.device, quick=args.quick)
    records = run_cases(cases, args.device, progress=not args.no_progress)
    table = format_table(records)
    machine = machine_description(args.device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "iapt-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{machine}, {stamp}\n")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"machine": machine, "date": stamp, "command": command, "ops": records}, f, indent=1)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(f"# iapt-bench report\n\nCommand: `{command.strip()}`  \nMachine: {machine}  \nDate: {stamp}\n\n")
            f.write("Median of repeated runs. Speedups are the eager reference's and `torch.compile(reference)`'s "
                    "time over this row's; `of copy limit` is the time of `out.copy_(x)` over the bytes the op "
                    "must move, divided by this row's time (1.0 = memory-bound optimum).\n\n")
            f.write(table + "\n")
        print(f"\nwrote {args.out}/report.md and {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
