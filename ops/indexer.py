"""Lightning indexer of CSA: scores, top-k selection and its KL training loss (docs/MODEL.md §6, §12.4).

Score (paper eq. 16 with the two constants of the code):
``I_{t,s} = Σ_h (w_{t,h} · n_I^{-1/2}) · ReLU(q^I_{t,h} · K^IComp_s) · c_I^{-1/2}``.

Selection: among the entries visible to query t (``visible_lo[t] <= s < visible_hi[t]``, see
``ops.compressor``) take the k highest scores; equal scores are broken deterministically by the LOWER entry
index first (ReLU makes exact ties at 0 common; ``torch.topk``'s tie order is unspecified). Slots beyond the
number of visible entries hold -1.

Training signal (DSA recipe, §12.4): KL(P_t ‖ Q_t) per query over a set E_t of entries, where
``P_t(s) ∝ Σ_h p_{h,t,s}`` is the main attention's probability mass on entry s summed over heads and
renormalised over E_t (a constant target), and ``Q_t = softmax_{s∈E_t}(I_{t,s})``. E_t = all visible entries
(indexer warm-up) or the selected top-k (sparse training). Averaged over the queries with a non-empty E_t.

Ops registered in ``ops.dispatch``: ``indexer_scores``, ``indexer_topk``, ``indexer_kl_loss``.
"""

from __future__ import annotations

import torch

from ops.dispatch import register

__all__ = ["check_indexer_inputs", "indexer_scores", "indexer_topk", "indexer_kl_loss"]


def check_indexer_inputs(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> None:
    """The shape contract of ``indexer_scores`` (shared by every backend)."""
    if q.dim() != 4 or keys.dim() != 3 or weights.dim() != 3:
        raise ValueError(
            f"indexer_scores: expected q [B,S,H,c], keys [B,N,c], weights [B,S,H]; got "
            f"{tuple(q.shape)}, {tuple(keys.shape)}, {tuple(weights.shape)}"
        )
    B, S, H, c = q.shape
    if keys.shape[0] != B or keys.shape[2] != c or weights.shape != (B, S, H):
        raise ValueError(
            f"indexer_scores: shapes disagree: q {tuple(q.shape)}, keys {tuple(keys.shape)}, "
            f"weights {tuple(weights.shape)}"
        )


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Index scores I_{t,s} for every (query, entry) pair (reference).

    Args:
        q: [B, S, H_I, c_I] indexer queries (RoPE applied to their last rope dims).
        keys: [B, N, c_I] compressed indexer keys K^IComp (one per entry, shared by the heads).
        weights: [B, S, H_I] head weights w = H W^w (without the n_I^{-1/2} factor, applied here).
    Returns:
        float32 [B, S, N] (float64 for float64 inputs); no masking (the caller masks invisible entries).
    """
    check_indexer_inputs(q, keys, weights)
    B, S, H, c = q.shape
    cdt = torch.promote_types(q.dtype, torch.float32)
    dots = torch.einsum("bshc,bnc->bshn", q.to(cdt), keys.to(cdt))
    w = weights.to(cdt) * H**-0.5
    return torch.einsum("bshn,bsh->bsn", torch.relu(dots) * c**-0.5, w)


def indexer_topk(scores: torch.Tensor, visible_lo: torch.Tensor, visible_hi: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries per query (reference; not differentiable).

    Args:
        scores: [B, S, N] index scores.
        visible_lo, visible_hi: int64 [B, S]; entry s is visible to query t iff lo[t] <= s < hi[t].
        k: number of entries to select.
    Returns:
        int64 [B, S, min(k, N)]: selected entry indices in descending score order, ties by lower index
        first; -1 in the slots beyond the number of visible entries.
    """
    B, S, N = scores.shape
    kk = min(k, N)
    n = torch.arange(N, device=scores.device)
    vis = (n >= visible_lo[..., None]) & (n < visible_hi[..., None])
    masked = scores.detach().masked_fill(~vis, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :kk]
    ok = vis.gather(-1, order)
    return torch.where(ok, order, torch.full_like(order, -1))


def indexer_kl_loss(scores: torch.Tensor, target_mass: torch.Tensor, entry_mask: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(P_t ‖ softmax_{E_t}(scores_t)) (reference).

    Args:
        scores: [B, S, N] index scores (carry the gradient).
        target_mass: [B, S, N] non-negative attention mass per entry (treated as a constant; need not be
            normalised; values outside ``entry_mask`` are ignored).
        entry_mask: bool [B, S, N], the set E_t per query.
    Returns:
        scalar float32 (float64 for float64 scores). Queries with an empty E_t (or zero target mass) are
        skipped; 0 (still attached to ``scores``) if no query qualifies.
    """
    cdt = torch.promote_types(scores.dtype, torch.float32)
    target = torch.where(entry_mask, target_mass.detach().to(cdt), torch.zeros((), dtype=cdt, device=scores.device))
    total = target.sum(-1, keepdim=True)
    rows = (total.squeeze(-1) > 0) & entry_mask.any(-1)
    p = target / total.clamp_min(torch.finfo(cdt).tiny)
    keep = entry_mask & rows[..., None]
    # rows without entries get all-zero logits so that log_softmax (and its gradient) stays finite
    logits = torch.where(keep, scores.to(cdt), torch.where(rows[..., None], float("-inf"), 0.0))
    log_q = torch.log_softmax(logits, dim=-1)
    log_q = torch.where(keep, log_q, torch.zeros_like(log_q))
    kl_rows = (torch.xlogy(p, p) - p * log_q).sum(-1)
    n_rows = rows.sum().clamp_min(1)  # no host sync; 0 / 1 = 0 when no query qualifies
    return torch.where(rows, kl_rows, torch.zeros_like(kl_rows)).sum() / n_rows


register("indexer_scores", reference=indexer_scores)
register("indexer_topk", reference=indexer_topk)
register("indexer_kl_loss", reference=indexer_kl_loss)
