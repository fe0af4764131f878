"""KV compression of CSA/HCA (docs/MODEL.md §5) and the bookkeeping of packed documents.

Pooling (paper eqs. 9–12, 20–23). Per compressed entry i and per channel, a softmax over the entry's slots:

* HCA (non-overlapping, rate m'): slots = the m' tokens of block i;
  ``C^Comp_i = Σ_j softmax_j(Z_j + B_j) ⊙ C_j`` with ``C = H W^KV``, ``Z = H W^Z``, ``B ∈ R^{m'×c}``.
* CSA (overlapping, rate m, width 2m, stride m): each token carries two c-wide series in 2c channels.
  Checkpoint convention (§5.2): channels ``[0:c)`` = the series a token gives to the NEXT entry (the
  previous-window slots of entry i+1; paper C^b), channels ``[c:2c)`` = the series it gives to its own
  entry (current-window slots; paper C^a). Entry i softmaxes over 2m slots: slots 0..m-1 = tokens of block
  i-1 with channels [0:c) and bias ``B[j, :c]``; slots m..2m-1 = tokens of block i with channels [c:2c) and
  bias ``B[j, c:]``. Without a previous block the first m slots have logit -inf and value 0.

Packed documents (our definition; the paper says "each document is compressed independently and tails
shorter than m are dropped", §5.3). A sample is cut into segments = maximal runs of equal ``doc_ids``.
The block grid restarts at every segment start: block j of a segment covers its local positions
[j·m, (j+1)·m). Only complete blocks inside one segment become entries; the CSA previous-window slots of
block j are block j-1 of the same segment (none for j = 0). So a document inside a packed sample yields
exactly the entries it yields alone, and with one segment (``doc_ids=None``) this is the plain spec
(entry i = tokens [i·m, (i+1)·m)).

Entry layout (``CompressedLayout``): the entries of a sample are stored in order of their last token in
``N = S // m`` slots (always enough: each segment of length L gives floor(L/m) entries); unused slots have
``block_start = -1`` and pool to 0. Query t sees entry n iff n's block ends at or before t and lies in
t's segment, which in this order is the contiguous range ``visible_lo[t] <= n < visible_hi[t]``
(plain spec: lo = 0, hi = floor((t+1)/m), i.e. HF's ``(position_ids+1)//m``).

Ops registered in ``ops.dispatch``: ``compressor_pool``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ops.dispatch import register

__all__ = ["segment_starts", "document_positions", "CompressedLayout", "compressed_layout", "compressor_pool"]


def segment_starts(
    doc_ids: Optional[torch.Tensor], batch: int, seq_len: int, device: torch.device | None = None
) -> torch.Tensor:
    """Index of the first token of each token's segment: int64 [B, S] (zeros when ``doc_ids`` is None).

    A segment is a maximal run of equal ``doc_ids`` values along the sequence.
    """
    if doc_ids is None:
        return torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    if doc_ids.dim() != 2 or tuple(doc_ids.shape) != (batch, seq_len):
        raise ValueError(
            f"doc_ids must have shape [B, S] = [{batch}, {seq_len}] (one document index per "
            f"token), got {tuple(doc_ids.shape)}"
        )
    t = torch.arange(seq_len, device=doc_ids.device)
    change = torch.ones_like(doc_ids, dtype=torch.bool)
    change[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    marker = torch.where(change, t, torch.zeros_like(t))
    return torch.cummax(marker, dim=1).values


def document_positions(seg_start: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every segment start: ``t - seg_start[t]`` (int64 [B, S])."""
    t = torch.arange(seg_start.shape[1], device=seg_start.device)
    return t - seg_start


@dataclass
class CompressedLayout:
    """Which compressed entries exist and who sees them (see the module docstring). B batch, S tokens,
    N = S // rate entry slots.

    rate: m (CSA) or m' (HCA).
    block_start: int64 [B, N], token index of the first token of each entry's block; -1 = unused slot.
    prev_valid: bool [B, N], the entry has a previous block in its segment (CSA overlap slots usable).
    entry_position: int64 [B, N], position id of the block's first token (RoPE position of the entry;
        = i·m in the plain spec); 0 for unused slots.
    visible_lo, visible_hi: int64 [B, S], query t sees entries n with lo[t] <= n < hi[t].
    """

    rate: int
    block_start: torch.Tensor
    prev_valid: torch.Tensor
    entry_position: torch.Tensor
    visible_lo: torch.Tensor
    visible_hi: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.block_start.shape[1]

    def visible_mask(self) -> torch.Tensor:
        """bool [B, S, N]: entry n visible to query t (materialised; reference use only)."""
        n = torch.arange(self.num_slots, device=self.block_start.device)
        return (n >= self.visible_lo[..., None]) & (n < self.visible_hi[..., None])


