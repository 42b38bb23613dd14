"""Tests for the stored rational (PAU) initialisation fits and :mod:`iapt_kernels.fits`."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iapt_kernels import fits
from iapt_kernels.fits import INIT_NAMES, _fits, fit_max_error, rational_init

# The package data as shipped (iapt_kernels/data/rational_fits.json), read as a user's install reads it.
DATA = json.loads(resources.files("iapt_kernels").joinpath("data", "rational_fits.json").read_text())
FITS = _fits()
PUBLISHED_MAX_ERROR = {
    (e["name"], e["version"], e["m"], e["n"]): e["max_error"] for e in DATA["published_max_error"]
}

FITTED = ("relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid")
DEGREES = [(m, n) for m in range(1, 9) for n in range(1, 9)]
X = np.linspace(-3.0, 3.0, 100001)  # the grid the stored errors were measured on


def _target(name: str, x: np.ndarray) -> np.ndarray:
    """The target activations, computed independently of the fitting script (torch, float64)."""
    t = torch.from_numpy(x)
    out = {
        "relu": lambda: torch.relu(t),
        "leaky_relu": lambda: F.leaky_relu(t, 0.01),
        "gelu": lambda: F.gelu(t),  # exact erf GELU
        "silu": lambda: F.silu(t),
        "tanh": lambda: torch.tanh(t),
        "sigmoid": lambda: torch.sigmoid(t),
        "identity": lambda: t.clone(),
    }[name]()
    return out.numpy()


def _rational(num: np.ndarray, den: np.ndarray, version: str, x: np.ndarray) -> np.ndarray:
    """R(x) for a batch of coefficient rows: num (k, m+1), den (k, n) -> (k, len(x)), float64.

    Power sums (not Horner), so it is independent of the script's evaluator.
    """
    m, n = num.shape[1] - 1, den.shape[1]
    p = num @ (x[None, :] ** np.arange(m + 1)[:, None])
    if version == "B":
        q = 1.0 + np.abs(den @ (x[None, :] ** np.arange(1, n + 1)[:, None]))
    else:
        q = 1.0 + np.abs(den) @ (np.abs(x)[None, :] ** np.arange(1, n + 1)[:, None])
    return p / q


def test_every_fit_is_stored():
    expected = {(nm, v, m, n) for nm in FITTED for v in "AB" for m, n in DEGREES}
    assert set(FITS) == expected
    for (name, version, m, n), (num, den, err) in FITS.items():
        assert len(num) == m + 1 and len(den) == n
        values = np.array(num + den + (err,), dtype=np.float64)
        assert np.all(np.isfinite(values)), (name, version, m, n)
        assert np.max(np.abs(values[:-1])) <= 1e4, (name, version, m, n)
        assert 0.0 <= err < 1.0, (name, version, m, n)


@pytest.mark.slow  # every stored fit on the dense grid: the longest of this file (about 10 s)
def test_stored_errors_hold():
    """Every fit's max abs error on the grid is at most the stored number (vectorised per group)."""
    targets = {name: _target(name, X) for name in FITTED}
    groups = defaultdict(list)
    for key in FITS:
        groups[key[1:]].append(key)
    worst = 0.0
    for (version, _m, _n), keys in groups.items():
        num = np.array([FITS[k][0] for k in keys])
        den = np.array([FITS[k][1] for k in keys])
        r = _rational(num, den, version, X)
        f = np.stack([targets[k[0]] for k in keys])
        measured = np.max(np.abs(r - f), axis=1)
        stored = np.array([FITS[k][2] for k in keys])
        bad = [(k, a, b) for k, a, b in zip(keys, measured, stored) if not a <= b * (1 + 1e-6) + 1e-12]
        assert not bad, bad
        worst = max(worst, float(np.max(measured)))
    assert worst < 0.8


def test_sane_outside_the_fit_interval():
    """No blow-ups slightly outside [-3, 3]: |R - f| stays moderate on [-5, 5]."""
    x = np.linspace(-5.0, 5.0, 2001)
    for (name, version, m, n), (num, den, _err) in FITS.items():
        r = _rational(np.array([num]), np.array([den]), version, x)[0]
        assert np.all(np.isfinite(r))
        assert np.max(np.abs(r - _target(name, x))) < 1e3, (name, version, m, n)


def test_not_worse_than_published():
    assert PUBLISHED_MAX_ERROR  # the (5, 4) PAU fits of both versions at least
    for name in FITTED:
        for version in "AB":
            assert (name, version, 5, 4) in PUBLISHED_MAX_ERROR
    for key, published in PUBLISHED_MAX_ERROR.items():
        assert FITS[key][2] <= published, (key, FITS[key][2], published)


