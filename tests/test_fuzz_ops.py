"""Property-based tests (hypothesis) of the four ops against the float64 reference, on every backend
this machine runs: `rational`, `attention_pool`, `PromptGenerator` (the module / functional path) and
`multi_tenant_generator` (functional and the module's `slot_index` writes).

Properties, each drawn over shapes that cross every tile, block and chunk boundary of the kernels
(Triton `BLOCK_S`, `BLOCK_D`, the rational `BLOCK`, the multi-tenant `MM_BLOCK`/`SPLIT_CHUNK`; C++
`kRows`, `kMinChunk`, `kLaneGroup`, `kColTask`, `kRowTask`, `kTile`, `kBlock`), all four float dtypes,
degrees 1..8 and both versions, groups, padded and packed layouts (empty sequences, all-masked rows, a
single token), tenant mixes (unsorted, repeated, all -1, one tenant), NaN/Inf at masked positions and
non-contiguous or offset inputs:

- ``parity``: the output and every gradient within `TOLERANCE` (docs/design.md section 5) of the float64
  reference on the same rounded inputs, with the documented dtypes; the gradient at masked positions and
  of absent tenants exactly 0;
- ``determinism``: a second forward and backward gives the same bits (inside ``parity``);
- ``no stray writes``: the input buffers (sentinels around offset and strided views included) keep every
  bit; ``slot_index`` writes change exactly the slot rows of requests with an adapter;
- ``invalid``: every invalid draw (one mutation of a valid call) raises ValueError or TypeError with a
  message, never another exception, a crash or a result.

Failures found by the fuzzer are kept as ``@example`` regression cases (`REGRESSIONS`); the record of
each (and its fix) is in docs/design.md section 5.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch
from fuzz_helpers import DTYPES, LAYOUTS, PROFILES, expect_clear_error, place, run_property, same_bits, sized
from helpers import TOLERANCE, rel_err
from hypothesis import strategies as st

import iapt_kernels
from iapt_kernels import TenantGroups, reference
from iapt_kernels.ops.attention_pool import BLOCK_S, MAX_TOKENS, block_sizes
from iapt_kernels.ops.multi_tenant_generator import MM_BLOCK, SPLIT_CHUNK
from iapt_kernels.ops.rational import FWD_BLOCK

BACKENDS = iapt_kernels.available_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
F64 = torch.float64

# The C++ constants (csrc/pool_simd.h, csrc/multi_tenant.cpp, csrc/rational_blocks.h), read by hand:
# the extension does not export them.
K_ROWS, K_MIN_CHUNK, K_LANE_GROUP, K_COL_TASK, K_ROW_TASK = 16, 64, 4, 256, 16
K_TILE_F32, K_TILE_F64, K_BLOCK = 512, 256, 8192

# Per backend: the largest sizes drawn (the interpreter costs about a millisecond a program) and the
# boundaries crossed. Triton: BLOCK_D is 32 (fp64), 64 (fp32) or 128 (fp16/bf16) at L <= 16; L_PAD
# steps at 16 and 32; a sequence's chunks are BLOCK_S tokens at these sizes.
_BD = sorted({block_sizes(L, s)[2] for L in (4, 20) for s in (2, 4, 8)})
SIZES = {
    "triton": dict(
        B=(1, 5, ()),
        S=(0, 70, (BLOCK_S, 2 * BLOCK_S)),
        d=(1, 140, (*_BD, MM_BLOCK[1], SPLIT_CHUNK)),
        r=(1, 36, (MM_BLOCK[0], MM_BLOCK[1])),
        L=(1, 20, (16,)),
        T=(1, 4, ()),
        n=(0, 2200, (FWD_BLOCK, 2 * FWD_BLOCK)),
    ),
    "cpp": dict(
        B=(1, 12, (K_ROWS,)),
        S=(0, 300, (K_ROWS, 2 * K_ROWS, K_MIN_CHUNK, 2 * K_MIN_CHUNK, 4 * K_MIN_CHUNK)),
        d=(1, 300, (4, 8, 16, 32, K_COL_TASK)),
        r=(1, 40, (K_ROW_TASK, 2 * K_ROW_TASK)),
        L=(1, MAX_TOKENS, (K_LANE_GROUP, 2 * K_LANE_GROUP, 16, MAX_TOKENS)),
        T=(1, 6, ()),
        n=(0, 17000, (K_TILE_F64, K_TILE_F32, K_BLOCK, 2 * K_BLOCK)),
    ),
}
SIZES["reference"] = SIZES["cpp"]


def _size(backend, key):
    lo, hi, edges = SIZES[backend][key]
    return sized(lo, hi, edges)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shrinking(k: int, start: int) -> torch.Tensor:
    """1/j! for j = start..start+k-1: fitted coefficients shrink like this; random O(1) coefficients at
    degree 8 make an ill-conditioned rational that no fp32 evaluation gets to 1e-5 (tests/test_rational.py)."""
    return torch.tensor([1.0 / math.factorial(j) for j in range(start, start + k)], dtype=F64)


def _coefficients(degrees, groups, gen):
    m, n = degrees
    num = torch.randn(groups, m + 1, generator=gen, dtype=F64) * 0.5 * _shrinking(m + 1, 0)
    den = torch.randn(groups, n, generator=gen, dtype=F64) * 0.5 * _shrinking(n, 1)
    return num, den


def _positive(shape, gen):
    """A positive upstream gradient: coefficient and weight gradients are sums over every element, and
    with a zero-mean upstream they cancel to near 0, where any fp32 sum (the problem's conditioning, not
    the kernel's) misses a relative tolerance (tests/test_rational.py, `_upstream_grad`)."""
    return torch.rand(shape, generator=gen, dtype=F64) + 0.5


BASELINE_FACTOR = 8


def _leaf(t, dtype):
    """A fresh leaf (never the caller's tensor, whose .grad would accumulate across calls)."""
    return t.detach().to(dtype).clone().requires_grad_()


def _same(t):
    return t


def _baselines(ref_in, dtype, seed, rounded_intermediates=False):
    """For each output, what a correct float32 implementation may miss by: the reference evaluated in
    float32, and in float64 on inputs moved by about one float32 ulp (the sensitivity to rounding the
    inputs, and so the kernels' float32 intermediates). With `rounded_intermediates` (a composition of
    ops, each returning the activations' dtype by contract, as `PromptGenerator` returns `U` in fp16
    for fp16 inputs) also the reference evaluated in `dtype` itself. None for float64 inputs."""
    if dtype == F64:
        return None
    gen = _gen(seed + 1)

    def jitter(t):
        if not t.dtype.is_floating_point:
            return t
        return t.double() * (1 + 2.0**-24 * torch.randn(t.shape, generator=gen, dtype=F64))

    runs = [ref_in(torch.float32), ref_in(F64, jitter)]
    if rounded_intermediates and dtype != torch.float32:
        runs.append(ref_in(dtype))
    return list(zip(*runs))


def _close(what, out, ref, tol, case, base=None):
    """`out` within tolerance of the float64 `ref` (docs/design.md section 5.1):

    - `tol`, or the tolerance of `out`'s own dtype where that is coarser (a coefficient gradient comes
      back in the coefficients' dtype);
    - or, for an ill-conditioned draw, within `BASELINE_FACTOR` times the larger error of the
      baselines `base` (`_baselines`): a sum that cancels to near 0, or a result that moves by 1e-5
      when its inputs move by one float32 ulp, misses 1e-5 in any float32 implementation, the
      reference included; the kernel must then be as accurate as that, not more;
    - where the exact value overflows `out`'s dtype (a float16 coefficient gradient summed over many
      elements), `out` holds the infinity of the right sign; where a baseline overflows as well, any
      non-finite value is accepted.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)} for {case}"
    out, ref = out.detach().cpu(), ref.detach().cpu()
    tol = max(tol, TOLERANCE[out.dtype])
    base = [None if b is None else b.detach().cpu() for b in base or ()]
    # Where a baseline overflows too (an fp16 intermediate gradient past 65504 turns into inf, and
    # inf - inf into NaN, in the reference module as in the kernels; GradScaler skips such a step), a
    # non-finite output is what a correct implementation at that precision gives: left out.
    spilled = torch.zeros_like(out, dtype=torch.bool)
    for b in base:
        if b is not None:
            spilled |= ~torch.isfinite(b)
    if bool(spilled.any()):
        spilled &= ~torch.isfinite(out)
        out, ref = out[~spilled], ref[~spilled]
        base = [None if b is None else b[~spilled] for b in base]
    top = torch.finfo(out.dtype).max
    edge = torch.isinf(out) | (ref.abs() > top)
    if bool(edge.any()):
        at = ref[edge]
        assert not bool(torch.isnan(out[edge]).any()), f"{what}: NaN where the value overflows, for {case}"
        assert bool((at.abs() > top * (1 - tol)).all()), (
            f"{what}: infinity where the value is {at} for {case}"
        )
        assert torch.equal(torch.sign(out[edge]).double(), torch.sign(at)), (
            f"{what}: overflow sign for {case}"
        )
        out, ref = out[~edge], ref[~edge]
        base = [None if b is None else b[~edge] for b in base]
    err = rel_err(out, ref)
    if err < tol:
        return
    floor = max((rel_err(b, ref) for b in base if b is not None), default=0.0)
    assert floor < 0.25 and err < BASELINE_FACTOR * floor, (
        f"{what}: rel err {err:.3g} >= {tol} (float32 reference: {floor:.3g}) for {case}"
    )


# =========================================================================== rational


@dataclass(frozen=True)
class RationalCase:
    rows: int  # product of the leading dimensions
    chunk: int  # elements per group per row
    groups: int
    lead: str  # "1d" (x is (G chunk,) when rows == 1), "2d", "3d", "scalar" (0-dim x, G = chunk = 1)
    degrees: tuple[int, int]
    version: str
    dtype: str
    coef_dtype: str  # "same" as x, or a dtype name
    coef_1d: bool
    layout: str
    scale: float
    zeros: bool  # exact zeros in x: the sign of |u| at 0 is +1 in every backend
    seed: int
    bad: str = ""


@st.composite
def rational_cases(draw, backend, bad=()):
    lo, hi, edges = SIZES[backend]["n"]
    groups = draw(st.sampled_from([1, 1, 2, 3, 4, 7]))
    per_group = draw(sized(lo, hi // groups, edges))
    chunk = draw(st.sampled_from([1, 2, 5, 16, 33, per_group])) if per_group else draw(st.integers(1, 3))
    chunk = max(1, min(chunk, per_group or chunk))
    rows = per_group // chunk if per_group else draw(st.sampled_from([0, 0, 1]))
    lead = draw(st.sampled_from(["1d", "2d", "3d", "scalar"]))
    if lead == "scalar":
        rows, chunk, groups = 1, 1, 1
    return RationalCase(
        rows=rows,
        chunk=chunk,
        groups=groups,
        lead=lead,
        degrees=(draw(st.integers(1, 8)), draw(st.integers(1, 8))),
        version=draw(st.sampled_from("AB")),
        dtype=draw(st.sampled_from(list(DTYPES))),
        coef_dtype=draw(st.sampled_from(["same", "float32", "float64"])),
        coef_1d=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([0.3, 1.0, 2.0])),
        zeros=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        bad=draw(st.sampled_from(bad)) if bad else "",
    )


def _x_shape(c: RationalCase) -> tuple[int, ...]:
    last = c.groups * c.chunk
    if c.lead == "scalar":
        return ()
    if c.lead == "1d" and c.rows == 1:
        return (last,)
    if c.lead == "3d" and c.rows % 2 == 0 and c.rows:
        return (2, c.rows // 2, last)
    return (c.rows, last)


def _rational_inputs(c: RationalCase):
    gen = _gen(c.seed)
    dtype = DTYPES[c.dtype]
    x = torch.randn(_x_shape(c), generator=gen, dtype=F64) * c.scale
    if c.zeros and x.numel():
        x.view(-1)[::3] = 0.0
    num, den = _coefficients(c.degrees, c.groups, gen)
    if c.coef_1d and c.groups == 1:
        num, den = num[0], den[0]
    cdt = dtype if c.coef_dtype == "same" else DTYPES[c.coef_dtype]
    return x.to(dtype), num.to(cdt), den.to(cdt), _positive(x.shape, gen).to(dtype)


def _rational_run(fn, x, num, den, grad):
    num, den = num.detach().clone().requires_grad_(), den.detach().clone().requires_grad_()
    x.requires_grad_()
    y = fn(x, num, den)
    y.backward(grad)
    return y, x.grad, num.grad, den.grad


def check_rational(c: RationalCase, backend: str, device: str = "cpu") -> None:
    x, num, den, grad = _rational_inputs(c)
    tol = TOLERANCE[x.dtype]
    placed = place(x.to(device), c.layout)

    def fused(a, b, q):
        return iapt_kernels.rational(a, b, q, version=c.version, backend=backend)

    on = [t.to(device) for t in (num, den, grad)]
    out = _rational_run(fused, placed.view, on[0], on[1], on[2])
    assert placed.untouched(), f"the input buffer changed: {c}"

    def ref_in(dt, j=_same):
        return _rational_run(
            lambda a, b, q: reference.rational(a, b, q, version=c.version),
            *(j(t).detach().to(dt).clone() for t in (x, num, den, grad)),
        )

    ref = ref_in(F64)
    base = _baselines(ref_in, x.dtype, c.seed)
    assert out[0].dtype == x.dtype and out[1].dtype == x.dtype, c
    assert out[2].dtype == num.dtype and out[3].dtype == den.dtype, c
    assert out[2].shape == num.shape and out[3].shape == den.shape, c
    for what, o, r, f in zip(("y", "dx", "dnumerator", "ddenominator"), out, ref, base or [None] * 4):
        _close(what, o, r, tol, c, f)
    again = _rational_run(fused, place(x.to(device), c.layout).view, *on)
    for what, a, b in zip(("y", "dx", "dnumerator", "ddenominator"), out, again):
        assert same_bits(a, b), f"{what} differs bitwise on a second call: {c}"


def check_rational_nonfinite(c: RationalCase, backend: str, device: str = "cpu") -> None:
    """NaN, +Inf and -Inf in x propagate as in the reference; every other element is unaffected."""
    x, num, den, _ = _rational_inputs(c)
    if x.numel() == 0:
        return
    hit = x.view(-1)[:: max(1, x.numel() // 5)]  # about five elements, in every group for small x
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    hit.copy_(specials.repeat(hit.numel())[: hit.numel()])
    y = iapt_kernels.rational(
        place(x.to(device), c.layout).view, num.to(device), den.to(device), version=c.version, backend=backend
    ).cpu()
    ref = reference.rational(x.double(), num.double(), den.double(), version=c.version)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), c
    inf = torch.isinf(ref)
    assert torch.equal(y[inf].double(), ref[inf]), c
    finite = torch.isfinite(ref)
    _close("y (finite part)", y[finite], ref[finite], TOLERANCE[x.dtype], c)


RATIONAL_BAD = (
    "x_int",
    "x_list",
    "num_int",
    "version",
    "m0",
    "m9",
    "n0",
    "n9",
    "num_3d",
    "groups_mismatch",
    "groups_not_dividing",
    "zero_groups",
    "backend",
)


def check_rational_invalid(c: RationalCase, backend: str, device: str = "cpu") -> None:
    x, num, den, _ = (t.to(device) for t in _rational_inputs(replace(c, coef_1d=False)))
    version, which = c.version, backend
    G = num.shape[0]
    bad = c.bad
    if bad == "x_int":
        x = x.to(torch.int32)
    elif bad == "x_list":
        x = x.tolist()
    elif bad == "num_int":
        num = num.to(torch.int64)
    elif bad == "version":
        version = "C"
    elif bad == "m0":
        num = num[:, :1]
    elif bad == "m9":
        num = torch.cat([num, num.new_zeros(G, 10 - num.shape[1])], 1)
    elif bad == "n0":
        den = den[:, :0]
    elif bad == "n9":
        den = torch.cat([den, den.new_zeros(G, 9 - den.shape[1])], 1)
    elif bad == "num_3d":
        num = num[None]
    elif bad == "groups_mismatch":
        den = torch.cat([den, den])
    elif bad == "groups_not_dividing":
        num, den = (
            num.repeat(x.shape[-1] + 1 if x.dim() else 2, 1),
            den.repeat(x.shape[-1] + 1 if x.dim() else 2, 1),
        )
    elif bad == "zero_groups":
        num, den = num[:0], den[:0]
    elif bad == "backend":
        which = "cuda"
    expect_clear_error(
        lambda: iapt_kernels.rational(x, num, den, version=version, backend=which), f"{bad}: {c}"
    )


RATIONAL_EXAMPLES = {
    "triton": {"quick": 12, "long": 100},
    "cpp": {"quick": 40, "long": 3000},
    "reference": {"quick": 20, "long": 1000},
}
RATIONAL_REGRESSIONS = [
    # fp16 coefficients: the exact denominator gradient (about 1.2e5) overflows fp16; the kernel must
    # return the infinity of the right sign (the oracle first called any infinity a failure).
    RationalCase(464, 1, 3, "1d", (2, 6), "B", "float16", "same", False, "contiguous", 2.0, False, 2),
]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rational_matches_reference(backend, profile, device):
    run_property(
        f"rational parity [{backend}]",
        lambda c: check_rational(c, backend, device),
        rational_cases(backend),
        profile,
        RATIONAL_EXAMPLES[backend],
        RATIONAL_REGRESSIONS,
    )


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rational_nonfinite_input(backend, profile, device):
    run_property(
        f"rational non-finite [{backend}]",
        lambda c: check_rational_nonfinite(c, backend, device),
        rational_cases(backend),
        profile,
        {k: v // 4 for k, v in RATIONAL_EXAMPLES[backend].items()},
    )


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rational_invalid_input(backend, profile, device):
    run_property(
        f"rational invalid [{backend}]",
        lambda c: check_rational_invalid(c, backend, device),
        rational_cases(backend, RATIONAL_BAD),
        profile,
        {"quick": 30, "long": 1000},
    )


# =========================================================================== batches


@dataclass(frozen=True)
class BatchCase:
    """A batch for the pool, the generator and the multi-tenant generator."""

    B: int
    S: int  # padded length (packed: the longest sequence is drawn up to S)
    d: int
    r: int
    L: int
    packed: bool
    mask_kind: str  # random | all | none | left | right | single | empty_rows | sparse
    lengths: tuple[int, ...]  # packed: the sequence lengths (0 allowed)
    dtype: str
    poison: str  # at masked positions: none | nan | inf | -inf | huge
    layout: str  # of hidden_states
    weight_layout: str  # of the (stacked) weights
    degrees: tuple[int, int]
    version: str
    tenants: tuple[int, ...]  # multi-tenant: ids in [-1, T)
    T: int
    seed: int
    bad: str = ""


MASK_KINDS = ("random", "all", "none", "left", "right", "single", "empty_rows", "sparse")
TENANT_MIXES = ("random", "sorted", "reversed", "one", "all_none", "with_none", "distinct")


@st.composite
def batch_cases(draw, backend, bad=(), multi_tenant=False, max_L=None):
    B = draw(_size(backend, "B"))
    S = draw(_size(backend, "S"))
    packed = draw(st.booleans())
    lengths = ()
    if packed:
        lengths = tuple(
            draw(st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, S)), min_size=B, max_size=B))
        )
    L_lo, L_hi, L_edges = SIZES[backend]["L"]
    L = draw(sized(L_lo, min(L_hi, max_L or L_hi), L_edges))
    T = draw(_size(backend, "T")) if multi_tenant else 1
    mix = draw(st.sampled_from(TENANT_MIXES))
    ids = draw(st.lists(st.integers(-1, T - 1), min_size=B, max_size=B))
    if mix == "sorted":
        ids = sorted(ids)
    elif mix == "reversed":
        ids = sorted(ids, reverse=True)
    elif mix == "one":
        ids = [draw(st.integers(0, T - 1))] * B
    elif mix == "all_none":
        ids = [-1] * B
    elif mix == "distinct":
        ids = [b % T for b in range(B)]
    elif mix == "random":
        ids = [max(i, 0) for i in ids]
    return BatchCase(
        B=B,
        S=S,
        d=draw(_size(backend, "d")),
        r=draw(_size(backend, "r")),
        L=L,
        packed=packed,
        mask_kind=draw(st.sampled_from(MASK_KINDS)),
        lengths=lengths,
        dtype=draw(st.sampled_from(list(DTYPES))),
        poison=draw(st.sampled_from(["none", "nan", "inf", "-inf", "huge"])),
        layout=draw(st.sampled_from(LAYOUTS)),
        weight_layout=draw(st.sampled_from(LAYOUTS)),
        degrees=(draw(st.integers(1, 8)), draw(st.integers(1, 8))),
        version=draw(st.sampled_from("AB")),
        tenants=tuple(ids),
        T=T,
        seed=draw(st.integers(0, 2**31 - 1)),
        bad=draw(st.sampled_from(bad)) if bad else "",
    )


def make_mask(kind: str, B: int, S: int, gen: torch.Generator) -> torch.Tensor:
    pos = torch.arange(S)[None, :]
    lengths = torch.randint(0, S + 1, (B,), generator=gen)
    if kind == "all":
        return torch.ones(B, S, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(B, S, dtype=torch.bool)
    if kind == "left":
        return pos >= S - lengths[:, None]
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "single":  # one instruction token per row (where S allows)
        mask = torch.zeros(B, S, dtype=torch.bool)
        if S:
            mask[torch.arange(B), torch.randint(0, S, (B,), generator=gen)] = True
        return mask
    if kind == "sparse":
        return torch.rand(B, S, generator=gen) < 0.1
    mask = torch.rand(B, S, generator=gen) < 0.6
    if kind == "empty_rows":
        mask[torch.rand(B, generator=gen) < 0.5] = False
    return mask


@dataclass
class Batch:
    h: torch.Tensor  # the values (contiguous), poisoned at masked positions
    mask: torch.Tensor | None
    cu: torch.Tensor | None
    keep: torch.Tensor  # True where a value may influence the result (rows of h)


def on_device(batch: Batch, weights, device: str) -> SimpleNamespace:
    """The batch's tensors and the weights on `device` (the reference runs on the CPU copies)."""

    def to(t):
        return None if t is None else t.to(device)

    return SimpleNamespace(
        h=to(batch.h), mask=to(batch.mask), cu=to(batch.cu), weights=[to(w) for w in weights]
    )


POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "huge": 6e4}


