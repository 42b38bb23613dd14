"""Train IAPT soft-prompt generators on a frozen causal LM.

    python -m iapt_kernels.train                                  # built-in synthetic task, tiny random Llama
    python -m iapt_kernels.train --model DIR --data train.jsonl --out adapter/
    torchrun --nproc_per_node 2 -m iapt_kernels.train --steps 5   # DistributedDataParallel (gloo / nccl)

``--data`` is a JSONL file of ``{"instruction": ..., "response": ...}`` objects; ``--model`` a local
directory with a causal LM and its tokenizer (``AutoModelForCausalLM`` / ``AutoTokenizer``). Without
``--model`` the run uses a tiny randomly initialised Llama and a character-level vocabulary (nothing is
downloaded), on a synthetic task: copy or reverse a short digit string. Only the generators train; the
adapter is saved with :func:`iapt_kernels.save_iapt` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

__all__ = ["main", "SyntheticTask"]


class SyntheticTask:
    """Copy or reverse a digit string, with a character-level vocabulary (no tokenizer needed).

    Ids: 0 pad, 1 bos, 2 eos, 3 slot, 4 ``copy``, 5 ``reverse``, 6.. 15 the digits ``0``-``9``.
    """

    PAD, BOS, EOS, SLOT, COPY, REVERSE, DIGIT0 = 0, 1, 2, 3, 4, 5, 6
    vocab_size = 16

    def __init__(self, min_len: int = 3, max_len: int = 8) -> None:
        self.min_len, self.max_len = min_len, max_len

    def sample(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """One ``(instruction_ids, response_ids)`` pair."""
        n = rng.randint(self.min_len, self.max_len)
        digits = [rng.randrange(10) for _ in range(n)]
        op = rng.choice((self.COPY, self.REVERSE))
        out = digits if op == self.COPY else digits[::-1]
        return [self.BOS, op] + [self.DIGIT0 + d for d in digits], [self.DIGIT0 + d for d in out] + [self.EOS]

    def decode(self, ids) -> str:
        names = {self.PAD: "", self.BOS: "<s>", self.EOS: "</s>", self.SLOT: "_", self.COPY: "copy ",
                 self.REVERSE: "reverse "}
        return "".join(names.get(int(i), str(int(i) - self.DIGIT0)) for i in ids)


def tiny_llama(vocab_size: int, seed: int = 0):
    """A tiny randomly initialised ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                                   bos_token_id=SyntheticTask.BOS, eos_token_id=SyntheticTask.EOS,
                                   pad_token_id=SyntheticTask.PAD)
    return transformers.LlamaForCausalLM(cfg)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m iapt_kernels.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local directory of a causal LM and its tokenizer (default: tiny random Llama)")
    p.add_argument("--data", help='JSONL of {"instruction","response"} (default: synthetic copy/reverse task)')
    p.add_argument("--out", default="iapt-adapter", help="directory the adapter is saved to (default %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step per process")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--num-tokens", type=int, default=4)
    p.add_argument("--bottleneck-size", type=int, default=None, help="default 32 for the tiny model, else 256")
    p.add_argument("--num-tenants", type=int, default=1)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "reference"])
    p.add_argument("--max-length", type=int, default=512, help="truncate instruction + response to this")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def _load_jsonl(path, tokenizer, max_length):
    eos = tokenizer.eos_token_id
    pairs = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            if "instruction" not in ex or "response" not in ex:
                raise ValueError(f"{path}:{ln}: each line needs 'instruction' and 'response'")
            ins = tokenizer(ex["instruction"])["input_ids"]
            resp = tokenizer(ex["response"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            pairs.append((ins[: max_length // 2], resp[: max_length // 2]))
    if not pairs:
        raise ValueError(f"{path} holds no examples")
    return pairs


def main(argv=None) -> None:
    """Command-line entry point (see the module docstring)."""
    import iapt_kernels as ik
    from tqdm.auto import tqdm

    args = _parse(sys.argv[1:] if argv is None else argv)
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
    if args.model is None:
        if args.data is not None:
            raise SystemExit("--data needs --model (a tokenizer to encode it with)")
        task = SyntheticTask()
        log("no --model given: using the built-in synthetic task (copy / reverse a digit string, "
            "character-level vocabulary) on a tiny randomly initialised Llama")
        model = tiny_llama(task.vocab_size, seed=args.seed)
        pad_id, slot_id = task.PAD, task.SLOT
        sample = lambda: task.sample(rng)  # noqa: E731
        bottleneck = args.bottleneck_size or 32
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        slot_id = pad_id
        if args.data is None:
            log("no --data given: using the built-in synthetic task (copy / reverse a digit string)")
            task = SyntheticTask()

            def sample():
                ins, resp = task.sample(rng)
                text_in = task.decode(ins[1:]).strip()
                text_out = task.decode(resp[:-1])
                return (tok(text_in)["input_ids"],
                        tok(" " + text_out, add_special_tokens=False)["input_ids"] + [tok.eos_token_id or pad_id])
        else:
            pairs = _load_jsonl(args.data, tok, args.max_length)
            log(f"{len(pairs)} examples from {args.data}")
            sample = lambda: pairs[rng.randrange(len(pairs))]  # noqa: E731
        bottleneck = args.bottleneck_size or 256
    model.to(device)
    torch.manual_seed(args.seed)  # same generator init on every rank
    cfg = ik.IAPTConfig(num_tokens=args.num_tokens, bottleneck_size=bottleneck, num_tenants=args.num_tenants,
                        backend=args.backend)
    iapt = ik.apply_iapt(model, cfg)
    n_train = iapt.num_trainable_parameters()
    n_total = sum(p.numel() for p in iapt.parameters())
    log(f"trainable parameters: {n_train:,} (generators, {iapt.num_layers} layers) of {n_total:,} total "
        f"({100.0 * n_train / n_total:.2f}%); world size {world}, device {device}")
    net = iapt
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(iapt, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in iapt.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    iapt.train()
    bar = tqdm(range(args.steps), desc="iapt", disable=args.no_progress or not main_proc, dynamic_ncols=True)
    t0, running = time.time(), None
    for step in bar:
        ex = [sample() for _ in range(args.batch_size)]
        batch = ik.insert_prompt_slots([e[0] for e in ex], [e[1] for e in ex], num_tokens=args.num_tokens,
                                       pad_token_id=pad_id, slot_token_id=slot_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if args.num_tenants > 1:
            batch["tenant_ids"] = torch.randint(0, args.num_tenants, (args.batch_size,), device=device)
        loss = net(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = loss.detach()
        if distributed:
            torch.distributed.all_reduce(lv)
            lv /= world
        lv = lv.item()
        running = lv if running is None else 0.9 * running + 0.1 * lv
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            msg = f"step {step + 1}/{args.steps}  loss {lv:.4f}  (avg {running:.4f})  {time.time() - t0:.1f}s"
            if bar.disable:
                log(msg)
            else:
                bar.write(msg)
    bar.close()
    if main_proc:
        ik.save_iapt(iapt, args.out)
        log(f"saved the adapter to {args.out}")
        if args.model is None:
            iapt.eval()
            ins, resp = task.sample(random.Random(12345))
            g = ik.insert_prompt_slots([ins], num_tokens=args.num_tokens, pad_token_id=pad_id, slot_token_id=slot_id)
            g = {k: v.to(device) for k, v in g.items()}
            kw = {"tenant_ids": torch.zeros(1, dtype=torch.long, device=device)} if args.num_tenants > 1 else {}
            out = iapt.generate(**g, **kw, max_new_tokens=len(resp), do_sample=False)
            log(f"example: {task.decode(ins)} -> {task.decode(out[0, g['input_ids'].shape[1]:])} "
                f"(target {task.decode(resp)})")
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
