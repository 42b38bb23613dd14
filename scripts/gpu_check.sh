#!/usr/bin/env bash
# One command that says where iapt_kernels stands on this machine's GPU (about 6 minutes on one
# H100/H200, no network):
#   1. installs the package into the machine's torch (no dependencies, no build isolation; the C++
#      extension is skipped: it serves CPU tensors, and its serial compile would eat the budget). A
#      failed install stops the check here with its reason (missing setuptools/wheel are named before
#      pip runs); nothing runs from a source tree the environment does not import;
#   2. runs the CUDA subset of the tests (`-m "gpu and not slow"`, at most 240 s; sized with
#      scripts/gpu_subset_size.py, see the README);
#   3-5. scripts/gpu_check.py: times every op (do_bench, fused vs eager and torch.compile reference,
#      fraction of the measured copy bandwidth), trains IAPT 30 steps fused vs reference in fp32 and
#      bf16, checks multi-tenant generate and tenant -1, all with backend "triton";
#   6. writes OUT/{results.json,report.md,log.txt,pytest.txt} and exits non-zero naming what failed.
#      The report gives the versions it ran on, each step's seconds, and the backend every step's
#      fused calls resolved to.
#
#   scripts/gpu_check.sh [--out DIR] [--smoke]
#
# --smoke: CPU only, the Triton interpreter, tiny shapes, every step exercised with backend "triton"
# (CI runs it so this script cannot rot); step 1 then checks that the package imports from this tree
# instead of reinstalling it (the test command's install has just done that).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-check-out
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
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

# A step that cannot go on stops the check here, with its reason on screen and in report.md.
stop() {
  say "FAILED: $1"
  printf '# GPU check\n\nFAILED at %s\n\nNothing after it ran; log.txt has the output.\n' "$1" > "$OUT/report.md"
  exit 1
}
from_tree="import os, iapt_kernels as k; here = os.path.realpath('iapt_kernels'); \
assert os.path.realpath(k.__file__).startswith(here), f'iapt_kernels imports from {k.__file__}, not {here}'; \
print('backends:', k.available_backends())"
t_install=$(date +%s)
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  say "1/6 install (smoke): checking that iapt_kernels imports from $(pwd)"
  python -c "$from_tree" || stop "install: iapt_kernels does not import from this tree (install it first)"
  test_args=(-m gpu -q -p no:cacheprovider)
else
  say "1/6 install: pip install --no-deps --no-build-isolation -e . (C++ extension skipped)"
  # --no-build-isolation builds with this environment's setuptools: name what is missing before pip
  # fails on it (no setuptools: "No module named 'setuptools'"; setuptools < 64 cannot build an
  # editable install; 64 to 70.0 without `wheel`: "invalid command 'bdist_wheel'").
  python - <<'PY' || stop "install: the build tools are missing (above); pip install 'setuptools>=70.1' (or 'setuptools>=64' wheel) and rerun"
import sys
try:
    import setuptools
except ImportError:
    sys.exit("setuptools is not installed")
v = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
if v < (64, 0):
    sys.exit(f"setuptools {setuptools.__version__} is older than 64 and cannot build an editable install")
if v < (70, 1):
    try:
        import wheel  # noqa: F401
    except ImportError:
        sys.exit(f"setuptools {setuptools.__version__} without the wheel package fails with invalid command 'bdist_wheel'")
PY
  IAPT_NO_EXTENSION=1 pip install --no-deps --no-build-isolation -e . -q > "$OUT/install.txt" 2>&1 || {
    rc=$?; tail -n 30 "$OUT/install.txt"; stop "install: pip exit status $rc (its last lines above)"; }
  rm -f "$OUT/install.txt"
  python -c "$from_tree" || stop "install: iapt_kernels does not import from this tree after pip install"
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" ||
    stop "no CUDA device visible (use --smoke on a CPU machine)"
  test_args=(-m "gpu and not slow" -q -p no:cacheprovider --durations=15)
fi
install_s=$(( $(date +%s) - t_install ))

say "2/6 tests: python -m pytest ${test_args[*]}"
t_tests=$(date +%s)
timeout 240 python -m pytest "${test_args[@]}" > "$OUT/pytest.txt" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - t_tests ))
[ "$tests_rc" = 124 ] && echo "pytest did not finish within 240 s" >> "$OUT/pytest.txt"
tail -n 25 "$OUT/pytest.txt"

say "3-5/6 timing, training, serving: python scripts/gpu_check.py"
smoke_flag=()
[ "$SMOKE" = 1 ] && smoke_flag=(--smoke)
python scripts/gpu_check.py --out "$OUT" "${smoke_flag[@]}" --install-rc 0 --install-s "$install_s" \
  --tests-rc "$tests_rc" --tests-s "$tests_s" --tests-log "$OUT/pytest.txt"
rc=$?
say "6/6 wrote $OUT (report.md, results.json, log.txt, pytest.txt) in $(( $(date +%s) - start )) s"
exit "$rc"
