"""Reference self-attention pooling with projections, in the naive order of docs/design.md section 1.

    H' = H Wd^T + bd                 (B, S, r)    down-projection (down_weight Wd: (r, d))
    E  = H' Wp^T                     (B, S, L)    pooling scores   (pool_weight Wp: (L, r))
    A  = softmax over S of E, masked (B, S, L)    masked positions get weight exactly 0
    U  = A^T H'                      (B, L, r)

A sequence with no instruction token pools to U = 0. Masked positions are zeroed before any
arithmetic, so NaN or Inf there never reaches the output or a gradient (whose value there is exactly 0).
The packed layout (`cu_seqlens`) is unpacked into the padded one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import check_attention_pool_inputs

__all__ = ["attention_pool", "unpack"]


def unpack(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed `(N, d)` + `cu_seqlens (B+1,)` -> padded `(B, S_max, d)` and its mask `(B, S_max)`."""
    bounds = cu_seqlens.tolist()
    seqs = [hidden_states[bounds[b] : bounds[b + 1]] for b in range(len(bounds) - 1)]
    lengths = torch.tensor([len(s) for s in seqs], device=hidden_states.device)
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = torch.arange(padded.shape[1], device=hidden_states.device)[None, :] < lengths[:, None]
    return padded, mask


def attention_pool(
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    pool_weight: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled bottleneck features `U (B, L, r)`; same contract as :func:`iapt_kernels.attention_pool`.

    Computes in at least float32 and returns the dtype of `hidden_states`.
    """
    check_attention_pool_inputs(hidden_states, mask, down_weight, down_bias, pool_weight, cu_seqlens)
    if cu_seqlens is not None:
        hidden_states, mask = unpack(hidden_states, cu_seqlens)
    compute = torch.promote_types(hidden_states.dtype, torch.float32)
    keep = mask.unsqueeze(-1)
    h = torch.where(keep, hidden_states.to(compute), 0.0)
    h_down = F.linear(h, down_weight.to(compute), down_bias.to(compute))  # (B, S, r)
    scores = F.linear(h_down, pool_weight.to(compute))  # (B, S, L)
    # A finite fill (not -inf) keeps all-masked rows finite; multiplying by the mask then gives them
    # weight exactly 0, and exactly 0 at every masked position of the other rows too.
    scores = scores.masked_fill(~keep, torch.finfo(compute).min)
    weights = torch.softmax(scores, dim=1) * keep
    pooled = weights.transpose(1, 2) @ h_down  # (B, L, r)
    return pooled.to(hidden_states.dtype)
