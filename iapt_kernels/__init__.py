"""iapt_kernels: fused kernels for IAPT (Instruction-Aware Prompt Tuning).

Public API:
    rational, Rational, rational_init, attention_pool, PromptGenerator, MultiTenantPromptGenerator,
    TenantGroups, available_backends, and for Hugging Face models IAPTConfig, IAPTModel, apply_iapt,
    insert_prompt_slots, save_iapt, load_iapt, IAPTDataCollator (transformers is imported lazily)

Each op exists three times with the same contract: a Triton kernel (CUDA, or CPU under
``TRITON_INTERPRET=1``), a C++ CPU kernel (optional extension), and a plain-PyTorch reference in
:mod:`iapt_kernels.reference`. ``backend="auto"`` picks Triton for CUDA tensors and C++ for CPU ones.
"""

from . import library as _library  # noqa: F401  (registers the iapt:: torch.library ops)
from . import reference
from ._backend import available_backends
from .fits import rational_init
from .functional import attention_pool, rational
from .modules import MultiTenantPromptGenerator, PromptGenerator, Rational, TenantGroups

__all__ = [
    "rational", "Rational", "rational_init", "attention_pool", "PromptGenerator", "available_backends",
    "reference", "MultiTenantPromptGenerator", "TenantGroups",
]
__version__ = "0.1.0"

# Hugging Face integration (docs/design.md section 4, integrations/): transformers is imported lazily.
from .integrations import (  # noqa: E402
    IAPTConfig, IAPTDataCollator, IAPTModel, apply_iapt, insert_prompt_slots, load_iapt, save_iapt)

__all__ += ["IAPTConfig", "IAPTModel", "apply_iapt", "insert_prompt_slots", "save_iapt", "load_iapt", "IAPTDataCollator"]
