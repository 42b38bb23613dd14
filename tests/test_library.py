"""`torch.library.opcheck` for every iapt:: op (schema, fake implementation, autograd registration,
AOT dispatch) on each backend that runs on CPU tensors here: `cpp`, and `triton` in the interpreter.
The rational ops' checks, per version and dtype, are in tests/test_rational.py."""

import pytest
import torch

import iapt_kernels
from iapt_kernels import TenantGroups

CPU_KERNELS = [b for b in iapt_kernels.available_backends() if b in ("cpp", "triton")]
B, S, D, R, L, T = 3, 7, 16, 8, 4, 3


def _padded():
    torch.manual_seed(0)
    h = torch.randn(B, S, D)
    mask = torch.rand(B, S) < 0.7
    mask[:, 0] = True
    return h, mask


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_opcheck_attention_pool_ops(backend):
    h, mask = _padded()
    wd, bd, wp = torch.randn(R, D) * 0.2, torch.randn(R) * 0.2, torch.randn(L, R) * 0.2
    fwd_args = (h, mask, None, wd, bd, wp, S, backend)
    torch.library.opcheck(torch.ops.iapt.attention_pool_fwd, fwd_args)
    u, a, z, n = torch.ops.iapt.attention_pool_fwd(*fwd_args)
    bwd_args = (torch.randn_like(u), h, mask, None, wd, wp, a, z, n, S, backend)
    torch.library.opcheck(torch.ops.iapt.attention_pool_bwd, bwd_args)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_opcheck_multi_tenant_generator_ops(backend):
    h, mask = _padded()
    # Tenant 1 absent (its gradient slices are only zero-filled). No tenant -1: the Triton forward leaves
    # the saved Z, U, G rows of such requests unwritten (the backward never reads them), and opcheck
    # compares every output of two runs.
    groups = TenantGroups.build(torch.tensor([2, 0, 0]), T)
    wd, bd, wp = torch.randn(T, R, D) * 0.2, torch.randn(T, R) * 0.2, torch.randn(T, L, R) * 0.2
    num, den = torch.randn(T, 6) * 0.3, torch.randn(T, 4) * 0.3
    wu, bu = torch.randn(T, D, R) * 0.2, torch.randn(T, D) * 0.2
    fwd_args = (h, mask, None, *groups.tensors(), wd, bd, wp, num, den, wu, bu, "B", S, backend)
    torch.library.opcheck(torch.ops.iapt.multi_tenant_generator_fwd, fwd_args)
    p, a, z, u, g, n, wdp = torch.ops.iapt.multi_tenant_generator_fwd(*fwd_args)
    bwd_args = (
        torch.randn_like(p),
        h,
        mask,
        None,
        *groups.tensors(),
        wd,
        wp,
        num,
        den,
        wu,
        a,
        z,
        u,
        g,
        n,
        wdp,
        "B",
        S,
        backend,
        groups.absent,
    )
    torch.library.opcheck(torch.ops.iapt.multi_tenant_generator_bwd, bwd_args)
