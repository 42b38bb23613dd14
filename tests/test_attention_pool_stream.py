"""The Triton attention-pool stream (issue 11): each instruction element of H is loaded by one program
of one launch per direction, counted in the interpreter; chunk boundaries (S from 1 to 4099, a
sequence inside one chunk beside an empty one, packed sequences of very different lengths) against
the float64 reference; `max_seqlen` too small is an error."""

import contextlib
import zlib

import numpy as np
import pytest
import torch
from helpers import TOLERANCE, cpu_kernels, rel_err

import iapt_kernels
from iapt_kernels.ops import attention_pool as ap

pytestmark = pytest.mark.skipif(
    "triton" not in iapt_kernels.available_backends(), reason="the Triton backend is not available"
)
INTERPRETED = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _triton_on_cpu():
    """Every case here runs the Triton kernels: on CPU, inside the interpreter test route."""
    with cpu_kernels("triton") if INTERPRETED else contextlib.nullcontext():
        yield


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weights(d, r, L, gen, dtype=torch.float32):
    return [
        t.to(dtype).requires_grad_()
        for t in (
            torch.randn(r, d, generator=gen) / d**0.5,
            torch.randn(r, generator=gen) * 0.1,
            torch.randn(L, r, generator=gen) / r**0.5,
        )
    ]


def _run(h, mask, weights, grad, cu_seqlens=None, backend="triton", device="cpu"):
    """U and every gradient, all inputs on `device`."""
    h = h.detach().to(device).clone().requires_grad_()
    weights = [w.detach().to(device).requires_grad_() for w in weights]
    mask = None if mask is None else mask.to(device)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(device)
    u = iapt_kernels.attention_pool(h, mask, *weights, cu_seqlens=cu_seqlens, backend=backend)
    assert u.device.type == torch.device(device).type
    u.backward(grad.to(device, u.dtype))
    return {
        "U": u.detach(),
        "hidden_states": h.grad,
        "down_weight": weights[0].grad,
        "down_bias": weights[1].grad,
        "pool_weight": weights[2].grad,
    }


def _check_against_reference(h, mask, weights, gen, tol, context, cu_seqlens=None, device="cpu"):
    """The Triton backend on `device` against the float64 reference on CPU, on the same values."""
    B = h.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    grad = torch.rand(B, weights[2].shape[0], weights[0].shape[0], generator=gen) + 0.5
    out = {k: v.cpu() for k, v in _run(h, mask, weights, grad, cu_seqlens, device=device).items()}
    ref_w = [w.detach().double().requires_grad_() for w in weights]
    want = _run(h.double(), mask, ref_w, grad.double(), cu_seqlens, backend="reference")
    for key, r in want.items():
        err = rel_err(out[key], r)
        assert err < tol, f"{key}: rel err {err:.3g} >= {tol} ({context})"
    return out


# --------------------------------------------------------------------------- chunk boundaries


