"""IAPT's configuration (:class:`IAPTConfig`) and the one place its fields become generator modules.

Below the model and the adapter files: both build generators through :func:`new_generator`.
"""

from __future__ import annotations

import dataclasses
import math
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
        gate_init: each layer's prompts are multiplied by a learned scalar gate that starts at this
            value (default 0: a fresh adapter writes zero prompts, and ``up`` keeps its random
            start); ``None``: no gate. Adapters saved before the gate existed have no such key in
            ``iapt_config.json`` and load as ``None``, unchanged. With a gate, call
            :meth:`IAPTModel.calibrate` before training (docs/design.md section 1, "Initialisation").
    """

    num_tokens: int = 4
    bottleneck_size: int = 16
    degrees: tuple[int, int] = (5, 4)
    activation_init: str = "gelu"
    version: str = "B"
    share_projections: bool = False
    num_tenants: int = 1
    backend: str = "auto"
    gate_init: float | None = 0.0

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
        if self.gate_init is not None:
            if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)):
                raise ValueError(f"IAPTConfig.gate_init must be a float or None, got {self.gate_init!r}")
            self.gate_init = float(self.gate_init)
            if not math.isfinite(self.gate_init):
                raise ValueError(f"IAPTConfig.gate_init must be finite, got {self.gate_init!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``degrees`` as a list)."""
        d = dataclasses.asdict(self)
        d["degrees"] = list(self.degrees)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IAPTConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error. A dict without ``gate_init`` (an
        adapter saved before the gate existed) means ``gate_init=None``: no gate, as it was trained."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown IAPTConfig keys: {sorted(unknown)}")
        return cls(**{"gate_init": None, **d})


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
        return PromptGenerator(*generator_args(config, hidden_size), backend, gate_init=config.gate_init)
    return MultiTenantPromptGenerator(
        num_tenants, *generator_args(config, hidden_size), backend, gate_init=config.gate_init
    )
