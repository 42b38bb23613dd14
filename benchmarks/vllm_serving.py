"""IAPT vs vLLM's own multi-LoRA vs the bare backbone, served by one vLLM engine each (issue 19).

    .venv-vllm/bin/python -m benchmarks.vllm_serving --out bench-out/vllm      # from the repository root

Same engine settings for all three (fp32, eager, chunked prefill and prefix caching off, which IAPT
needs; ``max_num_seqs`` = the concurrency), same backbone, same prompts. Each tenant's adapter has the
same number of trainable parameters: LoRA rank ``k`` on ``q_proj`` and ``v_proj`` (PEFT's default for
Llama), IAPT's bottleneck ``r`` chosen to match it. One engine per system serves 16 tenants; a workload
of ``N`` tenants (1, 4, 16) spreads its requests over the first ``N``. Every request has an adapter: a
request without one, batched with adapter requests while every ``max_loras`` slot is taken, gets the
last slot's LoRA on vLLM 0.32's CPU LoRA ops (``lora_ops.py`` indexes the stacked weights with -1), so
the bare backbone is measured on its own engine instead.

Per run (``--requests`` prompts at concurrency ``--concurrency``: the engine admits that many and refills
as they finish, a closed loop): per-request decode rate ``(n - 1) / (last - first token)`` (median),
output tokens/s and requests/s of the whole run, and time to first token from scheduling
(median). Medians over ``--repeats`` runs, all in one process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

TENANTS = (1, 4, 16)


def tiny_llama(path):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def lora_params(cfg, rank: int) -> int:
    d = cfg.hidden_size
    kv = cfg.num_key_value_heads * getattr(cfg, "head_dim", d // cfg.num_attention_heads)
    return cfg.num_hidden_layers * rank * ((d + d) + (d + kv))


def iapt_params(cfg, r: int, L: int = 4, degrees=(5, 4)) -> int:
    d = cfg.hidden_size
    return cfg.num_hidden_layers * (r * d + r + L * r + sum(degrees) + 1 + d * r + d + 1)  # + the gate


def make_adapters(model_dir, root, rank, n):
    """``n`` LoRA adapters (PEFT) and ``n`` IAPT adapters (save_iapt) with matched parameter counts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import iapt_kernels as ik

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = base.config
    target = lora_params(cfg, rank)
    r = min(range(1, 4 * rank + 64), key=lambda r: abs(iapt_params(cfg, r) - target))
    loras = []
    for t in range(n):
        torch.manual_seed(100 + t)
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        )
        with torch.no_grad():  # nonzero B, as after training
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        peft.save_pretrained(os.path.join(root, f"lora{t}"))
        loras.append(os.path.join(root, f"lora{t}"))
    torch.manual_seed(7)
    w = ik.apply_iapt(base, ik.IAPTConfig(num_tokens=4, bottleneck_size=r, num_tenants=n))
    iapts = {}
    for t in range(n):
        ik.save_iapt(w, os.path.join(root, f"iapt{t}"), tenant=t)
        iapts[f"t{t}"] = os.path.join(root, f"iapt{t}")
    return loras, iapts, {"lora_rank": rank, "iapt_r": r, "lora": target, "iapt": iapt_params(cfg, r)}


def params_len(params):
    return (params[0] if isinstance(params, list) else params).max_tokens


