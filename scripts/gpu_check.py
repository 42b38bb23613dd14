"""Where the package stands on this machine's GPU, in one run: the timing, training and serving steps
of `scripts/gpu_check.sh` (which installs the package and runs the CUDA tests first).

    python scripts/gpu_check.py --out DIR [--smoke] [--budget-s 60] [--tests-rc N --tests-log F]

Steps (each a named check; the run fails if any check fails, and says which):

* ``timing``: every op at the benchmark's default shape (bf16 and fp32) and attention_pool/generator
  at B=1, S=4096, d=4096 (bf16), forward and forward+backward, timed with ``triton.testing.do_bench``:
  the fused kernels against the eager reference and ``torch.compile(reference)``, and the fraction of
  the measured device-to-device copy bandwidth each reaches for the bytes the op must move at least.
  A figure, not a pass/fail check (the kernels' own acceptance bounds live in their issues).
* ``train-fp32`` / ``train-bf16``: IAPT on a tiny random Llama (fp32, or a bf16 backbone with fp32
  generators) for 30 AdamW steps, fused backend against the reference backend from the same seed and
  batches; the loss at every step must agree (relative: fp32 1e-5 on the first step and 1e-4 on any;
  bf16 2e-3 and 2e-2).
* ``generate``: a 3-tenant greedy ``generate`` equals each request generated alone, and a tenant -1
  request equals the bare backbone's ``generate`` on its instruction (no slot tokens).

``--smoke`` runs every step on CPU with tiny shapes (the Triton interpreter, CPU wall-clock timing),
so CI keeps the script alive; its figures mean nothing. Writes ``results.json`` and ``report.md``
into ``--out``; the shell script adds ``log.txt`` and ``pytest.txt``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

TRAIN_STEPS = 30
# (first step, any step), relative. bf16: the backbone is bf16 and the generators fp32 (as one trains
# an adapter); a last-bit fp32 difference flips a bf16 rounding of the prompts now and then, and the
# flip carries through the run (tests/test_convergence.py measures 2e-4 over 32 steps on CPU).
TRAIN_TOL = {"float32": (1e-5, 1e-4), "bfloat16": (2e-3, 2e-2)}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes: exercise every step")
    p.add_argument(
        "--budget-s",
        type=float,
        default=60.0,  # tests about 170 s (estimated, README), this and the rest: inside 6 minutes
        help="seconds for the timing step; baselines left when it runs out are reported skipped",
    )
    p.add_argument(
        "--tests-rc", type=int, default=None, help="exit status of the CUDA test run (from the .sh)"
    )
    p.add_argument("--tests-log", default=None, help="its output (from the .sh), summarised in the report")
    p.add_argument(
        "--install-rc", type=int, default=None, help="exit status of the install step (from the .sh)"
    )
    p.add_argument(
        "--install-s", type=float, default=None, help="seconds the install step took (from the .sh)"
    )
    p.add_argument("--tests-s", type=float, default=None, help="seconds the test step took (from the .sh)")
    return p.parse_args(argv)


class BackendLog:
    """Inside `with`, counts the backend every public call resolves to (`_backend.resolve_backend`,
    the one seam every op goes through), so each figure says which code produced it: under --smoke
    `"triton"` is the interpreter running the same kernels a GPU compiles."""

    def __init__(self):
        self.counts = collections.Counter()

    def __enter__(self):
        from iapt_kernels import _backend

        self._mod, self._resolve = _backend, _backend.resolve_backend

        def resolve(backend, device):
            which = self._resolve(backend, device)
            self.counts[which] += 1
            return which

        _backend.resolve_backend = resolve
        return self

    def __exit__(self, *exc):
        self._mod.resolve_backend = self._resolve

    def only(self, backend):
        """True when every call ran on `backend`, and at least one did."""
        return set(self.counts) == {backend}


# --------------------------------------------------------------------------- timing


def _timer(device):
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def once_warm(fn):  # smoke: the interpreter's times mean nothing, so one warm-up and one timed call
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return once_warm


def copy_bandwidth(device, timer, nbytes):
    """Bytes/s of `dst.copy_(src)` over `nbytes`, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def floor_bytes(case) -> float:
    """The bytes `case` must move at least: rational reads x and writes y (and backward reads g, x and
    writes dx); the pools read H's instruction rows (fraction f) once per direction and backward
    writes gH whole (zeros at padding); weights and the (B, L, *) tensors are next to nothing."""
    p, s = case.params, torch.empty((), dtype=case.dtype).element_size()
    if case.op == "rational":
        return p["numel"] * s * (2 if case.mode == "fwd" else 5)
    h = p["B"] * p["S"] * p["d"] * s
    f = p.get("mask_fraction", 1.0)
    return f * h if case.mode == "fwd" else 2 * f * h + h


