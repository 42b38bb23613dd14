"""Tenant sweep of the benchmark report (`python -m benchmarks`): the multi-tenant generator at a
fixed batch with 1, 4, 16 and 64 tenants (round robin, so every tenant is present), the fused backend (C++ on CPU, Triton on CUDA)
against the reference's per-tenant loop, forward (under no_grad) and forward+backward.

On CUDA it also times `bmm`: the three forward products of the generator (`U = Z Wd^T`, `P = G Wu^T`
and `Wdp^T = Wp Wd`) as cuBLAS batched matmuls over per-request copies of the weights, gathered
before the timing: the same arithmetic as the fused products with none of the grouping, a yardstick
for the products' share of the fused time.

    python -m benchmarks --tenant-sweep-only --out bench-out     # the sweep alone (CSV, PNG, markdown table)
"""

from __future__ import annotations

import csv
import os

import torch

import iapt_kernels
from iapt_kernels import reference

from .cases import MODES, _runner, kernel_backends, random_mask, tenant_mix
from .timing import time_cpu, time_cuda

TENANTS = (1, 4, 16, 64)
# (B, S, d, r, L): a serving batch on CUDA; on CPU a size that a shared 2-core machine times in minutes.
SHAPE = {"cuda": (64, 256, 4096, 64, 4), "cpu": (64, 128, 1024, 64, 4)}


def _bmm_products(gen, h, tenant_ids):
    """A closure running the generator's forward products as cuBLAS `bmm`s on gathered weights."""
    B, _, d = h.shape
    L, r = gen.num_tokens, gen.bottleneck_size
    ids = tenant_ids.clamp(min=0)
    with torch.no_grad():
        wd = gen.down.weight[ids].contiguous()  # (B, r, d)
        wu = gen.up.weight[ids].contiguous()  # (B, d, r)
        wp = gen.pool.weight[ids].contiguous()  # (B, L, r)
    z = torch.randn(B, L, d, device=h.device, dtype=h.dtype)
    g = torch.randn(B, L, r, device=h.device, dtype=h.dtype)

    def run():
        with torch.no_grad():
            torch.bmm(wp, wd)  # Wdp^T per request
            torch.bmm(z, wd.transpose(1, 2))  # U
            torch.bmm(g, wu.transpose(1, 2))  # P

    return run


def tenant_sweep(
    device: str, tenants=TENANTS, shape=None, dtype=torch.float32, modes=MODES, timer=None, progress=None
) -> list[dict]:
    """Time the sweep; one record per (tenants, mode, implementation) with `ms`, and `x_loop` =
    reference loop time / this time."""
    B, S, d, r, L = shape or SHAPE["cuda" if device == "cuda" else "cpu"]
    timer = timer or (time_cuda if device == "cuda" else time_cpu)
    fused = [b for b in kernel_backends(device) if b != "reference"]
    records = []
    for T in tenants:
        for mode in modes:
            torch.manual_seed(0)
            h = torch.randn(B, S, d, device=device, dtype=dtype)
            mask = random_mask(B, S, device)
            ids = tenant_mix("round_robin", B, T).to(device)
            grad = torch.randn(B, L, d, device=device, dtype=dtype)
            if mode == "fwd+bwd":
                h.requires_grad_()
            ref = reference.MultiTenantPromptGenerator(T, d, r, L).to(device=device, dtype=dtype)
            impls = {"reference loop": ref}
            for backend in fused:
                gen = iapt_kernels.MultiTenantPromptGenerator(T, d, r, L, backend=backend)
                gen.load_state_dict(ref.state_dict())
                impls[backend] = gen.to(device=device, dtype=dtype)
            times = {}
            for name, gen in impls.items():
                gen.requires_grad_(mode == "fwd+bwd")
                times[name] = timer(_runner(gen, (h, mask, ids), mode, grad, gen.parameters()))
                if progress is not None:
                    progress.update(1)
            if device == "cuda" and mode == "fwd":
                times["bmm (forward products)"] = timer(_bmm_products(impls["reference loop"], h, ids))
            for name, ms in times.items():
                records.append(
                    {
                        "tenants": T,
                        "B": B,
                        "S": S,
                        "d": d,
                        "r": r,
                        "L": L,
                        "dtype": str(dtype).replace("torch.", ""),
                        "mode": mode,
                        "impl": name,
                        "ms": ms,
                        "x_loop": times["reference loop"] / ms,
                    }
                )
    return records


def sweep_steps(device: str, tenants=TENANTS, modes=MODES) -> int:
    return len(tenants) * len(modes) * (1 + len([b for b in kernel_backends(device) if b != "reference"]))


def write_sweep(out_dir: str, records: list[dict], header: str = "") -> list[str]:
    """`tenants.csv`, `tenants.png` (time against tenants, one line per implementation and mode) and
    `tenants.md` under `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("tenants.csv", "tenants.md", "tenants.png")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    first = records[0]
    lines = [
        header,
        "",
        f"Tenant sweep, B={first['B']}, S={first['S']}, d={first['d']}, r={first['r']}, "
        f"L={first['L']}, {first['dtype']}, round-robin tenants (ms, median; x = reference loop / this)",
        "",
        "| tenants | mode | impl | ms | x loop |",
        "|---:|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['tenants']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {r['x_loop']:.2f} |" for r in records
    ]
    with open(paths[1], "w") as f:
        f.write("\n".join(lines).lstrip() + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, mode in dict.fromkeys((r["impl"], r["mode"]) for r in records):
        pts = [(r["tenants"], r["ms"]) for r in records if r["impl"] == impl and r["mode"] == mode]
        ax.plot(*zip(*pts), marker="o", linestyle="-" if mode == "fwd" else "--", label=f"{impl}, {mode}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(
        [r["tenants"] for r in records if r["impl"] == "reference loop" and r["mode"] == records[0]["mode"]]
    )
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(f"tenants in a batch of {first['B']}")
    ax.set_ylabel("time (ms)")
    ax.set_title("Multi-tenant generator: time against tenants")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
