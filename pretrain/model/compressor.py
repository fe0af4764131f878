"""KV compressor of the CSA and HCA layers (docs/MODEL.md §5; paper eqs. 9–12, 20–23).

    C = H W^KV,  Z = H W^Z                                   (per token; 2c channels for CSA, c for HCA)
    C^Comp_i = Σ_{slots j of entry i} softmax_j(Z_j + B_j) ⊙ C_j   (per channel; ops ``compressor_pool``)
    K_i = RoPE_{pos_i}(RMSNorm(C^Comp_i))                     (pos_i = position of the block's first token)

HCA: non-overlapping blocks of m' tokens. CSA: overlapping windows of 2m slots with stride m — channels
[0:c) of ``kv_proj``/``gate_proj``/``position_bias`` feed the NEXT entry, [c:2c) the token's own entry
(checkpoint convention, §5.2). Packed documents are compressed independently (block grid restarts at each
document; see ``ops.compressor``).

Parameter names follow HF (``kv_proj``, ``gate_proj``, ``position_bias``, ``kv_norm``), so HF weights copy
without renaming. The lightning indexer (``pretrain.model.indexer``) reuses this class for its own keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ops import functional as op
from ops.compressor import CompressedLayout
from pretrain.model.rmsnorm import RMSNorm
from pretrain.model.rope import RotaryEmbedding

__all__ = ["KVCompressor"]


class KVCompressor(nn.Module):
    """Compress hidden states [B, S, d] into entries [B, N, head_dim] at rate ``rate``.

    Args:
        hidden_size: d. head_dim: c (main compressor) or c^I (indexer keys). rate: m or m'.
        overlap: True for CSA (2c-wide projections and bias), False for HCA.
        eps: RMSNorm eps. init_std: std of the normal init of the projections (position_bias starts at 0).
    Projections are replicated across tensor-parallel ranks (small: d x 2c).
    """

    def __init__(
        self, hidden_size: int, head_dim: int, rate: int, overlap: bool, eps: float = 1e-6, init_std: float = 0.02
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rate = rate
        self.overlap = overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width, dtype=torch.float32))
        self.kv_norm = RMSNorm(head_dim, eps)
        for lin in (self.kv_proj, self.gate_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    def compress(self, x: torch.Tensor, layout: CompressedLayout, rope: RotaryEmbedding) -> torch.Tensor:
        """x [B, S, d] -> entries [B, N, head_dim] (unused slots of ``layout`` are 0)."""
        if layout.rate != self.rate:
            raise ValueError(f"layout built for rate {layout.rate}, compressor has rate {self.rate}")
        kv = self.kv_proj(x)
        gate = self.gate_proj(x)
        pooled = op.compressor_pool(
            kv,
            gate=gate,
            position_bias=self.position_bias,
            block_start=layout.block_start,
            prev_valid=layout.prev_valid if self.overlap else None,
        )
        entries = self.kv_norm(pooled)
        cos, sin = rope(layout.entry_position)
        return op.apply_rope(entries, cos=cos, sin=sin)

    def forward(self, x: torch.Tensor, layout: CompressedLayout, rope: RotaryEmbedding) -> torch.Tensor:
        return self.compress(x, layout, rope)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rate={self.rate}, overlap={self.overlap}"