def timing_cases(device, smoke):
    """(label, cases) groups: the default shapes in bf16 and fp32, and one large pool shape in bf16."""
    # The benchmark cases live in the checkout's top-level benchmarks/, which no wheel installs; run as
    # `python scripts/gpu_check.py`, this script sees scripts/ on sys.path, not the checkout.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import cases as bc

    if smoke:
        triton = ["triton"]  # the interpreter, so the Triton launch path is what the smoke run times
        return [
            (
                "smoke",
                bc.rational_cases(device, sizes=(256,), backends=triton, compiled=True)
                + bc.generator_cases(device, shapes=((2, 8, 16, 8, 4),), backends=triton, compiled=False)
                + bc.multi_tenant_cases(
                    device, shapes=((3, 3, 8, 16, 8, 4),), backends=triton, compiled=False
                ),
            )
        ]
    groups = []
    for dtype in (torch.bfloat16, torch.float32):
        groups.append(
            (
                f"default {dtype}".replace("torch.", ""),
                bc.rational_cases(device, sizes=(bc.RATIONAL_SIZES[-1],), dtypes=(dtype,))
                + bc.generator_cases(device, shapes=(bc.GENERATOR_SHAPES[-1],), dtypes=(dtype,))
                + bc.multi_tenant_cases(device, shapes=(bc.MULTI_TENANT_SHAPES[-1],), dtypes=(dtype,)),
            )
        )
    groups.append(
        (
            "large bfloat16",
            bc.generator_cases(device, shapes=((1, 4096, 4096, 256, 4),), dtypes=(torch.bfloat16,)),
        )
    )
    return groups


def run_timing(device, smoke, budget_s, log):
    timer = _timer(device)
    bandwidth = copy_bandwidth(device, timer, (1 << 20) if smoke else (1 << 30))
    log(f"timing: device copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    deadline = time.monotonic() + budget_s
    rows = []
    for group, cases in timing_cases(device, smoke):
        for case in cases:
            if case.op == "multi_tenant_generator" and case.params.get("mix") != "round_robin":
                continue
            floor_ms = floor_bytes(case) / bandwidth * 1e3
            row = {
                "group": group,
                "case": case.label,
                "floor_bytes": floor_bytes(case),
                "floor_ms": floor_ms,
                "ms": {},
                "skipped": [],
            }
            for name, fn in case.impls.items():
                if name == "compiled" and time.monotonic() > deadline:
                    row["skipped"].append(name)  # compiling is what costs: drop it first
                    continue
                try:
                    with BackendLog() as used:
                        row["ms"][name] = timer(fn)
                    row.setdefault("backends", {})[name] = dict(used.counts)
                    if name == "triton" and not used.only("triton"):
                        raise RuntimeError(f"the fused case ran on {dict(used.counts)}, not on triton")
                except Exception as exc:  # noqa: BLE001 - reported, and fails the check below
                    row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            fused = [n for n in row["ms"] if n in ("triton", "cpp")]
            if fused:
                ms = row["ms"][fused[0]]
                row["fused"] = fused[0]
                row["fraction_of_copy_bandwidth"] = floor_ms / ms
                for base in ("reference", "compiled"):
                    if base in row["ms"]:
                        row[f"speedup_vs_{base}"] = row["ms"][base] / ms
            log(f"timing: {case.label}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()))
            rows.append(row)
    errors = [f"{r['case']} {n}" for r in rows for n in r.get("errors", {})]
    return {
        "ok": not errors,
        "detail": "errors in " + ", ".join(errors) if errors else "timed",
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
    }


# --------------------------------------------------------------------------- training


def _batches(steps, batch_size, seed):
    import random

    from iapt_kernels.integrations.slots import insert_prompt_slots
    from iapt_kernels.testing import SyntheticTask

    task, rng = SyntheticTask(), random.Random(seed)
    out = []
    for _ in range(steps):
        pairs = [task.sample(rng) for _ in range(batch_size)]
        out.append(
            insert_prompt_slots(
                [p[0] for p in pairs],
                [p[1] for p in pairs],
                num_tokens=4,
                pad_token_id=task.PAD,
                slot_token_id=task.SLOT,
            )
        )
    return out


def train_losses(backend, dtype, device, steps, batches, used=None):
    import iapt_kernels as ik
    from iapt_kernels.testing import SyntheticTask, tiny_llama

    # HF's init (std 0.02), as tests/test_convergence.py: the demo's 0.2 is chaotic under AdamW.
    model = tiny_llama(SyntheticTask.vocab_size, seed=0, initializer_range=0.02).to(
        device=device, dtype=dtype
    )
    torch.manual_seed(1)
    # Ungated (gate_init=None), as before the gate: the kernels' parity from the first step on.
    w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=4, bottleneck_size=32, backend=backend, gate_init=None))
    w.to(device)  # the generators stay fp32
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    with used if used is not None else BackendLog():
        for batch in batches[:steps]:
            batch = {k: v.to(device) for k, v in batch.items()}
            opt.zero_grad(set_to_none=True)
            loss = w(**batch).loss
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def run_train(dtype, device, smoke, fused):
    steps = 3 if smoke else TRAIN_STEPS
    batches = _batches(steps, 4 if smoke else 16, seed=0)
    fused_used, ref_used = BackendLog(), BackendLog()
    got = train_losses(fused, dtype, device, steps, batches, fused_used)
    want = train_losses("reference", dtype, device, steps, batches, ref_used)
    rel = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    first_tol, any_tol = TRAIN_TOL[str(dtype).replace("torch.", "")]
    finite = all(math.isfinite(x) for x in got + want)
    ran = fused_used.only(fused) and ref_used.only("reference")
    ok = finite and ran and rel[0] <= first_tol and max(rel) <= any_tol
    return {
        "ok": ok,
        "detail": f"max relative loss difference {max(rel):.2e} over {steps} steps "
        f"(first {rel[0]:.2e}; limits {first_tol:g} / {any_tol:g})"
        + (
            ""
            if ran
            else f"; expected {fused} vs reference, ran {dict(fused_used.counts)} vs {dict(ref_used.counts)}"
        ),
        "fused_backend": fused,
        "backends": dict(fused_used.counts),
        "reference_backends": dict(ref_used.counts),
        "losses_fused": got,
        "losses_reference": want,
    }


