"""End-to-end multi-tenant serving on one tiny randomly initialised Llama: IAPT against multi-LoRA.

- IAPT: `iapt_kernels.apply_iapt(model, IAPTConfig(num_tenants=T, bottleneck_size=r))`, prompts laid
  out by `iapt_kernels.insert_prompt_slots` as `[128 instruction tokens][L slots]`, one
  `generate(..., instruction_mask=..., tenant_ids=...)` call for the whole batch. The generators run
  once, in the prefill; decode steps attend to `L` extra positions and call no generator.
- LoRA: PEFT's mixed-batch inference, `peft_model.generate(..., adapter_names=[...])`, `T` adapters
  on `q_proj` and `v_proj` with random (nonzero) `A` and `B` (`init_lora_weights=False`), the rank
  chosen so that one tenant's trainable parameters match one IAPT tenant's as closely as possible.

Both serve the same 16 requests (tenant of request `i` is `i mod T`), greedy, a fixed number of new
tokens (no EOS). Prefill time is the first forward of `generate` over the prompt (measured with
forward hooks on the backbone); decode tokens/s counts the remaining `B * (new - 1)` tokens over the
rest of the `generate` call.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

import iapt_kernels
from iapt_kernels import _backend, reference
from iapt_kernels.testing import tiny_llama

TENANTS = (1, 2, 4, 8, 16)


@dataclass
class E2EConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    vocab_size: int = 1024
    requests: int = 16
    prompt_len: int = 128
    new_tokens: int = 64
    num_tokens: int = 4  # L, IAPT soft tokens per layer
    bottleneck_size: int = 64  # r, IAPT generator width
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    tenants: tuple[int, ...] = TENANTS
    repeats: int = 3
    seed: int = 0

    @classmethod
    def quick(cls) -> "E2EConfig":
        return cls(
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
            vocab_size=256,
            requests=4,
            prompt_len=16,
            new_tokens=4,
            bottleneck_size=16,
            tenants=(1, 2),
            repeats=1,
        )


def build_model(cfg: E2EConfig):
    """The tiny random Llama (fp32, eval, no EOS so every request decodes `new_tokens`)."""
    model = tiny_llama(
        cfg.vocab_size,
        seed=cfg.seed,
        initializer_range=0.02,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(512, cfg.prompt_len + cfg.num_tokens + cfg.new_tokens + 8),
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    ).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def iapt_params_per_tenant(cfg: E2EConfig) -> int:
    """Trainable parameters of one IAPT tenant: one generator per decoder layer."""
    # gated, as IAPTConfig builds them by default
    gen = reference.PromptGenerator(cfg.hidden_size, cfg.bottleneck_size, cfg.num_tokens, gate_init=0.0)
    return cfg.num_layers * sum(p.numel() for p in gen.parameters())


def lora_params_per_rank(model, targets) -> int:
    """Trainable parameters of one LoRA adapter per unit of rank: sum over target Linears of in + out."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += mod.in_features + mod.out_features
    return total


def matched_lora_rank(model, cfg: E2EConfig) -> tuple[int, int, int]:
    """`(rank, lora params per tenant, iapt params per tenant)` with the closest match."""
    per_rank = lora_params_per_rank(model, cfg.lora_targets)
    iapt = iapt_params_per_tenant(cfg)
    rank = max(1, round(iapt / per_rank))
    return rank, rank * per_rank, iapt


