"""The multi-seed study driver (benchmarks/real_task_study.py): the rate is chosen on validation loss
only, ablations reuse IAPT's rate, finished runs are not repeated, and the table is what the runs said;
then one real run end to end on the tiny model."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("tokenizers")

from benchmarks import real_task_study as st  # noqa: E402

# final validation loss and test accuracy each fake run reports, by (method, lr, seed); the test
# accuracy is best at the rate the validation loss does NOT pick, so a choice on test would show
FAKE_VAL = {("iapt", 0.001): 0.2, ("iapt", 0.003): 0.5, ("lora", 0.001): 0.9, ("lora", 0.003): 0.3}


def fake_call(calls):
    def call(cmd, stdout=None, stderr=None):
        arg = dict(zip(cmd, cmd[1:]))
        method, seed, out = arg["--methods"], int(arg["--seed"]), arg["--out"]
        lr = float(arg[st.LR_FLAG[method]])
        calls.append((method, lr, seed))
        val = FAKE_VAL.get((method, lr), 0.4) + seed / 100
        acc = 0.9 - val if (method, lr) in FAKE_VAL else 0.5 + seed / 10
        rec = {
            "method": method,
            "trainable_params": 10,
            "val": [[0, 7.0], [4, val]],
            "accuracy": acc,
            "train_cpu_s": 1.0,
            "peak_rss_mib": 100.0,
        }
        with open(f"{out}/results.json", "w") as f:
            json.dump({"setup": {"frozen_val_loss": 7.0 + seed}, "methods": [rec]}, f)
        return 0

    return call


def test_choice_on_validation_ablation_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(st.subprocess, "call", fake_call(calls))
    argv = ["--seeds", "0,1", "--lrs", "1e-3,3e-3", "--jobs", "1", "--out", str(tmp_path), "--", "--quick"]
    assert st.main(argv) == 0
    study = json.loads((tmp_path / "study.json").read_text())["methods"]
    assert study["iapt"]["lr"] == 0.001 and study["lora"]["lr"] == 0.003  # lowest validation loss
    assert study["iapt-gelu"]["lr"] == 0.001  # the ablation takes IAPT's rate
    assert study["iapt"]["accuracy"] == pytest.approx([70.0, 69.0])  # seed 0 from the sweep, seed 1 run
    assert study["iapt"]["mean"] == pytest.approx(69.5) and study["iapt"]["std"] == pytest.approx(
        0.7071, abs=1e-4
    )
    assert study["iapt"]["step0_vs_frozen"] == pytest.approx([0.0, 7.0 / 8.0 - 1])
    # 2 methods x 2 rates on seed 0, then 2 methods + 1 ablation on seed 1, plus the ablation's seed 0
    assert len(calls) == 4 + 3 + 1 and len(set(calls)) == len(calls)
    md = (tmp_path / "study.md").read_text()
    assert "| iapt | 0.001 |" in md and "69.5 ± 0.7" in md and "--quick" in md
    calls.clear()
    assert st.main(argv) == 0  # every run is on disk: nothing runs again
    assert calls == []


def test_failed_run_names_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(st.subprocess, "call", lambda *a, **k: 3)
    with pytest.raises(RuntimeError, match=r"iapt lr=0.001 seed=0 failed \(exit 3\).*log.txt"):
        st.main(
            ["--methods", "iapt", "--ablations", "", "--seeds", "0", "--lrs", "1e-3", "--out", str(tmp_path)]
        )


def test_bad_arguments():
    with pytest.raises(SystemExit):
        st.main(["--methods", "nope"])


@pytest.mark.slow
def test_one_real_run(tmp_path):
    """A real (tiny) run through `python -m benchmarks.real_task`: the table reads its results file."""
    from iapt_kernels.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    words = {"red": "warm", "orange": "warm", "blue": "cold", "green": "cold"}
    rows = [{"instruction": f"Is {w} warm or cold?", "output": words[w]} for w in sorted(words)] * 12
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.real_task_study",
        "--methods",
        "iapt",
        "--ablations",
        "",
        "--seeds",
        "0",
        "--lrs",
        "1e-2",
        "--out",
        str(out),
        "--",
        "--model",
        str(model),
        "--train",
        str(train),
        "--test",
        str(test),
        "--steps",
        "2",
        "--val-size",
        "4",
        "--batch-size",
        "4",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    run = json.loads((out / "iapt" / "lr0.01" / "seed0" / "results.json").read_text())["methods"][0]
    study = json.loads((out / "study.json").read_text())["methods"]["iapt"]
    assert study["accuracy"] == [100 * run["accuracy"]] and study["final_val"] == [run["val"][-1][1]]