def test_chunks_cover_the_sms_without_walking_past_a_sequence():
    assert ap.NUM_SMS == 132
    assert ap.chunk_size(1, 4096) == 32  # 128 programs: every 32-row block its own program
    assert ap.chunk_size(8, 512) == 32  # the default shape: 128 programs
    assert ap.chunk_size(64, 2048) == 512  # 256 programs of 16 row blocks each
    assert ap.chunk_size(1000, 100) == 128  # the batch alone fills the GPU: one chunk a sequence
    assert ap.chunk_size(3, 0) == 32


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("num_sms", [ap.NUM_SMS, 3], ids=["chunks_of_32", "chunks_of_many_blocks"])
def test_lengths_across_chunk_boundaries(backend, device, num_sms, monkeypatch):
    """S from 1 to 4099 (B = 1 at S = 4099), with the default chunking (one row block a program at
    these sizes) and with few SMs (chunks of many blocks: the online rescale between blocks)."""
    monkeypatch.setattr(ap, "NUM_SMS", num_sms)
    d, r, L = 24, 8, 4
    for B, S in ((2, 1), (2, 31), (1, 32), (2, 33), (2, 97), (1, 4099)):
        gen = _seed("lengths", B, S, num_sms)
        weights = _weights(d, r, L, gen)
        h = torch.randn(B, S, d, generator=gen)
        mask = torch.rand(B, S, generator=gen) < 0.7
        mask[:, -1] = True  # the last position, in the last (ragged) chunk
        h[~mask] = float("nan")
        out = _check_against_reference(
            h, mask, weights, gen, TOLERANCE[torch.float32], f"B={B} S={S}", device=device
        )
        assert torch.all(out["hidden_states"][~mask] == 0)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_sequence_inside_one_chunk_beside_an_empty_one(backend, device, dtype, monkeypatch):
    monkeypatch.setattr(ap, "NUM_SMS", 7)  # chunk_size(3, 300) = 128 tokens
    assert ap.chunk_size(3, 300) == 128
    B, S, d, r, L = 3, 300, 40, 8, 5
    gen = _seed("inside", dtype)
    weights = _weights(d, r, L, gen, dtype)
    h = torch.randn(B, S, d, generator=gen).to(dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 140:170] = True  # all inside chunk 1 of 3
    mask[2] = torch.rand(S, generator=gen) < 0.5  # row 1 stays empty
    h[~mask] = float("inf")
    out = _check_against_reference(h, mask, weights, gen, TOLERANCE[dtype], str(dtype), device=device)
    assert torch.all(out["hidden_states"][~mask] == 0)
    assert torch.all(out["U"][1] == 0)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("num_sms", [ap.NUM_SMS, 13], ids=["chunks_of_32", "chunks_of_many_blocks"])
def test_packed_sequences_of_very_different_lengths(backend, device, num_sms, monkeypatch):
    monkeypatch.setattr(ap, "NUM_SMS", num_sms)
    lengths = [1, 700, 0, 37, 129, 64]
    d, r, L = 24, 8, 4
    gen = _seed("packed", num_sms)
    weights = _weights(d, r, L, gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    h = torch.randn(int(cu[-1]), d, generator=gen)
    _check_against_reference(
        h, None, weights, gen, TOLERANCE[torch.float32], f"lengths={lengths}", cu_seqlens=cu, device=device
    )


@pytest.mark.parametrize("backend", ["triton"])
def test_max_seqlen_shorter_than_a_sequence_is_an_error(backend, device):
    if device != "cpu":
        pytest.skip("on CUDA the check runs on the device without a host read: a device-side assert")
    d, r, L = 16, 8, 4
    wd, bd, wp = (w.detach().to(device) for w in _weights(d, r, L, _seed("maxlen")))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=device)
    h = torch.randn(10, d, device=device)
    with pytest.raises(ValueError, match="sequence 1 has 7 tokens, more than max_seqlen = 6"):
        torch.ops.iapt.attention_pool_fwd(h, None, cu, wd, bd, wp, 6)
    wdp = (wd.t() @ wp.t()).contiguous()
    with pytest.raises(ValueError, match="more than max_seqlen"):
        ap.stream_fwd(h, None, cu, 5, wdp, wp @ bd)


# --------------------------------------------------------------------------- the autotune set


def test_autotune_members_share_tiles_and_are_all_in_the_static_report():
    """Every member streams the same tiles and chunks (so sums run in the same order over d and over
    chunks); the default comes first; the static report compiles every member of every kernel that
    streams H."""
    specs = [s for s in ap.launch_configs() if s["h_stage_bytes"]]
    for l_pad in (16, 32, 64):
        members = ap.stream_configs(l_pad)
        assert members[0] == dict(num_warps=ap.NUM_WARPS, num_stages=ap.pipeline_stages(l_pad))
        assert len(members) == len({tuple(m.items()) for m in members}) >= 2
        for name in ("_attention_pool_fwd_kernel", "_attention_pool_bwd_kernel"):
            for io in ("fp32", "fp16", "bf16", "fp64"):
                got = [
                    (s["num_warps"], s["num_stages"])
                    for s in specs
                    if s["name"] == name
                    and s["config"]["L_PAD"] == l_pad
                    and s["config"]["dtype"] == io
                    and not s["config"]["packed"]
                    and not s["config"]["multi_tenant"]
                ]
                assert got == [(m["num_warps"], m["num_stages"]) for m in members]
                assert (
                    len(
                        {
                            s["constexprs"]["BLOCK_D"]
                            for s in specs
                            if s["name"] == name
                            and s["config"]["L_PAD"] == l_pad
                            and s["config"]["dtype"] == io
                        }
                    )
                    == 1
                )


