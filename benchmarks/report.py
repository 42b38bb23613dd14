"""Writers of a `python -m benchmarks` run: report.md (tables, sentences made from the numbers, plots),
results.json, CSVs and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import json
import os
import textwrap

SHAPE_NAMES = {
    "rational": "numel",
    "attention_pool": "B x S x d x r x L",
    "generator": "B x S x d x r x L",
    "multi_tenant_generator": "T x B x S x d x r x L",
}
FUSED = ("cpp", "triton")
OP_ORDER = ("rational", "attention_pool", "generator", "multi_tenant_generator")
ACCEPTANCE_OPS = ("rational", "generator")
ACCEPTANCE_RATIO = 0.2
TIE = 0.02  # e2e ratios within 2 % are reported as a tie


def _shape(rec) -> str:
    """The shape, and the tenant mix for the multi-tenant op (its cases differ only in that)."""
    mix = rec.get("params", {}).get("mix")
    return "x".join(map(str, rec["shape"])) + (f" ({mix})" if mix else "")


def _size(rec) -> int:
    """Elements of the op's main input (x, or H = B*S*d)."""
    s = rec["shape"]
    if rec["op"] == "rational":
        return s[0]
    if rec["op"] == "multi_tenant_generator":
        return s[1] * s[2] * s[3]
    return s[0] * s[1] * s[2]


def _ops(records):
    present = {r["op"] for r in records}
    return [op for op in OP_ORDER if op in present] + sorted(present - set(OP_ORDER))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_flops(n: float) -> str:
    for unit, div in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} FLOP"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in [head, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables


def format_table(records: list[dict]) -> str:
    """The timing table (also printed by `python -m benchmarks`)."""
    head = [
        "op",
        "shape",
        "dtype",
        "mode",
        "backend",
        "median ms",
        "vs eager ref",
        "vs compiled ref",
        "of copy limit",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r["op"],
                _shape(r),
                r["dtype"],
                r["mode"],
                r["backend"],
                f"{r['median_ms']:.3f}",
                f"{r['speedup_vs_reference']:.2f}x",
                "-" if r.get("speedup_vs_compiled") is None else f"{r['speedup_vs_compiled']:.2f}x",
                f"{r['fraction_of_copy_limit']:.2f}",
            ]
        )
    return markdown_table(head, rows)


def model_table(rows: list[dict]) -> str:
    head = [
        "op",
        "shape",
        "dtype",
        "mode",
        "bytes ref",
        "bytes fused",
        "fused/ref bytes",
        "FLOPs ref",
        "FLOPs fused",
        "launches ref",
        "launches fused",
        "H100 ms ref",
        "H100 ms fused",
        "modelled speedup",
    ]
    out = []
    for r in rows:
        out.append(
            [
                r["op"],
                _shape(r),
                r["dtype"],
                r["mode"],
                _fmt_bytes(r["bytes_reference"]),
                _fmt_bytes(r["bytes_fused"]),
                f"{r['bytes_ratio']:.3f}",
                _fmt_flops(r["flops_reference"]),
                _fmt_flops(r["flops_fused"]),
                str(r["launches_reference"]),
                str(r["launches_fused"]),
                f"{r['h100_ms_reference']:.4f}",
                f"{r['h100_ms_fused']:.4f}",
                f"{r['h100_ms_reference'] / r['h100_ms_fused']:.1f}x",
            ]
        )
    return markdown_table(head, out)


def e2e_table(e2e: dict) -> str:
    head = [
        "method",
        "tenants",
        "prompt tokens",
        "trainable params / tenant",
        "prefill ms",
        "decode tokens/s",
        "generate ms",
        "config",
    ]
    rows = []
    base = e2e.get("base")
    for r in ([base] if base else []) + sorted(e2e["records"], key=lambda r: (r["tenants"], r["method"])):
        rows.append(
            [
                r["method"],
                str(r["tenants"]) if r["method"] != "base" else "-",
                str(r["prompt_tokens"]),
                f"{r['trainable_params_per_tenant']:,}",
                f"{r['prefill_ms']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['generate_ms']:.0f}",
                r.get("config", "frozen backbone, no adapter"),
            ]
        )
    return markdown_table(head, rows)


