"""Rational activation: parity of every backend against the float64 reference, gradients, gradcheck,
determinism, bad input, the torch.library ops, and the modules."""

import itertools
import math
import zlib

import pytest
import torch
from helpers import TOLERANCE, rel_err

import iapt_kernels
from iapt_kernels import reference

BACKENDS = iapt_kernels.available_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
DEGREES = [(1, 1), (3, 2), (5, 4), (8, 8)]


def test_kernel_backends_present():
    # The parity tests below are only meaningful if the kernels actually run here.
    assert "reference" in BACKENDS
    assert "triton" in BACKENDS, "tests set TRITON_INTERPRET=1 when there is no GPU"
    assert "cpp" in BACKENDS, "the C++ extension should be built by the README's install command"


def test_poisoning_is_active():
    assert torch.isnan(torch.empty(64)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, 5, dtype=torch.bfloat16))).all()


def _shapes(groups):
    """0, 1, 1023 and 4099 elements per group, and a non-contiguous 3-D input."""
    g = groups
    return [(0, g), (1, g), (1023, g), (4099, g), "noncontiguous"]


def _make_x(shape, groups, dtype, gen):
    if shape == "noncontiguous":
        # (5, 6, 4g) viewed from a transposed buffer: strides are not those of a dense tensor.
        base = torch.randn(4 * groups, 6, 5, generator=gen, dtype=torch.float64) * 1.5
        x = base.to(dtype).permute(2, 1, 0)
        assert not x.is_contiguous()
        return x
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5
    if x.numel() > 4:
        x.view(-1)[:3] = 0.0  # sgn at exactly 0 is +1 in every backend
    return x.to(dtype)


def _make_coefficients(degrees, groups, gen):
    """Random coefficients shrinking like 1/j!, as fitted ones do: random O(1) coefficients at degree 8
    make an ill-conditioned rational whose fp32 evaluation is inaccurate in any implementation."""
    m, n = degrees
    shrink = lambda k, start: torch.tensor([1.0 / math.factorial(j) for j in range(start, start + k)])  # noqa: E731
    num = torch.randn(groups, m + 1, generator=gen, dtype=torch.float64) * 0.5 * shrink(m + 1, 0)
    den = torch.randn(groups, n, generator=gen, dtype=torch.float64) * 0.5 * shrink(n, 1)
    return num.float(), den.float()


def _upstream_grad(shape, gen):
    """A positive upstream gradient. Coefficient gradients are sums over every element; with a
    zero-mean upstream gradient they can cancel to near zero, and then the relative error of ANY fp32
    summation is large (the problem's condition number, not the kernel). Positive weights keep the sums
    well-conditioned, so the tolerance measures the kernel."""
    return torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5


def _run(fn, x, num, den, grad, device="cpu"):
    """Output and every gradient of `fn` with all inputs on `device` (the float64 reference: CPU)."""
    x = x.detach().to(device).requires_grad_()
    num = num.detach().to(device).requires_grad_()
    den = den.detach().to(device).requires_grad_()
    y = fn(x, num, den)
    y.backward(grad.to(device))
    return y, x.grad, num.grad, den.grad


# Every degree pair and version compiles its own kernels (106 of the 240 cold compiles of the CUDA
# subset, scripts/gpu_subset_size.py): the GPU check's subset keeps version B (the default) at the
# default (5, 4) and the largest (8, 8) degrees; the rest is `slow`, run by the test command.
SLOW = pytest.mark.slow
PARITY_DEGREES = [pytest.param(d, marks=SLOW) if d in ((1, 1), (3, 2)) else d for d in DEGREES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow), torch.bfloat16], ids=str
)
@pytest.mark.parametrize("version", [pytest.param("A", marks=SLOW), "B"])
@pytest.mark.parametrize("degrees", PARITY_DEGREES, ids=str)
@pytest.mark.parametrize("groups", [1, 4])
def test_parity_with_float64_reference(backend, device, dtype, version, degrees, groups):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((version, degrees, groups)).encode()))
    num, den = _make_coefficients(degrees, groups, gen)
    tol = TOLERANCE[dtype]
    for shape in _shapes(groups):
        x = _make_x(shape, groups, dtype, gen)
        grad = _upstream_grad(x.shape, gen).to(dtype)
        out = _run(
            lambda x_, a_, b_: iapt_kernels.rational(x_, a_, b_, version=version, backend=backend),
            x,
            num,
            den,
            grad,
            device,
        )
        assert out[0].device.type == device
        # Ground truth: the reference in float64 on the very same (rounded) inputs.
        ref = _run(
            lambda x_, a_, b_: reference.rational(x_, a_, b_, version=version),
            x.double(),
            num.double(),
            den.double(),
            grad.double(),
        )
        assert out[0].dtype == dtype and out[0].shape == x.shape
        assert out[1].dtype == dtype and out[2].dtype == num.dtype and out[3].dtype == den.dtype
        for what, o, r in zip(("y", "dx", "dnumerator", "ddenominator"), out, ref):
            err = rel_err(o, r)
            assert err < tol, f"{what} shape={shape} rel err {err:.3g} >= {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("groups", [1, 3])
