r"""Train IAPT soft-prompt generators on a frozen causal LM.

    python -m iapt_kernels.train                                  # built-in synthetic task, tiny random Llama
    python -m iapt_kernels.train --evaluate iapt-adapter          # reload what that run saved, re-score it
    python -m iapt_kernels.train --model DIR --data train.jsonl --out adapter/
    torchrun --nproc_per_node 2 -m iapt_kernels.train --steps 5   # DistributedDataParallel (gloo / nccl)

``--data`` is a JSONL file of ``{"instruction": ..., "response": ...}`` objects (``"output"`` in place
of ``"response"`` too, as the real-task data has it); ``--model`` a local directory with a causal LM and
its tokenizer (``AutoModelForCausalLM`` / ``AutoTokenizer``); nothing is ever downloaded. With
``--model`` each example is laid out as ``[instruction][slots][--response-prefix, default
"\n"][response]``, so a real token, not a slot, predicts the response. Without ``--model`` the run uses a
tiny randomly initialised Llama and a small vocabulary, on a synthetic task: the largest or the smallest
digit of a digit string, as the instruction says. Only the generators train. The end of the run scores greedy generation on held-out
examples (exact match of the answer and EOS) and saves the adapter with :func:`iapt_kernels.save_iapt`;
with the built-in model it also saves that backbone (``base_model/``) and the task (``demo.json``), so
``--evaluate`` reloads everything and reproduces the score.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

import iapt_kernels as ik
from iapt_kernels.integrations.collator import RESPONSE_TEXT_KEYS
from iapt_kernels.testing import SyntheticTask, tiny_llama

__all__ = ["main", "load_demo", "exact_match"]

DEFAULTS = {
    "steps": 1000,
    "batch_size": 32,
    "lr": 1e-2,
    "lr_up_ratio": 1.0,
    "bottleneck": 64,
}  # the built-in demo's, see README


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m iapt_kernels.train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="local directory of a causal LM and its tokenizer; never downloaded "
        "(default: a tiny random Llama)",
    )
    p.add_argument(
        "--data",
        help='JSONL of {"instruction","response"} or {"instruction","output"} (default: the synthetic task)',
    )
    p.add_argument(
        "--out", default="iapt-adapter", help="directory the adapter is saved to (default %(default)s)"
    )
    p.add_argument(
        "--evaluate",
        metavar="DIR",
        help="train nothing: reload the built-in demo saved in DIR and score it on the held-out examples",
    )
    p.add_argument(
        "--steps", type=int, default=DEFAULTS["steps"], help="optimisation steps (default %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        help="examples per step per process (default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=DEFAULTS["lr"],
        help="AdamW peak learning rate, cosine-decayed to 0 over the run (default %(default)s)",
    )
    p.add_argument(
        "--lr-up-ratio",
        type=float,
        default=DEFAULTS["lr_up_ratio"],
        help="the up-projections train at --lr times this (IAPTModel.param_groups; default %(default)s)",
    )
    p.add_argument("--num-tokens", type=int, default=4)
    p.add_argument(
        "--bottleneck-size",
        type=int,
        default=None,
        help=f"default {DEFAULTS['bottleneck']} for the tiny model, else IAPTConfig's ({ik.IAPTConfig.bottleneck_size})",
    )
    p.add_argument("--num-tenants", type=int, default=1)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "reference"])
    p.add_argument("--max-length", type=int, default=512, help="truncate instruction + response to this")
    p.add_argument(
        "--response-prefix",
        default="\n",
        help="with --model: text placed after the soft-token slots, before each response (default "
        "%(default)r), so the first response token is predicted at a real token rather than at a "
        "slot that IAPT overwrites at every layer; generation prompts must end with it too. "
        "'' keeps [instruction][slots][response]. The built-in tiny model uses none",
    )
    p.add_argument(
        "--eval-size", type=int, default=200, help="held-out examples scored at the end (synthetic task)"
    )
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="log the loss at the first and the last step only (default: every --log-every steps too)",
    )
    return p.parse_args(argv)


def _load_jsonl(path, tokenizer, max_length):
    eos = tokenizer.eos_token_id
    pairs = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{ln}: not valid JSON ({exc})") from None
            key = next((k for k in RESPONSE_TEXT_KEYS if isinstance(ex, dict) and k in ex), None)
            if not isinstance(ex, dict) or "instruction" not in ex or key is None:
                got = sorted(ex) if isinstance(ex, dict) else type(ex).__name__
                raise ValueError(
                    f"{path}:{ln}: each line needs 'instruction' and 'response' (or 'output'); got {got}"
                )
            ins = tokenizer(ex["instruction"])["input_ids"]
            resp = tokenizer(ex[key], add_special_tokens=False)["input_ids"] + (
                [eos] if eos is not None else []
            )
            pairs.append((ins[: max_length // 2], resp[: max_length // 2]))
    if not pairs:
        raise ValueError(f"{path} holds no examples")
    return pairs


@torch.no_grad()
def exact_match(
    iapt, examples, num_tokens: int, pad_id: int, slot_id: int, batch_size: int = 64, tenant: int = 0
):
    """``(hits, outputs)``: greedy generation of each example's response length, compared token for token."""
    was = iapt.training
    iapt.eval()
    device = next(iapt.generators.parameters()).device
    hits, outputs = 0, []
    for k in range(0, len(examples), batch_size):
        chunk = examples[k : k + batch_size]
        n = max(len(r) for _, r in chunk)
        g = __import__("iapt_kernels").insert_prompt_slots(
            [e[0] for e in chunk],
            num_tokens=num_tokens,
            pad_token_id=pad_id,
            slot_token_id=slot_id,
            padding_side="left",
        )
        g = {key: v.to(device) for key, v in g.items()}
        if iapt.iapt_config.num_tenants > 1:
            g["tenant_ids"] = torch.full((len(chunk),), tenant, dtype=torch.long, device=device)
        out = iapt.generate(**g, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
        for (_, resp), row in zip(chunk, out[:, g["input_ids"].shape[1] :].tolist()):
            hits += row[: len(resp)] == resp
            outputs.append(row[: len(resp)])
    iapt.train(was)
    return hits, outputs


def load_demo(path: str, device=None):
    """``(iapt_model, task)`` of a built-in demo run saved in ``path`` (backbone, adapter and task)."""
    import transformers

    meta_file = os.path.join(path, "demo.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(
            f"{path!r} holds no built-in demo run (no demo.json): --evaluate reloads the output "
            "of `python -m iapt_kernels.train` without --model"
        )
    with open(meta_file) as f:
        meta = json.load(f)
    task = SyntheticTask(meta["min_len"], meta["max_len"])
    base = transformers.LlamaForCausalLM.from_pretrained(
        os.path.join(path, "base_model"), local_files_only=True
    )
    iapt = ik.load_iapt(base.to(device or "cpu"), path)
    return iapt, task


def _score(iapt, task, n, num_tokens, log):
    examples = task.held_out(n)
    hits, outs = exact_match(iapt, examples, num_tokens, task.PAD, task.SLOT)
    log(f"held-out exact match (answer and EOS, greedy): {hits}/{n} = {100.0 * hits / n:.1f}%")
    ins, resp = examples[0]
    log(f"example: {task.decode(ins)} -> {task.decode(outs[0])} (target {task.decode(resp)})")
    return hits / n


def main(argv=None) -> float | None:
    """Command-line entry point (see the module docstring). Returns the held-out exact match of the
    synthetic task (``None`` with ``--data``)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.evaluate:
        iapt, task = load_demo(args.evaluate, args.device)
        return _score(iapt, task, args.eval_size, iapt.iapt_config.num_tokens, print)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)

    rng = random.Random(args.seed * 1000 + rank)
    task = None
    if args.model is None:
        if args.data is not None:
            raise SystemExit("--data needs --model (a tokenizer to encode it with)")
        task = SyntheticTask()
        log(
            "no --model given: the built-in synthetic task (the max or min digit of a digit string, as the "
            "instruction says) on a tiny randomly initialised Llama"
        )
        model = tiny_llama(task.vocab_size, seed=args.seed)
        pad_id, slot_id = task.PAD, task.SLOT
        sample = lambda: task.sample(rng)  # noqa: E731
        # Trained from scratch, the tiny model has no reading of the instruction to lose at the slots; the
        # saved demos were trained without a prefix, and --evaluate scores them the same way.
        prefix = []
        bottleneck = args.bottleneck_size or DEFAULTS["bottleneck"]
    else:
        if not os.path.isdir(args.model):
            raise SystemExit(
                f"--model must be a local directory (nothing is downloaded); {args.model!r} is not one"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        slot_id = pad_id
        prefix = (
            tok(args.response_prefix, add_special_tokens=False)["input_ids"] if args.response_prefix else []
        )
        if args.data is None:
            log("no --data given: the built-in synthetic task (max / min digit), as text")
            text_task = SyntheticTask()

            def sample():
                ins, resp = text_task.sample(rng)
                return (
                    tok(text_task.decode(ins[1:]))["input_ids"],
                    tok(" " + text_task.decode(resp[:-1]), add_special_tokens=False)["input_ids"]
                    + [tok.eos_token_id if tok.eos_token_id is not None else pad_id],
                )
        else:
            pairs = _load_jsonl(args.data, tok, args.max_length)
            log(f"{len(pairs)} examples from {args.data}")
            sample = lambda: pairs[rng.randrange(len(pairs))]  # noqa: E731
        bottleneck = args.bottleneck_size or ik.IAPTConfig.bottleneck_size
    model.to(device)
    torch.manual_seed(args.seed)  # same generator init on every rank
    cfg = ik.IAPTConfig(
        num_tokens=args.num_tokens,
        bottleneck_size=bottleneck,
        num_tenants=args.num_tenants,
        backend=args.backend,
    )
    iapt = ik.apply_iapt(model, cfg)
    n_train = iapt.num_trainable_parameters()
    n_total = sum(p.numel() for p in iapt.parameters())
    log(
        f"trainable parameters: {n_train:,} (generators, {iapt.num_layers} layers) of {n_total:,} total "
        f"({100.0 * n_train / n_total:.2f}%); world size {world}, device {device}"
    )
    # The package's start (docs/design.md section 1): the config's gate at 0, and up.bias at the mean
    # hidden state of the first training batch, run through the backbone without slots. Before DDP,
    # which then gives every rank rank 0's calibration.
    first = [sample() for _ in range(args.batch_size)]
    plain = [(e[0] + prefix + e[1])[: args.max_length] for e in first]
    width = max(len(r) for r in plain)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in plain], device=device)
    att = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in plain], device=device)
    iapt.calibrate(ids, att, slot_token_id=slot_id)
    net = iapt
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(iapt, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(iapt.param_groups(args.lr, args.lr_up_ratio), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
    iapt.train()
    t0, running = time.time(), None
    for step in range(args.steps):
        ex = first if step == 0 else [sample() for _ in range(args.batch_size)]
        batch = ik.insert_prompt_slots(
            [e[0] for e in ex],
            [e[1] for e in ex],
            num_tokens=args.num_tokens,
            pad_token_id=pad_id,
            slot_token_id=slot_id,
            max_length=args.max_length,
            response_prefix_ids=prefix,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        if args.num_tenants > 1:
            batch["tenant_ids"] = torch.randint(0, args.num_tenants, (args.batch_size,), device=device)
        loss = net(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        lv = loss.detach()
        if distributed:
            torch.distributed.all_reduce(lv)
            lv /= world
        lv = lv.item()
        running = lv if running is None else 0.9 * running + 0.1 * lv
        periodic = not args.no_progress and (step + 1) % args.log_every == 0
        if periodic or step == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps}  loss {lv:.4f}  (avg {running:.4f})  {time.time() - t0:.1f}s")
    score = None
    ik.save_iapt(iapt, args.out)  # every rank (sharded models gather); rank 0 writes
    if main_proc:
        log(f"saved the adapter to {args.out}")
        if task is not None:
            # The random backbone exists nowhere else: save it, and the task, so the run can be reloaded.
            model.save_pretrained(os.path.join(args.out, "base_model"))
            with open(os.path.join(args.out, "demo.json"), "w") as f:
                json.dump(task.to_dict(), f, indent=2)
            log(
                f"saved the tiny backbone to {os.path.join(args.out, 'base_model')}; "
                f"`python -m iapt_kernels.train --evaluate {args.out}` reloads and re-scores it"
            )
            score = _score(iapt, task, args.eval_size, args.num_tokens, log)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return score


if __name__ == "__main__":
    main()
