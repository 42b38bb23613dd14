"""Attention pooling and the prompt generator: parity of P and every gradient against the float64
reference, masks that must not leak, empty instructions, packed = padded, determinism, bad input,
memory (no (B, S, r) tensor, bytes saved for backward)."""

import itertools
import zlib

import pytest
import torch
from helpers import TOLERANCE, rel_err

import iapt_kernels
from iapt_kernels import reference

BACKENDS = iapt_kernels.available_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
MASK_KINDS = ("random", "all_true", "empty_rows", "left_padded", "right_padded")
SHAPES = list(itertools.product([1, 3], [1, 7, 129], [16, 80, 257], [8, 48], [1, 4, 5]))  # B, S, d, r, L


def pairwise_subset(cases):
    """A subset of `cases` in which every pair of values of any two parameters still appears
    (greedy covering): the reduced-precision runs check dtype handling, the full grid runs in fp32."""

    def pairs(c):
        return {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(c)), 2)}

    todo = set().union(*map(pairs, cases))
    chosen = []
    while todo:
        best = max(cases, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


PARAMS = (
    "down.weight",
    "down.bias",
    "pool.weight",
    "act.numerator",
    "act.denominator",
    "up.weight",
    "up.bias",
)


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_mask(kind, B, S, gen):
    if kind == "all_true":
        return torch.ones(B, S, dtype=torch.bool)
    lengths = torch.randint(0, S + 1, (B,), generator=gen)
    if kind == "random":
        mask = torch.rand(B, S, generator=gen) < 0.6
        mask[0, 0] = True  # at least one token somewhere
        return mask
    if kind == "empty_rows":
        mask = torch.rand(B, S, generator=gen) < 0.7
        mask[0] = False  # row 0 is an empty instruction
        return mask
    pos = torch.arange(S)[None, :]
    if kind == "right_padded":
        return pos < lengths[:, None]
    return pos >= S - lengths[:, None]  # left padded


def make_generators(B, S, d, r, L, dtype, backend, gen, device="cpu", gate_init=None):
    """A fused generator in `dtype` on `device` and a float64 reference generator (CPU) holding the
    same weights (gated with `gate_init`, when given)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fused = iapt_kernels.PromptGenerator(d, r, num_tokens=L, backend=backend, gate_init=gate_init)
    with torch.no_grad():  # a non-trivial up-projection and activation, so every gradient is exercised
        # Positive up-weights (with the positive upstream gradients below) keep the activation's
        # coefficient gradients, sums over B*L*r terms, free of catastrophic cancellation: with
        # zero-mean weights any fp32 implementation, the fp32 reference included, misses 1e-5 there.
        fused.up.weight.uniform_(0.05, 0.35)
        fused.up.bias.normal_(0, 0.1)
        fused.act.numerator.add_(torch.randn_like(fused.act.numerator) * 0.05)
        fused.act.denominator.add_(torch.randn_like(fused.act.denominator) * 0.05)
    fused = fused.to(dtype)
    ref = reference.PromptGenerator(d, r, num_tokens=L, gate_init=gate_init).double()
    ref.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    return fused.to(device), ref


def run_generator(module, h, mask, grad, cu_seqlens=None):
    """P and every gradient, with the inputs moved to the module's device."""
    module.zero_grad(set_to_none=True)
    device = next(module.parameters()).device
    h = h.detach().to(device).clone().requires_grad_()
    mask, grad = (None if mask is None else mask.to(device)), grad.to(device)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(device)
    p = module(h, mask, cu_seqlens=cu_seqlens)
    p.backward(grad)
    params = dict(module.named_parameters())
    names = PARAMS + (("gate",) if "gate" in params else ())
    return {"P": p, "hidden_states": h.grad, **{name: params[name].grad for name in names}}


def check_parity(out, ref, tol, context):
    for key, r in ref.items():
        o = out[key]
        assert o is not None, f"{key}: no gradient ({context})"
        assert o.shape == r.shape, f"{key}: shape {tuple(o.shape)} != {tuple(r.shape)} ({context})"
        err = rel_err(o, r)
        assert err < tol, f"{key}: rel err {err:.3g} >= {tol} ({context})"


def _parity_cases():
    """One case per shape: fp32 over the full grid (on CPU, the cases outside the pairwise subset in
    the slow tier), fp16 (slow) and bf16 over the pairwise subset. The mask kind cycles with the
    position."""
    subset = pairwise_subset(SHAPES)
    cases = []
    for dtype, shapes in ((torch.float32, SHAPES), (torch.float16, subset), (torch.bfloat16, subset)):
        for i, shape in enumerate(shapes):
            slow = dtype == torch.float16 or shape not in subset
            cid = f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{MASK_KINDS[i % len(MASK_KINDS)]}"
            marks = (pytest.mark.slow if dtype == torch.float16 else pytest.mark.slow_on_cpu,) if slow else ()
            cases.append(pytest.param(dtype, shape, MASK_KINDS[i % len(MASK_KINDS)], id=cid, marks=marks))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, shape, kind", _parity_cases())
def test_generator_parity_with_float64_reference(backend, device, dtype, shape, kind):
    B, S, d, r, L = shape
    gen = _seed(B, S, d, r, L, kind)
    mask = make_mask(kind, B, S, gen)
    fused, ref = make_generators(B, S, d, r, L, dtype, backend, gen, device)
    h = torch.randn(B, S, d, generator=gen).to(dtype)
    h[~mask] = float("nan")  # masked positions must never leak
    grad = (torch.rand(B, L, d, generator=gen) + 0.5).to(dtype)
    out = run_generator(fused, h, mask, grad)
    expect = run_generator(ref, h.double(), mask, grad.double())
    check_parity(out, expect, TOLERANCE[dtype], f"B={B} S={S} d={d} r={r} L={L} mask={kind}")
    assert out["P"].device.type == device
    assert torch.all(out["hidden_states"].cpu()[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_mask_kind_at_a_prime_length(backend, device):
    B, S, d, r, L = 3, 31, 80, 48, 4
    for kind in MASK_KINDS:
        gen = _seed("kinds", kind)
        mask = make_mask(kind, B, S, gen)
        fused, ref = make_generators(B, S, d, r, L, torch.float32, backend, gen, device)
        h = torch.randn(B, S, d, generator=gen)
        grad = torch.rand(B, L, d, generator=gen) + 0.5
        check_parity(
            run_generator(fused, h, mask, grad),
            run_generator(ref, h.double(), mask, grad.double()),
            1e-5,
            kind,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_layout_equals_padded(backend, device):
    B, S, d, r, L = 3, 29, 80, 48, 4
    gen = _seed("packed")
    mask = make_mask("random", B, S, gen)
    mask[1] = False  # an empty sequence in the middle
    fused, _ = make_generators(B, S, d, r, L, torch.float32, backend, gen, device)
    h = torch.randn(B, S, d, generator=gen)
    grad = torch.rand(B, L, d, generator=gen) + 0.5
    padded = run_generator(fused, h, mask, grad)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = mask.sum(1).cumsum(0)
    packed = run_generator(fused, h[mask], None, grad, cu_seqlens=cu)
    assert rel_err(packed["hidden_states"], padded["hidden_states"][mask]) < 1e-6
    for key in ["P", *PARAMS]:
        assert rel_err(packed[key], padded[key]) < 1e-6, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_masked_positions_never_influence_anything(backend, device, poison):
    B, S, d, r, L = 3, 17, 80, 8, 4
    gen = _seed("poison")
    mask = make_mask("random", B, S, gen)
    fused, _ = make_generators(B, S, d, r, L, torch.float32, backend, gen, device)
    h = torch.randn(B, S, d, generator=gen)
    grad = torch.rand(B, L, d, generator=gen) + 0.5
    clean = run_generator(fused, torch.where(mask[..., None], h, 0.0), mask, grad)
    dirty = run_generator(fused, torch.where(mask[..., None], h, poison), mask, grad)
    for key in clean:
        assert torch.equal(clean[key], dirty[key]), key
    assert torch.all(dirty["hidden_states"].cpu()[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_instruction_pools_to_zero(backend, device):
    B, S, d, r, L = 2, 9, 16, 8, 4
    gen = _seed("empty")
    fused, _ = make_generators(B, S, d, r, L, torch.float32, backend, gen, device)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    h = torch.full((B, S, d), float("nan"), device=device)
    u = iapt_kernels.attention_pool(
        h, mask, fused.down.weight, fused.down.bias, fused.pool.weight, backend=backend
    )
    assert torch.equal(u, torch.zeros(B, L, r, device=device))
    out = run_generator(fused, h, mask, torch.ones(B, L, d))
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    assert torch.equal(out["hidden_states"], torch.zeros(B, S, d, device=device))
    # S = 0: no tokens at all
    u0 = iapt_kernels.attention_pool(
        torch.zeros(B, 0, d, device=device),
        torch.zeros(B, 0, dtype=torch.bool, device=device),
        fused.down.weight,
        fused.down.bias,
        fused.pool.weight,
        backend=backend,
    )
    assert torch.equal(u0, torch.zeros(B, L, r, device=device))


GATED_CASES = [  # B, S, d, r, L, mask kind, dtype
    (3, 7, 80, 8, 4, "random", torch.float32),
    (1, 129, 257, 48, 5, "left_padded", torch.float32),
    (3, 7, 16, 8, 1, "empty_rows", torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, S, d, r, L, kind, dtype", GATED_CASES)
def test_gated_generator_parity_with_float64_reference(backend, device, B, S, d, r, L, kind, dtype):
    """P = (G Wu^T + bu) * gate: outputs and every gradient, d gate included, against float64. The
    gate is a random nonzero value, so every gradient is nonzero (at 0 only the gate's would be)."""
    gen = _seed("gated", B, S, d, r, L, kind)
    gate = float(torch.empty(()).uniform_(0.3, 1.5, generator=gen))
    mask = make_mask(kind, B, S, gen)
    fused, ref = make_generators(B, S, d, r, L, dtype, backend, gen, device, gate_init=gate)
    assert sorted(fused.state_dict()) == sorted(PARAMS + ("gate",))
    h = torch.randn(B, S, d, generator=gen).to(dtype)
    h[~mask] = float("nan")
    grad = (torch.rand(B, L, d, generator=gen) + 0.5).to(dtype)
    out = run_generator(fused, h, mask, grad)
    expect = run_generator(ref, h.double(), mask, grad.double())
    assert set(out) == set(PARAMS) | {"P", "hidden_states", "gate"}
    check_parity(out, expect, TOLERANCE[dtype], f"gated B={B} S={S} d={d} r={r} L={L} mask={kind}")
    for name in PARAMS + ("gate",):
        assert bool(out[name].ne(0).any()), f"{name}: zero gradient"
    # the gate is one multiply after the ungated forward: exactly that product, in every dtype
    with torch.no_grad():
        ungated = iapt_kernels.PromptGenerator(d, r, num_tokens=L, backend=backend).to(device, dtype)
        ungated.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "gate"})
        hd, md = h.to(device), mask.to(device)
        assert torch.equal(fused(hd, md), ungated(hd, md) * fused.gate)


def test_gate_at_zero_gives_zero_prompts_and_only_a_gate_gradient():
    g = iapt_kernels.PromptGenerator(16, 8, num_tokens=3, gate_init=0.0)
    h, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    p = g(h, mask)
    assert torch.equal(p, torch.zeros(2, 3, 16))
    p.sum().backward()
    assert g.gate.grad.abs() > 0 and all(float(g.get_parameter(n).grad.abs().max()) == 0 for n in PARAMS)


def test_gate_constructor_and_repr():
    for cls in (iapt_kernels.PromptGenerator, reference.PromptGenerator):
        assert cls(16, 8).gate is None and "gate" not in cls(16, 8).state_dict()
        for bad in (float("nan"), float("inf"), "0", True):
            with pytest.raises(ValueError, match="gate_init"):
                cls(16, 8, gate_init=bad)
        g = cls(16, 8, gate_init=0.25)
        assert g.gate.shape == (1,) and float(g.gate) == 0.25 and "gated=True" in repr(g)
    # the gate draws no random numbers: the other parameters are those of an ungated generator
    torch.manual_seed(5)
    a = iapt_kernels.PromptGenerator(16, 8)
    torch.manual_seed(5)
    b = iapt_kernels.PromptGenerator(16, 8, gate_init=0.0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gate_init", [None, 0.7])
def test_backward_is_bitwise_deterministic(backend, device, gate_init):
    B, S, d, r, L = 3, 40, 80, 48, 4
    gen = _seed("det")
    mask = make_mask("random", B, S, gen)
    fused, _ = make_generators(B, S, d, r, L, torch.float32, backend, gen, device, gate_init=gate_init)
    h = torch.randn(B, S, d, generator=gen)
    grad = torch.randn(B, L, d, generator=gen)
    first, second = run_generator(fused, h, mask, grad), run_generator(fused, h, mask, grad)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, device):
    gen = _seed("gradcheck")
    B, S, d, r, L = 2, 5, 6, 3, 2
    mask = torch.tensor([[True, False, True, True, False], [False] * 5], device=device)
    h, wd, bd, wp = (
        torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        for shape in ((B, S, d), (r, d), (r,), (L, r))
    )
    fn = lambda h_, a, b, c: iapt_kernels.attention_pool(h_, mask, a, b, c, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, wd, bd, wp))


# --------------------------------------------------------------------------- bad input


def _args(B=2, S=5, d=8, r=4, L=3, dtype=torch.float32, device="cpu"):
    return tuple(
        t.to(device)
        for t in (
            torch.randn(B, S, d, dtype=dtype),
            torch.ones(B, S, dtype=torch.bool),
            torch.randn(r, d, dtype=dtype),
            torch.randn(r, dtype=dtype),
            torch.randn(L, r, dtype=dtype),
        )
    )


def _packed_args(device="cpu"):
    h, _, wd, bd, wp = _args(device=device)
    return torch.randn(7, 8, device=device), wd, bd, wp


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_padded(backend, device):
    h, mask, wd, bd, wp = _args(device=device)
    call = lambda *a, **k: iapt_kernels.attention_pool(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"mask must be \(B, S\)"):
        call(h, mask[:, :4], wd, bd, wp)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        call(h, mask.float(), wd, bd, wp)
    with pytest.raises(ValueError, match="hidden size d=8"):
        call(h, mask, torch.randn(4, 9, device=device), bd, wp)
    with pytest.raises(ValueError, match=r"down_bias must be \(r,\)"):
        call(h, mask, wd, torch.randn(5, device=device), wp)
    with pytest.raises(ValueError, match=r"pool_weight must be \(L, r\) with r=4"):
        call(h, mask, wd, bd, torch.randn(3, 5, device=device))
    with pytest.raises(ValueError, match="L=0"):
        call(h, mask, wd, bd, torch.randn(0, 4, device=device))
    with pytest.raises(ValueError, match="r, d >= 1"):
        call(h, mask, *(torch.randn(*s, device=device) for s in ((0, 8), (0,), (3, 0))))
    with pytest.raises(TypeError, match="down_weight has dtype torch.float64"):
        call(h, mask, wd.double(), bd, wp)
    with pytest.raises(ValueError, match="same device"):
        call(h, mask.to("meta"), wd, bd, wp)
    with pytest.raises(TypeError, match="hidden_states must be a floating tensor"):
        call(h.long(), mask, wd, bd, wp)
    with pytest.raises(ValueError, match=r"\(B, S, d\) with a mask"):
        call(h[0], mask, wd, bd, wp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_packed(backend, device):
    h, wd, bd, wp = _packed_args(device)
    cu32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731

    def call(cu, **k):
        return iapt_kernels.attention_pool(h, None, wd, bd, wp, cu_seqlens=cu, backend=backend, **k)

    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor"):
        call(torch.tensor([0, 3, 7], device=device))
    with pytest.raises(ValueError, match="must start at 0"):
        call(cu32([1, 3, 7]))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(cu32([0, 4, 3, 7]))
    with pytest.raises(ValueError, match="must end at N"):
        call(cu32([0, 3, 6]))
    with pytest.raises(ValueError, match="not both"):
        iapt_kernels.attention_pool(
            h,
            torch.ones(1, 7, dtype=torch.bool, device=device),
            wd,
            bd,
            wp,
            cu_seqlens=cu32([0, 7]),
            backend=backend,
        )


def test_generator_constructor_errors():
    for cls in (iapt_kernels.PromptGenerator, reference.PromptGenerator):
        with pytest.raises(ValueError, match="num_tokens"):
            cls(16, 8, num_tokens=0)
        with pytest.raises(ValueError, match="bottleneck_size"):
            cls(16, 0)
    with pytest.raises(ValueError, match="backend"):
        iapt_kernels.PromptGenerator(16, 8, backend="gpu")


# --------------------------------------------------------------------------- modules and memory


def test_state_dicts_interchange_and_fresh_prompts_are_small():
    fused = iapt_kernels.PromptGenerator(64, 16)
    ref = reference.PromptGenerator(64, 16)
    assert list(fused.state_dict()) == list(ref.state_dict()) == list(PARAMS)
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    h, mask = torch.randn(2, 10, 64), torch.ones(2, 10, dtype=torch.bool)
    p = fused(h, mask)
    assert p.shape == (2, 4, 64) and torch.isfinite(p).all()
    assert p.abs().max() < 1.0  # small next to the O(1) hidden states they replace
    assert rel_err(p, ref.double()(h.double(), mask)) < 1e-5


def _allocation_sizes(fn, device):
    """Byte sizes of every allocation on `device` (from C++ or Python) made while `fn` runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    usage = (lambda e: e.cpu_memory_usage) if device == "cpu" else (lambda e: e.device_memory_usage)
    return {usage(e) for e in prof.events() if usage(e) > 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_path_never_allocates_a_b_s_r_tensor(backend, device):
    B, S, d, r, L = 2, 48, 24, 40, 4  # sizes chosen so B*S*r matches no other tensor's size
    gen = _seed("alloc")
    fused, _ = make_generators(B, S, d, r, L, torch.float32, backend, gen, device)
    h = torch.randn(B, S, d, generator=gen).to(device).requires_grad_()
    mask = make_mask("random", B, S, gen).to(device)
    forbidden = B * S * r * 4
    sizes = _allocation_sizes(lambda: fused(h, mask).sum().backward(), device)
    if backend == "reference":
        assert forbidden in sizes  # the naive order does form H Wd^T: the probe can see it
    else:
        assert forbidden not in sizes, sorted(sizes)


def saved_bytes(fn):
    """Bytes autograd saves for backward while `fn` runs: `(all, excluding the caller's tensors)`.

    The second figure leaves out storages that belong to the inputs and parameters, which stay
    alive whatever the op saves; it is the memory the op adds."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = fn()
    owned = {t.untyped_storage().data_ptr() for t in inputs}
    total = sum(n for n, _ in storages.values())
    added = sum(n for ptr, (n, _) in storages.items() if ptr not in owned)
    return total, added


def test_bytes_saved_for_backward_at_most_a_quarter_of_reference():
    B, S, d, r, L = 8, 512, 2048, 256, 4
    h = torch.randn(B, S, d, requires_grad=True)
    mask = torch.rand(B, S) < 0.8
    results = {}
    for name, module in (
        ("fused", iapt_kernels.PromptGenerator(d, r, L)),
        ("reference", reference.PromptGenerator(d, r, L)),
    ):

        def run(module=module):
            module(h, mask)
            return [h, *module.parameters()]

        results[name] = saved_bytes(run)
    fused_total, fused_added = results["fused"]
    ref_total, ref_added = results["reference"]
    assert fused_added * 4 <= ref_added, results
    assert fused_total < ref_total, results
