#!/usr/bin/env bash
# One command that says where iapt_kernels stands on this machine's GPU (about 6 minutes on one
# H100/H200, no network):
#   1. installs the package into the machine's torch (no dependencies, no build isolation; the C++
#      extension is skipped: it serves CPU tensors, and its serial compile would eat the budget);
#   2. runs the CUDA subset of the tests (`-m "gpu and not slow"`);
#   3-5. scripts/gpu_check.py: times every op (do_bench, fused vs eager and torch.compile reference,
#      fraction of the measured copy bandwidth), trains IAPT 30 steps fused vs reference in fp32 and
#      bf16, checks multi-tenant generate and tenant -1;
#   6. writes OUT/{results.json,report.md,log.txt,pytest.txt} and exits non-zero naming what failed.
#
#   scripts/gpu_check.sh [--out DIR] [--smoke]
#
# --smoke: CPU only, the Triton interpreter, tiny shapes, every step exercised (CI runs it so this
# script cannot rot); step 1 then checks that the package imports from this tree instead of
# reinstalling it (the README's install has just built it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-check-out
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
say() { echo "[$(date +%H:%M:%S)] $*"; }
export CUBLAS_WORKSPACE_CONFIG=:4096:8

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  say "1/6 install (smoke): checking that iapt_kernels imports from $(pwd)"
  python -c "import os, iapt_kernels as k; assert os.path.realpath(k.__file__).startswith(os.path.realpath('iapt_kernels')), k.__file__; print('backends:', k.available_backends())"
  install_rc=$?
  test_args=(-m gpu -q -p no:cacheprovider)
else
  say "1/6 install: pip install --no-deps --no-build-isolation -e . (C++ extension skipped)"
  IAPT_NO_EXTENSION=1 pip install --no-deps --no-build-isolation -e . -q
  install_rc=$?
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || {
    say "FAILED: no CUDA device visible (use --smoke on a CPU machine)"; exit 1; }
  test_args=(-m "gpu and not slow" -q -p no:cacheprovider --durations=15)
fi

say "2/6 tests: python -m pytest ${test_args[*]}"
timeout 240 python -m pytest "${test_args[@]}" > "$OUT/pytest.txt" 2>&1
tests_rc=$?
[ "$tests_rc" = 124 ] && echo "pytest did not finish within 240 s" >> "$OUT/pytest.txt"
tail -n 25 "$OUT/pytest.txt"

say "3-5/6 timing, training, serving: python scripts/gpu_check.py"
smoke_flag=()
[ "$SMOKE" = 1 ] && smoke_flag=(--smoke)
python scripts/gpu_check.py --out "$OUT" "${smoke_flag[@]}" --install-rc "$install_rc" \
  --tests-rc "$tests_rc" --tests-log "$OUT/pytest.txt"
rc=$?
say "6/6 wrote $OUT (report.md, results.json, log.txt, pytest.txt) in $(( $(date +%s) - start )) s"
exit "$rc"
