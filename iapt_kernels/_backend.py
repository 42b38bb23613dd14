"""Which backends work in this process, and which one a call runs on: the one backend seam.

`auto` means Triton for CUDA tensors, the C++ extension for CPU tensors when it is built, else the
reference. Nothing here falls back silently from an explicitly requested backend: asking for one that
cannot run is an error that says how to get it. `resolve_backend` is called once per public call, by
`functional`; the library ops and the autograd Functions only read its answer. The name check itself
is `_validate.check_backend`, shared with the modules, which check the name when they are built.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from ._validate import BACKENDS, check_backend

__all__ = ["BACKENDS", "HAS_TRITON", "HAS_CPP", "available_backends", "resolve_backend", "triton_interpreted"]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    _TRITON_ERROR = ""
except Exception as exc:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

try:
    _C = importlib.import_module(f"{__package__}._C")

    HAS_CPP = True
    CPP_ERROR = ""
except Exception as exc:  # the extension is optional: the package must import without it
    _C = None
    HAS_CPP = False
    CPP_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "iapt_kernels: the C++ CPU extension is not available, CPU tensors will use the reference "
        f"backend ({CPP_ERROR}). Build it with `pip install --no-build-isolation -e .` "
        "(needs a C++ compiler and torch installed first).",
        RuntimeWarning,
        stacklevel=2,
    )


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> list[str]:
    """The backends that work in this process, among ``"triton"``, ``"cpp"`` and ``"reference"``.

    ``"triton"`` is listed when Triton is importable and either CUDA is present or
    ``TRITON_INTERPRET=1`` was set before ``iapt_kernels`` was imported (then it runs on CPU
    tensors in the interpreter); ``"cpp"`` when the C++ extension is built and loads.
    """
    out = []
    if HAS_TRITON and (torch.cuda.is_available() or triton_interpreted()):
        out.append("triton")
    if HAS_CPP:
        out.append("cpp")
    out.append("reference")
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``triton``, ``cpp`` or ``reference``) a call on ``device`` runs on."""
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        if device.type == "cpu" and HAS_CPP:
            return "cpp"
        return "reference"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(
                f"backend='triton' needs the triton package, which failed to import ({_TRITON_ERROR}); "
                "install it with `pip install triton`"
            )
        if device.type == "cpu" and not triton_interpreted():
            raise RuntimeError(
                "backend='triton' runs on CUDA tensors; to run Triton kernels on CPU tensors set "
                "TRITON_INTERPRET=1 in the environment before importing iapt_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not support device {device}")
    if backend == "cpp":
        if not HAS_CPP:
            raise RuntimeError(
                f"backend='cpp' needs the C++ extension iapt_kernels._C, which failed to load ({CPP_ERROR}); "
                "build it with `pip install --no-build-isolation -e .` in an environment that already "
                "has torch and a C++ compiler"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    return backend
