"""The iapt:: op contract: `torch.library.opcheck` for every op (schema, fake, autograd registration,
AOT dispatch) with each kernel that runs on CPU tensors here: C++, and the Triton launchers in the
interpreter (`helpers.cpu_kernels`); schemas without a backend and of bounded length; the C++ library
alone, and the C++ kernels where Triton cannot be imported. The rational ops' checks, per version and
dtype, are in tests/test_rational.py."""

import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import cpu_kernels

import iapt_kernels
from iapt_kernels import TenantGroups, _backend
from iapt_kernels.library import OPS

CPU_KERNELS = [b for b in iapt_kernels.available_backends() if b in ("cpp", "triton")]
B, S, D, R, L, T = 3, 7, 16, 8, 4, 3
ROOT = pathlib.Path(__file__).resolve().parents[1]
NEEDS_CPP = pytest.mark.skipif(not _backend.HAS_CPP, reason="the C++ extension is not built")


def _padded():
    torch.manual_seed(0)
    h = torch.randn(B, S, D)
    mask = torch.rand(B, S) < 0.7
    mask[:, 0] = True
    return h, mask


def _multi_tenant_args():
    h, mask = _padded()
    # Tenant 1 absent (its gradient slices are only zero-filled). No tenant -1: the Triton forward leaves
    # the saved Z, U, G rows of such requests unwritten (the backward never reads them), and opcheck
    # compares every output of two runs.
    groups = TenantGroups.build(torch.tensor([2, 0, 0]), T)
    wd, bd, wp = torch.randn(T, R, D) * 0.2, torch.randn(T, R) * 0.2, torch.randn(T, L, R) * 0.2
    num, den = torch.randn(T, 6) * 0.3, torch.randn(T, 4) * 0.3
    wu, bu = torch.randn(T, D, R) * 0.2, torch.randn(T, D) * 0.2
    return h, mask, list(groups.tensors()), [wd, bd, wp, num, den, wu, bu]


