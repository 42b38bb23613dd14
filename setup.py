"""Builds the optional C++ CPU extension `iapt_kernels._C` from csrc/.

Install with `pip install --no-build-isolation -e .` in an environment that already has torch: the
extension compiles against that torch, and no build environment ever installs another. If torch is
missing or the compile fails, the package installs without the extension and falls back to the
reference on CPU (it warns once at import).
"""

import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("IAPT_NO_EXTENSION", "0") == "1":
    print("iapt_kernels: IAPT_NO_EXTENSION=1, skipping the C++ extension", file=sys.stderr)
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("iapt_kernels: torch is not installed, building without the C++ extension", file=sys.stderr)
    else:

        class OptionalBuildExtension(BuildExtension):
            """A failed compile leaves the package usable (reference on CPU) instead of failing the install."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001
                    ext.iapt_failed = True
                    print(f"iapt_kernels: C++ extension not built ({exc}); CPU falls back to the reference",
                          file=sys.stderr)

            def build_extensions(self):
                super().build_extensions()
                # Later steps (the editable install's copy) must not look for what was not built.
                self.extensions = [e for e in self.extensions if not getattr(e, "iapt_failed", False)]

        # -fopenmp matters: without it at::parallel_for compiles to a serial loop.
        ext_modules = [
            CppExtension(
                "iapt_kernels._C",
                sorted(glob.glob("csrc/*.cpp")),
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
