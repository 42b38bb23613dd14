"""Test setup, read top to bottom:

1. cuBLAS is deterministic only with a fixed workspace, and the variable must be set before CUDA
   initialises: every test runs with `torch.use_deterministic_algorithms(True)` (see 5).
2. Where CUDA exists the Triton backend runs on CUDA tensors; where it does not, Triton runs in its
   CPU interpreter (`TRITON_INTERPRET=1`, read when a kernel is *defined*, so before iapt_kernels
   imports). Triton's own default for FP fusion is used, as in production.
3. TF32 is off: the fp32 tolerance (1e-5) holds for exact fp32 products only (README, "Precision").
4. `device`: a test that takes it runs once per device. Its `cuda` case carries the `gpu` marker and
   is skipped with "needs CUDA" on a machine without one; a `cpp`/`reference` case exists on CPU only
   (the C++ backend is CPU code; the float64 ground truth is computed on CPU from the same values); a
   `triton` case on CPU needs the interpreter, which is off when CUDA is present.
5. Every uninitialised output is poisoned with NaN, so a kernel that forgets an element fails.
6. A `triton` case on CPU runs inside `iapt_kernels.library.triton_on_cpu()`: the iapt:: ops know no
   backend (CPU tensors run C++), so the case makes the Triton launchers their CPU kernels for its
   duration (helpers.cpu_kernels).
7. Two tiers. Plain `python -m pytest` is the fast tier, the inner loop: every test not marked `slow`
   (at least one case of every kind of check, so a broken op, backend or HF path still fails there).
   The slow tier (marker `slow`: the tooling, distributed runs, the static report, the GPU-check smoke,
   the long parity grids and the long fuzz profile) runs with `--all` (both tiers, what
   scripts/test.sh runs) or `-m slow` (that tier alone). `slow_on_cpu` puts a case's CPU run in the
   slow tier and leaves its CUDA run where it was (cheap there, and in scripts/gpu_check.sh's subset). An explicit `-m` expression selects by itself,
   and a test named by its node id (`file::test[...]`) runs whatever its tier.
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402

import iapt_kernels  # noqa: E402,F401

# The vLLM tests run in their own leg of scripts/test.sh, in a virtual environment holding vLLM
# (IAPT_VLLM_TESTS=1); everywhere else they are not collected (deselected, not skipped).
collect_ignore = [] if os.environ.get("IAPT_VLLM_TESTS") == "1" else ["vllm_serving"]

NEEDS_CUDA = "needs CUDA"
INTERPRETER_OFF = "the Triton interpreter is off where CUDA is present: Triton runs on the cuda case"


def pytest_addoption(parser):
    parser.addoption(
        "--all",
        action="store_true",
        help="run both tiers, the fast default and the slow tier (marker slow); scripts/test.sh runs this",
    )


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


def _fast_tier_only(config) -> bool:
    """The slow tier is left out unless asked for: `--all`, any `-m` expression (it says by itself
    what to run), or a test named by its node id."""
    named = any("::" in str(arg) for arg in config.args)
    return not (config.getoption("all") or config.option.markexpr or named)


@pytest.hookimpl(tryfirst=True)  # before pytest's own `-m` selection, which must see `slow_on_cpu`'s mark
def pytest_collection_modifyitems(config, items):
    fast_only = _fast_tier_only(config)
    selected, dropped = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        device, backend = params.get("device"), params.get("backend")
        if device == "cpu" and item.get_closest_marker("slow_on_cpu"):
            item.add_marker(pytest.mark.slow)
        if device == "cuda" and backend in ("cpp", "reference"):
            dropped.append(item)  # a CPU-only backend, or the ground truth: no CUDA case to run
            continue
        if fast_only and item.get_closest_marker("slow"):
            dropped.append(item)  # the slow tier: `--all` or `-m slow` runs it
            continue
        if item.get_closest_marker("gpu") and not CUDA:
            item.add_marker(pytest.mark.skip(reason=NEEDS_CUDA))
        elif device == "cpu" and backend == "triton" and CUDA:
            item.add_marker(pytest.mark.skip(reason=INTERPRETER_OFF))
        selected.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = selected


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """With deterministic algorithms on, torch.empty* (Python and ATen C++ alike, CPU and CUDA) fills
    new floating tensors with NaN: every kernel output starts poisoned."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def triton_cases_run_triton_on_cpu(request):
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    if not CUDA and params.get("backend") == "triton" and params.get("device", "cpu") == "cpu":
        from helpers import cpu_kernels

        with cpu_kernels("triton"):
            yield
    else:
        yield
