"""Builds the C++ CPU extension `iapt_kernels._C` from csrc/.

Install with `pip install --no-build-isolation -e .` in an environment that already has torch: the
extension compiles against that torch, and no build environment ever installs another. The C++ files
compile in parallel with ninja (`MAX_JOBS` of them), optimised and without debug info; `pip -v`
shows the progress. If torch cannot be imported (typically: `--no-build-isolation` forgotten) or the
compile fails, the install fails with a message saying why and what to do; `IAPT_NO_EXTENSION=1`
installs without the extension on purpose (CPU tensors then use the reference, and the package warns
at import).
"""

import glob
import os
import sys
import time

from setuptools import setup

NO_EXT_HINT = (
    "set IAPT_NO_EXTENSION=1 to install without it (CPU tensors then run the slower reference "
    "backend; GPU Triton kernels are unaffected)"
)


def _say(msg: str) -> None:
    print(f"iapt_kernels: {msg}", file=sys.stderr, flush=True)


ext_modules, cmdclass = [], {}
if os.environ.get("IAPT_NO_EXTENSION", "0") == "1":
    _say("IAPT_NO_EXTENSION=1, skipping the C++ extension")
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            f"iapt_kernels: cannot import torch in the build environment ({exc}), so the C++ CPU extension "
            "cannot be built.\n  Install torch first, then this package with --no-build-isolation:\n"
            '    pip install torch "setuptools>=64" wheel && pip install --no-build-isolation -e .\n'
            f"  or {NO_EXT_HINT}."
        ) from None

    class CheckedBuildExtension(BuildExtension):
        """torch's BuildExtension (ninja compiles the C++ files in parallel, `MAX_JOBS` of them, default
        ninja's own: the CPU count + 2), with a failed compile turned into a message that says what to
        do."""

        def build_extensions(self):
            if not self.use_ninja:
                _say("ninja is not installed: the C++ files compile one at a time (`pip install ninja`)")
            _say("compiling the C++ CPU extension; this takes a few minutes (`pip -v` shows progress)")
            t0 = time.time()
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                raise SystemExit(
                    f"iapt_kernels: the C++ extension failed to build ({exc}); the compiler's output "
                    f"is above. Fix it (a C++17 compiler with OpenMP is needed), or {NO_EXT_HINT}."
                ) from None
            _say(f"built the C++ extension in {time.time() - t0:.0f} s")

    # -fopenmp matters: without it at::parallel_for compiles to a serial loop. -g0 overrides the -g that
    # Python's own CFLAGS carry: debug info for the torch headers doubles the compile time for nothing.
    ext_modules = [
        CppExtension(
            "iapt_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-g0", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": CheckedBuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
