#!/usr/bin/env bash
# The GPU-image leg of scripts/test.sh: the versions of the image the GPU check runs on (Python 3.12,
# torch 2.11, Triton 3.6, transformers 5.17), on this CPU machine, in a venv of their own
# (.venv-gpu-image/, gitignored; the system Python never gets a second torch). It runs
#   1. the Triton-interpreter tests (every `triton` case) and the Hugging Face tests;
#   2. scripts/gpu_check.sh --smoke (every step of the GPU check, Triton path under the interpreter);
#   3. an ahead-of-time compile with Triton 3.6's own ptxas for sm_80 and sm_90 (no GPU needed): a
#      sample of every op's configs and every fp64 attention-pool config, none may fail or spill.
# numpy stays below 2.4: Triton 3.6's interpreter fails on numpy >= 2.4 (fixed upstream after 3.6);
# the image's numpy 2.5 does not matter on a GPU, where the interpreter is not used.
# torch 2.11 from PyPI is the CUDA build (several GB; pip's cache makes a second install quick); it
# runs on CPU here. The package is installed without the C++ extension (IAPT_NO_EXTENSION=1), as
# gpu_check.sh installs it on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu-image
PINS=(torch==2.11.0 triton==3.6.0 "transformers==5.17.*" "numpy<2.4" peft pytest safetensors accelerate
      "setuptools>=64" wheel)
t0=$(date +%s)
stamp() { echo "[gpu-image leg $(( $(date +%s) - t0 )) s] $*"; }

# Python 3.12, as on the image: on PATH, or a pyenv install (pyenv's shim exists but fails when 3.12
# is not its selected version, so each candidate is run, not just found).
py=""
for c in "${IAPT_GPU_IMAGE_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 \
         "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py="$c"; break; fi
done
if [ -z "$py" ]; then
  echo "test_gpu_image.sh: no Python 3.12 found (PATH or pyenv); set IAPT_GPU_IMAGE_PYTHON" >&2
  exit 1
fi

[ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
stamp "installing ${PINS[*]} into $VENV"
"$VENV/bin/pip" install -q "${PINS[@]}"
IAPT_NO_EXTENSION=1 "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
export PATH="$PWD/$VENV/bin:$PATH"
python - <<'PY'
import importlib.metadata as md, os, platform
import iapt_kernels
have = [f"{n} {md.version(n)}" for n in ("torch", "triton", "transformers", "numpy", "peft")]
print("versions: python", platform.python_version(), "|", " | ".join(have))
here = os.path.realpath("iapt_kernels")
assert os.path.realpath(iapt_kernels.__file__).startswith(here), f"imported {iapt_kernels.__file__}, not {here}"
PY

stamp "1/3 tests: the Triton-interpreter cases and the Hugging Face tests"
python -m pytest tests --all -p no:cacheprovider -q -k "triton or attention_pool_stream or hf_path or hf_traps or integration or response_prefix or convergence"

stamp "2/3 scripts/gpu_check.sh --smoke"
out=$(mktemp -d)
bash scripts/gpu_check.sh --smoke --out "$out"
cat "$out/report.md"
rm -rf "$out"

stamp "3/3 ahead-of-time compile with Triton 3.6 for sm_80 and sm_90"
python benchmarks/static_report.py --arch 80 90 --scope sample --no-progress
python benchmarks/static_report.py --arch 80 90 --ops attention_pool --where dtype=fp64 --no-progress
stamp "done"
