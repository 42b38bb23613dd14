"""iapt_kernels: fused kernels for IAPT (Instruction-Aware Prompt Tuning).

Public API:
    rational, Rational, rational_init, attention_pool, multi_tenant_generator, PromptGenerator,
    MultiTenantPromptGenerator, TenantGroups, available_backends, and for Hugging Face models IAPTConfig, IAPTModel, apply_iapt,
    insert_prompt_slots, save_iapt, load_iapt, IAPTDataCollator (transformers is imported lazily)

Each op exists three times with the same contract: a Triton kernel (CUDA tensors), a C++ CPU kernel
(optional extension), both behind one ``iapt::`` torch.library op, and a plain-PyTorch reference in
:mod:`iapt_kernels.reference`. ``backend="auto"`` picks Triton for CUDA tensors and C++ for CPU ones.

The floors (docs/design.md section 4): ``_validate``, ``tenants``, ``fits`` and ``reference`` import
neither Triton nor the kernel layer, so they are imported first, always. The kernel layer
(``library``, ``functional``, ``modules``, and ``integrations`` on top) imports Triton's launchers
(``ops``) only where Triton imports; it is imported here whenever Triton is importable, and on first
use otherwise (without Triton, e.g. on macOS, CPU tensors run the C++ kernels).
"""

from importlib import import_module

from . import reference
from ._backend import HAS_TRITON as _HAS_TRITON
from ._backend import available_backends
from ._version import __version__ as __version__  # re-exported
from .fits import rational_init
from .tenants import TenantGroups

# Where each name of the kernel layer lives.
_KERNEL_LAYER = {
    "rational": "functional",
    "attention_pool": "functional",
    "multi_tenant_generator": "functional",
    "Rational": "modules",
    "PromptGenerator": "modules",
    "MultiTenantPromptGenerator": "modules",
    "IAPTConfig": "integrations",
    "IAPTModel": "integrations",
    "apply_iapt": "integrations",
    "insert_prompt_slots": "integrations",
    "save_iapt": "integrations",
    "load_iapt": "integrations",
    "IAPTDataCollator": "integrations",
}

__all__ = [
    "rational",
    "Rational",
    "rational_init",
    "attention_pool",
    "multi_tenant_generator",
    "PromptGenerator",
    "available_backends",
    "reference",
    "MultiTenantPromptGenerator",
    "TenantGroups",
    # Hugging Face integration (docs/design.md section 9): transformers is imported lazily.
    "IAPTConfig",
    "IAPTModel",
    "apply_iapt",
    "insert_prompt_slots",
    "save_iapt",
    "load_iapt",
    "IAPTDataCollator",
]


def __getattr__(name: str):
    if name in _KERNEL_LAYER:
        value = getattr(import_module(f".{_KERNEL_LAYER[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if _HAS_TRITON:
    for _name in _KERNEL_LAYER:
        __getattr__(_name)
    del _name
