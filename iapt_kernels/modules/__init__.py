"""Drop-in ``nn.Module``s on the fused kernels, interchangeable with :mod:`iapt_kernels.reference`."""

from .generator import PromptGenerator
from .multi_tenant import MultiTenantPromptGenerator, TenantGroups
from .rational import Rational

__all__ = ["Rational", "PromptGenerator", "MultiTenantPromptGenerator", "TenantGroups"]