def test_schemas_have_no_backend_and_at_most_twelve_arguments():
    assert set(OPS) == {
        f"{op}_{way}"
        for op in ("rational", "attention_pool", "multi_tenant_generator")
        for way in ("fwd", "bwd")
    }
    for name in OPS:
        schema = getattr(torch.ops.iapt, name).default._schema
        names = [a.name for a in schema.arguments]
        assert "backend" not in names and len(names) <= 12, (name, names)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_opcheck_attention_pool_ops(backend):
    h, mask = _padded()
    wd, bd, wp = torch.randn(R, D) * 0.2, torch.randn(R) * 0.2, torch.randn(L, R) * 0.2
    fwd_args = (h, mask, None, wd, bd, wp, S)
    with cpu_kernels(backend):
        torch.library.opcheck(torch.ops.iapt.attention_pool_fwd, fwd_args)
        u, a, z, n = torch.ops.iapt.attention_pool_fwd(*fwd_args)
        bwd_args = (torch.randn_like(u), h, mask, None, wd, wp, a, z, n, S)
        torch.library.opcheck(torch.ops.iapt.attention_pool_bwd, bwd_args)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_opcheck_multi_tenant_generator_ops(backend):
    h, mask, groups, weights = _multi_tenant_args()
    fwd_args = (h, mask, None, groups, weights, "B", S)
    with cpu_kernels(backend):
        torch.library.opcheck(torch.ops.iapt.multi_tenant_generator_fwd, fwd_args)
        p, *saved = torch.ops.iapt.multi_tenant_generator_fwd(*fwd_args)
        wd, _, wp, num, den, wu, _ = weights
        bwd_args = (torch.randn_like(p), h, mask, None, groups, [wd, wp, num, den, wu], saved, "B", S)
        torch.library.opcheck(torch.ops.iapt.multi_tenant_generator_bwd, bwd_args)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_forward_ops_are_differentiable_by_themselves(backend):
    """`register_autograd` on the forward op: gradients through `torch.ops.iapt.*_fwd` alone, against
    float64 autograd through the reference."""
    from helpers import rel_err

    from iapt_kernels import reference

    h, mask, groups, weights = _multi_tenant_args()
    weights = [w.requires_grad_() for w in weights]
    with cpu_kernels(backend):
        p = torch.ops.iapt.multi_tenant_generator_fwd(
            h.requires_grad_(), mask, None, groups, weights, "B", S
        )[0]
        grads = torch.autograd.grad((p * p).sum(), [h, *weights])
    ref_in = [t.detach().double().requires_grad_() for t in (h, *weights)]
    ref = reference.multi_tenant_generator(
        ref_in[0], mask, TenantGroups.build(torch.tensor([2, 0, 0]), T), *ref_in[1:], version="B"
    )
    ref_grads = torch.autograd.grad((ref * ref).sum(), ref_in)
    assert rel_err(p, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5


def _subprocess(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@NEEDS_CPP
def test_the_cpp_library_alone_defines_and_runs_the_ops():
    """`torch.ops.load_library` of the built .so, without importing iapt_kernels: every op is in
    torch.ops.iapt and computes (rational against its float64 formula)."""
    out = _subprocess(f"""
        import sys, torch
        torch.ops.load_library({_backend.LIBRARY_PATH!r})
        assert "iapt_kernels" not in sys.modules
        names = {sorted(OPS)!r}
        assert all(hasattr(torch.ops.iapt, n) for n in names), dir(torch.ops.iapt)
        x = torch.linspace(-3, 3, 101)
        num, den = torch.tensor([[0.1, 1.0, 0.3, 0.05]]), torch.tensor([[0.4, 0.1]])
        y = torch.ops.iapt.rational_fwd(x, num, den, "B")
        xd, nd, dd = x.double(), num.double()[0], den.double()[0]
        p = sum(nd[j] * xd**j for j in range(4))
        q = 1 + (dd[0] * xd + dd[1] * xd**2).abs()
        err = ((y.double() - p / q).norm() / (p / q).norm()).item()
        assert err < 1e-6, err
        h, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
        u, a, z, n = torch.ops.iapt.attention_pool_fwd(h, mask, None, torch.randn(4, 8), torch.randn(4),
                                                       torch.randn(3, 4), 5)
        assert u.shape == (2, 3, 4) and torch.allclose(a.sum(1), torch.ones(2, 3))
        assert "iapt_kernels" not in sys.modules
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


@NEEDS_CPP
def test_prompt_generator_runs_the_cpp_kernels_without_triton():
    """Triton blocked before iapt_kernels imports: `PromptGenerator` on CPU runs the C++ ops (the
    profiler sees iapt::attention_pool_fwd/bwd and the CPU kernel is the one csrc/registration.cpp
    registered), output and gradients equal the float64 reference."""
    out = _subprocess("""
        import importlib.abc, sys

        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError(f"{name} is blocked for this test")

        sys.meta_path.insert(0, NoTriton())
        import torch
        import iapt_kernels
        from iapt_kernels import reference

        assert iapt_kernels.available_backends() == ["cpp", "reference"]
        torch.manual_seed(0)
        gen = iapt_kernels.PromptGenerator(16, 8, num_tokens=4)
        ref = reference.PromptGenerator(16, 8, num_tokens=4).double()
        ref.load_state_dict({k: v.double() for k, v in gen.state_dict().items()})
        h, mask = torch.randn(3, 9, 16), torch.rand(3, 9) < 0.6
        mask[:, 0] = True
        with torch.profiler.profile() as prof:
            out = gen(h, mask)
            out.square().sum().backward()
        ran = {e.name for e in prof.events()}
        assert {"iapt::attention_pool_fwd", "iapt::attention_pool_bwd", "iapt::rational_fwd"} <= ran, ran
        cpu = [line for line in torch._C._dispatch_dump("iapt::attention_pool_fwd").splitlines()
               if line.startswith("CPU")]
        assert len(cpu) == 1 and "registration.cpp" in cpu[0], cpu
        want = ref(h.double(), mask)
        want.square().sum().backward()
        err = ((out.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, err
        for (name, p), q in zip(gen.named_parameters(), ref.parameters()):
            e = ((p.grad.double() - q.grad).norm() / q.grad.norm()).item()
            assert e < 1e-5, (name, e)
        assert not [m for m in sys.modules if m.split(".")[0] == "triton"]
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


@NEEDS_CPP
def test_backend_names_the_kernel_it_needs_on_cpu():
    """No schema carries a backend, so the public name is checked against the CPU kernels registered:
    `triton` on CPU tensors outside the test route, or `cpp` inside it, is an error naming the cause."""
    x, num, den = torch.randn(8), *iapt_kernels.rational_init("gelu")
    if "triton" in iapt_kernels.available_backends() and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="triton_on_cpu"):
            iapt_kernels.rational(x, num, den, backend="triton")
        with cpu_kernels("triton"):
            with pytest.raises(RuntimeError, match="outside that block"):
                iapt_kernels.rational(x, num, den, backend="cpp")
            assert _backend.resolve_backend("auto", x.device) == "triton"
    assert _backend.resolve_backend("auto", x.device) == "cpp"
    torch.testing.assert_close(
        iapt_kernels.rational(x, num, den, backend="cpp"),
        iapt_kernels.rational(x, num, den, backend="reference"),
    )


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_max_seqlen_is_the_callers_bound(backend):
    """`max_seqlen` (functional and module forward): the longest sequence or more gives the result
    of the call without it; less, or a negative value, is a ValueError naming it."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    h = torch.randn(9, D)
    gen = iapt_kernels.PromptGenerator(D, R, num_tokens=L, backend=backend)
    mt = iapt_kernels.MultiTenantPromptGenerator(T, D, R, num_tokens=L, backend=backend)
    ids = torch.tensor([2, 0, 0])
    want_u = iapt_kernels.attention_pool(
        h, None, gen.down.weight, gen.down.bias, gen.pool.weight, cu_seqlens=cu
    )
    want_p, want_q = gen(h, cu_seqlens=cu), mt(h, None, ids, cu_seqlens=cu)
    for max_seqlen in (6, 11):
        u = iapt_kernels.attention_pool(
            h, None, gen.down.weight, gen.down.bias, gen.pool.weight, cu_seqlens=cu, max_seqlen=max_seqlen
        )
        torch.testing.assert_close(u, want_u, rtol=0, atol=0)
        torch.testing.assert_close(gen(h, cu_seqlens=cu, max_seqlen=max_seqlen), want_p, rtol=0, atol=0)
        got_q = mt(h, None, ids, cu_seqlens=cu, max_seqlen=max_seqlen)
        torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sequence 2 has 6 tokens, more than max_seqlen = 5"):
        gen(h, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="more than max_seqlen = 5"):
        mt(h, None, ids, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="max_seqlen must be an int >= 0"):
        gen(h, cu_seqlens=cu, max_seqlen=-1)


@pytest.mark.gpu
def test_packed_calls_with_max_seqlen_read_nothing_back():
    """With `max_seqlen`, a packed call (functional and module forward, single- and multi-tenant) makes
    no device-to-host copy: `torch.cuda.set_sync_debug_mode("error")` turns one into an error. The
    first calls (Triton compiles and autotunes) run before the mode is on."""
    from helpers import TOLERANCE, rel_err

    from iapt_kernels import reference

    dev = "cuda"
    torch.manual_seed(0)
    lengths = [5, 0, 9]
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=dev)
    h = torch.randn(sum(lengths), D, device=dev)
    gen = iapt_kernels.PromptGenerator(D, R, num_tokens=L).to(dev)
    mt = iapt_kernels.MultiTenantPromptGenerator(T, D, R, num_tokens=L).to(dev)
    groups = TenantGroups.build(torch.tensor([2, -1, 0], device=dev), T)
    kw = dict(cu_seqlens=cu, max_seqlen=max(lengths))

    def calls():
        return (
            iapt_kernels.attention_pool(h, None, gen.down.weight, gen.down.bias, gen.pool.weight, **kw),
            gen(h, **kw),
            mt(h, None, groups=groups, **kw),
        )

    calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u, p, q = calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_gen = reference.PromptGenerator(D, R, num_tokens=L).double()
    ref_gen.load_state_dict({k: v.double().cpu() for k, v in gen.state_dict().items()})
    ref_mt = reference.MultiTenantPromptGenerator(T, D, R, num_tokens=L).double()
    ref_mt.load_state_dict({k: v.double().cpu() for k, v in mt.state_dict().items()})
    h64, cu64 = h.double().cpu(), cu.cpu()
    assert rel_err(p, ref_gen(h64, cu_seqlens=cu64)) < TOLERANCE[torch.float32]
    assert rel_err(u, ref_gen.pooled(h64, None, cu64)) < TOLERANCE[torch.float32]
    want = ref_mt(h64, None, groups=TenantGroups.build(torch.tensor([2, -1, 0]), T), cu_seqlens=cu64)
    assert rel_err(q, want) < TOLERANCE[torch.float32]
