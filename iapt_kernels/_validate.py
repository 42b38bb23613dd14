"""Input checks shared by every backend, run before any kernel launches.

Each check raises with a message that names the argument and what was expected, so a user sees the
problem in their call rather than a failure deep inside a kernel.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_DEGREE = 8
BACKENDS = ("auto", "triton", "cpp", "reference")
REFERENCE_BACKENDS = ("auto", "reference")  # what the reference modules accept, for signature parity


def check_backend(backend: object, allowed: tuple[str, ...] = BACKENDS, owner: str = "") -> str:
    """The one backend-name check: `backend` must be in `allowed`. Whether that backend can run on a
    given device is `_backend.resolve_backend`'s business, once the tensors are known."""
    if backend not in allowed:
        who = f"{owner} runs only the reference backend: " if allowed == REFERENCE_BACKENDS else ""
        raise ValueError(f"{who}backend must be one of {allowed}, got {backend!r}")
    return backend


def check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def check_degrees(degrees: object) -> tuple[int, int]:
    """`degrees` as an `(m, n)` pair of ints, each in 1..8."""
    try:
        m, n = degrees  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"degrees must be a pair (m, n), got {degrees!r}") from None
    for label, d in (("numerator degree m", m), ("denominator degree n", n)):
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"{label} must be an int, got {d!r}")
        if not 1 <= d <= MAX_DEGREE:
            raise ValueError(f"{label} must be in 1..{MAX_DEGREE}, got {d}")
    return m, n


def check_version(version: object) -> None:
    if version not in ("A", "B"):
        raise ValueError(f'version must be "A" or "B", got {version!r}')


