r"""``python -m iapt_kernels.integrations.vllm``: start vLLM's OpenAI-compatible server serving IAPT tenants.

Builds the engine arguments of :func:`iapt_kernels.integrations.vllm.engine_args` as command-line flags
and replaces this process with ``python -m vllm.entrypoints.openai.api_server`` (same pid: stop the
server by this process's id). Arguments after ``--`` go to the server unchanged (``--host``,
``--port``, ``--dtype``, ...).

    python -m iapt_kernels.integrations.vllm --model DIR --adapter support=DIR_A --adapter legal=DIR_B:1 \
        --response-prefix $'<|im_start|>assistant\n' -- --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ._prompts import engine_args

# Engine arguments whose value is a flag pair on vLLM's command line.
_BOOLEAN_FLAGS = {
    "enforce_eager": ("--enforce-eager", None),
    "enable_chunked_prefill": ("--enable-chunked-prefill", "--no-enable-chunked-prefill"),
    "enable_prefix_caching": ("--enable-prefix-caching", "--no-enable-prefix-caching"),
}


def server_argv(args: dict) -> list[str]:
    """``engine_args(...)`` as the api_server's command-line flags."""
    argv = ["--model", args["model"], "--hf-overrides", json.dumps(args["hf_overrides"])]
    for key, (on, off) in _BOOLEAN_FLAGS.items():
        flag = on if args[key] else off
        if flag:
            argv.append(flag)
    return argv


def _adapter(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=DIR or NAME=DIR:TENANT, got {text!r}")
    head, colon, tail = path.rpartition(":")
    if colon and tail.isdigit() and head:
        return name, [head, int(tail)]
    return name, path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="python -m iapt_kernels.integrations.vllm", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="the base model directory the adapters were trained on")
    p.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        required=True,
        help="NAME=DIR (a single-tenant adapter) or NAME=DIR:T (tenant T of a multi-tenant one); repeat",
    )
    p.add_argument("--slot-token-id", type=int, default=None, help="id written at slot positions")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--response-prefix", help="text after the slots (tokenized with the model's tokenizer)"
    )
    group.add_argument("--response-prefix-ids", help="comma-separated token ids after the slots")
    p.add_argument("--backend", default="auto", help="generator kernels: auto, cpp, triton or reference")
    a = p.parse_args(own)
    prefix: list[int] = []
    if a.response_prefix_ids:
        prefix = [int(t) for t in a.response_prefix_ids.split(",")]
    elif a.response_prefix:
        from transformers import AutoTokenizer

        prefix = AutoTokenizer.from_pretrained(a.model)(a.response_prefix, add_special_tokens=False)[
            "input_ids"
        ]
    args = engine_args(
        a.model, dict(a.adapter), slot_token_id=a.slot_token_id, response_prefix_ids=prefix, backend=a.backend
    )
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *server_argv(args), *rest]
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