def make_batch(c: BatchCase, gen: torch.Generator) -> Batch:
    dtype = DTYPES[c.dtype]
    if c.packed:
        cu = torch.tensor([0, *torch.tensor(c.lengths).cumsum(0).tolist()], dtype=torch.int32)
        N = int(cu[-1])
        h = torch.randn(N, c.d, generator=gen, dtype=F64).to(dtype)
        return Batch(h, None, cu, torch.ones(N, dtype=torch.bool))
    mask = make_mask(c.mask_kind, c.B, c.S, gen)
    h = torch.randn(c.B, c.S, c.d, generator=gen, dtype=F64).to(dtype)
    if c.poison != "none":
        h[~mask] = POISON[c.poison]
    return Batch(h, mask, None, mask)


def make_pool_weights(c: BatchCase, gen: torch.Generator, lead=()):
    """Wd, bd, Wp in float64, scaled so the scores are O(1)."""
    wd = torch.randn(*lead, c.r, c.d, generator=gen, dtype=F64) / math.sqrt(c.d)
    bd = torch.randn(*lead, c.r, generator=gen, dtype=F64) * 0.5
    wp = torch.randn(*lead, c.L, c.r, generator=gen, dtype=F64) * (1.5 / math.sqrt(c.r))
    return wd, bd, wp


