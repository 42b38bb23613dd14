"""Builds the C++ CPU extension `iapt_kernels._C` from csrc/.

Install with `pip install --no-build-isolation -e .` in an environment that already has torch: the
extension compiles against that torch, and no build environment ever installs another. The C++ files
compile in parallel (`MAX_JOBS`, default: the CPU count), optimised and without debug info; `pip -v`
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

    class ParallelBuildExtension(BuildExtension):
        """Compiles the C++ files in parallel and says what it is doing; a failed compile stops the
        install with the compiler's error and the way to install without the extension."""

        def build_extensions(self):
            jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
            compiler = self.compiler
            serial = compiler.compile

            def compile_parallel(
                sources,
                output_dir=None,
                macros=None,
                include_dirs=None,
                debug=0,
                extra_preargs=None,
                extra_postargs=None,
                depends=None,
            ):
                macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                    output_dir, macros, include_dirs, sources, depends, extra_postargs
                )
                cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
                todo = [o for o in objects if o in build]
                n = min(jobs, len(todo)) or 1
                _say(
                    f"compiling {len(todo)} C++ files with {n} parallel jobs (MAX_JOBS sets it); "
                    "this takes a few minutes"
                )
                t0, done = time.time(), []

                def one(obj):
                    src, ext = build[obj]
                    compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                    done.append(obj)
                    _say(
                        f"  compiled {os.path.basename(src)} ({len(done)}/{len(todo)}, {time.time() - t0:.0f} s)"
                    )

                if n == 1:
                    for o in todo:
                        one(o)
                else:
                    from concurrent.futures import ThreadPoolExecutor

                    with ThreadPoolExecutor(n) as pool:
                        list(pool.map(one, todo))  # re-raises the first compile error
                return objects

            compiler.compile = compile_parallel
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                raise SystemExit(
                    f"iapt_kernels: the C++ extension failed to build ({exc}); the compiler's output "
                    f"is above. Fix it (a C++17 compiler with OpenMP is needed), or {NO_EXT_HINT}."
                ) from None
            finally:
                compiler.compile = serial

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
    cmdclass = {"build_ext": ParallelBuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
