"""Reference rational activation (Padé Activation Unit), docs/design.md section 2.

    R(x) = P(x) / Q(x),   P(x) = a_0 + a_1 x + ... + a_m x^m
    version "B":  Q(x) = 1 + | b_1 x + ... + b_n x^n |
    version "A":  Q(x) = 1 + |b_1| |x| + ... + |b_n| |x|^n

`G` groups split the last dimension of `x` into `G` equal contiguous chunks; chunk `g` uses row `g` of
the coefficients. `|u|` is `u * sgn(u)` with `sgn(u) = -1 if u < 0 else +1`, so autograd gives
`d|u|/du = sgn(u)` everywhere, including at 0 (PyTorch's `abs` would give 0 there).

This module is the ground truth every kernel is tested against: plain PyTorch, written for clarity.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validate import REFERENCE_BACKENDS, check_backend, check_rational_inputs, normalize_coefficients
from ..fits import rational_init

__all__ = ["rational", "Rational"]


def _abs(u: torch.Tensor) -> torch.Tensor:
    # The sign is a constant to autograd, so d|u|/du = sgn(u), +1 at u = 0.
    return u * torch.where(u < 0, -1.0, 1.0).to(u.dtype)


def _horner(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j c[..., j] x^j with coefficients laid out (G, 1, k) against x (…, G, chunk)."""
    out = coefficients[..., -1]
    for j in range(coefficients.shape[-1] - 2, -1, -1):
        out = out * x + coefficients[..., j]
    return out


def rational(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    *,
    version: str = "B",
) -> torch.Tensor:
    """Rational activation in plain PyTorch; same contract as :func:`iapt_kernels.rational`.

    Computes in the promoted dtype of ``x`` and the coefficients (at least float32) and returns
    ``x.dtype``.
    """
    check_rational_inputs(x, numerator, denominator, version)
    num, den = normalize_coefficients(numerator, denominator)
    groups = num.shape[0]
    compute = torch.promote_types(torch.promote_types(x.dtype, num.dtype), torch.float32)
    xs = x.to(compute)
    shape = xs.shape
    # (..., C) -> (..., G, chunk): group g is the g-th contiguous chunk of the last dimension.
    last = shape[-1] if xs.dim() > 0 else 1
    xg = xs.reshape(*shape[:-1], groups, last // groups)
    a = num.to(compute).unsqueeze(-2)  # (G, 1, m+1), broadcasts against (..., G, chunk)
    b = den.to(compute).unsqueeze(-2)  # (G, 1, n)
    p = _horner(a, xg)
    if version == "B":
        b0 = torch.cat([torch.zeros_like(b[..., :1]), b], dim=-1)  # A(x) = sum_{k>=1} b_k x^k
        q = 1.0 + _abs(_horner(b0, xg))
    else:
        b0 = torch.cat([torch.zeros_like(b[..., :1]), _abs(b)], dim=-1)
        q = 1.0 + _horner(b0, _abs(xg))
    return (p / q).reshape(shape).to(x.dtype)


class Rational(nn.Module):
    """Learned rational activation with ``groups`` coefficient sets (reference implementation).

    Args:
        degrees: ``(m, n)``, numerator and denominator degrees, each in 1..8.
        init: name of the function the coefficients start as (see :func:`iapt_kernels.rational_init`).
        version: ``"B"`` (default, ``Q = 1 + |sum b_k x^k|``) or ``"A"`` (``Q = 1 + sum |b_k||x|^k``).
        groups: number of equal contiguous chunks of the last dimension, each with its own coefficients.
        backend: accepted for signature parity with :class:`iapt_kernels.Rational`; must be
            ``"reference"`` or ``"auto"``.

    Parameters ``numerator (groups, m+1)`` and ``denominator (groups, n)``, float32.
    """

    def __init__(
        self,
        degrees: tuple[int, int] = (5, 4),
        init: str = "gelu",
        version: str = "B",
        groups: int = 1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend(backend, REFERENCE_BACKENDS, "reference.Rational")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        num, den = rational_init(init, degrees, version)
        self.degrees = (int(degrees[0]), int(degrees[1]))
        self.version = version
        self.groups = groups
        self.init = init
        self.numerator = nn.Parameter(num.float().repeat(groups, 1))
        self.denominator = nn.Parameter(den.float().repeat(groups, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator, version=self.version)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, init={self.init!r}, version={self.version!r}, groups={self.groups}"
