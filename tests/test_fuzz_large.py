"""Large indices: batches whose element offsets pass 2^31, for each kernel (rational, attention_pool,
multi_tenant_generator), computed correctly (docs/design.md section 6: offsets are int64).

Memory: the CPU cases allocate the big fp16 tensors with `torch.empty` and the NaN poisoning of
tests/conftest.py switched off, so the kernel reads untouched pages, which the kernel maps as zeros
without committing memory; only the few rows set here and the outputs the kernels write (the fp16
`y` / `dx` of the rational, the fp16 `dH` of the pool, 4 GiB each) take real memory. The reference
runs on the few nonzero rows in float64. The Triton cases run on CUDA (`gpu`); in the interpreter a
grid of this size would take hours.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, rel_err

import iapt_kernels
from iapt_kernels import TenantGroups, reference

pytestmark = pytest.mark.slow
BIG = 2**31
FP16 = torch.float16
CHUNK = 1 << 26  # elements per slice when scanning a big tensor (a bool temporary of 64 MiB)


@pytest.fixture
def lazy_memory():
    """`torch.empty` without the NaN fill, so untouched pages stay uncommitted (and read as zero)."""
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous


def _big(shape, device):
    if device == "cpu":
        return torch.empty(shape, dtype=FP16)
    return torch.zeros(shape, dtype=FP16, device=device)


def _all_equal(t: torch.Tensor, value: float, skip: torch.Tensor) -> bool:
    """Every element of the flat tensor `t` equals `value`, except at the flat indices `skip`."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        bad = part != value
        inside = skip[(skip >= start) & (skip < start + CHUNK)] - start
        bad[inside] = False
        if bool(bad.any()):
            return False
    return True


def _backend(device):
    return "cpp" if device == "cpu" else "triton"


def test_rational_past_2_31_elements(device, lazy_memory):
    """Grouped rational over (2^20 + 1, 2048) fp16 = 2^31 + 2048 elements: the values set at the end
    (offsets past 2^31) and at the start give the reference's outputs and gradients; every other
    (zero) element gives R(0) = a_0 and a zero gradient."""
    rows, C, G = 2**20 + 1, 2048, 2
    assert rows * C > BIG
    x = _big((rows, C), device)
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.arange(0, 300), torch.arange(rows * C - 3000, rows * C)])
    values = torch.randn(idx.numel(), generator=gen).to(FP16)
    x.view(-1)[idx.to(device)] = values.to(device)
    # The same a_0 in both groups, so every zero element has the same output.
    num = torch.tensor([[0.125, 1.0, 0.3, 0.05], [0.125, 0.5, -0.2, 0.02]], dtype=torch.float32)
    den = torch.tensor([[0.4, 0.1], [0.2, 0.3]], dtype=torch.float32)
    group = (idx % C) // (C // G)
    xr = values.double().requires_grad_()
    nr, dr = num.double().requires_grad_(), den.double().requires_grad_()
    ref = torch.zeros_like(xr)
    for g in range(G):
        sel = group == g
        ref = ref.index_put((sel,), reference.rational(xr[sel], nr[g], dr[g]))
    upstream = (torch.rand(idx.numel(), generator=gen) + 0.5).to(FP16)
    (ref * upstream.double()).sum().backward()

    y = torch.ops.iapt.rational_fwd(x, num.to(device), den.to(device), "B")
    assert rel_err(y.view(-1)[idx.to(device)].cpu(), ref) < TOLERANCE[FP16]
    assert _all_equal(y, 0.125, idx.to(device))
    del y
    grad = _big((rows, C), device)
    grad.view(-1)[idx.to(device)] = upstream.to(device)
    dx, dnum, dden = torch.ops.iapt.rational_bwd(grad, x, num.to(device), den.to(device), "B")
    del grad
    assert rel_err(dx.view(-1)[idx.to(device)].cpu(), xr.grad) < TOLERANCE[FP16]
    assert _all_equal(dx, 0.0, idx.to(device))
    assert rel_err(dnum.cpu(), nr.grad) < TOLERANCE[FP16]
    assert rel_err(dden.cpu(), dr.grad) < TOLERANCE[FP16]