def compressed_layout(seg_start: torch.Tensor, position_ids: torch.Tensor, rate: int) -> CompressedLayout:
    """Build the entry layout for segment starts ``seg_start`` [B, S] (see ``segment_starts``) and the
    RoPE ``position_ids`` [B, S] of the tokens, for compression rate ``rate``."""
    if rate < 1:
        raise ValueError(f"compression rate must be >= 1, got {rate}")
    B, S = seg_start.shape
    dev = seg_start.device
    t = torch.arange(S, device=dev)
    local = t - seg_start  # position inside the segment
    ends = (local + 1) % rate == 0  # token t closes a complete block
    count = torch.cumsum(ends.long(), dim=1)  # entries ending at or before t
    count_before = count - ends.long()  # entries ending strictly before t
    visible_hi = count
    visible_lo = count_before.gather(1, seg_start)  # entries that end before t's segment starts
    N = S // rate
    slot = torch.where(ends, count - 1, torch.full_like(count, N))  # slot N = discard column
    start_tok = (t - rate + 1).expand(B, S)
    block_start = torch.full((B, N + 1), -1, dtype=torch.long, device=dev)
    block_start.scatter_(1, slot, torch.where(ends, start_tok, torch.full_like(start_tok, -1)))
    block_start = block_start[:, :N]
    valid = block_start >= 0
    safe = block_start.clamp(min=0)
    prev_valid = valid & (local.gather(1, safe) >= rate)
    entry_position = torch.where(valid, position_ids.long().gather(1, safe), torch.zeros_like(safe))
    return CompressedLayout(
        rate=rate,
        block_start=block_start,
        prev_valid=prev_valid,
        entry_position=entry_position,
        visible_lo=visible_lo,
        visible_hi=visible_hi,
    )


def compressor_pool(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    block_start: torch.Tensor,
    prev_valid: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gated per-channel softmax pooling of blocks into compressed entries (reference).

    Args:
        kv: [B, S, C] values C = H W^KV (activation dtype).
        gate: [B, S, C] gate logits Z = H W^Z (activation dtype).
        position_bias: [m, C] B (float32); m = rate = position_bias.shape[0].
        block_start: int64 [B, N] first token of each entry's block, -1 = unused slot (output 0).
        prev_valid: None for HCA (non-overlapping, C = c); for CSA (overlapping, C = 2c) a bool [B, N]
            telling whether the previous block (tokens block_start-m .. block_start-1) may be used; where
            False those m slots get logit -inf and value 0.
    Returns:
        [B, N, c] in ``kv.dtype``. Logits ``gate + bias`` and the softmax are computed in float32 (float64
        for float64 inputs), the weights cast to ``kv.dtype`` before the weighted sum (as HF does).
    Differentiable w.r.t. kv, gate and position_bias.
    """
    if kv.dim() != 3 or gate.shape != kv.shape:
        raise ValueError(
            f"compressor_pool: kv and gate must both be [B, S, C]; got {tuple(kv.shape)} and {tuple(gate.shape)}"
        )
    B, S, C = kv.shape
    m = position_bias.shape[0]
    if position_bias.shape != (m, C):
        raise ValueError(
            f"compressor_pool: position_bias must be [rate, C] = [{m}, {C}], got {tuple(position_bias.shape)}"
        )
    if block_start.dim() != 2 or block_start.shape[0] != B:
        raise ValueError(f"compressor_pool: block_start must be [B, N] with B={B}, got {tuple(block_start.shape)}")
    overlap = prev_valid is not None
    if overlap and C % 2:
        raise ValueError(f"compressor_pool: overlapping (CSA) pooling needs 2c channels, got C={C}")
    c = C // 2 if overlap else C
    N = block_start.shape[1]
    cdt = torch.promote_types(kv.dtype, torch.float32)
    valid = block_start >= 0
    offs = torch.arange(m, device=kv.device)
    cur = (block_start.clamp(min=0)[..., None] + offs).clamp(max=S - 1)  # [B, N, m]

    def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # x [B,S,C] -> [B,N,m,C]
        return x.gather(1, idx.reshape(B, -1, 1).expand(-1, -1, C)).reshape(B, N, m, C)

    kv_cur = take(kv, cur)
    logit_cur = take(gate, cur).to(cdt) + position_bias.to(cdt)
    if overlap:
        prev = (block_start[..., None] - m + offs).clamp(min=0, max=S - 1)
        use_prev = (prev_valid & valid)[..., None, None]  # [B, N, 1, 1]
        kv_prev = take(kv, prev)[..., :c]
        logit_prev = take(gate, prev)[..., :c].to(cdt) + position_bias[:, :c].to(cdt)
        kv_prev = torch.where(use_prev, kv_prev, torch.zeros_like(kv_prev))
        logit_prev = torch.where(use_prev, logit_prev, torch.full_like(logit_prev, float("-inf")))
        values = torch.cat((kv_prev, kv_cur[..., c:]), dim=2)  # [B, N, 2m, c]
        logits = torch.cat((logit_prev, logit_cur[..., c:]), dim=2)
    else:
        values, logits = kv_cur, logit_cur
    weights = torch.softmax(logits, dim=2).to(kv.dtype)
    pooled = (values * weights).sum(dim=2)
    return torch.where(valid[..., None], pooled, torch.zeros_like(pooled))


register("compressor_pool", reference=compressor_pool)
