"""The ops as typed functions: what the model and the optimizer call (``from ops import functional as op``).

One function per op registered in :mod:`ops.dispatch`, with the parameter names and order of its
implementations (``tests/test_ops_functional.py`` checks them against every registered backend with
``inspect.signature``, so they cannot drift). The leading tensor inputs are positional-or-keyword; from the
first scalar or optional argument on, every argument is keyword-only, so a call site names what it passes::

    o, lse = op.hybrid_attention(q, kv, sinks=s, scale=c**-0.5, window=128, seg_start=..., comp_kv=..., ...)

Each function resolves its backend per call, ``dispatch.get(name, <first tensor>)`` (the ``reference`` /
``blocked`` / ``triton`` switch of ``model.ops_backend`` stays inside ``ops/``), and calls it with keyword
arguments: a result equals that of the resolved implementation exactly (the same function runs). Shapes and
formulas: each reference's docstring, named below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ops import dispatch
from ops.linear_cross_entropy import IGNORE_INDEX
from ops.newton_schulz import GRAM_RESTARTS, V4_NS_STEPS, NSSteps, Reduce

__all__ = [
    "apply_rope",
    "compressed_attention_mass",
    "compressor_pool",
    "hc_head",
    "hybrid_attention",
    "indexer_attention_kl",
    "indexer_kl_loss",
    "indexer_scores",
    "indexer_select",
    "indexer_topk",
    "linear_cross_entropy",
    "mhc_post",
    "mhc_pre",
    "newton_schulz",
    "newton_schulz_gram",
    "rms_norm",
    "sinkhorn",
]


# ---- attention ---------------------------------------------------------------------------------------------
def hybrid_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sinks: torch.Tensor,
    *,
    scale: float,
    window: int,
    seg_start: Optional[torch.Tensor] = None,
    comp_kv: Optional[torch.Tensor] = None,
    comp_lo: Optional[torch.Tensor] = None,
    comp_hi: Optional[torch.Tensor] = None,
    comp_idx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint softmax with sink over the sliding window ∪ the compressed entries: q [B, S, H, D] (normalised,
    RoPE applied), kv [B, S, D] (the one K=V head), sinks [H] float32 logits z'_h (not scaled); ``scale`` c^{-1/2},
    ``window`` n_win tokens incl. t; ``seg_start`` int64 [B, S] (None: one document per row); ``comp_kv``
    [B, N, D] (None: sliding only) seen through the visible range ``comp_lo <= n < comp_hi`` (int64 [B, S]) or
    the selected ``comp_idx`` int64 [B, S, K] (-1 empty). Returns (o [B, S, H, D] in q.dtype, not de-rotated;
    lse [B, S, H] float32, float64 for float64 q, incl. the sink). Reference
    ``ops.sparse_attention.hybrid_attention``."""
    return dispatch.get("hybrid_attention", q)(
        q=q,
        kv=kv,
        sinks=sinks,
        scale=scale,
        window=window,
        seg_start=seg_start,
        comp_kv=comp_kv,
        comp_lo=comp_lo,
        comp_hi=comp_hi,
        comp_idx=comp_idx,
    )


