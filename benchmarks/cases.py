"""The benchmark cases: every op, forward and forward+backward, over a sweep of sizes, on every backend
of the device. Shared by the report (`python -m benchmarks`) and the pytest-benchmark suite under `benchmarks/`.

Implementations of a case (`Case.impls`): `reference` (eager PyTorch), `compiled`
(`torch.compile(reference)`, on CPU and CUDA), and the fused backend of the device: `cpp` on CPU (when the
extension is built), `triton` on CUDA. Triton in the CPU interpreter is not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import iapt_kernels
from iapt_kernels import reference

MODES = ("fwd", "fwd+bwd")

# Default sweeps. The largest size of each op is the "default size" of the acceptance criteria.
RATIONAL_SIZES = (1 << 16, 1 << 20, 1 << 23)
GENERATOR_SHAPES = ((2, 128, 512, 64, 4), (4, 256, 1024, 128, 4), (8, 512, 2048, 256, 4))  # (B, S, d, r, L)
MULTI_TENANT_SHAPES = ((4, 8, 128, 512, 64, 4), (8, 16, 256, 1024, 128, 4))  # (T, B, S, d, r, L)
QUICK_RATIONAL_SIZES = (1 << 12, 1 << 16)
QUICK_GENERATOR_SHAPES = ((2, 64, 256, 32, 4),)
QUICK_MULTI_TENANT_SHAPES = ((3, 4, 64, 256, 32, 4),)
MASK_FRACTION = 0.8


@dataclass
class Case:
    """One benchmark: an op at a shape, dtype and mode, with a runnable closure per implementation.

    `impls` maps an implementation name (`reference`, `compiled`, `cpp`, `triton`) to a function of no
    arguments that runs the op once; `tensors_moved` is how many `x`-sized tensors the op must read
    and write at least, which scales the copy limit; `params` are the sizes the cost model needs.
    """

    op: str
    shape: tuple
    dtype: torch.dtype
    mode: str
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    tensors_moved: float = 2.0
    copy: Callable[[], object] | None = None
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = f",{self.params['mix']}" if "mix" in self.params else ""
        return f"{self.op}[{'x'.join(map(str, self.shape))},{str(self.dtype).replace('torch.', '')},{self.mode}{extra}]"


def _runner(fn, inputs, mode, grad, params=()):
    """One call of `fn(*inputs)`: under no_grad forward, else forward and backward with fresh grads."""
    params = list(params)
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn(*inputs)
    else:

        def run():
            for t in [*inputs, *params]:
                if isinstance(t, torch.Tensor):
                    t.grad = None
            fn(*inputs).backward(grad)

    return run


def configure_compile() -> None:
    """Let torch.compile keep one graph per benchmark shape and mode instead of giving up."""
    import logging

    import torch._dynamo

    # Graph breaks in the references (data-dependent input checks) are expected: keep the log quiet.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096


def _compile(fn):
    # dynamic=False: one specialised graph per shape, the best torch.compile can do for the baseline.
    return torch.compile(fn, dynamic=False)


def kernel_backends(device: str) -> list[str]:
    avail = iapt_kernels.available_backends()
    if device == "cuda":
        return ["triton"] if "triton" in avail else []
    return ["cpp"] if "cpp" in avail else []


def rational_cases(
    device: str, sizes=RATIONAL_SIZES, dtypes=(torch.float32,), backends=None, compiled=True
) -> list[Case]:
    """Rational activation, degrees (5, 4), version B, one group, on a flat tensor of `numel` elements."""
    backends = backends if backends is not None else kernel_backends(device)
    num0, den0 = iapt_kernels.rational_init("gelu", (5, 4))
    cases = []
    for numel in sizes:
        for dtype in dtypes:
            for mode in MODES:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(numel, generator=gen).to(device=device, dtype=dtype)
                out = torch.empty_like(x)
                num = num0.float().to(device)
                den = den0.float().to(device)
                if mode == "fwd+bwd":
                    for t in (x, num, den):
                        t.requires_grad_()
                grad = torch.randn_like(x)
                case = Case(
                    "rational",
                    (numel,),
                    dtype,
                    mode,
                    tensors_moved=2.0 if mode == "fwd" else 5.0,
                    params={"numel": numel, "degrees": (5, 4)},
                )
                case.copy = lambda out=out, x=x: out.copy_(x.detach())
                ref = lambda x, a, b: reference.rational(x, a, b)  # noqa: E731
                case.impls["reference"] = _runner(ref, (x, num, den), mode, grad)
                if compiled:
                    case.impls["compiled"] = _runner(_compile(ref), (x, num, den), mode, grad)
                for backend in backends:
                    fn = lambda x, a, b, backend=backend: iapt_kernels.rational(x, a, b, backend=backend)  # noqa: E731
                    case.impls[backend] = _runner(fn, (x, num, den), mode, grad)
                cases.append(case)
    return cases


def random_mask(B: int, S: int, device: str) -> torch.Tensor:
    """A `(B, S)` instruction mask, True at about MASK_FRACTION of the positions."""
    return (torch.rand(B, S) < MASK_FRACTION).to(device)


def generator_cases(
    device: str, shapes=GENERATOR_SHAPES, dtypes=(torch.float32,), backends=None, compiled=True
) -> list[Case]:
    """attention_pool alone and the whole prompt generator (pool + rational + up-projection), at
    `(B, S, d, r, L)`, with a random instruction mask covering ~80% of the positions."""
    backends = backends if backends is not None else kernel_backends(device)
    cases = []
    for B, S, d, r, L in shapes:
        for dtype in dtypes:
            for mode in MODES:
                torch.manual_seed(0)
                h = torch.randn(B, S, d).to(device=device, dtype=dtype)
                mask = random_mask(B, S, device)
                out = torch.empty_like(h)
                if mode == "fwd+bwd":
                    h.requires_grad_()
                # Minimum traffic in units of H: read it once forward; read it again and write gH backward.
                moved = 1.0 if mode == "fwd" else 3.0
                gens = {"reference": reference.PromptGenerator(d, r, L)}
                for backend in backends:
                    gens[backend] = iapt_kernels.PromptGenerator(d, r, L, backend=backend)
                for g in gens.values():
                    g.load_state_dict(gens["reference"].state_dict())
                    g.to(device=device, dtype=dtype)
                    g.requires_grad_(mode == "fwd+bwd")
                ref_gen = gens["reference"]
                params = {
                    "B": B,
                    "S": S,
                    "d": d,
                    "r": r,
                    "L": L,
                    "degrees": (5, 4),
                    "mask_fraction": float(mask.float().mean()),
                }
                for op in ("attention_pool", "generator"):
                    case = Case(op, (B, S, d, r, L), dtype, mode, tensors_moved=moved, params=params)
                    case.copy = lambda out=out, h=h: out.copy_(h.detach())
                    grad = torch.randn(B, L, d if op == "generator" else r, device=device, dtype=dtype)
                    for name, g in gens.items():
                        fn = g if op == "generator" else g.pooled
                        case.impls[name] = _runner(fn, (h, mask), mode, grad, g.parameters())
                        if name == "reference" and compiled:
                            fn_ref = ref_gen if op == "generator" else ref_gen.pooled
                            case.impls["compiled"] = _runner(
                                _compile(fn_ref), (h, mask), mode, grad, ref_gen.parameters()
                            )
                    cases.append(case)
    return cases


def multi_tenant_available() -> bool:
    """Kept for callers of the bench API: the multi-tenant generator is always part of the package."""
    return True


def multi_tenant_cases(
    device: str, shapes=MULTI_TENANT_SHAPES, dtypes=(torch.float32,), backends=None, compiled=True
) -> list[Case]:
    """The multi-tenant generator at `(T, B, S, d, r, L)`: `T` tenants' generators and `B` requests
    whose tenants follow a mix (`TENANT_MIXES`; every mix at the last shape, round robin at the
    others)."""
    backends = backends if backends is not None else kernel_backends(device)
    cases = []
    runs = [(shape, "round_robin") for shape in shapes[:-1]] + [(shapes[-1], mix) for mix in TENANT_MIXES]
    for (T, B, S, d, r, L), mix in runs:
        for dtype in dtypes:
            for mode in MODES:
                torch.manual_seed(0)
                h = torch.randn(B, S, d).to(device=device, dtype=dtype)
                mask = random_mask(B, S, device)
                tenant_ids = tenant_mix(mix, B, T).to(device)
                out = torch.empty_like(h)
                if mode == "fwd+bwd":
                    h.requires_grad_()
                gens = {"reference": reference.MultiTenantPromptGenerator(T, d, r, L)}
                for backend in backends:
                    gens[backend] = iapt_kernels.MultiTenantPromptGenerator(T, d, r, L, backend=backend)
                for g in gens.values():
                    g.load_state_dict(gens["reference"].state_dict())
                    g.to(device=device, dtype=dtype)
                    g.requires_grad_(mode == "fwd+bwd")
                params = {
                    "T": T,
                    "B": B,
                    "S": S,
                    "d": d,
                    "r": r,
                    "L": L,
                    "degrees": (5, 4),
                    "mask_fraction": float(mask.float().mean()),
                    "mix": mix,
                    "tenant_ids": tenant_ids.tolist(),
                }
                case = Case(
                    "multi_tenant_generator",
                    (T, B, S, d, r, L),
                    dtype,
                    mode,
                    tensors_moved=1.0 if mode == "fwd" else 3.0,
                    params=params,
                )
                case.copy = lambda out=out, h=h: out.copy_(h.detach())
                grad = torch.randn(B, L, d, device=device, dtype=dtype)
                for name, g in gens.items():
                    case.impls[name] = _runner(g, (h, mask, tenant_ids), mode, grad, g.parameters())
                    if name == "reference" and compiled:
                        case.impls["compiled"] = _runner(
                            _compile(g), (h, mask, tenant_ids), mode, grad, g.parameters()
                        )
                cases.append(case)
    return cases


TENANT_MIXES = ("round_robin", "one_tenant", "zipf")


def tenant_mix(mix: str, B: int, T: int) -> torch.Tensor:
    """`tenant_ids (B,)`: `round_robin` 0, 1, ..., T-1, 0, ...; `one_tenant` all 0; `zipf` tenant t
    drawn with weight 1 / (t + 1)^1.5 (a fixed seed), as traffic across many tenants tends to be."""
    if mix == "round_robin":
        return torch.arange(B) % T
    if mix == "one_tenant":
        return torch.zeros(B, dtype=torch.long)
    if mix == "zipf":
        weights = 1.0 / torch.arange(1, T + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, B, replacement=True, generator=torch.Generator().manual_seed(0))
    raise ValueError(f"unknown tenant mix {mix!r}; one of {TENANT_MIXES}")


def default_cases(device: str, quick: bool = False, compiled: bool = True) -> list[Case]:
    """The cases `python -m benchmarks` runs by default (and the pytest-benchmark suite runs)."""
    if quick:
        return (
            rational_cases(device, sizes=QUICK_RATIONAL_SIZES, compiled=compiled)
            + generator_cases(device, shapes=QUICK_GENERATOR_SHAPES, compiled=compiled)
            + multi_tenant_cases(device, shapes=QUICK_MULTI_TENANT_SHAPES, compiled=compiled)
        )
    return (
        rational_cases(device, compiled=compiled)
        + generator_cases(device, compiled=compiled)
        + multi_tenant_cases(device, compiled=compiled)
    )
