"""Lightning indexer of CSA (docs/MODEL.md §6; paper eqs. 13–17).

    K^IComp = compressor_I(H)                  own overlapping compressor, head dim c^I, rate m (keys)
    q^I_t   = RoPE_t(c^Q_t W^{IUQ})            [n_I, c^I] from the shared query latent c^Q (no q norm)
    w^I_t   = h_t W^w                          [n_I] head weights
    I_{t,s} = Σ_h w^I_{t,h} n_I^{-1/2} · ReLU(q^I_{t,h} · K^IComp_s) · c_I^{-1/2}

Selection (top-k with the lower index winning ties) is the op ``indexer_select`` (reference:
``ops.indexer.indexer_topk`` of the scores); the indexer's KL training loss is the op ``indexer_attention_kl``,
called by the attention module (it needs the main attention's q and lse). Both are streamed (``blocked`` backend;
Triton for ``indexer_select``): no [S, N] tensor at long context.

The indexer never receives gradient from the LM loss (top-k is not differentiable) and must not send any
into the LM: the attention module passes it DETACHED hidden states and c^Q (§12.4), so its KL loss trains
the indexer parameters only.

HF names: the indexer lives at ``compressor.indexer`` with ``kv_proj``, ``gate_proj``, ``position_bias``,
``kv_norm`` (its compressor, flattened into it), ``q_b_proj`` and ``scorer.weights_proj``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ops import functional as op
from ops.compressor import CompressedLayout
from pretrain.model.compressor import KVCompressor
from pretrain.model.rope import RotaryEmbedding

__all__ = ["LightningIndexer", "IndexerScorer"]


class IndexerScorer(nn.Module):
    """Head weights w^I_t = h_t W^w (``weights_proj``: [n_I, d])."""

    def __init__(self, hidden_size: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        nn.init.normal_(self.weights_proj.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights_proj(x)


class LightningIndexer(KVCompressor):
    """Scores every (query, compressed entry) pair of a CSA layer; see the module docstring."""

    def __init__(self, cfg):
        super().__init__(
            cfg.hidden_size,
            cfg.index_head_dim,
            cfg.compress_rate_csa,
            overlap=True,
            eps=cfg.rms_norm_eps,
            init_std=cfg.init_std,
        )
        if cfg.rope_head_dim > cfg.index_head_dim:
            raise ValueError(
                f"model.rope_head_dim={cfg.rope_head_dim} exceeds model.index_head_dim="
                f"{cfg.index_head_dim}; the indexer rotates its last rope_head_dim dims"
            )
        self.n_heads = cfg.index_n_heads
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        nn.init.normal_(self.q_b_proj.weight, mean=0.0, std=cfg.init_std)
        self.scorer = IndexerScorer(cfg.hidden_size, cfg.index_n_heads, cfg.init_std)

    def score_inputs(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        layout: CompressedLayout,
        rope: RotaryEmbedding,
        keys_x: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three inputs of the score ops: (q^I [B, S, n_I, c_I] with RoPE, K^IComp [B, N, c_I], w^I [B, S, n_I]).

        Args:
            x: [B, S, d] attention input h (pass it detached). q_latent: [B, S, d_c] c^Q (detached).
            positions: int64 [B, S] RoPE positions of the queries. layout: entry layout at rate m.
            rope: the layer's RoPE (compress base + YaRN).
            keys_x: the hidden states the keys are compressed from, when they cover more tokens than the
                queries (Ulysses sequence parallelism: the whole sequence, ``x`` this rank's shard); default x.
        The attention feeds them to the streamed ops ``indexer_select`` (top-k) and ``indexer_attention_kl``
        (the KL loss), which never form the [S, N] score matrix.
        """
        B, S, _ = x.shape
        keys = self.compress(x if keys_x is None else keys_x, layout, rope)  # [B, N, c_I]
        q = self.q_b_proj(q_latent).view(B, S, self.n_heads, self.head_dim)
        cos, sin = rope(positions)
        q = op.apply_rope(q, cos=cos[:, :, None], sin=sin[:, :, None])
        return q, keys, self.scorer(x)

    def forward(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        layout: CompressedLayout,
        rope: RotaryEmbedding,
        keys_x: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Index scores float32 [B, S, N] I_{t,s} (unmasked; invisible entries must be masked by the caller),
        materialised: for tests and short sequences; arguments as :meth:`score_inputs`."""
        q, keys, weights = self.score_inputs(x, q_latent, positions, layout, rope, keys_x)
        return op.indexer_scores(q, keys=keys, weights=weights)