def _leaves(tensors, layout):
    """Each tensor placed in `layout` (a leaf requiring grad), with its buffer for the write check."""
    placed = [place(t, layout) for t in tensors]
    for p in placed:
        p.view.requires_grad_()
    return placed


# =========================================================================== attention_pool


def check_attention_pool(c: BatchCase, backend: str, device: str = "cpu") -> None:
    gen = _gen(c.seed)
    dtype = DTYPES[c.dtype]
    batch = make_batch(c, gen)
    weights = [w.to(dtype) for w in make_pool_weights(c, gen)]
    grad = _positive((c.B, c.L, c.r), gen).to(dtype)
    on = on_device(batch, weights, device)

    def fused():
        hp = place(on.h, c.layout)
        hp.view.requires_grad_()
        ws = _leaves(on.weights, c.weight_layout)
        mask = None if on.mask is None else place(on.mask, c.layout).view
        u = iapt_kernels.attention_pool(
            hp.view, mask, *(w.view for w in ws), cu_seqlens=on.cu, backend=backend
        )
        u.backward(grad.to(device))
        assert hp.untouched() and all(w.untouched() for w in ws), f"an input buffer changed: {c}"
        return [u, hp.view.grad, *(w.view.grad for w in ws)]

    out = fused()

    def ref_in(dt, j=_same):
        h = _leaf(j(batch.h), dt)
        ws = [_leaf(j(w), dt) for w in weights]
        u = reference.attention_pool(h, batch.mask, *ws, cu_seqlens=batch.cu)
        u.backward(grad.to(dt))
        return [u, h.grad, *(w.grad for w in ws)]

    ref = ref_in(F64)
    base = _baselines(ref_in, dtype, c.seed)
    names = ("U", "dH", "dWd", "dbd", "dWp")
    assert out[0].dtype == dtype and all(g.dtype == dtype for g in out[1:]), c
    for what, o, r, f in zip(names, out, ref, base or [None] * len(ref)):
        _close(what, o, r, TOLERANCE[dtype], c, f)
    assert bool((out[1].cpu()[~batch.keep] == 0).all()), f"nonzero dH at masked positions: {c}"
    for what, a, b in zip(names, out, fused()):
        assert same_bits(a, b), f"{what} differs bitwise on a second call: {c}"


