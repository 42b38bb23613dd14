"""IAPT beyond one device: FSDP2 (`fully_shard`) and DDP on 2 CPU processes with gloo (issue 15, item 12).

The backbone's decoder layers are sharded and frozen, the generators are sharded with the root; the
layer hooks run inside FSDP's forward and backward, every rank calls save_iapt (it gathers the
sharded generators) and rank 0 alone writes the adapter, which reloads into a plain model.
"""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
# Slow tier: each case starts two processes that import torch and transformers and train.
pytestmark = pytest.mark.slow


def _worker(rank: int, init_file: str, out_dir: str, mode: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _train_and_save(rank, out_dir, mode)
    finally:
        dist.destroy_process_group()


def _train_and_save(rank: int, out_dir: str, mode: str) -> None:
    from test_integration import INSTR, RESP, L, tiny_model, wrap

    import iapt_kernels as ik

    w = wrap(tiny_model("llama"))  # same seeds: identical start on every rank
    w.train()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in w.model.model.layers:
            fully_shard(layer)
        fully_shard(w)  # the root group holds the generators (and the rest of the frozen backbone)
        net = w
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(w)
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2)
    i = rank  # each rank its own example: gradients must be averaged to agree
    batch = ik.insert_prompt_slots([INSTR[i]] * 2, [RESP[i]] * 2, num_tokens=L, pad_token_id=0)
    losses = []
    for _ in range(4):
        loss = net(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ik.save_iapt(w, os.path.join(out_dir, "adapter"))  # every rank: FSDP gathers; rank 0 writes
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in w.generators.parameters()]
    flat = torch.cat([p.reshape(-1) for p in full])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    eval_batch = ik.insert_prompt_slots(INSTR, RESP, num_tokens=L, pad_token_id=0)
    w.eval()
    with torch.no_grad():
        logits = net(**eval_batch).logits
    torch.save(
        {"losses": losses, "params": gathered, "logits": logits}, os.path.join(out_dir, f"rank{rank}.pt")
    )


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_process_training_saves_a_reloadable_adapter(tmp_path, mode):
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp").fully_shard  # noqa: B018
    import torch.multiprocessing as mp
    from test_integration import INSTR, RESP, L, tiny_model

    import iapt_kernels as ik

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), mode), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in res:
        assert r["losses"][-1] < r["losses"][0]  # the generators learn
        assert torch.equal(r["params"][0], r["params"][1])  # ranks agree, bitwise
    assert torch.equal(res[0]["params"][0], res[1]["params"][0])
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_model.safetensors", "iapt_config.json"]
    back = ik.load_iapt(tiny_model("llama"), tmp_path / "adapter")
    with torch.no_grad():
        logits = back(**ik.insert_prompt_slots(INSTR, RESP, num_tokens=L, pad_token_id=0)).logits
    assert torch.allclose(logits, res[0]["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(res[0]["logits"], res[1]["logits"])