def test_tuner_keeps_the_fastest_member_first_on_ties_and_skips_what_cannot_launch(monkeypatch):
    """`_fastest` with a fake `do_bench` that returns each member's made-up time."""
    import triton.testing

    configs = [dict(num_warps=4, num_stages=s) for s in (2, 3, 4, 5)]

    def timed(times):
        def launch(cfg):
            t = times[configs.index(cfg)]
            if t is None:
                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
            return t

        return launch

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    assert ap._fastest(timed([2.0, 1.0, None, 1.5]), configs) == configs[1]
    assert ap._fastest(timed([None, 3.0, 3.0, 4.0]), configs) == configs[1]  # a tie keeps the earlier
    assert ap._fastest(timed([None, None, None, None]), configs) == configs[0]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the interpreter runs the default member)"
)
@pytest.mark.parametrize("member", range(2))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_autotune_member_matches_the_reference(member, dtype, monkeypatch):
    """Each member alone (the tuner sees only it), padded and packed, against the float64 reference."""
    members = ap.stream_configs(16)
    monkeypatch.setattr(ap, "stream_configs", lambda l_pad: [members[member]])
    monkeypatch.setattr(ap, "_TUNED", {})
    B, S, d, r, L = 3, 200, 96, 8, 4
    gen = _seed("member", member, dtype)
    weights = _weights(d, r, L, gen, dtype)
    h = torch.randn(B, S, d, generator=gen).to(dtype)
    mask = torch.rand(B, S, generator=gen) < 0.7
    _check_against_reference(
        h, mask, weights, gen, TOLERANCE[dtype], f"member {members[member]}", device="cuda"
    )
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = mask.sum(1).cumsum(0)
    _check_against_reference(
        h[mask],
        None,
        weights,
        gen,
        TOLERANCE[dtype],
        f"member {members[member]} packed",
        cu_seqlens=cu,
        device="cuda",
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the tuner runs on CUDA only)")
def test_tuned_launches_repeat_bit_for_bit(monkeypatch):
    """The first call times the members and keeps one; later calls give the same bits."""
    monkeypatch.setattr(ap, "_TUNED", {})
    monkeypatch.setenv("IAPT_AUTOTUNE", "1")
    B, S, d, r, L = 2, 300, 128, 16, 4
    gen = _seed("tuned")
    weights = _weights(d, r, L, gen)
    h = torch.randn(B, S, d, generator=gen)
    mask = torch.rand(B, S, generator=gen) < 0.8
    grad = torch.rand(B, L, r, generator=gen)
    first, second = (_run(h, mask, weights, grad, device="cuda") for _ in range(2))
    assert ap._TUNED, "no launch went through the tuner"
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --------------------------------------------------------------------------- traffic


