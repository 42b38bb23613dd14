"""Pure-PyTorch reference implementations: the ground truth every kernel is tested against.

Each module here computes the op in the plain order of docs/design.md section 1, with no fusion; the modules have
the same constructors, parameter names and state_dicts as their fused counterparts. This floor imports only
`_validate`, `fits` and `tenants`: no Triton, nothing from `ops/` or `modules/` (tests/test_layers.py).
"""

from .attention_pool import attention_pool
from .generator import PromptGenerator
from .multi_tenant import MultiTenantPromptGenerator, multi_tenant_generator
from .rational import Rational, rational

__all__ = [
    "rational",
    "Rational",
    "attention_pool",
    "PromptGenerator",
    "MultiTenantPromptGenerator",
    "multi_tenant_generator",
]