# --------------------------------------------------------------------------- serving


def run_generate(device, smoke, fused):
    import iapt_kernels as ik
    from iapt_kernels.testing import SyntheticTask, tiny_llama

    task = SyntheticTask()
    model = tiny_llama(task.vocab_size, seed=0).to(device).eval()
    model.generation_config.eos_token_id = None  # fixed length: compare token for token
    model.generation_config.pad_token_id = task.PAD
    torch.manual_seed(2)
    w = ik.apply_iapt(  # ungated: the default gate at 0 would write zero prompts for every tenant
        model, ik.IAPTConfig(num_tokens=4, bottleneck_size=32, num_tenants=3, backend=fused, gate_init=None)
    )
    w.to(device)
    with torch.no_grad():  # nonzero up-projections so every tenant visibly changes the output
        for g in w.generators:
            for name, p in g.named_parameters():
                if name.endswith("up.weight"):
                    p.normal_(0.0, 0.5)
    instr = [[1, 4, 7, 8, 9], [1, 5, 10, 11], [1, 4, 12, 13, 14, 6]]
    tenants = torch.tensor([2, -1, 0], device=device)
    n = 4 if smoke else 8
    kw = dict(num_tokens=4, pad_token_id=task.PAD, slot_token_id=task.SLOT, padding_side="left")
    batch = {k: v.to(device) for k, v in ik.insert_prompt_slots(instr, **kw).items()}
    used = BackendLog()
    with used:
        out = w.generate(**batch, tenant_ids=tenants, max_new_tokens=n, do_sample=False)
    S = batch["input_ids"].shape[1]
    problems = [] if used.only(fused) else [f"expected {fused}, ran {dict(used.counts)}"]
    for i in range(len(instr)):
        one = {k: v.to(device) for k, v in ik.insert_prompt_slots([instr[i]], **kw).items()}
        with used:
            alone = w.generate(**one, tenant_ids=tenants[i : i + 1], max_new_tokens=n, do_sample=False)
        if not torch.equal(out[i, S:], alone[0, one["input_ids"].shape[1] :]):
            problems.append(f"request {i} (tenant {int(tenants[i])}): batched != alone")
        if int(tenants[i]) < 0:  # no adapter: the base model on the bare instruction, no slot tokens
            ids = torch.tensor([instr[i]], device=device)
            bare = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
            )
            if not torch.equal(out[i, S:], bare[0, ids.shape[1] :]):
                problems.append(f"request {i}: tenant -1 != the bare backbone on its instruction")
    return {
        "ok": not problems,
        "detail": "; ".join(problems) or f"{len(instr)} requests, {n} tokens each: equal",
        "backends": dict(used.counts),
    }


# --------------------------------------------------------------------------- report


def _environment(device):
    import numpy
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"no GPU (CPU {platform.machine()}, Triton interpreter)",
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    import iapt_kernels

    env["backends"] = iapt_kernels.available_backends()
    return env


def _tests_summary(path):
    if not path or not os.path.exists(path):
        return None
    lines = [ln.strip() for ln in open(path, errors="replace") if ln.strip()]
    return lines[-1] if lines else None


