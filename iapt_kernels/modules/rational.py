"""Drop-in rational activation module: same constructor, parameters and state_dict as
`iapt_kernels.reference.Rational`, running the fused kernels."""

from __future__ import annotations

import torch

from .._validate import check_backend
from ..functional import rational
from ..reference.rational import Rational as _ReferenceRational

__all__ = ["Rational"]


class Rational(_ReferenceRational):
    """Learned rational activation (Padé Activation Unit) on the fused kernels.

    Args:
        degrees: ``(m, n)``, numerator and denominator degrees, each in 1..8.
        init: function the coefficients start as: ``identity``, ``relu``, ``leaky_relu``, ``gelu``,
            ``silu``, ``tanh`` or ``sigmoid`` (see :func:`iapt_kernels.rational_init`).
        version: ``"B"`` (default) or ``"A"``.
        groups: equal contiguous chunks of the last dimension, each with its own coefficients.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"reference"``; checked when the module is
            called, since the device is known only then.

    Parameters ``numerator (groups, m+1)`` and ``denominator (groups, n)``, float32; the state_dict
    is interchangeable with :class:`iapt_kernels.reference.Rational`.
    """

    def __init__(
        self,
        degrees: tuple[int, int] = (5, 4),
        init: str = "gelu",
        version: str = "B",
        groups: int = 1,
        backend: str = "auto",
    ) -> None:
        super().__init__(degrees, init, version, groups, backend="reference")
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator, version=self.version, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