def test_errors_do_not_grow_with_degree():
    """A fit of degrees (m, n) can represent every fit of lower degrees, so it is never worse."""
    for (name, version, m, n), (_, _, err) in FITS.items():
        for lower in ((m - 1, n), (m, n - 1)):
            if min(lower) >= 1:
                assert err <= FITS[(name, version) + lower][2] * (1 + 1e-9) + 1e-15


@pytest.mark.parametrize("version", ["A", "B"])
def test_identity_is_exact(version):
    x = np.linspace(-100.0, 100.0, 20001)
    for m, n in DEGREES:
        num, den = rational_init("identity", (m, n), version)
        r = _rational(num.numpy()[None], den.numpy()[None], version, x)[0]
        assert np.max(np.abs(r - x)) == 0.0
        assert fit_max_error("identity", (m, n), version) == 0.0


@pytest.mark.parametrize("name", INIT_NAMES)
@pytest.mark.parametrize("version", ["A", "B"])
def test_rational_init_shapes_and_values(name, version):
    for m, n in DEGREES:
        num, den = rational_init(name, (m, n), version)
        assert isinstance(num, torch.Tensor) and isinstance(den, torch.Tensor)
        assert num.shape == (m + 1,) and den.shape == (n,)
        assert num.dtype == torch.float64 and den.dtype == torch.float64
        if name != "identity":
            stored = FITS[(name, version, m, n)]
            assert num.tolist() == list(stored[0]) and den.tolist() == list(stored[1])
            assert fit_max_error(name, (m, n), version) == stored[2]


def test_defaults_and_fresh_tensors():
    num, den = rational_init("gelu")
    assert num.shape == (6,) and den.shape == (4,)
    assert num.tolist() == list(FITS[("gelu", "B", 5, 4)][0])
    assert fit_max_error("gelu") == FITS[("gelu", "B", 5, 4)][2]
    num.zero_()
    den.fill_(7.0)
    again, den_again = rational_init("gelu")
    assert again.tolist() == list(FITS[("gelu", "B", 5, 4)][0])
    assert den_again.tolist() == list(FITS[("gelu", "B", 5, 4)][1])
    ident, _ = rational_init("identity")
    ident[1] = 5.0
    assert rational_init("identity")[0][1].item() == 1.0
    assert rational_init("relu", [3, 2])[0].shape == (4,)  # any pair-like sequence


def test_init_names():
    assert isinstance(INIT_NAMES, tuple)
    assert set(INIT_NAMES) == set(FITTED) | {"identity"}
    assert fits.__all__ == ["INIT_NAMES", "rational_init", "fit_max_error"]


@pytest.mark.parametrize("func", [rational_init, fit_max_error])
def test_bad_arguments(func):
    with pytest.raises(ValueError, match="known names.*relu"):
        func("swish")
    with pytest.raises(ValueError, match="known names"):
        func(None)
    for degrees in [(0, 4), (9, 4), (5, 0), (5, 9), (-1, 2)]:
        with pytest.raises(ValueError):
            func("relu", degrees)
    for degrees in [(5,), (5, 4, 3), 5, None]:
        with pytest.raises(ValueError):
            func("relu", degrees)
    for degrees in [(5.0, 4), (5, "4"), (True, 4), (5, np.int64(4))]:
        with pytest.raises(TypeError):
            func("relu", degrees)
    for version in ["C", "b", "", None]:
        with pytest.raises(ValueError):
            func("relu", (5, 4), version)


def test_matches_reference_module():
    """The stored coefficients mean the same function in the package's reference implementation."""
    try:
        from iapt_kernels.reference.rational import rational
    except ImportError as exc:  # pragma: no cover - the reference module is part of the package
        pytest.skip(f"reference implementation not importable: {exc}")
    x = torch.from_numpy(X)
    for name in FITTED:
        for version in "AB":
            num, den = rational_init(name, (5, 4), version)
            ref = rational(x, num, den, version=version)
            ours = _rational(num.numpy()[None], den.numpy()[None], version, X)[0]
            assert np.max(np.abs(ref.numpy() - ours)) < 1e-12
            assert math.isclose(
                float(torch.max(torch.abs(ref - torch.from_numpy(_target(name, X))))),
                fit_max_error(name, (5, 4), version),
                rel_tol=1e-6,
                abs_tol=1e-12,
            )
