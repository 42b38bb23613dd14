"""Initial coefficients for the rational activation (Padé Activation Unit).

The rational function is

    R(x) = (a_0 + a_1 x + ... + a_m x^m) / Q(x)
    version "B":  Q(x) = 1 + | b_1 x + b_2 x^2 + ... + b_n x^n |
    version "A":  Q(x) = 1 + |b_1| |x| + |b_2| |x|^2 + ... + |b_n| |x|^n

The coefficients come from minimax fits on [-3, 3] stored as package data in
``iapt_kernels/data/rational_fits.json`` (written by ``scripts/fit_rational.py``, read once on first
use); ``identity`` is exact.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch

from ._validate import check_degrees, check_version

__all__ = ["INIT_NAMES", "rational_init", "fit_max_error"]

INIT_NAMES: tuple[str, ...] = ("identity", "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid")
"""Names accepted by :func:`rational_init` and :func:`fit_max_error`.

``leaky_relu`` has negative slope 0.01 and ``gelu`` is the exact (erf) GELU.
"""


@functools.cache
def _fits() -> dict[tuple[str, str, int, int], tuple[tuple[float, ...], tuple[float, ...], float]]:
    """`(name, version, m, n) -> (numerator, denominator, max_error)` from the package's JSON."""
    data = json.loads(resources.files("iapt_kernels").joinpath("data", "rational_fits.json").read_text())
    return {
        (f["name"], f["version"], f["m"], f["n"]): (
            tuple(f["numerator"]),
            tuple(f["denominator"]),
            f["max_error"],
        )
        for f in data["fits"]
    }


def _check(name: object, degrees: object, version: object) -> tuple[str, int, int, str]:
    if not isinstance(name, str) or name not in INIT_NAMES:
        raise ValueError(f"unknown init name {name!r}; known names: {', '.join(INIT_NAMES)}")
    m, n = check_degrees(degrees)
    check_version(version)
    return name, m, n, version


def rational_init(
    name: str, degrees: tuple[int, int] = (5, 4), version: str = "B"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients that make the rational activation start as a known function.

    Parameters
    ----------
    name : str
        One of :data:`INIT_NAMES`.
    degrees : tuple of int
        ``(m, n)``, numerator and denominator degrees, each in 1..8.
    version : {"B", "A"}
        Denominator form: ``"B"`` is ``1 + |sum b_k x^k|``, ``"A"`` is ``1 + sum |b_k| |x|^k``.

    Returns
    -------
    numerator : torch.Tensor
        ``(m + 1,)`` float64, ``a_0 .. a_m``.
    denominator : torch.Tensor
        ``(n,)`` float64, ``b_1 .. b_n``.

    Both are new tensors on each call.  The fits minimise the maximum absolute error on [-3, 3];
    see :func:`fit_max_error`.  ``identity`` is exact (``a_1 = 1``, all else 0).

    Raises
    ------
    ValueError
        Unknown name, degrees not a pair in 1..8, or version not ``"A"``/``"B"``.
    TypeError
        A degree that is not an int.
    """
    name, m, n, version = _check(name, degrees, version)
    if name == "identity":
        num = torch.zeros(m + 1, dtype=torch.float64)
        num[1] = 1.0
        return num, torch.zeros(n, dtype=torch.float64)
    num, den, _ = _fits()[(name, version, m, n)]
    return torch.tensor(num, dtype=torch.float64), torch.tensor(den, dtype=torch.float64)


def fit_max_error(name: str, degrees: tuple[int, int] = (5, 4), version: str = "B") -> float:
    """Maximum absolute error of the stored fit on [-3, 3].

    Parameters
    ----------
    name, degrees, version
        As for :func:`rational_init`.

    Returns
    -------
    float
        ``max |R(x) - f(x)|`` over ``numpy.linspace(-3, 3, 100001)`` in float64; ``0.0`` for
        ``identity``.
    """
    name, m, n, version = _check(name, degrees, version)
    if name == "identity":
        return 0.0
    return float(_fits()[(name, version, m, n)][2])
