"""Which backends work in this process, and which one a call runs on: the one backend seam.

`auto` means Triton for CUDA tensors, the C++ extension for CPU tensors when it is built, else the
reference. The ops themselves know no backend: the device picks the kernel (CPU: C++, CUDA: Triton),
and the functional layer checks here that the kernel it gets is the one asked for. Triton on CPU
tensors (the interpreter) is a test route, `library.triton_on_cpu`; `cpu_route` says when it is on,
and inside it `auto` on CPU tensors is Triton. Nothing here falls back silently from an explicitly
requested backend: asking for one that cannot run is an error that says how to get it.
`resolve_backend` is called once per public call, by `functional`. The name check itself is
`_validate.check_backend`, shared with the modules, which check the name when they are built.
"""

from __future__ import annotations

import importlib.machinery
import os
import warnings

import torch

from ._validate import BACKENDS, check_backend

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "HAS_CPP",
    "available_backends",
    "cpu_route",
    "resolve_backend",
    "triton_interpreted",
]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    TRITON_ERROR = ""
except Exception as exc:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def _library_path() -> str:
    """The C++ extension's shared library, ``iapt_kernels/_C<ABI suffix>`` (built by setup.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no _C{importlib.machinery.EXTENSION_SUFFIXES[0]} in {here}")


# Loading the library defines the iapt:: schemas and registers the C++ kernels for CPU tensors
# (csrc/registration.cpp); iapt_kernels.library adds the rest.
try:
    LIBRARY_PATH = _library_path()
    torch.ops.load_library(LIBRARY_PATH)
    if not hasattr(torch.ops.iapt, "rational_fwd"):
        raise ImportError(f"{LIBRARY_PATH} defines no iapt:: ops (built before csrc/registration.cpp?)")

    HAS_CPP = True
    CPP_ERROR = ""
except Exception as exc:  # the extension is optional: the package must import without it
    LIBRARY_PATH = None
    HAS_CPP = False
    CPP_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "iapt_kernels: the C++ CPU extension is not available, CPU tensors will use the reference "
        f"backend ({CPP_ERROR}). Build it with `pip install --no-build-isolation -e .` "
        "(needs a C++ compiler and torch installed first).",
        RuntimeWarning,
        stacklevel=2,
    )


_CPU_ROUTE: str | None = None


def cpu_route() -> str | None:
    """``"triton"`` while `iapt_kernels.library.triton_on_cpu` has made the Triton launchers the CPU
    kernels of the ``iapt::`` ops (a test route), else None (CPU tensors run C++)."""
    return _CPU_ROUTE


def _set_cpu_route(route: str | None) -> None:
    global _CPU_ROUTE
    _CPU_ROUTE = route


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> list[str]:
    """The backends that work in this process, among ``"triton"``, ``"cpp"`` and ``"reference"``.

    ``"triton"`` is listed when Triton is importable and either CUDA is present or
    ``TRITON_INTERPRET=1`` was set before ``iapt_kernels`` was imported (then it runs on CPU
    tensors in the interpreter, inside ``iapt_kernels.library.triton_on_cpu()``); ``"cpp"`` when the
    C++ extension is built and loads.
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
        if device.type == "cpu" and cpu_route() == "triton":
            return "triton"
        if device.type == "cpu" and HAS_CPP:
            return "cpp"
        return "reference"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(
                f"backend='triton' needs the triton package, which failed to import ({TRITON_ERROR}); "
                "install it with `pip install triton`"
            )
        if device.type == "cpu" and cpu_route() != "triton":
            raise RuntimeError(
                "backend='triton' runs on CUDA tensors; CPU tensors run the C++ kernels (backend='cpp'). "
                "Running the Triton kernels on CPU tensors is a test route: set TRITON_INTERPRET=1 before "
                "importing iapt_kernels and call inside `with iapt_kernels.library.triton_on_cpu():`"
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
        if cpu_route() == "triton":
            raise RuntimeError(
                "backend='cpp': the CPU kernels are the Triton launchers inside "
                "iapt_kernels.library.triton_on_cpu(); call it outside that block"
            )
    return backend
