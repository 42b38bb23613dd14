"""Static GPU report: compile every Triton kernel ahead of time, with no GPU, and read the cubin.

    python benchmarks/static_report.py --arch 80 90 --json report.json [--scope all|quick|sample] [--jobs 2]
        [--ops rational attention_pool multi_tenant_generator] [--where KEY=VALUE ...]

For each kernel at each configuration its launcher can use (`launch_configs()` in each `ops/` module),
compile for the requested architectures through `triton.compile` (no driver needed), then read
registers, spills (LOCAL bytes) and static shared memory with `cuobjdump --dump-resource-usage`, and
count instructions in `cuobjdump -sass`. Pointers and integer arguments are specialised as divisible
by 16, as the JIT does for 16-byte-aligned tensors, so the report shows the wide loads a real launch
gets. Writes a JSON list of records
`{"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "instructions", "num_warps",
"num_stages", "h_stage_bytes", "ctas_per_sm", "bytes_in_flight_per_sm"}` and prints a summary; exits
non-zero if any config fails to compile or spills.

`h_stage_bytes` is what the spec says one program loads of the streamed input (H) per pipeline stage;
`ctas_per_sm` the occupancy the architecture allows (registers, shared memory, warps and its block
limit, `ARCH_LIMITS`); `bytes_in_flight_per_sm = ctas_per_sm * h_stage_bytes * num_stages`.
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

INSTRUCTIONS = (
    "LDG.E.128",
    "STG.E.128",
    "LDG",
    "STG",
    "LDGSTS",
    "UTMALDG",
    "HMMA",
    "HGMMA",
    "RED",
    "ATOM",
    "ATOMS",
    "BAR",
)
DEFAULT_NUM_STAGES = 3  # triton.compile's default, for specs that do not set num_stages

# Per-SM limits (CUDA occupancy calculator): registers, shared memory usable by CTAs, warps, CTAs;
# registers are allocated per warp in units of 256, and each CTA reserves 1 KiB of shared memory.
ARCH_LIMITS = {
    80: dict(registers=65536, shared=167936, warps=64, ctas=32),
    90: dict(registers=65536, shared=233472, warps=64, ctas=32),
}


def ctas_per_sm(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM that registers, shared memory, warps and the block limit allow."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = lim["registers"] // (regs_per_warp * num_warps)
    by_smem = lim["shared"] // (shared_bytes + 1024)
    return min(by_regs, by_smem, lim["warps"] // num_warps, lim["ctas"])


OPS = ("rational", "attention_pool", "multi_tenant_generator")


def _configs(scope: str, ops=OPS, where=()):
    """Launch configurations of every op in `ops`. `scope`: "all" (every config a launcher can use),
    "quick" (rational degrees at four corners only), "sample" (a few representative configs, for the
    test)."""
    import importlib

    corners = {(1, 1), (3, 2), (5, 4), (8, 8)}
    specs = [
        spec for op in ops for spec in importlib.import_module(f"iapt_kernels.ops.{op}").launch_configs()
    ]
    for spec in specs:
        cfg = spec["config"]
        if any(str(cfg.get(key)) != value for key, value in where):
            continue
        if scope == "quick" and "degrees" in cfg and tuple(cfg["degrees"]) not in corners:
            continue
        if scope == "sample":
            if cfg["dtype"] not in ("fp32", "bf16"):
                continue
            if "degrees" in cfg and (tuple(cfg["degrees"]) not in {(5, 4), (8, 8)} or cfg["grouped"]):
                continue
            if "L_PAD" in cfg and (cfg["L_PAD"] not in (16, 64) or cfg["packed"] or cfg["multi_tenant"]):
                continue
            if "call" in cfg and (cfg.get("version", "B") != "B" or cfg["dtype"] != "bf16"):
                continue
        yield spec


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
    spec_index, arch, scope, ops, where = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = list(_configs(scope, ops, where))[spec_index]
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
    num_stages = spec.get("num_stages", DEFAULT_NUM_STAGES)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec["num_warps"], "num_stages": num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    registers, shared = field("REG"), field("SHARED") + int(compiled.metadata.shared)
    ctas = ctas_per_sm(arch, registers, shared, spec["num_warps"])
    stage = spec.get("h_stage_bytes", 0)
    return {
        "kernel": spec["name"],
        "config": spec["config"],
        "arch": arch,
        "registers": registers,
        "spill_bytes": field("LOCAL"),
        "shared_bytes": shared,
        "instructions": count_instructions(sass),
        "num_warps": spec["num_warps"],
        "num_stages": num_stages,
        "h_stage_bytes": stage,
        "ctas_per_sm": ctas,
        "bytes_in_flight_per_sm": ctas * stage * num_stages,
    }


def build_report(archs, scope="all", jobs=2, progress=True, ops=OPS, where=()):
    """Compile every config of `ops` in `scope` (and matching every `(key, value)` of `where` in its
    `config`) for each of `archs`; one record per (config, arch)."""
    where = tuple(where)
    n = len(list(_configs(scope, ops, where)))
    work = [(i, arch, scope, tuple(ops), where) for arch in archs for i in range(n)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(compile_one, work, chunksize=8)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(work), desc="compiling", unit="cfg")
        return list(results)


def summarize(records) -> str:
    """One line per kernel and arch: configs, worst registers/spills/shared memory, how many of the
    16-byte-aligned fp32/bf16 configs use 128-bit loads and stores, float atomics anywhere, how many
    of the fp16/bf16 configs use tensor-core instructions (HMMA, or HGMMA on sm_90), warps and stages,
    fewest CTAs per SM, least KiB of the streamed input in flight per SM (configs that stream one), and
    how many configs use cp.async (LDGSTS) and TMA (UTMALDG)."""
    head = (
        f"{'kernel':<40}{'arch':>5}{'configs':>8}{'max regs':>9}{'spill B':>8}{'max smem':>9}"
        f"{'LDG.128':>9}{'STG.128':>9}{'RED+ATOM':>9}{'MMA':>8}{'warps':>6}{'stages':>7}{'CTA/SM':>7}"
        f"{'KiB/SM':>7}{'LDGSTS':>8}{'UTMALDG':>8}"
    )
    lines = [head]
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(groups.items()):
        wide = [
            r for r in rs if r["config"].get("dtype") in ("fp32", "bf16") and not r["config"].get("grouped")
        ]
        ldg = sum(r["instructions"]["LDG.E.128"] > 0 for r in wide)
        stg = sum(r["instructions"]["STG.E.128"] > 0 for r in wide)
        half = [r for r in rs if r["config"].get("dtype") in ("fp16", "bf16")]
        mma = sum(r["instructions"]["HMMA"] + r["instructions"].get("HGMMA", 0) > 0 for r in half)
        lines.append(
            f"{kernel:<40}{arch:>5}{len(rs):>8}{max(r['registers'] for r in rs):>9}"
            f"{sum(r['spill_bytes'] for r in rs):>8}{max(r['shared_bytes'] for r in rs):>9}"
            f"{f'{ldg}/{len(wide)}':>9}{f'{stg}/{len(wide)}':>9}"
            f"{sum(r['instructions']['RED'] + r['instructions']['ATOM'] for r in rs):>9}"
            f"{f'{mma}/{len(half)}':>8}"
            f"{'/'.join(map(str, sorted({r['num_warps'] for r in rs}))):>6}"
            f"{'/'.join(map(str, sorted({r['num_stages'] for r in rs}))):>7}"
            f"{min(r['ctas_per_sm'] for r in rs):>7}"
            f"{(min(streams) / 1024 if (streams := [r['bytes_in_flight_per_sm'] for r in rs if r['h_stage_bytes']]) else 0):>7.0f}"
            f"{sum(r['instructions']['LDGSTS'] > 0 for r in rs):>4}/{len(rs):<3}"
            f"{sum(r['instructions']['UTMALDG'] > 0 for r in rs):>4}/{len(rs):<3}"
        )
    return "\n".join(lines)


# (present tenants, B, d, r) at which the report states the multi-tenant products' grids.
GRID_SHAPES = ((1, 8, 4096, 256), (16, 64, 4096, 64))


def multi_tenant_grids() -> str:
    """The grid each multi-tenant product launches at GRID_SHAPES (the launchers' own sizing)."""
    from iapt_kernels.ops.multi_tenant_generator import product_grids

    lines = []
    for K, B, d, r in GRID_SHAPES:
        lines.append(f"multi_tenant_generator grids at {K} tenant(s), B={B}, d={d}, r={r}, L=4:")
        for name, grid in product_grids(K, B, d, r).items():
            programs = grid[0] * grid[1] * grid[2]
            lines.append(f"  {name:<32}{str(grid):>16}{programs:>8} programs")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", metavar="PATH", help="write the records here")
    p.add_argument(
        "--scope",
        choices=["all", "quick", "sample"],
        default="all",
        help="all: every config (default); quick: rational degrees (1,1), (3,2), (5,4), (8,8) only; "
        "sample: a few representative configs",
    )
    p.add_argument(
        "--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops' kernels (default: all)"
    )
    p.add_argument(
        "--where",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="only configs whose `config` has these values, e.g. default=False (the autotune "
        "members beside each launcher's default) or dtype=bf16",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    where = [tuple(w.split("=", 1)) for w in args.where]
    if any(len(w) != 2 for w in where):
        p.error(f"--where takes KEY=VALUE, got {args.where}")
    records = build_report(
        args.arch, args.scope, args.jobs, progress=not args.no_progress, ops=args.ops, where=where
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(summarize(records))
    if "multi_tenant_generator" in args.ops:
        print(multi_tenant_grids())
    spills = [r for r in records if r["spill_bytes"]]
    if spills:
        print(
            f"{len(spills)} configs spill, e.g. {spills[0]['kernel']} {spills[0]['config']}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
