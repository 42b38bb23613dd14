"""Shared setup of the vLLM tests: tiny random backbones of each family, IAPT adapters saved by
save_iapt, and Hugging Face references from IAPTModel.generate. Engines start once per module (about
30 s each on 2 cores), on 127.0.0.1, with fp32 weights."""

import os

os.environ["VLLM_HOST_IP"] = "127.0.0.1"
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # LLM.apply_model(iapt_stats)

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import iapt_kernels as ik  # noqa: E402

L, R, T = 4, 16, 3
NAMES = ["a", "b", "c"]
PREFIX = [40, 41]  # the response prefix after the slots
# Instructions of different lengths; tenant -1 = no adapter.
INSTR = [
    [5, 6, 7, 8, 9],
    [10, 11],
    [12, 13, 14, 15, 16, 17, 18],
    [20, 21, 22],
    [30, 31, 32, 33],
    [50, 51, 52, 53, 54, 55],
]
TENANTS = [0, 1, -1, 2, 1, -1]
NEW = 12
# Engine memory on a shared machine: a fixed small KV cache instead of a fraction of the host's memory.
ENGINE = dict(
    dtype="float32", max_model_len=256, seed=0, gpu_memory_utilization=0.2, kv_cache_memory_bytes=1 << 27
)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_backbone(family: str, seed: int = 0):
    """A random 2-layer backbone whose head size (64) the CPU attention kernels support."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(seed)
    cfg = cfg_cls(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=128,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = model_cls(cfg).eval()
    return model


def iapt_wrap(model, seed: int = 1):
    """A 3-tenant IAPT model with up-projections large enough that the prompts change the output."""
    torch.manual_seed(seed)
    w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=L, bottleneck_size=R, num_tenants=T, backend="cpp"))
    with torch.no_grad():
        for g in w.generators:
            for name, p in g.named_parameters():
                if name.endswith("up.weight"):
                    p.normal_(0.0, 0.5)
            if g.gate is not None:  # the default gate starts at 0 (zero prompts): a served gate value
                g.gate.uniform_(0.5, 1.5)
    return w


def reference(w, instr, tenants, new=NEW, prefix=PREFIX):
    """Greedy continuations from IAPTModel.generate (one left-padded batch)."""
    w.model.generation_config.eos_token_id = None  # fixed length: compare token for token
    w.model.generation_config.pad_token_id = 0
    b = ik.insert_prompt_slots(
        instr, num_tokens=L, pad_token_id=0, padding_side="left", response_prefix_ids=prefix
    )
    out = w.generate(**b, tenant_ids=torch.tensor(tenants), max_new_tokens=new, do_sample=False)
    return out[:, b["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """family -> (model dir, {name: single-tenant adapter dir}, multi-tenant adapter dir, IAPTModel)."""
    out = {}
    for fam in FAMILIES:
        root = tmp_path_factory.mktemp(fam)
        model = tiny_backbone(fam)
        model.save_pretrained(root / "model")
        w = iapt_wrap(model)
        singles = {}
        for t, name in enumerate(NAMES):
            ik.save_iapt(w, root / f"adapter_{name}", tenant=t)
            singles[name] = str(root / f"adapter_{name}")
        ik.save_iapt(w, root / "adapter_mt")
        out[fam] = (str(root / "model"), singles, str(root / "adapter_mt"), w)
    return out