class LoadCounter:
    """Inside `with`, attributes every masked load of H's storage to (launch, program), through the
    interpreter's load (as /work/shared/tools/traffic.py does). `per_element()` maps each loaded
    element of H to the set of (launch, program) pairs that loaded it."""

    def __init__(self, h: torch.Tensor):
        st = h.untyped_storage()
        self.lo, self.hi, self.esize = st.data_ptr(), st.data_ptr() + st.nbytes(), h.element_size()
        self.log = []
        self.launch = 0

    def __enter__(self):
        from triton.runtime import interpreter as itp

        self._itp = itp
        self._load, self._call = itp.InterpreterBuilder.create_masked_load, itp.GridExecutor.__call__
        counter = self

        # The arguments after `mask` differ between Triton versions (3.6 has cache_modifier and
        # eviction_policy, 3.9 cache_policy): passed through untouched.
        def load(builder, ptrs, mask, *rest, **kwargs):
            addr = np.asarray(ptrs.data).reshape(-1)
            keep = np.asarray(mask.data).reshape(-1).astype(bool)
            addr = addr[keep]
            addr = addr[(addr >= counter.lo) & (addr < counter.hi)]
            if addr.size:
                pid = tuple(int(i) for i in itp.interpreter_builder.grid_idx)
                counter.log.append((counter.launch, pid, np.unique((addr - counter.lo) // counter.esize)))
            return counter._load(builder, ptrs, mask, *rest, **kwargs)

        def call(executor, *args, **kwargs):
            counter.launch += 1
            return counter._call(executor, *args, **kwargs)

        itp.InterpreterBuilder.create_masked_load = load
        itp.GridExecutor.__call__ = call
        return self

    def __exit__(self, *exc):
        self._itp.InterpreterBuilder.create_masked_load = self._load
        self._itp.GridExecutor.__call__ = self._call

    def per_element(self):
        who = {}
        for launch, pid, idx in self.log:
            for i in idx.tolist():
                who.setdefault(i, set()).add((launch, pid))
        return who


def _assert_read_once(counter, instruction_elements, what):
    who = counter.per_element()
    assert set(who) == instruction_elements, f"{what}: loaded elements are not the instruction elements"
    launches = {launch for pairs in who.values() for launch, _ in pairs}
    assert len(launches) == 1, f"{what}: H loaded in {len(launches)} launches"
    many = [i for i, pairs in who.items() if len(pairs) > 1]
    assert not many, f"{what}: {len(many)} elements loaded by more than one program"


def _instruction_elements(mask, d, cu_seqlens=None):
    rows = torch.arange(int(cu_seqlens[-1])) if cu_seqlens is not None else mask.reshape(-1).nonzero()[:, 0]
    return {int(r) * d + j for r in rows for j in range(d)}


@pytest.mark.skipif(not INTERPRETED, reason="counts loads in the Triton interpreter")
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("num_sms", [ap.NUM_SMS, 2], ids=["chunks_of_32", "chunks_of_many_blocks"])
def test_single_tenant_reads_h_once_per_direction(layout, num_sms, monkeypatch):
    monkeypatch.setattr(ap, "NUM_SMS", num_sms)
    B, S, d, r, L = 2, 77, 160, 8, 4  # d: three BLOCK_D tiles, the last ragged
    gen = _seed("traffic", layout)
    wd, bd, wp = _weights(d, r, L, gen)
    mask = torch.rand(B, S, generator=gen) < 0.8
    if layout == "packed":
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = mask.sum(1).cumsum(0)
        h, m = torch.randn(int(cu[-1]), d, generator=gen), None
    else:
        cu, h, m = None, torch.randn(B, S, d, generator=gen), mask
    h.requires_grad_()
    expected = _instruction_elements(mask, d, cu)
    with LoadCounter(h) as fwd:
        u = iapt_kernels.attention_pool(h, m, wd, bd, wp, cu_seqlens=cu, backend="triton")
    _assert_read_once(fwd, expected, f"forward {layout}")
    with LoadCounter(h) as bwd:
        u.sum().backward()
    _assert_read_once(bwd, expected, f"backward {layout}")
    assert torch.isfinite(h.grad).all()


@pytest.mark.skipif(not INTERPRETED, reason="counts loads in the Triton interpreter")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_multi_tenant_reads_h_once_per_direction(layout):
    B, S, d, r, L, T = 3, 45, 80, 8, 4, 2
    gen = _seed("traffic-mt", layout)
    torch.manual_seed(0)
    mod = iapt_kernels.MultiTenantPromptGenerator(T, d, r, L, backend="triton")
    tenant_ids = torch.tensor([1, -1, 0])
    mask = torch.rand(B, S, generator=gen) < 0.8
    if layout == "packed":
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = mask.sum(1).cumsum(0)
        h, m = torch.randn(int(cu[-1]), d, generator=gen), None
        kw = dict(cu_seqlens=cu)
    else:
        cu, h, m, kw = None, torch.randn(B, S, d, generator=gen), mask, {}
    h.requires_grad_()
    # Request 1 has no adapter: its rows are not read at all.
    served = mask.clone()
    served[1] = False
    if cu is not None:
        rows = torch.cat([torch.arange(int(cu[b]), int(cu[b + 1])) for b in (0, 2)])
        expected = {int(i) * d + j for i in rows for j in range(d)}
    else:
        expected = _instruction_elements(served, d)
    with LoadCounter(h) as fwd:
        p = mod(h, m, tenant_ids, **kw)
    _assert_read_once(fwd, expected, f"multi-tenant forward {layout}")
    with LoadCounter(h) as bwd:
        p.sum().backward()
    _assert_read_once(bwd, expected, f"multi-tenant backward {layout}")
