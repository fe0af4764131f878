"""Multi-Token Prediction, depth 1 (docs/MODEL.md §10; paper §2.1, DeepSeek-V3 §2.2).

For position i the MTP module predicts token t_{i+2} from the main model's last-block streams X^L_i (before
``hc_head``) and the embedding of the next token t_{i+1}:

    e        = RMSNorm_e(Emb(t_{i+1}))                              (shared embedding; ``enorm``)
    X'_i[j]  = e W_eᵀ + RMSNorm_h(X^L_i[j]) W_hᵀ      for every stream j   (``e_proj``, ``h_proj``; ``hnorm``)
    X''      = Block_MTP(X')                                        (mHC + ``mtp_layer_type`` attention + MoE)
    h        = RMSNorm(hc_head_MTP(X''))                            (own ``hc_head`` and final ``norm``)
    logits   = h W_headᵀ                                            (shared output head)
    L_MTP    = CE(logits_i, t_{i+2});  the total loss adds λ·L_MTP (λ scheduled by the trainer: 0.3, then 0.1)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pretrain.model.mhc import HyperHead
from pretrain.model.rmsnorm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth. ``forward`` returns the normalised hidden state h [B, S, d] for the shared head."""

    def __init__(self, cfg: Any, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        for lin in (self.e_proj, self.h_proj):
            if lin.weight.device.type != "meta":
                nn.init.normal_(lin.weight, mean=0.0, std=cfg.init_std)
        self.block = block
        self.hc_head = HyperHead(d, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps, cfg.hc_init_gating)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(
        self,
        streams: torch.Tensor,
        next_embedding: torch.Tensor,
        next_ids: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """streams X^L [B, S, n, d], next_embedding Emb(t_{i+1}) [B, S, d], next_ids t_{i+1} [B, S]
        -> (h [B, S, d], indexer loss of the MTP attention or None)."""
        if streams.dim() != 4 or next_embedding.shape != streams.shape[:2] + streams.shape[3:]:
            raise ValueError(
                f"MTPModule: streams must be [B, S, n, d] and next_embedding [B, S, d]; got "
                f"{tuple(streams.shape)} and {tuple(next_embedding.shape)}"
            )
        e = self.e_proj(self.enorm(next_embedding)).to(streams.dtype)
        x = e.unsqueeze(2) + self.h_proj(self.hnorm(streams)).to(streams.dtype)
        x, indexer_loss = self.block(x, next_ids, doc_ids)
        return self.norm(self.hc_head(x)), indexer_loss