# --------------------------------------------------------------------------- sentences


def op_sentences(records: list[dict]) -> list[str]:
    """Per op, at its largest measured size: the fused backend against eager and compiled reference."""
    out = []
    for op in _ops(records):
        recs = [r for r in records if r["op"] == op]
        big = max(recs, key=_size)
        for mode in ("fwd", "fwd+bwd"):
            rows = {
                r["backend"]: r
                for r in recs
                if _shape(r) == _shape(big) and r["mode"] == mode and r["dtype"] == big["dtype"]
            }
            fused = next((rows[b] for b in FUSED if b in rows), None)
            if fused is None or "reference" not in rows:
                continue
            s = (
                f"`{op}` {mode} at {_shape(big)} ({big['dtype']}): {fused['backend']} {fused['median_ms']:.2f} ms, "
                f"{_faster(fused['speedup_vs_reference'])} than the eager reference "
                f"({rows['reference']['median_ms']:.2f} ms)"
            )
            if "compiled" in rows:
                s += (
                    f" and {_faster(fused['speedup_vs_compiled'])} than `torch.compile(reference)` "
                    f"({rows['compiled']['median_ms']:.2f} ms)"
                )
            out.append(s + ".")
    return out


def _faster(x: float) -> str:
    return f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"


def _ranges(vals):
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}x to {hi:.2f}x"


def e2e_sentences(e2e: dict) -> list[str]:
    """Which method is faster where, as measured, and by how much (decode and prefill)."""
    by = {(r["method"], r["tenants"]): r for r in e2e["records"]}
    tenants = sorted({t for (_, t) in by})
    both = [t for t in tenants if ("iapt", t) in by and ("lora", t) in by]
    if not both:
        return ["No tenant count has both an IAPT and a LoRA measurement: no comparison."]
    out = []
    for key, name, higher_better, unit in (
        ("tokens_per_s", "decode throughput", True, "tokens/s"),
        ("prefill_ms", "prefill time", False, "ms"),
    ):
        iapt_wins, lora_wins, ties = [], [], []
        for t in both:
            a, b = by[("iapt", t)][key], by[("lora", t)][key]
            ratio = a / b if higher_better else b / a  # > 1: IAPT better
            if abs(ratio - 1) <= TIE:
                ties.append(t)
            else:
                (iapt_wins if ratio > 1 else lora_wins).append((t, ratio))
        parts = []
        if iapt_wins:
            parts.append(
                f"IAPT is faster at {_tlist([t for t, _ in iapt_wins])} tenant(s), by "
                f"{_ranges([r for _, r in iapt_wins])}"
            )
        if lora_wins:
            parts.append(
                f"multi-LoRA is faster at {_tlist([t for t, _ in lora_wins])} tenant(s), by "
                f"{_ranges([1 / r for _, r in lora_wins])}"
            )
        if ties:
            parts.append(f"the two are within {TIE:.0%} of each other at {_tlist(ties)} tenant(s)")
        detail = ", ".join(f"T={t}: {by[('iapt', t)][key]:.1f} vs {by[('lora', t)][key]:.1f}" for t in both)
        out.append(f"**{name.capitalize()}** (IAPT vs LoRA, {unit}; {detail}): " + "; ".join(parts) + ".")
    base = e2e.get("base")
    iapt = [by[("iapt", t)] for t in tenants if ("iapt", t) in by]
    if base and iapt:
        ratios = [r["tokens_per_s"] / base["tokens_per_s"] for r in iapt]
        extra = iapt[0]["prompt_tokens"] - base["prompt_tokens"]
        line = (
            f"The frozen backbone alone decodes at {base['tokens_per_s']:.1f} tokens/s; IAPT's decode steps do the "
            f"backbone's work plus {extra} more cached positions and call no generator, and it measured "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x the backbone's throughput"
        )
        if max(ratios) > 1 + TIE:
            line += (
                f". IAPT cannot really decode faster than the bare backbone, so gaps up to "
                f"{max(abs(x - 1) for x in ratios):.0%} are this run's noise"
            )
        out.append(line + ".")
    return out


def _tlist(ts):
    ts = [str(t) for t in ts]
    return ts[0] if len(ts) == 1 else ", ".join(ts[:-1]) + " and " + ts[-1]


