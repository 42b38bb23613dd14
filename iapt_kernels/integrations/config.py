"""IAPT's configuration (:class:`IAPTConfig`) and the one place its fields become generator modules.

Below the model and the adapter files: both build generators through :func:`new_generator`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._validate import check_backend
from ..functional import MAX_TOKENS
from ..modules import MultiTenantPromptGenerator, PromptGenerator

__all__ = ["IAPTConfig"]


@dataclass
class IAPTConfig:
    """Configuration of IAPT on a causal LM.

    Attributes:
        num_tokens: ``L``, soft tokens per layer (4 in the paper).
        bottleneck_size: ``r``, the generator's bottleneck width.
        degrees: ``(m, n)`` of the rational activation.
        activation_init: function the rational activation starts as (``"gelu"``, ``"identity"``, ...).
        version: rational activation version, ``"B"`` or ``"A"``.
        share_projections: share the ``down``/``up`` projections across layers (pooling and
            activation stay per layer).
        num_tenants: ``1`` for one adapter; ``T > 1`` for a multi-tenant model where each request
            picks its adapter with ``tenant_ids``.
        backend: kernel backend of the generators, ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``.
    """

    num_tokens: int = 4
    bottleneck_size: int = 256
    degrees: tuple[int, int] = (5, 4)
    activation_init: str = "gelu"
    version: str = "B"
    share_projections: bool = False
    num_tenants: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.degrees = tuple(int(x) for x in self.degrees)
        for name in ("num_tokens", "bottleneck_size", "num_tenants"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"IAPTConfig.{name} must be a positive int, got {v!r}")
        if len(self.degrees) != 2:
            raise ValueError(f"IAPTConfig.degrees must be (m, n), got {self.degrees!r}")
        if self.version not in ("A", "B"):
            raise ValueError(f"IAPTConfig.version must be 'A' or 'B', got {self.version!r}")
        try:
            check_backend(self.backend)
        except ValueError as exc:
            raise ValueError(f"IAPTConfig.{exc}") from None
        check_tokens_for_backend(self.num_tokens, self.backend)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``degrees`` as a list)."""
        d = dataclasses.asdict(self)
        d["degrees"] = list(self.degrees)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IAPTConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown IAPTConfig keys: {sorted(unknown)}")
        return cls(**d)


def check_tokens_for_backend(num_tokens: int, backend: str) -> None:
    # The fused kernels are compiled for L up to MAX_TOKENS: say so when the config is made, not at
    # the first forward.
    if backend != "reference" and num_tokens > MAX_TOKENS:
        raise ValueError(
            f"num_tokens={num_tokens} exceeds the {MAX_TOKENS} soft tokens the fused kernels support "
            f"(backend={backend!r}): use num_tokens <= {MAX_TOKENS}, or backend='reference'"
        )


def generator_args(config: IAPTConfig, hidden_size: int) -> tuple:
    """The positional arguments a generator module takes for ``config`` (after the tenant count of a
    multi-tenant one): the one place the config's fields map onto the modules' arguments."""
    return (
        hidden_size,
        config.bottleneck_size,
        config.num_tokens,
        tuple(config.degrees),
        config.activation_init,
        config.version,
    )


def new_generator(
    config: IAPTConfig, hidden_size: int, num_tenants: int = 1, backend: str = "auto"
) -> nn.Module:
    """One layer's generator for ``config``: a :class:`PromptGenerator` for one tenant, else a
    :class:`MultiTenantPromptGenerator` (wrapping and loading build through it)."""
    if num_tenants == 1:
        return PromptGenerator(*generator_args(config, hidden_size), backend)
    return MultiTenantPromptGenerator(num_tenants, *generator_args(config, hidden_size), backend)
