"""Machinery shared by the property-based tests (`test_fuzz_*.py`): the two hypothesis profiles, the
runner that applies one to a property, and the byte-level checks of "nothing else was written".

Profiles (docs/design.md section 5, "Fuzzing"):

- ``quick``: part of every run (``pytest -m "not slow"`` too); a fixed seed (``derandomize=True``) and a
  handful of examples per property, so a failure reproduces on any machine.
- ``long`` (the ``slow`` marker; ``bash scripts/test.sh`` runs it): thousands of examples where an
  example costs milliseconds (C++ backend, reference), a few hundred where it costs a second (the Triton
  interpreter). Also derandomized, so CI is reproducible; ``IAPT_FUZZ_RANDOM=1`` draws a fresh seed
  each run (and keeps hypothesis' failure database) for an open-ended search, and
  ``IAPT_FUZZ_SCALE=k`` multiplies its example counts by ``k``.

Every property runs the explicit ``@example`` regression cases first (the failures the fuzzer found).
``IAPT_FUZZ_LOG=path`` appends, per property run, the number of examples executed (JSON lines).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import pytest
import torch

# The GPU image has no hypothesis: there the fuzz modules skip, saying why (the main leg runs them).
pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the `test` extra installs it)")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

QUICK, LONG = "quick", "long"
PROFILES = [QUICK, pytest.param(LONG, marks=pytest.mark.slow)]
_RANDOM = os.environ.get("IAPT_FUZZ_RANDOM") == "1"
_SCALE = float(os.environ.get("IAPT_FUZZ_SCALE", "1"))
_COMMON = dict(
    deadline=None,  # the interpreter's cost varies by orders of magnitude with the grid
    derandomize=not _RANDOM,
    database=None if not _RANDOM else settings.default.database,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("iapt-" + QUICK, **_COMMON)
settings.register_profile("iapt-" + LONG, **_COMMON)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def run_property(name: str, body, strategy, profile: str, examples: dict[str, int], regressions=()) -> int:
    """Run ``body(case)`` on the explicit ``regressions`` and then on ``examples[profile]`` cases drawn
    from ``strategy`` under the profile's settings; return the number of cases run."""
    count = [0]
    n = examples[profile]
    if profile == LONG:
        n = max(1, round(n * _SCALE))

    @settings(settings.get_profile("iapt-" + profile), max_examples=n)
    @given(case=strategy)
    def prop(case):
        count[0] += 1
        body(case)

    for case in reversed(regressions):
        prop = example(case=case)(prop)
    start = time.process_time()
    prop()
    log = os.environ.get("IAPT_FUZZ_LOG")
    if log:
        with open(log, "a") as f:
            record = dict(
                property=name, profile=profile, examples=count[0], cpu_s=time.process_time() - start
            )
            f.write(json.dumps(record) + "\n")
    return count[0]


def sized(lo: int, hi: int, boundaries=()) -> st.SearchStrategy[int]:
    """An int in ``[lo, hi]``: small values, the values on and either side of each boundary (a tile,
    block or chunk size of some kernel), and anything in range. Shrinks towards small."""
    edges = sorted({v for b in boundaries for v in (b - 1, b, b + 1) if lo <= v <= hi})
    parts = [st.integers(lo, min(hi, lo + 8))]
    if edges:
        parts.append(st.sampled_from(edges))
    parts.append(st.integers(lo, hi))
    return st.one_of(*parts)


# --------------------------------------------------------------------------- memory layouts

LAYOUTS = ("contiguous", "offset", "transposed", "strided")


@dataclass
class Placed:
    """``view`` holds the values in some layout inside ``base``; ``before`` is a copy of ``base``."""

    view: torch.Tensor
    base: torch.Tensor
    before: torch.Tensor

    def untouched(self) -> bool:
        return same_bits(self.base, self.before)


def _sentinel(dtype: torch.dtype):
    # NaN around a float view: a kernel that reads past its input poisons the output, and one that
    # writes there changes bits the check compares.
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point:
        return float("nan")
    return 12345


def place(values: torch.Tensor, layout: str, shift: int = 3) -> Placed:
    """``values`` (any tensor) copied into a buffer so that the returned view has its values but the
    layout asked for: ``contiguous``; ``offset`` (contiguous at a storage offset, sentinels around it);
    ``transposed`` (the dimensions stored in reverse order: no dimension has stride 1 where a dense
    tensor would); ``strided`` (every other element of the last dimension, sentinels in between)."""
    values = values.detach()
    if layout in ("transposed", "strided") and values.dim() < 2:
        layout = "strided" if values.dim() == 1 else "offset"
    if layout == "contiguous":
        base = values.clone().contiguous()
        view = base
    elif layout == "offset":
        n = values.numel()
        base = torch.full((n + 2 * shift,), _sentinel(values.dtype), dtype=values.dtype, device=values.device)
        base[shift : shift + n] = values.reshape(-1)
        view = base[shift : shift + n].view(values.shape)
    elif layout == "transposed":
        dims = list(range(values.dim()))[::-1]
        base = values.permute(dims).contiguous()
        view = base.permute(dims)
    elif layout == "strided":
        shape = (*values.shape[:-1], 2 * values.shape[-1])
        base = torch.full(shape, _sentinel(values.dtype), dtype=values.dtype, device=values.device)
        base[..., ::2] = values
        view = base[..., ::2]
    else:
        raise ValueError(layout)
    assert torch.equal(view, values) or not values.dtype.is_floating_point or same_bits(view, values)
    return Placed(view, base, base.clone())


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as integers (NaN compares equal to the same NaN)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t
    return t.view(_INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def expect_clear_error(call, what: str) -> None:
    """``call()`` must raise ValueError or TypeError with a message (never another exception, a wrong
    result or a crash)."""
    try:
        call()
    except (ValueError, TypeError) as e:
        assert str(e).strip(), f"{what}: {type(e).__name__} without a message"
        return
    raise AssertionError(f"{what}: accepted an invalid input")