def acceptance_lines(model: list[dict]) -> list[str]:
    """Fused bytes <= 1/5 of the reference's at the default (largest) size, per op, dtype and mode;
    where not, why, from the numbers."""
    out = []
    for op in _ops(model):
        rows = [r for r in model if r["op"] == op]
        big = _shape(max(rows, key=_size))
        for r in rows:
            if _shape(r) != big:
                continue
            ok = r["bytes_ratio"] <= ACCEPTANCE_RATIO
            tag = "target" if op in ACCEPTANCE_OPS else "no target"
            line = (
                f"`{op}` {_shape(r)} {r['dtype']} {r['mode']} ({tag}): fused/reference bytes = "
                f"{r['bytes_ratio']:.3f} ({'at most' if ok else 'above'} 1/5)"
            )
            if not ok and op != "rational":
                unit = r["input_bytes"]
                line += (
                    f". Why: both paths are bound by streaming H ({_fmt_bytes(unit)}). The reference "
                    f"moves {r['bytes_reference'] / unit:.2f} H, the fused path {r['bytes_fused'] / unit:.2f} H. "
                    "The fused path is at the floor for H: an online softmax (running max and sum per "
                    "soft token, as FlashAttention) reads H's instruction rows once forward, and the "
                    "backward, with delta = <Z, gZ> from the saved Z, once more and writes gH once; "
                    "the rest is the (r, d) weights and per-chunk partials. The reference's "
                    "extra traffic is the masked copy of H and the (B, S, r) intermediate, r/d of H"
                    + (", plus the cast of H to fp32" if r["dtype"] in ("bfloat16", "float16") else "")
                    + f": 1/5 would need the reference to move at least {5 * r['bytes_fused'] / unit:.1f} H"
                )
            out.append(line + ".")
    return out


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _size_sweep(rec) -> bool:
    """Records on the size sweep: the multi-tenant op's other tenant mixes (same size) are table-only."""
    return rec.get("params", {}).get("mix", "round_robin") == "round_robin"


