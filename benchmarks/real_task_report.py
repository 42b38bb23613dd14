"""The real task's outputs (`python -m benchmarks.real_task`, `real_task.py`): the Markdown tables and report, the loss
plot, and the atomic write that leaves the previous results (or nothing), never a half-written file.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from pathlib import Path


# ----------------------------------------------------------------------------- outputs
def _majority(train_rows, test_rows) -> dict:
    counts = collections.Counter(r[2] for r in train_rows)
    label = counts.most_common(1)[0][0]
    return {"label": label, "accuracy": sum(r[2] == label for r in test_rows) / len(test_rows)}


def _table(results: dict) -> str:
    maj = results["majority"]["accuracy"]
    lines = [
        "| method | trainable params | test accuracy | vs majority | train loss first -> last (mean of min(10, steps/4)) "
        "| val loss start -> end | step 0 vs frozen | train wall / CPU (s) | test wall / CPU (s) "
        "| peak RSS (MiB) |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    frozen = results["setup"].get("frozen_val_loss")
    for r in results["methods"]:
        if "error" in r:
            lines.append(f"| {r['method']} | | failed: {r['error']} | | | | | | | |")
            continue
        ls, k = r["losses"], max(1, min(10, len(r["losses"]) // 4))
        fl = f"{sum(ls[:k]) / k:.3f} -> {sum(ls[-k:]) / k:.3f}" if ls else "-"
        vl = f"{r['val'][0][1]:.3f} -> {r['val'][-1][1]:.3f}" if r.get("val") else "-"
        v0 = f"{100 * (r['val'][0][1] / frozen - 1):+.1f}%" if r.get("val") and frozen else "-"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['accuracy']:.1f}% "
            f"({r['correct']}/{r['n']}) | {100 * (r['accuracy'] - maj):+.1f} pts | {fl} | {vl} | {v0} | "
            f"{r['train_s']:.0f} / {r.get('train_cpu_s', 0.0):.0f} | {r['eval_s']:.0f} / "
            f"{r.get('eval_cpu_s', 0.0):.0f} | {r['peak_rss_mib']:.0f} |"
        )
    lines.append(f"| majority class ({results['majority']['label']}) | 0 | {100 * maj:.1f}% | | | | | | | |")
    return "\n".join(lines)


def _serving_table(s: dict) -> str:
    lines = [
        "| method | tenants | params / tenant | prefill (ms) | decode (tokens/s) | generate (ms) | repeats |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s["records"]:
        lines.append(
            f"| {r['method']} | {r['tenants']} | {r['trainable_params_per_tenant']:,} | "
            f"{r['prefill_ms']:.0f} | {r['tokens_per_s']:.1f} | {r['generate_ms']:.0f} | {r['repeats']} |"
        )
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results["methods"]:
        ls = r.get("losses") or []
        if not ls:
            continue
        k = max(1, min(10, len(ls) // 5))
        smooth = [
            sum(ls[max(0, i - k + 1) : i + 1]) / len(ls[max(0, i - k + 1) : i + 1]) for i in range(len(ls))
        ]
        (line,) = ax.plot(
            range(1, len(ls) + 1), smooth, label=f"{r['method']} ({r['trainable_params']:,} params)"
        )
        if r.get("val"):
            ax.plot(
                [s for s, _ in r["val"]], [v for _, v in r["val"]], "o--", color=line.get_color(), alpha=0.6
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the response tokens")
    ax.set_yscale("log")
    ax.set_title(
        f"{results['setup']['model']}\ntrain loss (running mean of {k} steps), validation loss (dots)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _write_atomic(out_dir: Path, files: dict) -> None:
    """Write every file to a temporary name first, then rename each into place: an error while
    producing outputs leaves the previous results (or nothing), never a half-written file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for name, writer in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
            os.close(fd)
            writer(Path(tmp))
            staged.append((tmp, out_dir / name))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for tmp, dst in staged:
        os.replace(tmp, dst)


def _report(results: dict) -> str:
    s = results["setup"]
    lines = [
        f"# Real-task comparison: {s['data']}",
        "",
        f"Model: {s['model']}. Labels: {', '.join(s['labels'])}. Split: {s['n_train']} train / {s['n_val']} "
        f"validation / {s['n_test']} test (seed {s['seed']}).",
        f"Training: {s['steps']} steps x batch {s['batch_size']}, AdamW; learning rates {s['lrs']}. "
        f"IAPT: L={s['num_tokens']}, r={s['bottleneck']}; LoRA rank {s['lora_rank']} on "
        f"{'+'.join(s['lora_targets'])}; prompt tuning {s['prompt_tokens']} virtual tokens. IAPT recipe: "
        f"{s.get('iapt_recipe')}.",
        "The frozen model's validation loss (no slots): "
        + (f"{s['frozen_val_loss']:.3f}" if s.get("frozen_val_loss") is not None else "not measured")
        + "; 'step 0 vs frozen' is each method's validation loss before training against it.",
        f"Machine: {s['machine']}. Wall time {results['wall_s'] / 60:.1f} min (load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in results.get('load_avg_end') or ())}). CPU seconds count every "
        "thread: divided by the thread count they estimate the wall time on an idle machine.",
        "",
        _table(results),
        "",
    ]
    if results.get("serving"):
        sv = results["serving"]
        lines += [
            f"Serving ({sv['requests']} requests of {sv['prompt_len']} random tokens, {sv['tenants']} tenants, "
            f"{sv['new_tokens']} new tokens, greedy, {sv['threads']} threads):",
            "",
            _serving_table(sv),
            "",
        ]
    for r in results["methods"]:
        if "predictions" in r:
            lines.append(
                f"- {r['method']} predictions: " + ", ".join(f"{p} x{n}" for p, n in r["predictions"])
            )
    return "\n".join(lines) + "\n"
