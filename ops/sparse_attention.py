"""Core attention of DeepSeek-V4: one joint softmax over window ∪ compressed entries with a sink (§4.3, §7).

For head h of query t with key set J_t = W_t ∪ C_t (single shared K=V head, v_j = k_j):

    z_{h,t,j} = (q_{t,h} · k_j) · scale                       (scale = c^{-1/2}; no YaRN mscale)
    p_{h,t,j} = exp(z_{h,t,j}) / (Σ_{j'∈J_t} exp(z_{h,t,j'}) + exp(z'_h))   (sink logit z'_h, NOT scaled)
    o_{t,h}   = Σ_{j∈J_t} p_{h,t,j} · v_j

* W_t (sliding window, uncompressed kv): tokens s with max(t - n_win + 1, seg_start[t]) <= s <= t — the
  last n_win tokens including t, never crossing the start of t's document.
* C_t (compressed entries ``comp_kv``): either the selected indices ``comp_idx[t]`` (CSA sparse; -1 = empty
  slot) or, when ``comp_idx`` is None, the visible range ``comp_lo[t] <= n < comp_hi[t]`` (HCA, and CSA in
  dense / indexer-warm-up mode). The caller guarantees selected indices lie in the visible range.
* Sliding-only layers pass ``comp_kv=None``.

Also returned: the log-normaliser ``lse_{h,t} = log(Σ_j exp z + exp z'_h)`` so the main-attention
probability of any entry can be recomputed later (``compressed_attention_mass``, the indexer's KL target)
without storing probabilities — what a fused kernel returns too.

The reference cuts the queries into blocks of n_win tokens; each block scores the 2·n_win keys that can fall in
its queries' windows with one dense matmul (a masked band, never [S, S] and no gathered [S, n_win, D] key copy),
and scores all N compressed entries ([B, S, H, N]) with a mask; a kernel only needs the window band and the
index list / range.

Ops registered in ``ops.dispatch``: ``hybrid_attention``, ``compressed_attention_mass``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ops.dispatch import register

__all__ = ["hybrid_attention", "compressed_entry_mask", "compressed_attention_mass"]


def compressed_entry_mask(
    num_entries: int,
    comp_lo: Optional[torch.Tensor] = None,
    comp_hi: Optional[torch.Tensor] = None,
    comp_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """bool [B, S, N]: entry n in C_t, from ``comp_idx`` [B,S,K] (-1 = none) or the range [lo, hi)."""
    if comp_idx is not None:
        B, S, _ = comp_idx.shape
        safe = torch.where(comp_idx >= 0, comp_idx, torch.full_like(comp_idx, num_entries))
        mask = torch.zeros(B, S, num_entries + 1, dtype=torch.bool, device=comp_idx.device)
        mask.scatter_(-1, safe, True)
        return mask[..., :num_entries]
    if comp_lo is None or comp_hi is None:
        raise ValueError("compressed entries need either comp_idx or both comp_lo and comp_hi")
    n = torch.arange(num_entries, device=comp_lo.device)
    return (n >= comp_lo[..., None]) & (n < comp_hi[..., None])


def _window_blocks(
    seq_len: int, window: int, seg_start: Optional[torch.Tensor], device: torch.device, batch: int
) -> tuple[int, int, torch.Tensor]:
    """Blocked window layout: (block size Q, number of blocks nb, validity mask [B|1, nb, Q, Q + W]).

    Queries are cut into blocks of Q = min(W, S) consecutive tokens; block i (queries i·Q .. i·Q + Q - 1) scores
    the Q + W keys at positions i·Q - W .. i·Q + Q - 1 (one dense matmul per block instead of a gathered
    [S, W] key copy). Key k of block i, position s = i·Q - W + k, is in query t's window iff
    t - W < s <= t, s >= 0 and s >= seg_start[t].
    """
    W = max(1, min(window, seq_len))
    Q = W
    nb = -(-seq_len // Q)
    t = torch.arange(nb * Q, device=device).view(nb, Q, 1)  # query positions
    s = (
        torch.arange(nb, device=device).view(nb, 1, 1) * Q - W + torch.arange(Q + W, device=device).view(1, 1, Q + W)
    )  # key positions
    ok = (s > t - W) & (s <= t) & (s >= 0)  # [nb, Q, Q + W]
    if seg_start is None:
        return Q, nb, ok[None]
    seg = torch.nn.functional.pad(seg_start, (0, nb * Q - seq_len)).view(batch, nb, Q, 1)
    return Q, nb, ok[None] & (s[None] >= seg)


def check_attention_inputs(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    comp_kv: Optional[torch.Tensor],
    comp_lo: Optional[torch.Tensor],
    comp_hi: Optional[torch.Tensor],
    comp_idx: Optional[torch.Tensor],
) -> None:
    """Shape checks shared by every ``hybrid_attention`` implementation; raises ValueError naming the shapes."""
    if (
        q.dim() != 4
        or kv.dim() != 3
        or kv.shape[0] != q.shape[0]
        or kv.shape[1] != q.shape[1]
        or kv.shape[2] != q.shape[3]
    ):
        raise ValueError(
            f"hybrid_attention: expected q [B,S,H,D] and kv [B,S,D]; got {tuple(q.shape)} and {tuple(kv.shape)}"
        )
    B, S, H, D = q.shape
    if sinks.shape != (H,):
        raise ValueError(f"hybrid_attention: sinks must be [H] = [{H}], got {tuple(sinks.shape)}")
    if comp_kv is not None and (comp_kv.dim() != 3 or comp_kv.shape[0] != B or comp_kv.shape[2] != D):
        raise ValueError(f"hybrid_attention: comp_kv must be [B, N, D] = [{B}, N, {D}], got {tuple(comp_kv.shape)}")
    if comp_kv is not None and comp_kv.shape[1] > 0 and comp_idx is None and (comp_lo is None or comp_hi is None):
        raise ValueError("compressed entries need either comp_idx or both comp_lo and comp_hi")


def hybrid_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int,
    seg_start: Optional[torch.Tensor] = None,
    comp_kv: Optional[torch.Tensor] = None,
    comp_lo: Optional[torch.Tensor] = None,
    comp_hi: Optional[torch.Tensor] = None,
    comp_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint-softmax attention over window ∪ compressed entries with a per-head sink (reference).

    Args:
        q: [B, S, H, D] queries (normalised, RoPE applied); any float dtype.
        kv: [B, S, D] the single shared K=V head of every token (RoPE applied).
        sinks: [H] sink logits z'_h (float32 parameter; not multiplied by ``scale``).
        scale: softmax scale (c^{-1/2}).
        window: n_win, number of most recent tokens (including t) in the window.
        seg_start: int64 [B, S] first token of t's document (None = 0: one document per row).
        comp_kv: [B, N, D] compressed entries (RoPE applied), or None (sliding-only layer).
        comp_lo, comp_hi: int64 [B, S] visible entry range per query (used when comp_idx is None).
        comp_idx: int64 [B, S, K] selected entries per query, -1 = empty slot (CSA sparse).
    Returns:
        o: [B, S, H, D] in q.dtype (NOT de-rotated; the caller applies the inverse RoPE).
        lse: [B, S, H] float32 (float64 for float64 q) log of the full softmax denominator incl. the sink.
    Softmax arithmetic in float32 (float64 for float64 inputs). Differentiable w.r.t. q, kv, sinks, comp_kv.
    """
    check_attention_inputs(q, kv, sinks, comp_kv, comp_lo, comp_hi, comp_idx)
    B, S, H, D = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    qc = q.to(cdt)
    Q, nb, ok = _window_blocks(S, window, seg_start, q.device, B)
    W = Q
    Sp = nb * Q
    # keys of block i = kv_pad[:, i·Q : i·Q + Q + W] (W zeros in front, padding behind): a strided view
    kv_pad = torch.nn.functional.pad(kv.to(cdt), (0, 0, W, Sp - S))  # [B, W + Sp, D]
    kv_blk = kv_pad.unfold(1, Q + W, Q).transpose(-1, -2)  # [B, nb, Q + W, D]
    q_blk = torch.nn.functional.pad(qc, (0, 0, 0, 0, 0, Sp - S)).view(B, nb, Q, H, D)
    z_win = torch.einsum("biqhd,bikd->biqhk", q_blk, kv_blk) * scale  # [B, nb, Q, H, Q + W]
    z_win = z_win.masked_fill(~ok[:, :, :, None, :], float("-inf"))
    z_win = z_win.reshape(B, Sp, H, Q + W)[:, :S]
    parts = [z_win]
    has_comp = comp_kv is not None and comp_kv.shape[1] > 0
    if has_comp:
        N = comp_kv.shape[1]
        ck = comp_kv.to(cdt)
        vis = compressed_entry_mask(N, comp_lo, comp_hi, comp_idx)  # [B, S, N]
        z_c = torch.einsum("bshd,bnd->bshn", qc, ck) * scale
        parts.append(z_c.masked_fill(~vis[:, :, None, :], float("-inf")))
    sink = sinks.to(cdt).view(1, 1, H, 1).expand(B, S, H, 1)
    z = torch.cat(parts + [sink], dim=-1)
    lse = torch.logsumexp(z, dim=-1)  # [B, S, H]
    p = torch.exp(z - lse[..., None])
    Wn = Q + W
    p_win = torch.nn.functional.pad(p[..., :Wn], (0, 0, 0, 0, 0, Sp - S)).view(B, nb, Q, H, Wn)
    o = torch.einsum("biqhk,bikd->biqhd", p_win, kv_blk).reshape(B, Sp, H, D)[:, :S]
    if has_comp:
        o = o + torch.einsum("bshn,bnd->bshd", p[..., Wn:-1], ck)
    return o.to(q.dtype), lse


@torch.no_grad()
def compressed_attention_mass(
    q: torch.Tensor, comp_kv: torch.Tensor, lse: torch.Tensor, scale: float, entry_mask: torch.Tensor
) -> torch.Tensor:
    """Σ_h p_{h,t,n}: main-attention probability of entry n summed over the (local) heads (reference).

    Args:
        q: [B, S, H, D], comp_kv: [B, N, D], lse: [B, S, H] as returned by ``hybrid_attention``.
        scale: the same softmax scale.
        entry_mask: bool [B, S, N], the entries attended by query t (0 elsewhere).
    Returns:
        [B, S, N] float32 (float64 for float64 q); no gradient (it is the indexer's constant target).
    """
    cdt = torch.promote_types(q.dtype, torch.float32)
    z = torch.einsum("bshd,bnd->bshn", q.to(cdt), comp_kv.to(cdt)) * scale
    p = torch.exp(z - lse.to(cdt)[..., None])
    return (p * entry_mask[:, :, None, :]).sum(dim=2)


register("hybrid_attention", reference=hybrid_attention)
register("compressed_attention_mass", reference=compressed_attention_mass)