def run(llm, prompts, params, lora_requests=None):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == params_len(params) for o in outs)
    wall = time.perf_counter() - t0
    decode, ttft, ntok = [], [], 0
    for o in outs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        ntok += n
        if m is not None and n > 1 and m.last_token_ts > m.first_token_ts:
            decode.append((n - 1) / (m.last_token_ts - m.first_token_ts))
        if m is not None and m.first_token_ts and m.scheduled_ts:
            ttft.append(m.first_token_ts - m.scheduled_ts)
    return {
        "decode_tok_s": statistics.median(decode),
        "output_tok_s": ntok / wall,
        "req_s": len(outs) / wall,
        "ttft_ms": 1000 * statistics.median(ttft),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out/vllm")
    p.add_argument("--backbones", nargs="+", default=["tiny", "smollm2"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=8)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from iapt_kernels.integrations.vllm import IAPTPrompts, engine_args

    results = {"args": vars(a), "load_before": os.getloadavg(), "rows": [], "params": {}}
    for backbone in a.backbones:
        root = os.path.join(a.out, backbone)
        os.makedirs(root, exist_ok=True)
        if backbone == "tiny":
            model_dir = tiny_llama(os.path.join(root, "model"))
        else:
            from benchmarks.real_task_data import load_smollm2

            model_dir = load_smollm2(
                cache_dir=os.path.join(os.path.expanduser("~"), ".cache", "iapt_kernels", "vllm-bench")
            )
        cfg = AutoConfig.from_pretrained(model_dir)
        n = max(TENANTS)
        loras, iapts, params = make_adapters(model_dir, root, a.lora_rank, n)
        results["params"][backbone] = params
        vocab = cfg.vocab_size
        prompts_ids = [
            [(17 * i + 5 * j) % (vocab - 10) + 5 for j in range(a.prompt_tokens)] for i in range(a.requests)
        ]
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
        common = dict(
            dtype="float32", max_model_len=1024, max_num_seqs=a.concurrency, gpu_memory_utilization=0.3,
            kv_cache_memory_bytes=1 << 29, enforce_eager=True, enable_chunked_prefill=False,
            enable_prefix_caching=False, disable_log_stats=False, seed=0, skip_tokenizer_init=True,
        )  # fmt: skip
        P = IAPTPrompts(4, slot_token_id=cfg.pad_token_id or 0)
        from vllm.inputs import TokensPrompt

        lora_args = dict(enable_lora=True, max_loras=n, max_cpu_loras=n, max_lora_rank=a.lora_rank)
        systems = {
            "bare": dict(model=model_dir, **common),
            "lora": dict(model=model_dir, **lora_args, **common),
            "iapt": {**engine_args(model_dir, iapts), **common},
        }
        engines = {}
        try:
            for system, kwargs in systems.items():
                engines[system] = LLM(**kwargs)
            work = {}
            for system in systems:
                # ("iapt", 0): the IAPT engine on requests without a tenant, the bare backbone measured on
                # the same engine as the tenants' requests (a ratio immune to engine-to-engine noise).
                for T in {"bare": (0,), "lora": TENANTS, "iapt": (0, *TENANTS)}[system]:
                    if system == "iapt" and T == 0:
                        work[system, T] = (
                            [TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids],
                            sp,
                            None,
                        )
                    elif system == "iapt":
                        reqs = [P.request(ids, f"t{i % T}", sp) for i, ids in enumerate(prompts_ids)]
                        work[system, T] = ([r[0] for r in reqs], [r[1] for r in reqs], None)
                    elif system == "lora":
                        lr = [LoRARequest(f"l{i % T}", i % T + 1, loras[i % T]) for i in range(a.requests)]
                        work[system, T] = (
                            [TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids],
                            sp,
                            lr,
                        )
                    else:
                        work[system, T] = (
                            [TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids],
                            sp,
                            None,
                        )
                    run(engines[system], *work[system, T])  # warm-up (first-use allocations, LoRA loads)
            # Repeats interleave the systems, so a change in the machine's load hits all of them alike.
            reps = {key: [] for key in work}
            loads = []
            for _ in range(a.repeats):
                for (system, T), args in work.items():
                    reps[system, T].append(run(engines[system], *args))
                loads.append(os.getloadavg()[0])
            for (system, T), rs in reps.items():
                row = {"backbone": backbone, "system": system, "tenants": T}
                for k in rs[0]:
                    row[k] = statistics.median(r[k] for r in rs)
                row["load"] = statistics.median(loads)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            for llm in engines.values():
                llm.llm_engine.engine_core.shutdown()
            engines.clear()
            gc.collect()
    results["load_after"] = os.getloadavg()
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, a.out)


def write_report(results, out):
    rows = results["rows"]
    lines = [
        "| backbone | tenants | system | params/tenant | decode tok/s/request | output tok/s | TTFT ms | req/s | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        par = results["params"][r["backbone"]]
        pp = {
            "bare": "0",
            "lora": f"{par['lora']:,} (rank {par['lora_rank']})",
            "iapt": f"{par['iapt']:,} (r {par['iapt_r']})",
        }[r["system"]]
        if r["system"] == "iapt" and r["tenants"] == 0:
            pp = "0 (IAPT engine, no tenant)"
        lines.append(
            f"| {r['backbone']} | {r['tenants'] or '-'} | {r['system']} | {pp} | {r['decode_tok_s']:.1f} | "
            f"{r['output_tok_s']:.1f} | {r['ttft_ms']:.1f} | {r['req_s']:.2f} | {r['load']:.1f} |"
        )
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r["backbone"] for r in rows})
    fig, axes = plt.subplots(1, len(backbones), figsize=(5 * len(backbones), 3.6), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        bare = [r for r in rows if r["backbone"] == b and r["system"] == "bare"]
        for system, style in (("iapt", "o-"), ("lora", "s-")):
            pts = [
                (r["tenants"], r["decode_tok_s"])
                for r in rows
                if r["backbone"] == b and r["system"] == system
            ]
            if pts:
                ax.plot(*zip(*pts), style, label=system)
        if bare:
            ax.axhline(bare[0]["decode_tok_s"], color="gray", ls="--", label="bare backbone")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(TENANTS), [str(t) for t in TENANTS])
        ax.set_xlabel("tenants in the workload")
        ax.set_ylabel("decode tokens/s per request (median)")
        ax.set_title(f"{b}: vLLM 0.32 CPU, concurrency {results['args']['concurrency']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "vllm_serving.png"), dpi=120)


if __name__ == "__main__":
    main()
