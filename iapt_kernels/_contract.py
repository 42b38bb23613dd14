"""What the op contract fixes beyond the schemas (iapt_kernels/schemas.py), for every backend: the
compute dtype of the saved tensors and the largest soft-token count. Plain PyTorch, no Triton: the
fakes (`library`) and the public checks (`functional`) read it where Triton cannot be imported.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_TOKENS", "compute_dtype"]

MAX_TOKENS = 64  # largest L the kernels are compiled for (L is padded to a power of two >= 16)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Kernels compute in float64 for float64 inputs, float32 otherwise (docs/design.md section 5)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