POOL_BAD = (
    "h_int",
    "w_dtype",
    "mask_int",
    "mask_shape",
    "mask_none",
    "mask_and_cu",
    "cu_int64",
    "cu_start",
    "cu_decreasing",
    "cu_end",
    "cu_2d",
    "cu_single",
    "h_1d",
    "h_4d",
    "d_mismatch",
    "bias_shape",
    "pool_shape",
    "L0",
    "r0",
    "L_too_big",
    "backend",
)


def _pool_mutation(c: BatchCase, batch: Batch, weights):
    """`(h, mask, cu, wd, bd, wp, backend)` with the one mutation `c.bad`."""
    h, mask, cu = batch.h, batch.mask, batch.cu
    wd, bd, wp = weights
    backend = None
    bad = c.bad
    if bad == "h_int":
        h = h.to(torch.int32)
    elif bad == "w_dtype":
        wd = wd.to(torch.float64 if h.dtype != torch.float64 else torch.float32)
    elif bad == "mask_int" and mask is not None:
        mask = mask.to(torch.int32)
    elif bad == "mask_shape" and mask is not None:
        mask = torch.ones(c.B, c.S + 1, dtype=torch.bool)
    elif bad == "mask_none" and mask is not None:
        mask = None
    elif bad == "mask_and_cu":
        if cu is None:
            cu = torch.tensor([0, h.shape[1]], dtype=torch.int32)
        else:
            mask = torch.ones(c.B, max(c.lengths), dtype=torch.bool)
    elif bad == "cu_int64" and cu is not None:
        cu = cu.long()
    elif bad == "cu_start" and cu is not None:
        cu = cu + 1
    elif bad == "cu_decreasing" and cu is not None and c.B >= 2:
        cu = cu.clone()
        cu[1] = int(cu[-1]) + 1
        cu[-1] = int(cu[-1])
    elif bad == "cu_end" and cu is not None:
        cu = cu.clone()
        cu[-1] += 1
    elif bad == "cu_2d" and cu is not None:
        cu = cu[None]
    elif bad == "cu_single" and cu is not None:
        cu = cu[:1]
    elif bad == "h_1d":
        h = h.reshape(-1)
    elif bad == "h_4d":
        h = h[None]
    elif bad == "d_mismatch":
        wd = torch.cat([wd, wd[:, :1]], 1)
    elif bad == "bias_shape":
        bd = torch.cat([bd, bd[:1]])
    elif bad == "pool_shape":
        wp = torch.cat([wp, wp[:, :1]], 1)
    elif bad == "L0":
        wp = wp[:0]
    elif bad == "r0":
        wd, bd, wp = wd[:0], bd[:0], wp[:, :0]
    elif bad == "L_too_big":
        wp = wp.repeat(MAX_TOKENS // c.L + 1, 1)
    elif bad == "backend":
        backend = "gpu"
    else:
        return None  # a mutation that does not apply to this layout: the draw is valid
    return h, mask, cu, wd, bd, wp, backend


def check_attention_pool_invalid(c: BatchCase, backend: str, device: str = "cpu") -> None:
    gen = _gen(c.seed)
    dtype = DTYPES[c.dtype]
    batch = make_batch(c, gen)
    on = on_device(batch, [w.to(dtype) for w in make_pool_weights(c, gen)], device)
    mutated = _pool_mutation(c, on, on.weights)
    if mutated is None:
        return
    h, mask, cu, wd, bd, wp, which = mutated
    if c.bad == "L_too_big" and backend == "reference":
        return  # the reference has no limit on L
    if c.bad == "cu_decreasing" and int(cu[1]) <= int(cu[0]):
        return
    expect_clear_error(
        lambda: iapt_kernels.attention_pool(h, mask, wd, bd, wp, cu_seqlens=cu, backend=which or backend),
        f"{c.bad}: {c}",
    )


POOL_EXAMPLES = {
    "triton": {"quick": 8, "long": 60},
    "cpp": {"quick": 30, "long": 500},
}
POOL_REGRESSIONS = [
    # d = r = 1: dWd is one sum that cancels to 0.08 from terms of order 10; the float32 reference
    # itself is off by 9.5e-5 (the kernels: cpp 4.7e-5, triton 9.6e-5), so 1e-5 is out of reach.
    BatchCase(
        3,
        129,
        1,
        1,
        5,
        False,
        "all",
        (),
        "float32",
        "none",
        "contiguous",
        "contiguous",
        (1, 1),
        "A",
        (0, 0, 0),
        1,
        1,
    ),
]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_pool_matches_reference(backend, profile, device):
    run_property(
        f"attention_pool parity [{backend}]",
        lambda c: check_attention_pool(c, backend, device),
        batch_cases(backend),
        profile,
        POOL_EXAMPLES[backend],
        POOL_REGRESSIONS,
    )


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_pool_invalid_input(backend, profile, device):
    run_property(
        f"attention_pool invalid [{backend}]",
        lambda c: check_attention_pool_invalid(c, backend, device),
        batch_cases(backend, POOL_BAD),
        profile,
        {"quick": 30, "long": 1000},
    )


# =========================================================================== PromptGenerator


GEN_PARAMS = (
    "down.weight",
    "down.bias",
    "pool.weight",
    "act.numerator",
    "act.denominator",
    "up.weight",
    "up.bias",
)


def _stacked_parameters(c: BatchCase, gen: torch.Generator, lead=()):
    """Every generator parameter in float64, by state_dict name: non-trivial activation and positive
    up-weights (with the positive upstream, the activation's coefficient gradients stay free of
    cancellation; tests/test_generator.py `make_generators`)."""
    wd, bd, wp = make_pool_weights(c, gen, lead)
    num0, den0 = iapt_kernels.rational_init("gelu", c.degrees, c.version)
    num = num0.double() + torch.randn(*lead, c.degrees[0] + 1, generator=gen, dtype=F64) * 0.05
    den = den0.double() + torch.randn(*lead, c.degrees[1], generator=gen, dtype=F64) * 0.05
    wu = torch.rand(*lead, c.d, c.r, generator=gen, dtype=F64) * 0.3 + 0.05
    bu = torch.randn(*lead, c.d, generator=gen, dtype=F64) * 0.1
    return dict(zip(GEN_PARAMS, (wd, bd, wp, num, den, wu, bu)))


def check_prompt_generator(c: BatchCase, backend: str, device: str = "cpu") -> None:
    gen = _gen(c.seed)
    dtype = DTYPES[c.dtype]
    batch = make_batch(c, gen)
    params = _stacked_parameters(c, gen)
    params["act.numerator"], params["act.denominator"] = (
        params["act.numerator"][None],
        params["act.denominator"][None],
    )
    grad = _positive((c.B, c.L, c.d), gen).to(dtype)

    def run(module, h, mask):
        module.zero_grad(set_to_none=True)
        at = next(module.parameters()).device
        h = h.detach().to(at).clone().requires_grad_()
        mask = None if mask is None else mask.to(at)
        p = module(h, mask, cu_seqlens=None if batch.cu is None else batch.cu.to(at))
        p.backward(grad.to(at, p.dtype))
        named = dict(module.named_parameters())
        return [p, h.grad, *(named[n].grad for n in GEN_PARAMS)]

    fused = iapt_kernels.PromptGenerator(c.d, c.r, c.L, c.degrees, "gelu", c.version, backend=backend)
    # Cast first: loading into the float32 parameters would round float64 values to float32.
    fused = fused.to(device, dtype)
    params = {k: v.to(dtype) for k, v in params.items()}
    fused.load_state_dict(params)

    def ref_in(dt, j=_same):
        ref = reference.PromptGenerator(c.d, c.r, c.L, c.degrees, "gelu", c.version).to(dt)
        ref.load_state_dict({k: j(v).to(dt) for k, v in params.items()})
        return run(ref, j(batch.h).to(dt), batch.mask)

    out = run(fused, batch.h, batch.mask)
    expect = ref_in(F64)
    base = _baselines(ref_in, dtype, c.seed, rounded_intermediates=True)
    names = ("P", "dH", *GEN_PARAMS)
    assert out[0].dtype == dtype, c
    for what, o, r, f in zip(names, out, expect, base or [None] * len(expect)):
        assert o is not None and o.dtype == dtype, f"{what}: {None if o is None else o.dtype} for {c}"
        _close(what, o, r, TOLERANCE[dtype], c, f)
    assert bool((out[1].cpu()[~batch.keep] == 0).all()), f"nonzero dH at masked positions: {c}"
    for what, a, b in zip(names, out, run(fused, batch.h, batch.mask)):
        assert same_bits(a, b), f"{what} differs bitwise on a second call: {c}"


GENERATOR_EXAMPLES = {
    "triton": {"quick": 6, "long": 40},
    "cpp": {"quick": 25, "long": 400},
}
GENERATOR_REGRESSIONS = [
    # fp16, degree 8: the activation's input gradient overflows fp16 inside the composed module, and the
    # pool's backward turns the inf into NaN in dH, exactly as the fp16 reference module does.
    BatchCase(
        8,
        32,
        242,
        5,
        42,
        False,
        "all",
        (),
        "float16",
        "none",
        "contiguous",
        "contiguous",
        (8, 2),
        "A",
        (0,) * 8,
        1,
        1640,
    ),
    # bf16: the denominator gradient is 5.7% off in the bf16 reference module as in the kernels (the
    # cap on a baseline was 5%; it is 25%).
    BatchCase(
        7,
        0,
        9,
        33,
        9,
        True,
        "random",
        (0, 0, 0, 1, 1, 1, 0),
        "bfloat16",
        "none",
        "contiguous",
        "contiguous",
        (6, 4),
        "A",
        (0,) * 7,
        1,
        3005,
    ),
    # fp16: the module returns U in fp16 (each op returns the activations' dtype), and the activation's
    # denominator gradient (version A, b_1 near 0) moves by 1.6% when U is rounded to fp16; the fp16
    # reference module does the same. The oracle now includes that baseline for the composed module.
    BatchCase(
        7,
        0,
        8,
        1,
        5,
        True,
        "random",
        (0, 0, 0, 0, 1, 1, 1),
        "float16",
        "none",
        "contiguous",
        "contiguous",
        (1, 1),
        "A",
        (0,) * 7,
        1,
        187,
    ),
    # Packed, four empty sequences and three of one token: the denominator gradient of the activation
    # moves by 5e-5 when U moves by one float32 ulp (b_1 = 0.004); the float32 reference happened to
    # land at 2.7e-6, the C++ kernel at 4.5e-5. The oracle now also measures that sensitivity.
    BatchCase(
        7,
        0,
        8,
        17,
        9,
        True,
        "random",
        (0, 0, 0, 0, 1, 1, 1),
        "float32",
        "none",
        "contiguous",
        "contiguous",
        (6, 1),
        "A",
        (0,) * 7,
        1,
        3005,
    ),
    # Every sequence empty (S = 0), fp16 parameters: the numerator gradient, a sum over B L r = 1305
    # terms of about 51, overflows fp16 (the right answer is +inf).
    BatchCase(
        3,
        0,
        255,
        15,
        29,
        False,
        "random",
        (),
        "float16",
        "none",
        "contiguous",
        "contiguous",
        (1, 1),
        "A",
        (0, 0, 0),
        1,
        0,
    ),
]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_prompt_generator_matches_reference(backend, profile, device):
    run_property(
        f"PromptGenerator parity [{backend}]",
        lambda c: check_prompt_generator(c, backend, device),
        batch_cases(backend),
        profile,
        GENERATOR_EXAMPLES[backend],
        GENERATOR_REGRESSIONS,
    )


# =========================================================================== multi_tenant_generator


def _multi_tenant_weights(c: BatchCase, gen: torch.Generator):
    return list(_stacked_parameters(c, gen, lead=(c.T,)).values())


def check_multi_tenant(c: BatchCase, backend: str, device: str = "cpu") -> None:
    gen = _gen(c.seed)
    dtype = DTYPES[c.dtype]
    batch = make_batch(c, gen)
    weights = [w.to(dtype) for w in _multi_tenant_weights(c, gen)]
    on = on_device(batch, weights, device)
    ids = torch.tensor(c.tenants, dtype=torch.long)
    groups = TenantGroups.build(ids, c.T)
    groups_on = TenantGroups.build(ids.to(device), c.T)
    grad = _positive((c.B, c.L, c.d), gen).to(dtype)

    def fused():
        hp = place(on.h, c.layout)
        hp.view.requires_grad_()
        ws = _leaves(on.weights, c.weight_layout)
        mask = None if on.mask is None else place(on.mask, c.layout).view
        p = iapt_kernels.multi_tenant_generator(
            hp.view,
            mask,
            groups_on,
            *(w.view for w in ws),
            version=c.version,
            cu_seqlens=on.cu,
            backend=backend,
        )
        if p.requires_grad:
            p.backward(grad.to(device))
        assert hp.untouched() and all(w.untouched() for w in ws), f"an input buffer changed: {c}"
        return [p, hp.view.grad, *(w.view.grad for w in ws)]

    out = fused()

    def ref_in(dt, j=_same):
        h = _leaf(j(batch.h), dt)
        ws = [_leaf(j(w), dt) for w in weights]
        p = reference.multi_tenant_generator(
            h, batch.mask, groups, *ws, version=c.version, cu_seqlens=batch.cu
        )
        if p.requires_grad:
            p.backward(grad.to(dt))
        return [p, h.grad, *(w.grad for w in ws)]

    expect = ref_in(F64)
    base = _baselines(ref_in, dtype, c.seed)
    names = ("P", "dH", *GEN_PARAMS)
    assert out[0].dtype == dtype, c
    active = torch.tensor([t >= 0 for t in c.tenants], dtype=torch.bool)
    assert bool((out[0].cpu()[~active] == 0).all()), f"a request of tenant -1 got a nonzero prompt: {c}"
    absent = [t for t in range(c.T) if t not in c.tenants]
    for what, o, r, f in zip(names, out, expect, base or [None] * len(expect)):
        if r is None:  # every request is tenant -1: nothing depends on the inputs
            assert o is None or bool((o == 0).all()), f"{what}: nonzero gradient with no adapter: {c}"
            continue
        assert o is not None and o.dtype == dtype, f"{what}: {None if o is None else o.dtype} for {c}"
        _close(what, o, r, TOLERANCE[dtype], c, f)
        if what != "P" and what != "dH" and absent:
            assert bool((o[absent] == 0).all()), f"{what}: nonzero gradient of absent tenants {absent}: {c}"
    if out[1] is not None:
        assert bool((out[1].cpu()[~batch.keep] == 0).all()), f"nonzero dH at masked positions: {c}"
    for what, a, b in zip(names, out, fused()):
        assert same_bits(a, b), f"{what} differs bitwise on a second call: {c}"


MT_BAD = POOL_BAD + (
    "tenant_high",
    "tenant_low",
    "tenant_float",
    "tenant_2d",
    "tenant_count",
    "stacked_T",
    "stacked_dim",
    "up_shape",
    "degree",
    "version",
)


def check_multi_tenant_invalid(c: BatchCase, backend: str, device: str = "cpu") -> None:
    gen = _gen(c.seed)
    dtype = DTYPES[c.dtype]
    batch = make_batch(c, gen)
    batch = on_device(batch, [w.to(dtype) for w in _multi_tenant_weights(c, gen)], device)
    weights = list(batch.weights)
    ids = torch.tensor(c.tenants, dtype=torch.long, device=device)
    version, which, T = c.version, backend, c.T
    bad = c.bad
    h, mask, cu = batch.h, batch.mask, batch.cu
    if bad in POOL_BAD:
        if bad in ("L0", "r0", "L_too_big", "bias_shape", "pool_shape", "d_mismatch"):
            return  # the single-tenant shapes: covered by the pool's invalid draws, on the stacked ones below
        mutated = _pool_mutation(c, batch, weights[:3])
        if mutated is None or (bad == "cu_decreasing" and int(mutated[2][1]) <= int(mutated[2][0])):
            return
        h, mask, cu, *_, w = mutated
        which = w or backend
        weights[0] = mutated[3]
    elif bad == "tenant_high":
        ids = ids.clone()
        ids[-1] = T
    elif bad == "tenant_low":
        ids = ids.clone()
        ids[0] = -2
    elif bad == "tenant_float":
        ids = ids.float()
    elif bad == "tenant_2d":
        ids = ids[None]
    elif bad == "tenant_count":
        ids = torch.cat([ids, ids[:1]])
    elif bad == "stacked_T":
        weights[4] = torch.cat([weights[4], weights[4][:1]])
    elif bad == "stacked_dim":
        weights[1] = weights[1][..., None]
    elif bad == "up_shape":
        weights[5] = torch.cat([weights[5], weights[5][:, :1]], 1)
    elif bad == "degree":
        weights[3] = weights[3][:, :1]
    elif bad == "version":
        version = "b"

    def call():
        groups = TenantGroups.build(ids, T)
        return iapt_kernels.multi_tenant_generator(
            h, mask, groups, *weights, version=version, cu_seqlens=cu, backend=which
        )

    expect_clear_error(call, f"{bad}: {c}")


MT_EXAMPLES = {
    "triton": {"quick": 5, "long": 15},
    "cpp": {"quick": 20, "long": 300},
}
MT_REGRESSIONS = [
    # d = r = L = 1: the pool-weight gradient cancels; the float32 reference misses 1e-5 as well.
    BatchCase(
        2,
        268,
        1,
        1,
        1,
        False,
        "random",
        (),
        "float32",
        "none",
        "contiguous",
        "contiguous",
        (1, 1),
        "A",
        (1, 1),
        2,
        323,
    ),
]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_multi_tenant_generator_matches_reference(backend, profile, device):
    run_property(
        f"multi_tenant_generator parity [{backend}]",
        lambda c: check_multi_tenant(c, backend, device),
        batch_cases(backend, multi_tenant=True, max_L=MAX_TOKENS),
        profile,
        MT_EXAMPLES[backend],
        MT_REGRESSIONS,
    )


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tenant_generator_invalid_input(backend, profile, device):
    run_property(
        f"multi_tenant_generator invalid [{backend}]",
        lambda c: check_multi_tenant_invalid(c, backend, device),
        batch_cases(backend, MT_BAD, multi_tenant=True),
        profile,
        {"quick": 30, "long": 1000},
    )


# --------------------------------------------------------------------------- slot_index writes


@dataclass(frozen=True)
class SlotCase:
    batch: BatchCase
    bad: str = ""


SLOT_BAD = ("range_high", "range_low", "on_instruction", "dtype", "shape", "packed", "duplicate")


@st.composite
def slot_cases(draw, backend, bad=()):
    c = draw(batch_cases(backend, multi_tenant=True))
    c = replace(c, packed=False, S=max(c.S, c.L + 1), poison="none")
    return SlotCase(c, draw(st.sampled_from(bad)) if bad else "")


def _slot_batch(c: BatchCase, gen: torch.Generator):
    """A padded batch with `L` distinct slot positions per row, none on an instruction token."""
    slot = torch.stack([torch.randperm(c.S, generator=gen)[: c.L] for _ in range(c.B)])
    mask = make_mask(c.mask_kind, c.B, c.S, gen)
    mask.scatter_(1, slot, False)
    h = torch.randn(c.B, c.S, c.d, generator=gen, dtype=F64).to(DTYPES[c.dtype])
    return h, mask, slot


def _multi_tenant_module(c: BatchCase, gen: torch.Generator, backend: str):
    module = iapt_kernels.MultiTenantPromptGenerator(
        c.T, c.d, c.r, c.L, c.degrees, "gelu", c.version, backend=backend
    )
    module = module.to(DTYPES[c.dtype])
    module.load_state_dict(_stacked_parameters(c, gen, lead=(c.T,)))
    return module


def check_slot_writes(s: SlotCase, backend: str, device: str = "cpu") -> None:
    """`forward(slot_index=...)` writes each adapted request's prompts at its slots, bit for bit those
    that the out-of-place call returns, and changes no other bit of `hidden_states`."""
    c = s.batch
    gen = _gen(c.seed)
    h, mask, slot = (t.to(device) for t in _slot_batch(c, gen))
    module = _multi_tenant_module(c, gen, backend).to(device)
    ids = torch.tensor(c.tenants, dtype=torch.long, device=device)
    with torch.no_grad():
        prompts = module(h, mask, ids)
        written = h.clone()
        returned = module(written, mask, ids, slot_index=slot)
    assert returned is written, c
    expect = h.clone()
    for b, t in enumerate(c.tenants):
        if t >= 0:
            expect[b, slot[b]] = prompts[b]
    assert same_bits(written, expect), f"slot writes differ from the prompts or touched other positions: {c}"


def check_slot_invalid(s: SlotCase, backend: str, device: str = "cpu") -> None:
    c = s.batch
    gen = _gen(c.seed)
    h, mask, slot = (t.to(device) for t in _slot_batch(c, gen))
    module = _multi_tenant_module(c, gen, backend).to(device)
    ids = torch.tensor(c.tenants, dtype=torch.long, device=device)
    cu = None
    hh = h.clone()
    if s.bad == "range_high":
        slot[-1, -1] = c.S
    elif s.bad == "range_low":
        slot[0, 0] = -1
    elif s.bad == "on_instruction":
        if not mask.any():
            return
        b, pos = torch.nonzero(mask)[0].tolist()
        slot[b, 0] = pos
    elif s.bad == "dtype":
        slot = slot.int()
    elif s.bad == "shape":
        slot = slot[:, :-1]
    elif s.bad == "packed":
        lengths = mask.sum(1)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
        hh, mask = h[mask], None
    elif s.bad == "duplicate":
        if c.L < 2:
            return
        slot[0, 1] = slot[0, 0]

    def call():
        with torch.no_grad():
            module(hh, mask, ids, slot_index=slot, cu_seqlens=cu)

    expect_clear_error(call, f"{s.bad}: {c}")
    if cu is None:
        assert same_bits(hh, h), f"a refused call wrote into hidden_states: {s}"


SLOT_EXAMPLES = {
    "triton": {"quick": 3, "long": 10},
    "cpp": {"quick": 20, "long": 600},
    "reference": {"quick": 10, "long": 300},
}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_index_writes(backend, profile, device):
    run_property(
        f"slot_index writes [{backend}]",
        lambda s: check_slot_writes(s, backend, device),
        slot_cases(backend),
        profile,
        SLOT_EXAMPLES[backend],
    )


SLOT_REGRESSIONS = [
    # Two prompts of one request at the same position: accepted, and which one landed was unspecified
    # (index_put_ without accumulate). Fixed: check_slot_index refuses a repeated position.
    SlotCase(
        BatchCase(
            1,
            4,
            1,
            1,
            3,
            False,
            "random",
            (),
            "float32",
            "none",
            "contiguous",
            "contiguous",
            (1, 1),
            "A",
            (0,),
            1,
            0,
        ),
        "duplicate",
    ),
]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_index_invalid(backend, profile, device):
    run_property(
        f"slot_index invalid [{backend}]",
        lambda s: check_slot_invalid(s, backend, device),
        slot_cases(backend, SLOT_BAD),
        profile,
        {"quick": 10, "long": 20 if backend == "triton" else 300},
        SLOT_REGRESSIONS,
    )
