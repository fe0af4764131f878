"""RMSNorm as DeepSeek-V4 uses it (docs/MODEL.md §11): statistics in float32, weight kept in float32 and
multiplied before the single cast back to the activation dtype.

``RMSNorm``: ``y = w ⊙ x / sqrt(mean(x²) + eps)`` (weighted; q_a_norm, kv_norm, compressor norms, ...).
``unweighted_rms_norm``: ``y = x / sqrt(mean(x²) + eps)`` (the per-head query norm).
Both call the ``rms_norm`` op (``ops.functional.rms_norm``; ``ops/rms_norm.py``: reference, and a hand-written
backward as the CPU path).
"""

from __future__ import annotations

import torch
from torch import nn

from ops import functional as op

__all__ = ["RMSNorm", "unweighted_rms_norm"]


class RMSNorm(nn.Module):
    """Weighted RMSNorm over the last dim; ``weight`` is float32, initialised to 1, owned by AdamW."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm over {self.weight.shape[0]} dims got input with last dim {x.shape[-1]}")
        return op.rms_norm(x, weight=self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def unweighted_rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dim; the factor is computed in float32 (as HF does)."""
    return op.rms_norm(x, weight=None, eps=eps)