def prompts(cfg: E2EConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(3, cfg.vocab_size, (cfg.requests, cfg.prompt_len), generator=gen)


class _ForwardTimer:
    """Forward hooks on the backbone: start and end time of every forward call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[float, float]] = []
        self._t0 = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.calls.append((self._t0, time.perf_counter()))

    def reset(self) -> None:
        self.calls = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _measure(
    generate, timer: _ForwardTimer, batch: int, prompt_width: int, repeats: int, budget_s: float = 10.0
) -> dict:
    """Median prefill ms and decode tokens/s over `repeats` generate calls (after one warm-up); no
    new repeat starts once `budget_s` seconds have gone."""
    generate(4)  # warm-up: allocator, thread pools, first-call paths
    prefill, decode, totals = [], [], []
    new = 0
    start = time.perf_counter()
    for _ in range(repeats):
        if prefill and time.perf_counter() - start > budget_s:
            break  # slow machine: fewer repeats rather than a run that never ends
        timer.reset()
        t0 = time.perf_counter()
        out = generate(None)
        t1 = time.perf_counter()
        new = out.shape[1] - prompt_width
        first_start, first_end = timer.calls[0]
        prefill.append((first_end - first_start) * 1e3)
        decode.append(batch * (new - 1) / (t1 - first_end))
        totals.append((t1 - t0) * 1e3)
    return {
        "prefill_ms": statistics.median(prefill),
        "tokens_per_s": statistics.median(decode),
        "generate_ms": statistics.median(totals),
        "new_tokens": int(new),
        "forward_calls": len(timer.calls),
        "repeats": len(prefill),
    }


def run_iapt(base, cfg: E2EConfig, T: int, ids: torch.Tensor) -> dict:
    model = copy.deepcopy(base)
    wrapped = iapt_kernels.apply_iapt(
        model,
        iapt_kernels.IAPTConfig(
            num_tenants=T, num_tokens=cfg.num_tokens, bottleneck_size=cfg.bottleneck_size
        ),
    )
    wrapped.eval()
    batch = iapt_kernels.insert_prompt_slots(
        ids.tolist(), num_tokens=cfg.num_tokens, pad_token_id=0, padding_side="left"
    )
    tenant_ids = torch.arange(cfg.requests) % T
    timer = _ForwardTimer(model)

    def generate(n):
        return wrapped.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            instruction_mask=batch["instruction_mask"],
            tenant_ids=tenant_ids,
            max_new_tokens=n or cfg.new_tokens,
            do_sample=False,
        )

    try:
        rec = _measure(generate, timer, cfg.requests, batch["input_ids"].shape[1], cfg.repeats)
    finally:
        timer.remove()
    trainable = wrapped.num_trainable_parameters()
    rec.update(
        method="iapt",
        tenants=T,
        prompt_tokens=int(batch["input_ids"].shape[1]),
        trainable_params_per_tenant=trainable // T,
        trainable_params_total=trainable,
        config=f"L={cfg.num_tokens}, r={cfg.bottleneck_size}, backend={_resolved(wrapped)}",
    )
    return rec


def _resolved(wrapped) -> str:
    try:
        device = next(wrapped.generators.parameters()).device
        return _backend.resolve_backend(wrapped.iapt_config.backend, device)
    except Exception:
        return str(wrapped.iapt_config.backend)


def run_lora(base, cfg: E2EConfig, T: int, ids: torch.Tensor, rank: int) -> dict:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    lcfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=list(cfg.lora_targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed + 2)
    peft_model = get_peft_model(model, lcfg, adapter_name="t0")
    for t in range(1, T):
        peft_model.add_adapter(f"t{t}", lcfg)
    peft_model.eval()
    attention_mask = torch.ones_like(ids)
    names = [f"t{i % T}" for i in range(cfg.requests)]
    timer = _ForwardTimer(model)

    def generate(n):
        return peft_model.generate(
            input_ids=ids,
            attention_mask=attention_mask,
            adapter_names=names,
            max_new_tokens=n or cfg.new_tokens,
            do_sample=False,
        )

    try:
        rec = _measure(generate, timer, cfg.requests, ids.shape[1], cfg.repeats)
    finally:
        timer.remove()
    per_tenant = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and ".t0." in n)
    rec.update(
        method="lora",
        tenants=T,
        prompt_tokens=int(ids.shape[1]),
        trainable_params_per_tenant=per_tenant,
        trainable_params_total=per_tenant * T,
        config=f"rank={rank}, targets={'+'.join(cfg.lora_targets)}, mixed batch (adapter_names)",
    )
    return rec


def run_base(base, cfg: E2EConfig, ids: torch.Tensor) -> dict:
    """The frozen backbone alone, no adapter: the floor both methods sit on."""
    model = copy.deepcopy(base)
    timer = _ForwardTimer(model)
    attention_mask = torch.ones_like(ids)

    def generate(n):
        return model.generate(
            input_ids=ids, attention_mask=attention_mask, max_new_tokens=n or cfg.new_tokens, do_sample=False
        )

    try:
        rec = _measure(generate, timer, cfg.requests, ids.shape[1], cfg.repeats)
    finally:
        timer.remove()
    rec.update(method="base", tenants=0, prompt_tokens=int(ids.shape[1]), trainable_params_per_tenant=0)
    return rec


def iapt_available() -> str | None:
    """Kept for callers of the bench API: the IAPT integration is part of the package (transformers,
    the one optional piece, is checked where the models are built)."""
    return None


def e2e_steps(cfg: E2EConfig) -> int:
    return 1 + 2 * len(cfg.tenants)


def run_e2e(cfg: E2EConfig, progress=None, methods=("iapt", "lora")) -> dict:
    """Every (method, tenants) of `cfg`; returns `{"records": [...], "base": {...}, "setup": {...},
    "errors": [...]}`. A method that fails is recorded in `errors` and skipped, not fatal."""
    base = build_model(cfg)
    ids = prompts(cfg)
    rank, lora_n, iapt_n = matched_lora_rank(base, cfg)
    setup = {
        "model": (
            f"LlamaForCausalLM, random init, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
            f"{cfg.num_heads} heads, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, fp32"
        ),
        "requests": cfg.requests,
        "prompt_len": cfg.prompt_len,
        "new_tokens": cfg.new_tokens,
        "iapt": f"L={cfg.num_tokens} soft tokens per layer, bottleneck r={cfg.bottleneck_size}",
        "iapt_params_per_tenant": iapt_n,
        "lora_rank": rank,
        "lora_params_per_tenant": lora_n,
        "lora_targets": list(cfg.lora_targets),
        "repeats": cfg.repeats,
        "threads": torch.get_num_threads(),
    }
    records, errors = [], []

    def step(label):
        if progress is not None:
            progress.set_postfix_str(label)

    step("e2e base")
    base_rec = run_base(base, cfg, ids)
    if progress is not None:
        progress.update()
    missing = iapt_available()
    for T in cfg.tenants:
        for method in methods:
            step(f"e2e {method} T={T}")
            try:
                if method == "iapt":
                    if missing:
                        raise RuntimeError(f"IAPT integration not importable: {missing}")
                    records.append(run_iapt(base, cfg, T, ids))
                else:
                    records.append(run_lora(base, cfg, T, ids, rank))
            except Exception as exc:  # recorded, reported; the rest of the run goes on
                errors.append({"method": method, "tenants": T, "error": f"{type(exc).__name__}: {exc}"})
            if progress is not None:
                progress.update()
    return {"records": records, "base": base_rec, "setup": setup, "errors": errors}