def test_gradcheck_float64(backend, device, version, groups):
    gen = torch.Generator().manual_seed(7)
    # Keep x away from the kinks of |.| so finite differences are valid.
    x = (torch.rand(4, 3 * groups, generator=gen, dtype=torch.float64) + 0.2) * torch.tensor(
        [1.0, -1.0]
    ).repeat(6 * groups)[: 3 * groups]
    num = torch.randn(groups, 4, generator=gen, dtype=torch.float64) * 0.5
    den = torch.rand(groups, 3, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    args = [t.to(device).requires_grad_() for t in (x, num, den)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: iapt_kernels.rational(a, b, c, version=version, backend=backend), args
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", ["A", "B"])
def test_identity_init_learns_denominator(backend, device, version):
    num, den = iapt_kernels.rational_init("identity", (5, 4), version)
    num, den = num.float().to(device).requires_grad_(), den.float().to(device).requires_grad_()
    assert torch.count_nonzero(den) == 0
    x = torch.linspace(
        -1, 2, 101, device=device
    )  # asymmetric: on a symmetric grid the odd moments cancel exactly
    y = iapt_kernels.rational(x, num, den, version=version, backend=backend)
    assert torch.equal(y, x)  # exact identity
    y.pow(2).sum().backward()
    assert torch.count_nonzero(den.grad) == den.numel(), den.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_backward_is_bitwise_deterministic(backend, device, groups):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 256, generator=gen)
    num, den = _make_coefficients((5, 4), groups, gen)
    grad = torch.randn(x.shape, generator=gen)
    fn = lambda a, b, c: iapt_kernels.rational(a, b, c, backend=backend)  # noqa: E731
    first = _run(fn, x, num, den, grad, device)
    second = _run(fn, x, num, den, grad, device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_stride_zero_grad(backend, device):
    # `.sum().backward()` hands the backward an expanded (stride-0) gradient.
    num, den = iapt_kernels.rational_init("gelu")
    x = torch.randn(3, 40, device=device, requires_grad=True)
    iapt_kernels.rational(x, num.float().to(device), den.float().to(device), backend=backend).sum().backward()
    xr = x.detach().double().cpu().requires_grad_()
    reference.rational(xr, num, den).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_reference(backend, device):
    num, den = iapt_kernels.rational_init("gelu")
    x = torch.tensor([0.5, float("nan"), -1.0, float("inf"), 2.0])
    out = iapt_kernels.rational(
        x.to(device), num.float().to(device), den.float().to(device), backend=backend
    ).cpu()
    ref = reference.rational(x.double(), num, den)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite].double(), ref[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_coefficients_and_mixed_precision(backend, device):
    num, den = iapt_kernels.rational_init("silu", (5, 4))
    x = torch.randn(8, 16, dtype=torch.float16)
    a, b = num.float().to(device).requires_grad_(), den.float().to(device).requires_grad_()
    y = iapt_kernels.rational(x.to(device), a, b, backend=backend)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and a.grad.shape == (6,) and b.grad.dtype == torch.float32
    assert rel_err(y, reference.rational(x.double(), num, den)) < TOLERANCE[torch.float16]


# --------------------------------------------------------------------------- bad input


def _coefficients(m=5, n=4, groups=1):
    return torch.zeros(groups, m + 1), torch.zeros(groups, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("integer_x", TypeError, "x must be a floating tensor"),
        ("integer_coefficients", TypeError, "numerator must be a floating tensor"),
        ("degree_zero", ValueError, "degree m=0"),
        ("degree_nine", ValueError, "degree n=9"),
        ("groups_mismatch", ValueError, "numerator has 2 groups but denominator has 3"),
        ("groups_do_not_divide", ValueError, "groups=3 must divide the last dimension"),
        ("three_d_coefficients", ValueError, r"numerator must be \(G, k\) or \(k,\)"),
        ("bad_version", ValueError, 'version must be "A" or "B"'),
        ("bad_backend", ValueError, "backend must be one of"),
        ("meta_device", ValueError, "same device"),
    ],
)
def test_bad_input_is_rejected_before_launch(backend, device, case, exc, match):
    x = torch.randn(4, 8, device=device)
    num, den = (t.to(device) for t in _coefficients())
    kwargs = dict(version="B", backend=backend)
    if case == "integer_x":
        x = torch.ones(4, 8, dtype=torch.int32, device=device)
    elif case == "integer_coefficients":
        num = num.long()
    elif case == "degree_zero":
        num = torch.zeros(1, 1, device=device)
    elif case == "degree_nine":
        den = torch.zeros(1, 9, device=device)
    elif case == "groups_mismatch":
        num, den = torch.zeros(2, 6, device=device), torch.zeros(3, 4, device=device)
    elif case == "groups_do_not_divide":
        num, den = (t.to(device) for t in _coefficients(groups=3))
    elif case == "three_d_coefficients":
        num = torch.zeros(1, 1, 6, device=device)
    elif case == "bad_version":
        kwargs["version"] = "C"
    elif case == "bad_backend":
        kwargs["backend"] = "cuda"
    elif case == "meta_device":
        den = den.to("meta")
    with pytest.raises(exc, match=match):
        iapt_kernels.rational(x, num, den, **kwargs)


def test_unavailable_backend_says_how_to_get_it(monkeypatch):
    from iapt_kernels import _backend

    monkeypatch.setattr(_backend, "HAS_CPP", False)
    monkeypatch.setattr(_backend, "CPP_ERROR", "ImportError: simulated")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        iapt_kernels.rational(torch.randn(4), *_coefficients(), backend="cpp")
    assert "cpp" not in iapt_kernels.available_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before importing iapt_kernels"):
            iapt_kernels.rational(torch.randn(4), *_coefficients(), backend="triton")
        assert "triton" not in iapt_kernels.available_backends()


# --------------------------------------------------------------------------- library ops


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("version", ["A", "B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_cpu_ops(version, dtype):
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(6, 8, dtype=dtype)
    num, den = torch.randn(2, 6, dtype=cdt) * 0.3, torch.randn(2, 4, dtype=cdt) * 0.3
    torch.library.opcheck(torch.ops.iapt.rational_fwd, (x, num, den, version))
    torch.library.opcheck(torch.ops.iapt.rational_bwd, (torch.randn_like(x), x, num, den, version))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_torch_compile_traces_the_cpp_path():
    num, den = iapt_kernels.rational_init("gelu")
    num, den = num.float().requires_grad_(), den.float().requires_grad_()
    fn = torch.compile(lambda x: iapt_kernels.rational(x, num, den, backend="cpp") * 2, fullgraph=True)
    x = torch.randn(64, requires_grad=True)
    y = fn(x)
    y.sum().backward()
    xr = x.detach().double().requires_grad_()
    (reference.rational(xr, num.detach().double(), den.detach().double()) * 2).sum().backward()
    assert rel_err(y, reference.rational(x.detach().double(), num.detach(), den.detach()) * 2) < 1e-5
    assert rel_err(x.grad, xr.grad) < 1e-5


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_reference_module_and_state_dicts_interchange(backend, device):
    fused = iapt_kernels.Rational(degrees=(5, 4), init="gelu", version="B", groups=2, backend=backend).to(
        device
    )
    ref = reference.Rational(degrees=(5, 4), init="gelu", version="B", groups=2)
    assert [n for n, _ in fused.named_parameters()] == ["numerator", "denominator"]
    assert fused.state_dict().keys() == ref.state_dict().keys()
    # The fits are made (and their errors promised) on [-3, 3].
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    assert (
        fused(x.to(device)).cpu() - torch.nn.functional.gelu(x)
    ).abs().max() < 5e-3  # a gelu init is a gelu
    with torch.no_grad():
        ref.numerator.add_(torch.randn_like(ref.numerator) * 0.1)
    fused.load_state_dict(ref.state_dict())
    ref.load_state_dict(fused.state_dict())
    assert torch.equal(fused.numerator.cpu(), ref.numerator)
    assert rel_err(fused(x.to(device)), ref(x.double())) < 1e-5


def test_module_rejects_mismatched_state_dict():
    small = iapt_kernels.Rational(degrees=(3, 2))
    with pytest.raises(RuntimeError, match="size mismatch"):
        small.load_state_dict(reference.Rational(degrees=(5, 4)).state_dict())


@pytest.mark.parametrize("cls", [iapt_kernels.Rational, reference.Rational])
def test_module_constructor_errors(cls):
    with pytest.raises(ValueError, match="1..8"):
        cls(degrees=(9, 4))
    with pytest.raises(ValueError, match="groups"):
        cls(groups=0)
    with pytest.raises(ValueError, match="unknown"):
        cls(init="swishy")
    with pytest.raises(ValueError, match="version"):
        cls(version="Z")


def test_available_backends_lists_known_names():
    assert set(BACKENDS) <= {"triton", "cpp", "reference"}
    assert BACKENDS[-1] == "reference"


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_degrees_all_pairs_run_in_every_backend(backend, device):
    # Every (m, n) in 1..8 compiles and agrees, forward and backward (fp32, small input).
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 33, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    for m, n in itertools.product(range(1, 9), range(1, 9)):
        num, den = _make_coefficients((m, n), 1, gen)
        ref = _run(
            lambda a, b, c: reference.rational(a, b, c), x.double(), num.double(), den.double(), grad.double()
        )
        out = _run(lambda a, b, c: iapt_kernels.rational(a, b, c, backend=backend), x, num, den, grad, device)
        for o, r in zip(out, ref):
            assert rel_err(o, r) < 1e-5, (m, n)
