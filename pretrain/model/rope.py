"""Per-layer-type rotary embedding of DeepSeek-V4 (docs/MODEL.md §4.6, §11).

* sliding-only layers: base ``rope_theta`` (10000), no YaRN;
* CSA / HCA layers (queries, window KV, compressed entries, indexer q/k, output de-rotation):
  base ``compress_rope_theta`` (160000) with YaRN (``ModelConfig.yarn``; no mscale).

The frequencies are plain Python floats (float64) rather than a buffer, so ``module.to(bfloat16)`` cannot
round them; cos/sin are formed per call from integer positions in float64 and returned in float32.
The rotation itself is ``ops.rope.apply_rope`` (through ``ops.dispatch``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ops.rope import rope_cos_sin, rope_inv_freq

__all__ = ["RotaryEmbedding", "set_yarn_factor"]


class RotaryEmbedding(nn.Module):
    """cos/sin of interleaved partial RoPE over ``rope_dim`` dims for one layer type."""

    def __init__(self, rope_dim: int, base: float, yarn: Any = None):
        super().__init__()
        self.rope_dim = rope_dim
        self.base = base
        self.yarn = yarn if (yarn is not None and getattr(yarn, "enabled", True)) else None
        self.yarn_factor = None
        self.inv_freq = rope_inv_freq(rope_dim, base)
        if self.yarn is not None:
            self.set_yarn_factor(float(yarn.factor))
        self.has_yarn = self.yarn is not None  # a CSA/HCA RoPE (the ones a YaRN stage changes)

    def set_yarn_factor(self, factor: float) -> None:
        """Re-derive the frequencies for YaRN ``factor`` (a context-extension stage, ``train.yarn_stages``;
        ``factor <= 1``: plain RoPE); original_max_position and the betas stay the config's."""
        if self.yarn is None:
            raise ValueError("set_yarn_factor on a RoPE without YaRN (sliding layers never use it)")
        if factor == self.yarn_factor:
            return
        y = self.yarn
        self.yarn_factor = float(factor)
        self.inv_freq = (
            rope_inv_freq(self.rope_dim, self.base, factor, y.original_max_position, y.beta_fast, y.beta_slow)
            if factor > 1
            else rope_inv_freq(self.rope_dim, self.base)
        )

    @classmethod
    def for_layer(cls, cfg: Any, layer_type: str) -> "RotaryEmbedding":
        """The RoPE of a ``layer_type`` ("sliding" | "csa" | "hca") under ``cfg`` (a ModelConfig)."""
        if layer_type == "sliding":
            return cls(cfg.rope_head_dim, cfg.rope_theta, None)
        if layer_type in ("csa", "hca"):
            return cls(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.yarn)
        raise ValueError(f"unknown layer type '{layer_type}'; expected one of sliding, csa, hca")

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer [...] -> (cos, sin) float32 [..., rope_dim/2]."""
        return rope_cos_sin(positions, self.inv_freq)

    def extra_repr(self) -> str:
        return f"rope_dim={self.rope_dim}, base={self.base}, yarn_factor={self.yarn_factor}"


def set_yarn_factor(model: nn.Module, factor: float | None) -> None:
    """Set the YaRN factor of every CSA/HCA RoPE in ``model`` (None: leave the config's)."""
    if factor is None:
        return
    for m in model.modules():
        if isinstance(m, RotaryEmbedding) and m.has_yarn:
            m.set_yarn_factor(factor)
