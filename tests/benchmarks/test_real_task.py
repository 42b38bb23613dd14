"""The real-task comparison (benchmarks/real_task.py) on a tiny random Llama with a byte-level
tokenizer and generated JSONL data: the --train/--test path end to end, parameter matching, and bad
input (a clear error naming the problem, nothing written)."""

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("tokenizers")  # save_tiny_model's byte-level tokenizer

import iapt_kernels as ik  # noqa: E402
from benchmarks import real_task as rt  # noqa: E402
from iapt_kernels.testing import save_tiny_model  # noqa: E402

WORDS = {"red": "warm", "orange": "warm", "yellow": "warm", "blue": "cold", "green": "cold", "white": "cold"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(sorted(WORDS))
        out.append({"instruction": f"Is {w} warm or cold?", "output": WORDS[w]})
    return out


def run(tmp_path, tiny_dir, *extra):
    out = tmp_path / "out"
    argv = [
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--in-process",
        "--no-serving",
        "--no-progress",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--eval-every",
        "6",
        "--test-size",
        "12",
        *extra,
    ]
    return rt.main(argv), out


@pytest.mark.slow  # a whole tool run: the slow tier
def test_jsonl_comparison_end_to_end(tmp_path, tiny_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", colour_rows(40, 0))
    test = write_jsonl(tmp_path / "test.jsonl", colour_rows(12, 1))
    rc, out = run(
        tmp_path,
        tiny_dir,
        "--train",
        str(train),
        "--test",
        str(test),
        "--lr-iapt",
        "1e-2",
        "--lr-lora",
        "1e-2",
        "--lr-prompt",
        "1e-1",
        "--prompt-tokens",
        "4",
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert "| iapt |" in (out / "results.md").read_text()
    assert "step 0 vs frozen" in (out / "results.md").read_text()
    assert res["setup"]["labels"] == ["cold", "warm"]
    by = {r["method"]: r for r in res["methods"]}
    # The frozen model's validation loss is measured once, and is where LoRA (zero B) starts
    frozen = res["setup"]["frozen_val_loss"]
    assert frozen > 0
    assert by["zero-shot"]["val"] == [[0, pytest.approx(frozen, rel=1e-6)]]
    assert by["lora"]["val"][0][1] == pytest.approx(frozen, rel=1e-6)
    assert set(by) == set(rt.METHODS)
    for name, r in by.items():
        assert "error" not in r, r
        assert r["n"] == 12 and 0.0 <= r["accuracy"] <= 1.0
        if name == "zero-shot":
            assert r["trainable_params"] == 0 and r["losses"] == []
            continue
        assert len(r["losses"]) == 12 and all(v == v for v in r["losses"])
        # two labels, one always right: even 12 steps learn the label prior, so the loss falls
        assert sum(r["losses"][-3:]) < sum(r["losses"][:3]), (name, r["losses"])
    # matched sizes: the counts reported are the real ones, and LoRA's is the closest rank to IAPT's
    s = res["setup"]
    assert by["iapt"]["trainable_params"] == s["iapt_params"]
    assert by["iapt-gelu"]["trainable_params"] == s["iapt_params"] - 2 * 10  # no rational coefficients
    per_rank = 2 * ((64 + 64) + (64 + 32))  # q_proj 64->64, v_proj 64->32, 2 layers
    assert by["lora"]["trainable_params"] == s["lora_rank"] * per_rank
    assert abs(by["lora"]["trainable_params"] - s["iapt_params"]) <= per_rank / 2
    assert by["prompt"]["trainable_params"] == s["prompt_tokens"] * 64 == 4 * 64
    assert res["majority"]["accuracy"] > 0


def test_iapt_params_formula_matches_the_model(tiny_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=4, bottleneck_size=8))
    assert w.num_trainable_parameters() == rt.iapt_params(64, 2, 8, 4)


@pytest.mark.parametrize(
    "case", ["missing", "bad_json", "missing_field", "empty_labels", "too_long", "empty"]
)
def test_bad_data_is_a_clear_error_and_writes_nothing(tmp_path, tiny_dir, capsys, case):
    good = write_jsonl(tmp_path / "good.jsonl", colour_rows(20, 0))
    bad = tmp_path / "bad.jsonl"
    expect = {
        "missing": "data file not found",
        "bad_json": "not valid JSON",
        "missing_field": '"output"',
        "empty_labels": "empty label set",
        "too_long": "line 6: the instruction",
        "empty": "holds no examples",
    }[case]
    if case == "bad_json":
        bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    elif case == "missing_field":
        write_jsonl(bad, [{"instruction": "a"}])
    elif case == "empty_labels":
        write_jsonl(bad, [{"instruction": "a", "output": " "}] * 5)
    elif case == "too_long":
        write_jsonl(bad, colour_rows(5, 0) + [{"instruction": "x " * 100, "output": "warm"}])
    elif case == "empty":
        bad.write_text("\n")
    rc, out = run(tmp_path, tiny_dir, "--train", str(bad), "--test", str(good))
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err and bad.name in err, err
    assert not out.exists()


def test_missing_and_corrupt_gguf(tmp_path, capsys):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a model at all")
    for path, expect in ((tmp_path / "none.gguf", "GGUF file not found"), (junk, "not a GGUF file")):
        rc = rt.main(
            [
                "--gguf",
                str(path),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and expect in err and str(path) in err, err
        assert not (tmp_path / "o").exists()
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(
        b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8
    )  # right magic, nothing after the header
    pytest.importorskip("gguf")
    rc = rt.main(
        ["--gguf", str(truncated), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read GGUF file" in err and str(truncated) in err, err
    assert not (tmp_path / "o").exists() and not any((tmp_path / "cache").glob("*-fp32"))


def test_split_is_stratified_and_fixed():
    ex = [rt.Example(f"text {i}", lab) for i, lab in enumerate(["a"] * 60 + ["b"] * 30 + ["c"] * 10)]
    tr, va, te = rt.split_examples(ex, 10, 20, seed=3)
    assert len(tr) + len(va) + len(te) == 100 and len(te) == 20 and len(va) == 10
    assert sorted(e.output for e in te).count("a") == 12 and sorted(e.output for e in te).count("c") == 2
    again = rt.split_examples(ex, 10, 20, seed=3)
    assert [e.instruction for e in again[2]] == [e.instruction for e in te]
    assert not {e.instruction for e in te} & {e.instruction for e in tr}


def test_serving_only_on_the_backbone(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", colour_rows(10, 0))
    out = tmp_path / "out"
    rc = rt.main(
        [
            "--model",
            str(tiny_dir),
            "--train",
            str(data),
            "--test",
            str(data),
            "--serving-only",
            "--tenants",
            "2",
            "--serve-requests",
            "4",
            "--serve-prompt",
            "8",
            "--serve-new",
            "3",
            "--serve-repeats",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == []
    recs = {r["method"]: r for r in res["serving"]["records"]}
    assert set(recs) == {"base", "iapt", "lora"}
    assert recs["iapt"]["tenants"] == 2 and recs["iapt"]["trainable_params_per_tenant"] == rt.iapt_params(
        64, 2, 16
    )
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 3 for r in recs.values())
    assert "| iapt | 2 |" in (out / "results.md").read_text()


def test_the_gated_start_is_at_the_frozen_model_and_trains_every_part():
    """The gate (issue 20, ``IAPTConfig.gate_init=0.0``, the tool's ``--iapt-gate``): each layer's
    prompts times a scalar that starts at 0. The slots then
    have zero keys and values in every layer (they change no real token's output but for a softmax
    weight of exp(0)); at the first step only the gates have a gradient; after two AdamW steps every
    generator parameter has moved (``up`` keeps its random start, unlike a zero ``up``)."""
    from test_convergence import VOCAB, fixed_batches

    from iapt_kernels.testing import tiny_llama

    torch.manual_seed(1)
    w = ik.apply_iapt(
        tiny_llama(VOCAB, seed=0, initializer_range=0.02),
        ik.IAPTConfig(num_tokens=4, bottleneck_size=8, backend="reference"),
    )
    b = fixed_batches()[0]
    seen = []
    hooks = [
        getattr(layer.self_attn, proj).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        for layer in w.model.model.layers
        for proj in ("k_proj", "v_proj")
    ]
    loss = w(**b).loss
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * len(w.model.model.layers)
    for out in seen:
        assert torch.count_nonzero(out[b["slot_mask"]]) == 0
        assert torch.count_nonzero(out[~b["slot_mask"] & b["attention_mask"].bool()]) > 0
    init = {k: v.clone() for k, v in w.generators.state_dict().items()}
    assert sum(k.endswith(".gate") for k in init) == len(w.generators)
    loss.backward()
    for name, p in w.generators.named_parameters():
        has_grad = p.grad is not None and torch.count_nonzero(p.grad) > 0
        assert has_grad == name.endswith(".gate"), name
    opt = torch.optim.AdamW(w.param_groups(1e-2))
    for step in range(2):
        if step:
            opt.zero_grad(set_to_none=True)
            w(**fixed_batches()[step]).loss.backward()
        opt.step()
    for name, p in w.generators.state_dict().items():
        assert not torch.equal(p, init[name]), f"{name} did not move in two steps"


def test_real_task_cue_follows_the_slots():
    """The real task: every method sees instruction + cue + label; IAPT's slots sit before the cue."""
    from test_integration import INSTR, RESP, L

    cue = [30, 31]
    rows = [(ins, resp, "x", cue) for ins, resp in zip(INSTR, RESP)]
    iapt = rt._Method.__new__(rt._Method)
    iapt.slots, iapt.pad_id = L, 0
    b = iapt._layout(rows, True, "right")
    plain = rt._Method.__new__(rt._Method)
    plain.slots, plain.pad_id = 0, 0
    p = plain._layout(rows, True, "right")
    for i, (ins, resp) in enumerate(zip(INSTR, RESP)):
        n = len(ins)
        assert b["input_ids"][i, : n + L + 2].tolist()[-2:] == cue
        assert p["input_ids"][i, : n + 2 + len(resp)].tolist() == ins + cue + resp
        first = (b["labels"][i] != -100).nonzero()[0].item()
        assert first - 1 == n + L + 1  # the cue's last token predicts the label
