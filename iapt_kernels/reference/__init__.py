"""Pure-PyTorch reference implementations: the ground truth every kernel is tested against.

Each module here computes the op in the plain order of docs/design.md section 1, with no fusion; the modules have
the same constructors, parameter names and state_dicts as their fused counterparts.
"""

from .attention_pool import attention_pool
from .generator import PromptGenerator
from .multi_tenant import MultiTenantPromptGenerator
from .rational import Rational, rational

__all__ = ["rational", "Rational", "attention_pool", "PromptGenerator", "MultiTenantPromptGenerator"]