def normalize_coefficients(
    numerator: torch.Tensor, denominator: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(m+1,)` / `(n,)` coefficients as `(1, m+1)` / `(1, n)`; 2-D ones unchanged."""
    num = numerator.unsqueeze(0) if numerator.dim() == 1 else numerator
    den = denominator.unsqueeze(0) if denominator.dim() == 1 else denominator
    return num, den


def check_rational_inputs(
    x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, version: str
) -> int:
    """Validate a rational-activation call; return the number of groups."""
    check_float_tensor("x", x)
    check_float_tensor("numerator", numerator)
    check_float_tensor("denominator", denominator)
    check_version(version)
    for name, t in (("numerator", numerator), ("denominator", denominator)):
        if t.dim() not in (1, 2):
            raise ValueError(f"{name} must be (G, k) or (k,), got shape {tuple(t.shape)}")
    num, den = normalize_coefficients(numerator, denominator)
    m, n = num.shape[1] - 1, den.shape[1]
    if not 1 <= m <= MAX_DEGREE:
        raise ValueError(
            f"numerator has {num.shape[1]} coefficients, i.e. degree m={m}; m must be in 1..{MAX_DEGREE} "
            f"(numerator shape (G, m+1))"
        )
    if not 1 <= n <= MAX_DEGREE:
        raise ValueError(
            f"denominator has {n} coefficients, i.e. degree n={n}; n must be in 1..{MAX_DEGREE} "
            f"(denominator shape (G, n))"
        )
    if num.shape[0] != den.shape[0]:
        raise ValueError(
            f"numerator has {num.shape[0]} groups but denominator has {den.shape[0]} "
            f"(shapes {tuple(numerator.shape)} and {tuple(denominator.shape)})"
        )
    groups = num.shape[0]
    if groups < 1:
        raise ValueError("coefficients must have at least one group")
    last = x.shape[-1] if x.dim() > 0 else 1
    if last % groups != 0:
        raise ValueError(
            f"groups={groups} must divide the last dimension of x, got x of shape {tuple(x.shape)}"
        )
    check_same_device(x=x, numerator=numerator, denominator=denominator)
    return groups


def check_attention_pool_inputs(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    pool_weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None = None,
) -> tuple[int, int, int, int]:
    """Validate an attention-pool call; return `(B, d, r, L)`. With `max_seqlen` given and
    `cu_seqlens` off the CPU, its bounds are checked on the device (no host read, the reason a caller
    passes `max_seqlen`): a violation is a device-side assert rather than a ValueError."""
    check_float_tensor("hidden_states", hidden_states)
    for name, t in (("down_weight", down_weight), ("down_bias", down_bias), ("pool_weight", pool_weight)):
        check_float_tensor(name, t)
        if t.dtype != hidden_states.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but hidden_states has {hidden_states.dtype}; "
                "cast the weights or the input so they match"
            )
    if down_weight.dim() != 2:
        raise ValueError(f"down_weight must be (r, d), got shape {tuple(down_weight.shape)}")
    r, d = down_weight.shape
    if r == 0 or d == 0:
        raise ValueError(f"down_weight must be (r, d) with r, d >= 1, got shape {tuple(down_weight.shape)}")
    if down_bias.shape != (r,):
        raise ValueError(
            f"down_bias must be (r,) = ({r},) to match down_weight, got {tuple(down_bias.shape)}"
        )
    if pool_weight.dim() != 2 or pool_weight.shape[1] != r:
        raise ValueError(f"pool_weight must be (L, r) with r={r}, got shape {tuple(pool_weight.shape)}")
    L = pool_weight.shape[0]
    if L == 0:
        raise ValueError("pool_weight has L=0 rows: at least one soft token is needed")
    tensors = dict(
        hidden_states=hidden_states, down_weight=down_weight, down_bias=down_bias, pool_weight=pool_weight
    )
    if cu_seqlens is None:
        if hidden_states.dim() != 3:
            raise ValueError(
                f"hidden_states must be (B, S, d) with a mask, or (N, d) with cu_seqlens; got shape "
                f"{tuple(hidden_states.shape)} and no cu_seqlens"
            )
        B, S, dh = hidden_states.shape
        if not isinstance(mask, torch.Tensor):
            raise TypeError("mask must be a (B, S) bool tensor when cu_seqlens is not given")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = instruction token), got {mask.dtype}")
        if mask.shape != (B, S):
            raise ValueError(
                f"mask must be (B, S) = ({B}, {S}) to match hidden_states, got {tuple(mask.shape)}"
            )
        tensors["mask"] = mask
    else:
        if mask is not None:
            raise ValueError("pass either mask (padded layout) or cu_seqlens (packed layout), not both")
        if hidden_states.dim() != 2:
            raise ValueError(
                f"with cu_seqlens, hidden_states must be packed (N, d), got {tuple(hidden_states.shape)}"
            )
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
            got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise TypeError(f"cu_seqlens must be an int32 tensor, got {got}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be (B+1,) with B >= 1, got shape {tuple(cu_seqlens.shape)}")
        tensors["cu_seqlens"] = cu_seqlens
        B = cu_seqlens.numel() - 1
        dh = hidden_states.shape[1]
    check_same_device(**tensors)
    if dh != d:
        raise ValueError(
            f"hidden_states has hidden size d={dh} but down_weight is (r, d) = {tuple(down_weight.shape)}"
        )
    if cu_seqlens is not None and max_seqlen is not None and cu_seqlens.device.type != "cpu":
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        torch._assert_async(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
        torch._assert_async((steps >= 0).all(), "cu_seqlens must be non-decreasing")
        torch._assert_async(cu_seqlens[-1] == hidden_states.shape[0], "cu_seqlens must end at N")
    elif cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
        if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        if bounds[-1] != hidden_states.shape[0]:
            raise ValueError(
                f"cu_seqlens must end at N = hidden_states.shape[0] = {hidden_states.shape[0]}, got {bounds[-1]}"
            )
    return B, d, r, L


def check_max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    """`max_seqlen` of a packed batch must cover its longest sequence: a kernel sized to it would
    otherwise pool a truncated softmax without a word."""
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if cu_seqlens.numel() > 1:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        longest = int(lengths.max())
        if longest > max_seqlen:
            b = int(lengths.argmax())
            raise ValueError(f"sequence {b} has {longest} tokens, more than max_seqlen = {max_seqlen}")


INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_tenant_ids(tenant_ids: object, num_tenants: int, batch_size: int | None = None) -> None:
    """`tenant_ids (B,)` integer, each in `[-1, num_tenants)` (`-1` = no adapter)."""
    if not isinstance(tenant_ids, torch.Tensor):
        raise TypeError(
            f"tenant_ids must be an integer torch.Tensor of shape (B,), got {type(tenant_ids).__name__}"
        )
    if tenant_ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"tenant_ids must be an integer tensor (e.g. torch.long), got {tenant_ids.dtype}")
    if tenant_ids.dim() != 1:
        raise ValueError(f"tenant_ids must be (B,), got shape {tuple(tenant_ids.shape)}")
    if batch_size is not None and tenant_ids.numel() != batch_size:
        raise ValueError(
            f"tenant_ids has {tenant_ids.numel()} entries but the batch has {batch_size} requests"
        )
    if tenant_ids.numel():
        ids = tenant_ids.long()
        bad = (ids < -1) | (ids >= num_tenants)
        if bool(bad.any()):
            first = int(ids[bad][0])
            where = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"tenant id {first} (request {where}) is out of range: ids must be in [-1, {num_tenants}) "
                f"for num_tenants={num_tenants} (-1 = no adapter)"
            )


def check_slot_index(
    slot_index: object,
    mask: torch.Tensor | None,
    batch_size: int,
    seq_len: int,
    num_tokens: int,
    device: torch.device,
) -> None:
    """`slot_index (B, L)` long positions in `[0, S)`, distinct within a row, none on an instruction token."""
    if not isinstance(slot_index, torch.Tensor) or slot_index.dtype != torch.long:
        got = slot_index.dtype if isinstance(slot_index, torch.Tensor) else type(slot_index).__name__
        raise TypeError(f"slot_index must be a torch.long tensor of shape (B, L), got {got}")
    if slot_index.shape != (batch_size, num_tokens):
        raise ValueError(
            f"slot_index must be (B, L) = ({batch_size}, {num_tokens}), got {tuple(slot_index.shape)}"
        )
    if slot_index.device != device:
        raise ValueError(f"slot_index is on {slot_index.device} but hidden_states on {device}")
    if slot_index.numel() == 0:
        return
    bad = (slot_index < 0) | (slot_index >= seq_len)
    if bool(bad.any()):
        b, l = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"slot_index[{b}, {l}] = {int(slot_index[b, l])} is outside [0, S) = [0, {seq_len})")
    # Two prompts at one position: which one lands is unspecified (index_put_ without accumulate).
    ordered = slot_index.sort(dim=1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeated.any()):
        b, l = torch.nonzero(repeated)[0].tolist()
        raise ValueError(
            f"slot_index[{b}] holds position {int(ordered[b, l])} twice: each of the L prompts of a "
            "request needs its own position"
        )
    if mask is not None:
        on_instruction = torch.gather(mask, 1, slot_index)
        if bool(on_instruction.any()):
            b, l = torch.nonzero(on_instruction)[0].tolist()
            raise ValueError(
                f"slot_index[{b}, {l}] = {int(slot_index[b, l])} is an instruction position (mask is True "
                "there): prompts must not overwrite the instruction they are computed from"
            )


def check_multi_tenant_inputs(
    hidden_states,
    mask,
    cu_seqlens,
    num_tenants: int,
    batch_size: int,
    down_weight,
    down_bias,
    pool_weight,
    numerator,
    denominator,
    up_weight,
    up_bias,
    version: str,
    max_seqlen: int | None = None,
) -> tuple[int, int, int, int]:
    """Validate a multi-tenant generator call (stacked weights, one slice per tenant) whose requests
    were grouped into a `TenantGroups` of `num_tenants` tenants and `batch_size` requests; return
    `(T, d, r, L)`."""
    stacked = dict(
        down_weight=(down_weight, 3),
        down_bias=(down_bias, 2),
        pool_weight=(pool_weight, 3),
        numerator=(numerator, 2),
        denominator=(denominator, 2),
        up_weight=(up_weight, 3),
        up_bias=(up_bias, 2),
    )
    for name, (t, dim) in stacked.items():
        check_float_tensor(name, t)
        if t.dim() != dim or t.shape[0] != num_tenants:
            raise ValueError(
                f"{name} must be stacked ({num_tenants}, ...) with {dim} dimensions for "
                f"num_tenants={num_tenants}, got shape {tuple(t.shape)}"
            )
    B, d, r, L = check_attention_pool_inputs(
        hidden_states, mask, down_weight[0], down_bias[0], pool_weight[0], cu_seqlens, max_seqlen
    )
    if B != batch_size:
        raise ValueError(
            f"tenant_ids (the groups were built from them) has {batch_size} entries but the batch "
            f"has {B} requests"
        )
    check_version(version)
    m, n = numerator.shape[1] - 1, denominator.shape[1]
    if not (1 <= m <= MAX_DEGREE and 1 <= n <= MAX_DEGREE):
        raise ValueError(f"rational degrees (m, n) = ({m}, {n}) must each be in 1..{MAX_DEGREE}")
    if up_weight.shape[1:] != (d, r) or up_bias.shape[1:] != (d,):
        raise ValueError(
            f"up_weight must be (T, d, r) = (T, {d}, {r}) and up_bias (T, d), got "
            f"{tuple(up_weight.shape)} and {tuple(up_bias.shape)}"
        )
    check_same_device(
        hidden_states=hidden_states,
        numerator=numerator,
        denominator=denominator,
        up_weight=up_weight,
        up_bias=up_bias,
    )
    return num_tenants, d, r, L