def write_report(out, results):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    env, checks = results["environment"], results["checks"]
    lines = [
        f"# GPU check{' (smoke: CPU, interpreter, tiny shapes; figures mean nothing)' if results['smoke'] else ''}",
        "",
        f"{results['date']}, {env['device']}; Python {env['python']}, torch {env['torch']}, "
        f"triton {env['triton']}, transformers {env['transformers']}, numpy {env['numpy']}; "
        f"backends available {env['backends']}.",
        "",
        "`backend`: what the step's fused calls resolved to (calls counted at `_backend.resolve_backend`); "
        "train steps compare it with the reference backend.",
        "",
        "| check | result | seconds | backend | detail |",
        "|---|---|---:|---|---|",
    ]

    def backends(c):
        used = c.get("backends")
        if used is None and c.get("rows"):  # timing: the fused member of every row
            used = collections.Counter()
            for r in c["rows"]:
                used.update(r.get("backends", {}).get(r.get("fused"), {}))
        return ", ".join(f"{k} x{v}" for k, v in sorted(used.items())) if used else "–"

    lines += [
        f"| {name} | {'pass' if c['ok'] else '**FAIL**'} | {c.get('seconds', '–')} | {backends(c)} | {c['detail']} |"
        for name, c in checks.items()
    ]
    timing = checks.get("timing", {})
    if timing.get("rows"):
        bw = timing["copy_bandwidth_bytes_per_s"]
        lines += [
            "",
            f"Measured device copy bandwidth: {bw / 1e9:.1f} GB/s (read + write of a 1 GiB buffer). "
            "`floor` is the time to move the op's minimum bytes at that bandwidth; `% of copy bw` is "
            "floor / fused time.",
            "",
            "| shape group | case | fused ms | reference ms | compiled ms | floor ms | % of copy bw | vs ref | vs compiled |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in timing["rows"]:
            ms = r["ms"]
            fused = ms.get(r.get("fused"), float("nan"))
            cell = lambda v, fmt="{:.3f}": "–" if v is None else fmt.format(v)  # noqa: E731
            lines.append(
                f"| {r['group']} | `{r['case']}` | {cell(fused)} | {cell(ms.get('reference'))} | "
                f"{cell(ms.get('compiled'))} | {r['floor_ms']:.3f} | "
                f"{cell(r.get('fraction_of_copy_bandwidth'), '{:.0%}')} | "
                f"{cell(r.get('speedup_vs_reference'), '{:.1f}x')} | "
                f"{cell(r.get('speedup_vs_compiled'), '{:.2f}x')} |"
            )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = _parse(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke on a CPU machine)", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparisons assume exact fp32 products
        torch.backends.cudnn.allow_tf32 = False
    fused = "triton"

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "smoke": args.smoke,
        "environment": _environment(device),
        "checks": {},
    }
    checks = results["checks"]
    if args.install_rc is not None:
        checks["install"] = {
            "ok": args.install_rc == 0,
            "detail": "smoke: imports from this tree" if args.smoke else f"pip exit status {args.install_rc}",
            "seconds": args.install_s,
        }
    if args.tests_rc is not None:
        checks["tests"] = {
            "ok": args.tests_rc == 0,
            "detail": f"pytest exit status {args.tests_rc}: {_tests_summary(args.tests_log)}",
            "seconds": args.tests_s,
        }
    steps = [
        ("timing", lambda: run_timing(device, args.smoke, args.budget_s, log)),
        ("train-fp32", lambda: run_train(torch.float32, device, args.smoke, fused)),
        ("train-bf16", lambda: run_train(torch.bfloat16, device, args.smoke, fused)),
        ("generate", lambda: run_generate(device, args.smoke, fused)),
    ]
    # --smoke: the Triton launchers become the iapt:: ops' CPU kernels (the interpreter test route).
    route = contextlib.nullcontext()
    if args.smoke:
        from iapt_kernels.library import triton_on_cpu

        route = triton_on_cpu()
    with route:
        for name, step in steps:
            t0 = time.monotonic()
            log(f"{name}: start")
            try:
                checks[name] = step()
            except Exception as exc:  # noqa: BLE001 - a failed step is a failed check, and the rest still run
                traceback.print_exc()
                checks[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}".replace("|", "/")[:300]}
            checks[name]["seconds"] = round(time.monotonic() - t0, 1)
            log(f"{name}: {'pass' if checks[name]['ok'] else 'FAIL'} ({checks[name]['detail']})")
    write_report(args.out, results)
    failed = [name for name, c in checks.items() if not c["ok"]]
    log(f"report: {os.path.join(args.out, 'report.md')}")
    if failed:
        log("FAILED: " + ", ".join(failed))
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
