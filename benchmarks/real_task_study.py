"""The multi-seed real-task study (issue 20): every method gets the same learning-rate sweep, chosen on
the validation split, then the same seeds; ``python -m benchmarks.real_task_study``.

Phase 1 trains each method at each rate in ``--lrs`` on the first seed and keeps the rate with the lowest
final validation loss (the test split is never looked at for the choice). Phase 2 trains each method at its
chosen rate on the other seeds. Ablations (``--ablations iapt-gelu``) reuse IAPT's chosen rate on every
seed, so they differ from IAPT in one thing only. Each run is one ``python -m benchmarks.real_task``
process (``--no-serving --jobs 1``) writing ``OUT/<method>/lr<rate>/seed<s>/results.json``; a run whose
file exists is not repeated, so the study resumes where it stopped. Arguments after ``--`` go to every
run unchanged (the data set, ``--steps``, ``--quick``, ...). ``OUT/study.md`` and ``OUT/study.json`` get
the table: test accuracy mean, sample standard deviation and range over seeds, parameters, CPU seconds
of training, peak memory, and each run's step-0 validation loss against the frozen model's.

A run costs about 4 CPU-minutes on SmolLM2-135M and BBC News (one thread): a 3-seed, 3-rate study of
IAPT, LoRA and the gelu ablation is 13 runs, about 30 minutes wall with ``--jobs 2`` on 2 idle cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LR_FLAG = {"iapt": "--lr-iapt", "iapt-gelu": "--lr-iapt", "lora": "--lr-lora", "prompt": "--lr-prompt"}


def _run_dir(out: Path, method: str, lr: float, seed: int) -> Path:
    return out / method / f"lr{lr:g}" / f"seed{seed}"


def _run(out: Path, method: str, lr: float, seed: int, extra: list[str], log) -> dict:
    """One training run (or its saved result); returns its method record plus the run's setup."""
    d = _run_dir(out, method, lr, seed)
    res = d / "results.json"
    if not res.is_file():
        cmd = [sys.executable, "-m", "benchmarks.real_task", "--methods", method, LR_FLAG[method], f"{lr:g}"]
        cmd += ["--seed", str(seed), "--no-serving", "--jobs", "1", "--no-progress", "--skip-sanity"]
        cmd += ["--out", str(d), *extra]
        d.mkdir(parents=True, exist_ok=True)
        log(f"start {method} lr={lr:g} seed={seed}")
        t0 = time.perf_counter()
        with open(d / "log.txt", "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0 or not res.is_file():
            raise RuntimeError(f"{method} lr={lr:g} seed={seed} failed (exit {rc}): see {d / 'log.txt'}")
        log(f"done  {method} lr={lr:g} seed={seed} in {time.perf_counter() - t0:.0f} s")
    r = json.loads(res.read_text())
    (rec,) = r["methods"]
    if "error" in rec:
        raise RuntimeError(f"{method} lr={lr:g} seed={seed}: {rec['error']}")
    return {**rec, "seed": seed, "frozen_val_loss": r["setup"]["frozen_val_loss"], "setup": r["setup"]}


def _final_val(rec: dict) -> float:
    return rec["val"][-1][1] if rec["val"] else float("inf")


def _summary(recs: list[dict]) -> dict:
    acc = [100 * r["accuracy"] for r in recs]
    return {
        "seeds": [r["seed"] for r in recs],
        "accuracy": acc,
        "mean": statistics.fmean(acc),
        "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "min": min(acc),
        "max": max(acc),
        "params": recs[0]["trainable_params"],
        "train_cpu_s": statistics.fmean(r["train_cpu_s"] for r in recs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in recs),
        "step0_vs_frozen": [r["val"][0][1] / r["frozen_val_loss"] - 1 for r in recs if r["val"]],
        "final_val": [_final_val(r) for r in recs],
    }


def run_study(args, log=print) -> dict:
    out = Path(args.out)
    extra = args.extra
    seeds, lrs = args.seeds, args.lrs
    jobs = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    sweep = {(m, lr): jobs.submit(_run, out, m, lr, seeds[0], extra, log) for m in args.methods for lr in lrs}
    chosen, table = {}, {}
    for m in args.methods:
        vals = {lr: sweep[(m, lr)].result() for lr in lrs}
        chosen[m] = min(lrs, key=lambda lr: _final_val(vals[lr]))
        table[m] = {"sweep": {f"{lr:g}": _final_val(v) for lr, v in vals.items()}}
        log(f"{m}: validation loss by rate {table[m]['sweep']} -> lr {chosen[m]:g}")
    for a in args.ablations:
        chosen[a] = chosen.get("iapt", lrs[0])
    runs = {
        (m, s): jobs.submit(_run, out, m, chosen[m], s, extra, log)
        for m in [*args.methods, *args.ablations]
        for s in seeds
        if not (m in args.methods and s == seeds[0])
    }
    for m in [*args.methods, *args.ablations]:
        recs = [
            sweep[(m, chosen[m])].result() if (m, s) not in runs else runs[(m, s)].result() for s in seeds
        ]
        table.setdefault(m, {}).update(lr=chosen[m], **_summary(recs))
    jobs.shutdown()
    study = {
        "setup": {
            "seeds": seeds,
            "lrs": lrs,
            "extra": extra,
            "chosen_on": "final validation loss, first seed",
        },
        "methods": table,
    }
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(report(study))
    return study


def report(study: dict) -> str:
    s = study["setup"]
    lines = [
        f"Seeds {s['seeds']}; rates {s['lrs']} swept on seed {s['seeds'][0]}, chosen by {s['chosen_on']}; "
        f"run arguments {' '.join(s['extra']) or '(defaults)'}.",
        "",
        "| method | lr | params | test acc. mean ± sd (min-max) | per seed | step 0 vs frozen | final val. loss | train CPU s | peak RSS MiB |",
        "|---|---:|---:|---|---|---|---|---:|---:|",
    ]
    for m, t in study["methods"].items():
        lines.append(
            f"| {m} | {t['lr']:g} | {t['params']:,} | **{t['mean']:.1f} ± {t['std']:.1f}** ({t['min']:.1f}-{t['max']:.1f}) "
            f"| {' / '.join(f'{a:.1f}' for a in t['accuracy'])} "
            f"| {' / '.join(f'{100 * v:+.1f}%' for v in t['step0_vs_frozen'])} "
            f"| {' / '.join(f'{v:.3f}' for v in t['final_val'])} | {t['train_cpu_s']:.0f} | {t['peak_rss_mib']:.0f} |"
        )
    lines += ["", "Learning-rate sweep (final validation loss, first seed):", ""]
    for m, t in study["methods"].items():
        if "sweep" in t:
            lines.append(f"- {m}: " + ", ".join(f"{lr}: {v:.3f}" for lr, v in t["sweep"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.real_task_study", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--methods", default="iapt,lora", help="methods whose rate is swept (default %(default)s)")
    p.add_argument("--ablations", default="iapt-gelu", help="methods run at IAPT's chosen rate ('' for none)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="the rates every swept method tries")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    p.add_argument("--out", default="real-task-study")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.ablations = [m for m in args.ablations.split(",") if m]
    for m in args.methods + args.ablations:
        if m not in LR_FLAG:
            p.error(f"unknown method {m!r}; choose from {', '.join(LR_FLAG)}")
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    args.lrs = [float(x) for x in args.lrs.split(",") if x]
    if not args.seeds or not args.lrs or args.jobs < 1:
        p.error("--seeds and --lrs need at least one value, --jobs >= 1")
    args.extra = extra
    study = run_study(args)
    print(report(study))
    print(f"wrote study.json, study.md to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