def compressed_attention_mass(
    q: torch.Tensor, comp_kv: torch.Tensor, lse: torch.Tensor, *, scale: float, entry_mask: torch.Tensor
) -> torch.Tensor:
    """Σ_h exp(scale·q_{t,h}·comp_kv_n − lse_{t,h}) on the entries of ``entry_mask`` (bool [B, S, N]), 0 elsewhere:
    q [B, S, H, D], comp_kv [B, N, D], lse [B, S, H] as returned by ``hybrid_attention``. Returns float32
    [B, S, N] (float64 for float64 q) without gradient (the indexer's KL target). Reference
    ``ops.sparse_attention.compressed_attention_mass``."""
    return dispatch.get("compressed_attention_mass", q)(
        q=q, comp_kv=comp_kv, lse=lse, scale=scale, entry_mask=entry_mask
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r = 2·cos.shape[-1] dims of x [..., D] in interleaved pairs by φ (``inverse``: by −φ);
    cos, sin [..., r/2] broadcastable against x[..., :r/2]. Returns a tensor like x (same dtype; rotation in
    float32, float64 for float64 x). Reference ``ops.rope.apply_rope``."""
    return dispatch.get("apply_rope", x)(x=x, cos=cos, sin=sin, inverse=inverse)


def rms_norm(x: torch.Tensor, *, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """y = weight ⊙ x / sqrt(mean(x²) + eps) over the last dim of x (``weight`` float32 [D], or None for the
    unweighted norm); statistics in float32, one cast back. Returns a tensor like x. Reference
    ``ops.rms_norm.rms_norm``."""
    return dispatch.get("rms_norm", x)(x=x, weight=weight, eps=eps)


# ---- compressor and lightning indexer ------------------------------------------------------------------------
def compressor_pool(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    block_start: torch.Tensor,
    *,
    prev_valid: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per-channel softmax pooling of blocks into compressed entries: C^Comp_i = Σ_j softmax_j(Z_j + B_j) ⊙ C_j
    with kv C and gate Z [B, S, C], position_bias B float32 [m, C], block_start int64 [B, N] (-1 unused slot,
    output 0); ``prev_valid`` None for HCA (C = c), bool [B, N] for CSA (C = 2c, overlapping windows). Returns
    [B, N, c] in kv.dtype. Reference ``ops.compressor.compressor_pool``."""
    return dispatch.get("compressor_pool", kv)(
        kv=kv, gate=gate, position_bias=position_bias, block_start=block_start, prev_valid=prev_valid
    )


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Index scores I_{t,s} = Σ_h w_{t,h} H^{-1/2} ReLU(q_{t,h} · k_s) c^{-1/2} for every pair: q [B, S, H, c]
    (RoPE applied), keys [B, N, c], weights [B, S, H]. Returns float32 [B, S, N] (float64 for float64 inputs),
    unmasked. Reference ``ops.indexer.indexer_scores``."""
    return dispatch.get("indexer_scores", q)(q=q, keys=keys, weights=weights)


def indexer_topk(scores: torch.Tensor, visible_lo: torch.Tensor, visible_hi: torch.Tensor, *, k: int) -> torch.Tensor:
    """Top-``k`` visible entries (lo[t] <= s < hi[t], int64 [B, S]) of given scores [B, S, N]: int64
    [B, S, min(k, N)] in descending score order, ties to the lower index, -1 beyond the visible count; no
    gradient. Reference ``ops.indexer.indexer_topk``."""
    return dispatch.get("indexer_topk", scores)(scores=scores, visible_lo=visible_lo, visible_hi=visible_hi, k=k)


def indexer_select(
    q: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    visible_lo: torch.Tensor,
    visible_hi: torch.Tensor,
    *,
    k: int,
) -> torch.Tensor:
    """Fused scores and top-k, ``indexer_topk(indexer_scores(q, keys, weights), visible_lo, visible_hi, k=k)``
    (streamed backends never form [S, N]): q [B, S, H, c], keys [B, N, c], weights [B, S, H], lo/hi int64
    [B, S]. Returns int64 [B, S, min(k, N)]. Reference ``ops.triton.indexer_select_reference``."""
    return dispatch.get("indexer_select", q)(
        q=q, keys=keys, weights=weights, visible_lo=visible_lo, visible_hi=visible_hi, k=k
    )


def indexer_kl_loss(scores: torch.Tensor, target_mass: torch.Tensor, entry_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the qualifying queries of KL(P_t ‖ softmax_{E_t}(scores_t)), P_t = target_mass normalised over
    E_t = entry_mask (bool [B, S, N]); scores [B, S, N] carry the gradient, target_mass [B, S, N] is a
    constant. Returns a float32 scalar (float64 for float64 scores), 0 attached to scores if no query
    qualifies. Reference ``ops.indexer.indexer_kl_loss``."""
    return dispatch.get("indexer_kl_loss", scores)(scores=scores, target_mass=target_mass, entry_mask=entry_mask)


def indexer_attention_kl(
    q_i: torch.Tensor,
    keys_i: torch.Tensor,
    w_i: torch.Tensor,
    q: torch.Tensor,
    comp_kv: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    lo: torch.Tensor,
    hi: torch.Tensor,
    idx: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's KL loss with its target fused in: scores of q_i [B, S, H_I, c_I], keys_i [B, N, c_I],
    w_i [B, S, H_I] against the main attention's mass Σ_h exp(scale·q·comp_kv − lse) (q [B, S, H, D], comp_kv
    [B, N, D], lse [B, S, H], constants) over E_t = lo[t] <= s < hi[t] (int64 [B, S], ``idx`` None) or the
    selected ``idx`` int64 [B, S, K]. Returns (loss scalar, mean over the qualifying queries; rows int64
    scalar, their count); gradient to q_i, keys_i, w_i only. Reference ``ops.indexer_kl.indexer_attention_kl``."""
    return dispatch.get("indexer_attention_kl", q_i)(
        q_i=q_i, keys_i=keys_i, w_i=w_i, q=q, comp_kv=comp_kv, lse=lse, scale=scale, lo=lo, hi=hi, idx=idx
    )


# ---- manifold-constrained hyper-connections ----------------------------------------------------------------
def sinkhorn(logits: torch.Tensor, *, iters: int, eps: float) -> torch.Tensor:
    """Projection of logits [T, n, n] onto (nearly) doubly-stochastic matrices: M = softmax_k(L) + eps, then
    ``iters`` column and ``iters − 1`` row normalisations X / (Σ X + eps), the last over columns. Returns
    [T, n, n] float32 (float64 for float64 logits). Reference ``ops.mhc.sinkhorn``."""
    return dispatch.get("sinkhorn", logits)(logits=logits, iters=iters, eps=eps)


def mhc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    *,
    rms_eps: float,
    hc_eps: float,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre side: mix = vec(X) fnᵀ / sqrt(mean(vec(X)²) + rms_eps), pre = σ(α_pre·mix_pre + S_pre) + hc_eps,
    post = 2σ(α_post·mix_post + S_post), comb = Sinkhorn(α_res·mix_res + S_res; ``iters``, eps ``hc_eps``);
    x [T, n, d], fn [(2+n)n, nd], base S [(2+n)n], scale α [3]. Returns (x_in = Σ_j pre_j X[j] [T, d] in x.dtype,
    post [T, n], comb [T, n, n]). Reference ``ops.mhc.mhc_pre``."""
    return dispatch.get("mhc_pre", x)(x=x, fn=fn, base=base, scale=scale, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters)


def mhc_post(o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post side X_new[k] = post_k · o + Σ_j comb_{jk} X[j]: o [T, d], x [T, n, d], post [T, n], comb
    [T, n, n]. Returns [T, n, d] in x.dtype. Reference ``ops.mhc.mhc_post``."""
    return dispatch.get("mhc_post", x)(o=o, x=x, post=post, comb=comb)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *, rms_eps: float, hc_eps: float
) -> torch.Tensor:
    """Final stream collapse y = Σ_j (σ(α·mix_j + b_j) + hc_eps) X[j]: x [T, n, d], fn [n, nd], base [n],
    scale [1] (α). Returns [T, d] in x.dtype. Reference ``ops.mhc.hc_head``."""
    return dispatch.get("hc_head", x)(x=x, fn=fn, base=base, scale=scale, rms_eps=rms_eps, hc_eps=hc_eps)


# ---- output head -------------------------------------------------------------------------------------------------
def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Σ over tokens with labels != ``ignore_index`` of −log softmax(h Wᵀ)[label]: h [T, d], weight [V, d], labels
    int64 [T]. Returns the summed loss, a float32 scalar (float64 for float64 inputs); the blocked backend never
    holds the [T, V] logits. Reference ``ops.linear_cross_entropy.linear_cross_entropy``."""
    return dispatch.get("linear_cross_entropy", h)(h=h, weight=weight, labels=labels, ignore_index=ignore_index)


# ---- Muon ----------------------------------------------------------------------------------------------------------
def newton_schulz(
    X: torch.Tensor, *, steps: NSSteps = V4_NS_STEPS, fp32: bool = True, reduce: Reduce = None
) -> torch.Tensor:
    """Newton-Schulz orthogonalisation X_{k+1} = a X + b (X Xᵀ) X + c (X Xᵀ)² X from X_0 = X / ‖X‖_F, one
    (a, b, c) per iteration of ``steps`` ((count, a, b, c) rows), of X [n, m] or [..., n, m] (run wide:
    transposed when n > m and ``reduce`` is None); ``fp32`` False: bfloat16 matmuls; ``reduce``: the all-reduce
    (sum) over the shards of an X split along its long dim, passed already wide. Returns a tensor of X's shape
    and dtype. Reference ``ops.newton_schulz.newton_schulz``."""
    return dispatch.get("newton_schulz", X)(X=X, steps=steps, fp32=fp32, reduce=reduce)


def newton_schulz_gram(
    X: torch.Tensor,
    *,
    steps: NSSteps = V4_NS_STEPS,
    fp32: bool = True,
    reduce: Reduce = None,
    restarts: Sequence[int] = GRAM_RESTARTS,
) -> torch.Tensor:
    """The Gram form of :func:`newton_schulz` (equal in exact arithmetic): Q = a I + b A + c A², P ← Q P,
    A ← Q (Q A) on the s x s Gram A_0 = X_0 X_0ᵀ, result P X_0, the polynomial applied and A rebuilt before
    the iterations in ``restarts``. Returns a tensor like X. Reference ``ops.newton_schulz.newton_schulz_gram``."""
    return dispatch.get("newton_schulz_gram", X)(X=X, steps=steps, fp32=fp32, reduce=reduce, restarts=restarts)