def _no_minor_labels(ax) -> None:
    # Log axes spanning less than a decade label their minor ticks, and those labels overlap.
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_speedups(records: list[dict], path: str) -> None:
    plt = _plt()
    ops = _ops(records)
    cols = 2
    rows_n = (len(ops) + 1) // 2
    fig, axes = plt.subplots(rows_n, cols, figsize=(11, 4.2 * rows_n), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        recs = [r for r in records if r["op"] == op and r["backend"] != "reference" and _size_sweep(r)]
        for backend in sorted({r["backend"] for r in recs}):
            for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
                pts = sorted(
                    (_size(r), r["speedup_vs_reference"])
                    for r in recs
                    if r["backend"] == backend and r["mode"] == mode
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{backend} {mode}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _no_minor_labels(ax)
        ax.set_title(
            f"{op}: speedup over eager reference"
            + ("\n(round-robin tenants)" if op.startswith("multi") else ""),
            fontsize=10,
        )
        ax.set_xlabel("input elements (x, or H = B*S*d)")
        ax.set_ylabel("speedup (x, higher is faster)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(ops) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_model(model: list[dict], path: str) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, op in enumerate(_ops(model)):
        for dtype, ls in (("float32", "-"), ("bfloat16", "--")):
            for mode, marker in (("fwd", "o"), ("fwd+bwd", "s")):
                pts = sorted(
                    (_size(r), r["bytes_ratio"], r["h100_ms_reference"] / r["h100_ms_fused"])
                    for r in model
                    if r["op"] == op and r["dtype"] == dtype and r["mode"] == mode and _size_sweep(r)
                )
                if not pts:
                    continue
                kw = dict(color=colors[i % len(colors)], ls=ls, marker=marker, label=f"{op} {dtype} {mode}")
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
                ax2.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
    ax1.axhline(ACCEPTANCE_RATIO, color="red", lw=1, ls=":", label="1/5 target")
    ax1.set_title("Modelled DRAM bytes: fused / reference")
    ax1.set_ylabel("bytes ratio (lower is better)")
    ax2.set_title("Modelled H100 roofline speedup (reference / fused)")
    ax2.set_ylabel("speedup (x, higher is better)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        _no_minor_labels(ax)
        ax.set_xlabel("input elements (x, or H = B*S*d)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=6, ncol=2, title="colour: op, line: dtype, marker: mode", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(e2e: dict, key: str, ylabel: str, title: str, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, style in (("iapt", "-o"), ("lora", "-s")):
        pts = sorted((r["tenants"], r[key]) for r in e2e["records"] if r["method"] == method)
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                label={"iapt": "IAPT (apply_iapt.generate)", "lora": "multi-LoRA (PEFT adapter_names)"}[
                    method
                ],
            )
    if e2e.get("base"):
        ax.axhline(e2e["base"][key], color="grey", ls="--", lw=1, label="frozen backbone, no adapter")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tenants"] for r in e2e["records"]})
    ax.minorticks_off()  # log-scale minor labels overlap the tenant counts
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel(f"number of tenants among the {e2e['setup']['requests']} requests")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- writers


def write_csv(path: str, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (
                        "x".join(map(str, v))
                        if isinstance(v, list)
                        else json.dumps(v)
                        if isinstance(v, dict)
                        else v
                    )
                    for k, v in r.items()
                }
            )


def write_outputs(out_dir: str, result: dict) -> list[str]:
    """Write everything under `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def path(name):
        p = os.path.join(out_dir, name)
        written.append(p)
        return p

    ops, model, e2e = result["ops"], result["model"], result.get("e2e_run")
    with open(path("results.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "e2e_run"}, f, indent=1)
    write_csv(path("results.csv"), ops)
    write_csv(path("model.csv"), model)
    plots = []
    if ops:
        plot_speedups(ops, path("speedup_ops.png"))
        plots.append(
            ("Measured speedup of each op over the eager reference, across sizes", "speedup_ops.png")
        )
    if model:
        plot_model(model, path("model_h100.png"))
        plots.append(("GPU cost model: fused/reference bytes and modelled H100 speedup", "model_h100.png"))
    if e2e and e2e["records"]:
        write_csv(path("e2e.csv"), ([e2e["base"]] if e2e.get("base") else []) + e2e["records"])
        n = e2e["setup"]["requests"]
        smoke = " (quick run: smoke test, not a measurement)" if result.get("quick") else ""
        plot_e2e(
            e2e,
            "tokens_per_s",
            f"decode throughput (tokens/s, all {n} requests)",
            f"Decode throughput vs tenants: IAPT vs multi-LoRA{smoke}",
            path("e2e_decode.png"),
        )
        plot_e2e(
            e2e,
            "prefill_ms",
            f"prefill time (ms, one batch of {n})",
            f"Prefill time vs tenants: IAPT vs multi-LoRA{smoke}",
            path("e2e_prefill.png"),
        )
    with open(path("report.md"), "w") as f:
        f.write(render_markdown(result, e2e))
    return written


def render_markdown(result: dict, e2e: dict | None) -> str:
    ops, model = result["ops"], result["model"]
    L = [
        "# Benchmark report\n",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}  ",
        f"Wall time of the run: {result.get('wall_s', 0):.0f} s\n",
    ]
    quick = bool(result.get("quick"))
    if quick:
        L.append(
            "**Quick run: a smoke test, not a measurement.** It checks that every part of the benchmark runs; "
            "at its tiny sizes and few calls the figures below are fixed overheads and noise. No conclusion "
            "is drawn from them; run `python -m benchmarks` without `--quick` to measure.\n"
        )
    L.append("## Summary\n")
    for s in [] if quick else op_sentences(ops):
        L.append(f"- {s}")
    if e2e and e2e["records"] and not quick:
        L.append(
            f"- End to end, {e2e['setup']['requests']} requests of {e2e['setup']['prompt_len']} prompt tokens "
            f"and {e2e['setup']['new_tokens']} new tokens, greedy, on the tiny Llama "
            "(as measured on this machine):"
        )
        for s in e2e_sentences(e2e):
            L.append(f"  - {s}")
    if model:
        L.append(
            "- GPU cost model, fused/reference bytes at the default (largest) size "
            "(acceptance: at most 1/5 for rational and generator):"
        )
        for s in acceptance_lines(model):
            L.append(f"  - {s}")
    if result.get("notes"):
        for n in result["notes"]:
            L.append(f"- Note: {n}")
    L.append("")
    if ops:
        L.append("## Op timings (measured)\n")
        L.append(
            "Median of repeated runs in one process. `vs eager ref` / `vs compiled ref`: the eager "
            "reference's / `torch.compile(reference)`'s time over this row's. `of copy limit`: the time of "
            "`out.copy_(x)` over the bytes the op must move at least, divided by this row's time "
            "(1.0 = as fast as a memory copy). Shapes: rational `numel`; attention_pool and generator "
            "`B x S x d x r x L`; multi_tenant_generator `T x B x S x d x r x L`; instruction mask ~80 % of "
            "positions.\n"
        )
        L.append(format_table(ops) + "\n")
        L.append("![speedup of each op across sizes](speedup_ops.png)\n")
    if model:
        L.append("## GPU cost model (H100, modelled, not measured)\n")
        L.append(
            "Reference: every aten op it dispatches, counted by a `TorchDispatchMode` "
            "(`benchmarks.cost.CostCounter`): bytes = tensors read + written per op, FLOPs = 2MNK "
            "for mm/bmm/addmm/baddbmm (+ the added term), element count for other computing ops, 0 for "
            "copies; launches = ops that are not views or allocations. Fused: formulas from the "
            "launchers in `iapt_kernels/ops/` (`benchmarks.cost.fused_cost`): DRAM bytes each "
            "kernel and torch op of the launcher reads and writes (tensors re-read by several programs "
            "counted once, L2), their FLOPs and launches. Time = max(bytes / 3.35 TB/s, FLOPs / peak), "
            "peak 67 TFLOP/s for float32 (CUDA cores, no TF32) and 990 TFLOP/s for bfloat16 (dense tensor "
            "cores); launch overhead not included (`h100_launch_ms_*` in the JSON adds 3 us a launch).\n"
        )
        L.append(model_table(model) + "\n")
        L.append("![modelled bytes and H100 speedup](model_h100.png)\n")
    if e2e:
        st = e2e["setup"]
        L.append("## End to end: multi-tenant serving, IAPT vs multi-LoRA (measured)\n")
        L.append(
            f"Model: {st['model']}. {st['requests']} requests, prompts of {st['prompt_len']} random tokens, "
            f"{st['new_tokens']} new tokens, greedy, no EOS; request i belongs to tenant i mod T. "
            f"IAPT: {st['iapt']}, `apply_iapt(model, IAPTConfig(num_tenants=T, ...))` and one "
            f"`generate(..., instruction_mask, tenant_ids)`; the prompt is the {st['prompt_len']} instruction "
            f"tokens plus the L slot tokens. LoRA: PEFT, rank {st['lora_rank']} on "
            f"{'+'.join(st['lora_targets'])}, random nonzero A and B, mixed-batch "
            "`generate(..., adapter_names=...)`. "
            f"Trainable parameters per tenant: IAPT {st['iapt_params_per_tenant']:,}, LoRA "
            f"{st['lora_params_per_tenant']:,} (rank chosen for the closest match). Prefill = the first "
            f"forward of generate; decode tokens/s = requests x (new tokens - 1) over the rest of generate. "
            f"Median of {st['repeats']} runs after a warm-up, {st['threads']} threads.\n"
        )
        if e2e["records"]:
            L.append(e2e_table(e2e) + "\n")
            for s in [] if quick else e2e_sentences(e2e):
                L.append(f"- {s}")
            L.append("")
            L.append("![decode throughput vs tenants](e2e_decode.png)\n")
            L.append("![prefill time vs tenants](e2e_prefill.png)\n")
        for err in e2e.get("errors", []):
            L.append(f"- Not measured: {err['method']} with {err['tenants']} tenant(s): {err['error']}")
        L.append("")
    return "\n".join(L) + "\n"


def load_result(path: str) -> dict:
    """A result dict (as `write_outputs` takes) from a `results.json`, to re-render the report."""
    with open(path) as f:
        result = json.load(f)
    if result.get("e2e_setup"):
        result["e2e_run"] = {
            "records": result.get("e2e", []),
            "base": result.get("e2e_base"),
            "setup": result["e2e_setup"],
            "errors": result.get("e2e_errors", []),
        }
    return result
