"""Reference IAPT soft-prompt generator (docs/design.md section 1), in the naive order:

    H' = H Wd^T + bd,  A = masked softmax_S(H' Wp^T),  U = A^T H',  G = R(U),  P = G Wu^T + bu

times a learned scalar gate when the generator has one (``P = (G Wu^T + bu) * gate``),

one module per decoder layer, producing the `L` soft prompts `P (B, L, d)` of that layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import REFERENCE_BACKENDS, check_backend
from .attention_pool import attention_pool
from .rational import Rational

__all__ = ["PromptGenerator"]


class PromptGenerator(nn.Module):
    """Soft-prompt generator: down-projection, attention pooling to ``num_tokens`` soft tokens, a
    learned rational activation, up-projection (reference implementation).

    Args:
        hidden_size: ``d``, the backbone's hidden size.
        bottleneck_size: ``r``, the bottleneck width.
        num_tokens: ``L``, soft tokens per layer (4 in the paper).
        degrees, activation_init, version: of the rational activation (see :class:`Rational`).
        backend: accepted for signature parity with :class:`iapt_kernels.PromptGenerator`; must be
            ``"auto"`` or ``"reference"`` here.
        gate_init: ``None`` (default): no gate, ``P = G Wu^T + bu``. A float: a learned scalar
            ``gate`` starting at that value multiplies the prompts, ``P = (G Wu^T + bu) * gate``.

    Parameters (``nn.Linear`` conventions): ``down.weight (r, d)``, ``down.bias (r)``,
    ``pool.weight (L, r)``, ``act.numerator (1, m+1)``, ``act.denominator (1, n)``,
    ``up.weight (d, r)``, ``up.bias (d)``, and ``gate (1,)`` when gated. ``down`` and ``pool`` keep
    ``nn.Linear``'s default initialisation (pooling starts near a mean over the instruction), ``up``
    starts small (``N(0, 0.02^2)``, zero bias). Small prompts are not harmless on a pre-norm backbone
    (the next RMSNorm scales a slot to unit RMS); a gate at 0 makes them exactly 0 at the start while
    ``up`` keeps its random start (:class:`iapt_kernels.IAPTConfig` does this by default, with
    :meth:`iapt_kernels.IAPTModel.calibrate` for ``up.bias``). docs/design.md section 1,
    "Initialisation", has the reasons and the measurements (issue 20).
    """

    _activation_cls = Rational

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        num_tokens: int = 4,
        degrees: tuple[int, int] = (5, 4),
        activation_init: str = "gelu",
        version: str = "B",
        backend: str = "auto",
        gate_init: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("bottleneck_size", bottleneck_size),
            ("num_tokens", num_tokens),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.hidden_size, self.bottleneck_size, self.num_tokens = hidden_size, bottleneck_size, num_tokens
        self.backend = self._check_backend(backend)
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.pool = nn.Linear(bottleneck_size, num_tokens, bias=False)
        self.act = self._activation_cls(degrees, activation_init, version, backend=self.backend)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        # Not zero: zero prompts start at the frozen model but trained worse (docs/design.md section 1).
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)
        # Registered last, and drawing no random numbers: a gated generator's other parameters are
        # those of an ungated one made from the same seed.
        self.register_parameter("gate", None if gate_init is None else nn.Parameter(_scalar(gate_init)))

    @staticmethod
    def _check_backend(backend: str) -> str:
        check_backend(backend, REFERENCE_BACKENDS, "reference.PromptGenerator")
        return "reference"

    def pooled(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """``U (B, L, r)``: the pooled bottleneck features, before the activation (the reference
        reads the lengths from ``cu_seqlens`` itself and ignores ``max_seqlen``)."""
        return attention_pool(
            hidden_states, mask, self.down.weight, self.down.bias, self.pool.weight, cu_seqlens=cu_seqlens
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Prompts ``P (B, L, d)`` from hidden states ``(B, S, d)`` and an instruction mask ``(B, S)``,
        or from packed ``(N, d)`` instruction tokens with ``cu_seqlens`` (and optionally
        ``max_seqlen``, the longest sequence: the fused modules then read nothing back from the
        device, as :func:`iapt_kernels.attention_pool`)."""
        pooled = self.pooled(hidden_states, mask, cu_seqlens, max_seqlen)
        out = F.linear(self.act(pooled), self.up.weight, self.up.bias)
        return out if self.gate is None else out * self.gate

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
            f"num_tokens={self.num_tokens}, backend={self.backend!r}, gated={self.gate is not None}"
        )


def _scalar(gate_init) -> torch.Tensor:
    """The gate's initial value as a one-element ``(1,)`` tensor, not 0-d: FSDP2's ``fully_shard``
    refuses scalar parameters. A bad value is an error, not a NaN gate."""
    if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or not math.isfinite(gate_init):
        raise ValueError(f"gate_init must be a finite float or None, got {gate_init!r}")
    return torch.tensor([float(gate_init)])