def _padded_big_batch(device, gen):
    """(2, S, 4096) fp16 with S = 2^18 + 8, i.e. 2^31 + 65536 elements: row 0 has instruction tokens
    at positions 0..9, row 1 at its last 12 positions, whose element offsets pass 2^31."""
    B, S, d = 2, 2**18 + 8, 4096
    assert (S + S - 12) * d > BIG
    h = _big((B, S, d), device)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, S - 12 :] = True
    rows = torch.randn(22, d, generator=gen).to(FP16)
    h[mask.to(device)] = rows.to(device)
    cu = torch.tensor([0, 10, 22], dtype=torch.int32)
    flat = (torch.nonzero(mask.view(-1)).view(-1)[:, None] * d + torch.arange(d)).view(-1)
    return h, mask.to(device), rows, cu, flat


def _weights(T, d, r, L, gen):
    wd = torch.randn(*T, r, d, generator=gen, dtype=torch.float64) / d**0.5
    bd = torch.randn(*T, r, generator=gen, dtype=torch.float64) * 0.5
    wp = torch.randn(*T, L, r, generator=gen, dtype=torch.float64) * 0.5
    return [w.to(FP16) for w in (wd, bd, wp)]


def test_attention_pool_past_2_31_elements(device, lazy_memory):
    gen = torch.Generator().manual_seed(1)
    h, mask, rows, cu, flat = _padded_big_batch(device, gen)
    weights = _weights((), h.shape[2], 8, 4, gen)
    upstream = (torch.rand(2, 4, 8, generator=gen) + 0.5).to(FP16)
    hr = rows.double().requires_grad_()
    wr = [w.double().requires_grad_() for w in weights]
    ref = reference.attention_pool(hr, None, *wr, cu_seqlens=cu)
    ref.backward(upstream.double())

    wv = [w.to(device).requires_grad_() for w in weights]
    h.requires_grad_()
    u = iapt_kernels.attention_pool(h, mask, *wv, backend=_backend(device))
    assert rel_err(u.cpu(), ref) < TOLERANCE[FP16]
    u.backward(upstream.to(device))
    for w, r in zip(wv, wr):
        assert rel_err(w.grad.cpu(), r.grad) < TOLERANCE[FP16]
    gh = h.grad
    assert rel_err(gh[mask].cpu(), hr.grad) < TOLERANCE[FP16]
    assert _all_equal(gh, 0.0, flat.to(device))


def test_multi_tenant_generator_past_2_31_elements(device, lazy_memory):
    gen = torch.Generator().manual_seed(2)
    h, mask, rows, cu, flat = _padded_big_batch(device, gen)
    d, r, L, T = h.shape[2], 8, 4, 2
    weights = _weights((T,), d, r, L, gen)
    num = torch.tensor([[0.0, 1.0, 0.3, 0.05], [0.1, 0.5, -0.2, 0.02]], dtype=torch.float64)
    den = torch.tensor([[0.4, 0.1], [0.2, 0.3]], dtype=torch.float64)
    wu = torch.rand(T, d, r, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    bu = torch.randn(T, d, generator=gen, dtype=torch.float64) * 0.1
    weights += [t.to(FP16) for t in (num, den, wu, bu)]
    ids = torch.tensor([1, 0])
    upstream = (torch.rand(2, L, d, generator=gen) + 0.5).to(FP16)
    hr = rows.double().requires_grad_()
    wr = [w.double().requires_grad_() for w in weights]
    ref = reference.multi_tenant_generator(hr, None, TenantGroups.build(ids, T), *wr, cu_seqlens=cu)
    ref.backward(upstream.double())

    wv = [w.to(device).requires_grad_() for w in weights]
    h.requires_grad_()
    groups = TenantGroups.build(ids.to(device), T)
    p = iapt_kernels.multi_tenant_generator(h, mask, groups, *wv, backend=_backend(device))
    assert rel_err(p.cpu(), ref) < TOLERANCE[FP16]
    p.backward(upstream.to(device))
    for w, r in zip(wv, wr):
        assert rel_err(w.grad.cpu(), r.grad) < TOLERANCE[FP16]
    gh = h.grad
    assert rel_err(gh[mask].cpu(), hr.grad) < TOLERANCE[FP16]
    assert _all_equal(gh, 0.0, flat.to(device))
