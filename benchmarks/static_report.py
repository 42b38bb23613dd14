"""Static GPU report: compile every Triton kernel ahead of time, with no GPU, and read the cubin.

    python benchmarks/static_report.py --arch 80 90 --json report.json [--quick] [--jobs 2]

For each kernel at each configuration its launcher can use (`launch_configs()` in each `ops/` module),
compile for the requested architectures through `triton.compile` (no driver needed), then read
registers, spills (LOCAL bytes) and static shared memory with `cuobjdump --dump-resource-usage`, and
count instructions in `cuobjdump -sass`. Pointers and integer arguments are specialised as divisible
by 16, as the JIT does for 16-byte-aligned tensors, so the report shows the wide loads a real launch
gets. Writes a JSON list of records
`{"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "instructions"}` and prints a
summary; exits non-zero if any config fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# The report compiles real GPU code: it must see the JIT kernels, not the interpreter's.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INSTRUCTIONS = ("LDG.E.128", "STG.E.128", "LDG", "STG", "HMMA", "HGMMA", "RED", "ATOM", "ATOMS", "BAR")


def _configs(quick: bool):
    """Every launch configuration of every op; `quick` keeps the rational degrees at four corners."""
    from iapt_kernels.ops import attention_pool, rational

    corners = {(1, 1), (3, 2), (5, 4), (8, 8)}
    for spec in rational.launch_configs():
        if quick and tuple(spec["config"]["degrees"]) not in corners:
            continue
        yield spec
    yield from attention_pool.launch_configs()


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def count_instructions(sass: str) -> dict[str, int]:
    """Count SASS opcodes; `LDG.E.128` counts 128-bit global loads, `LDG` every global load."""
    counts = dict.fromkeys(INSTRUCTIONS, 0)
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base in ("LDG", "STG") and ".128" in op:
            counts[f"{base}.E.128"] += 1
        if base in counts:
            counts[base] += 1
    return counts


def compile_one(args):
    spec_index, arch, quick = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = list(_configs(quick))[spec_index]
    fn = spec["kernel"]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in spec["constexprs"]:
            signature[name] = "constexpr"
            continue
        signature[name] = f"*{spec['pointers'][name]}" if name in spec["pointers"] else "i32"
        if name not in spec.get("unaligned", ()):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=spec["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    return {
        "kernel": spec["name"],
        "config": spec["config"],
        "arch": arch,
        "registers": field("REG"),
        "spill_bytes": field("LOCAL"),
        "shared_bytes": field("SHARED") + int(compiled.metadata.shared),
        "instructions": count_instructions(sass),
    }


def build_report(archs, quick=False, jobs=2, progress=True):
    n = len(list(_configs(quick)))
    work = [(i, arch, quick) for arch in archs for i in range(n)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(compile_one, work, chunksize=8)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(work), desc="compiling", unit="cfg")
        return list(results)


def summarize(records) -> str:
    lines = ["kernel                  arch  configs  max regs  spills  max smem  LDG.128/STG.128 (fp32,bf16 G=1)  RED+ATOM"]
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(groups.items()):
        wide = [r for r in rs if r["config"].get("dtype") in ("fp32", "bf16") and not r["config"].get("grouped")]
        wide_ok = all(r["instructions"]["LDG.E.128"] > 0 and r["instructions"]["STG.E.128"] > 0 for r in wide)
        lines.append(
            f"{kernel:<24}{arch:>4}{len(rs):>9}{max(r['registers'] for r in rs):>10}"
            f"{sum(r['spill_bytes'] for r in rs):>8}{max(r['shared_bytes'] for r in rs):>10}"
            f"{'all wide' if wide_ok else 'NOT all wide':>33}"
            f"{sum(r['instructions']['RED'] + r['instructions']['ATOM'] for r in rs):>10}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", metavar="PATH", help="write the records here")
    p.add_argument("--quick", action="store_true", help="only degrees (1,1), (3,2), (5,4), (8,8)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    records = build_report(args.arch, args.quick, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(summarize(records))
    spills = [r for r in records if r["spill_bytes"]]
    if spills:
        print(f"{len(spills)} configs spill, e.g. {spills[0]['kernel']} {spills[0]['config']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
