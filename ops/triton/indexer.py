"""Lightning-indexer top-k in Triton, with a fused score variant that never materialises [S, N] scores.

Reference: ``ops.indexer`` (docs/MODEL.md §6). Score of query t and entry s:

    I_{t,s} = Σ_h (w_{t,h} · H^{-1/2}) · ReLU(q_{t,h} · k_s) · c^{-1/2}

Selection among visible entries lo[t] ≤ s < hi[t]: the kk = min(k, N) highest scores, in descending score
order, ties broken by the LOWER entry index first; slots beyond the number of visible entries hold −1.

Block-wise top-k merge (one program per query): a running buffer of KP = next_pow2(kk) candidates is
merged with each block of KP new entries. Each candidate is one int64 key

    key = (orderable_int32(score) << 32) | (2³¹ − 1 − s)

so a single descending sort orders by score, then by lower index (the tie rule), and needs no payload.
Invisible entries get the smallest key and come out as −1. Merge = join(buffer, block) → [2·KP] → sort →
keep the first KP; blocks whose best key does not beat the current KP-th key are skipped.

* ``indexer_topk(scores, lo, hi, k)``: same contract as the reference (scores given).
* ``indexer_select(q, keys, weights, lo, hi, k)``: scores computed block-wise in registers (head chunks of
  16 against a [KP, c] key tile) and merged on the fly; = ``indexer_topk(indexer_scores(q, keys, w), …)``.
Forward only: indices are not differentiable (the KL loss uses ``indexer_scores`` on the chosen entries).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ops import indexer as _ref
from ops.triton import native, new_empty


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pack(score, idx, valid):
    score = tl.where(score == 0.0, 0.0, score)  # −0.0 ties with +0.0, as in the reference sort
    bits = score.to(tl.int32, bitcast=True)
    okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    packed = (okey.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)
    return tl.where(valid, packed, -9223372036854775807 - 1)


@triton.jit
def _merge(buf, new, KP: tl.constexpr):
    both = tl.reshape(tl.join(buf, new), [2 * KP])
    srt = tl.sort(both, 0, descending=True)
    top, _ = tl.split(tl.permute(tl.reshape(srt, [2, KP]), [1, 0]))
    return top


@triton.jit
def _topk_kernel(
    s_ptr,
    q_ptr,
    k_ptr,
    w_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    S,
    N,
    KK,
    HI,
    CI,
    head_scale,
    KP: tl.constexpr,
    HC: tl.constexpr,
    CP: tl.constexpr,
    FUSED: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # b * S + t
    b = pid // S
    pid64 = pid.to(tl.int64)
    lo = tl.load(lo_ptr + pid)
    hi = tl.minimum(tl.load(hi_ptr + pid), N)
    offs = tl.arange(0, KP)
    buf = tl.full([KP], -9223372036854775807 - 1, tl.int64)
    offs_c = tl.arange(0, CP)
    cmask = offs_c < CI
    for n0 in range(lo, hi, KP):
        ent = n0 + offs
        valid = ent < hi
        if FUSED:
            kt = tl.load(
                k_ptr + (b.to(tl.int64) * N + ent[:, None]) * CI + offs_c[None, :],
                mask=valid[:, None] & cmask[None, :],
                other=0.0,
            )
            if UPCAST:
                kt = kt.to(tl.float32)
            sc = tl.zeros([KP], dtype=tl.float32)
            for h0 in range(0, HI, HC):
                offs_h = h0 + tl.arange(0, HC)
                hmask = offs_h < HI
                qh = tl.load(
                    q_ptr + (pid64 * HI + offs_h[:, None]) * CI + offs_c[None, :],
                    mask=hmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                if UPCAST:
                    qh = qh.to(tl.float32)
                wh = tl.load(w_ptr + pid64 * HI + offs_h, mask=hmask, other=0.0).to(tl.float32)
                d = tl.dot(qh, tl.trans(kt))  # [HC, KP]
                sc += tl.sum(tl.maximum(d, 0.0) * wh[:, None], axis=0)
            sc = sc * head_scale
        else:
            sc = tl.load(s_ptr + pid64 * N + ent, mask=valid, other=0.0).to(tl.float32)
        new = _pack(sc, ent, valid)
        if tl.max(new, axis=0) > tl.min(buf, axis=0):
            buf = _merge(buf, new, KP)
    lowbits = (buf & 0x7FFFFFFF).to(tl.int32)
    idx = tl.where(buf == -9223372036854775807 - 1, -1, 0x7FFFFFFF - lowbits)
    tl.store(out_ptr + pid64 * KK + offs, idx.to(tl.int64), mask=offs < KK)


def _launch(scores, q, keys, w, lo, hi, k, B, S, N, fused):
    kk = min(int(k), N)
    dev = lo.device
    out = new_empty((B, S, kk), device=dev, dtype=torch.long)
    if kk == 0 or B * S == 0:
        return out
    KP = max(16, triton.next_power_of_2(kk))
    lo32 = lo.to(torch.int32).contiguous()
    hi32 = hi.to(torch.int32).contiguous()
    if fused:
        HI, CI = q.shape[2], q.shape[3]
        args = (lo32, q, keys, w)
        head_scale = HI**-0.5 * CI**-0.5
    else:
        HI = CI = 1
        args = (scores, lo32, lo32, lo32)
        head_scale = 1.0
    _topk_kernel[(B * S,)](
        args[0],
        args[1],
        args[2],
        args[3],
        lo32,
        hi32,
        out,
        S,
        N,
        kk,
        HI,
        CI,
        head_scale,
        KP=KP,
        HC=16,
        CP=max(16, triton.next_power_of_2(CI)),
        FUSED=fused,
        UPCAST=_interp(),
        num_warps=4 if KP <= 256 else 8,
    )
    return out


def indexer_topk(scores: torch.Tensor, visible_lo: torch.Tensor, visible_hi: torch.Tensor, k: int) -> torch.Tensor:
    """Triton top-k over given scores; same contract as ``ops.indexer.indexer_topk``."""
    if scores.dim() != 3 or not native(scores) or scores.dtype == torch.float64:
        return _ref.indexer_topk(scores, visible_lo, visible_hi, k)
    B, S, N = scores.shape
    return _launch(scores.detach().float().contiguous(), None, None, None, visible_lo, visible_hi, k, B, S, N, False)


def indexer_select(
    q: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    visible_lo: torch.Tensor,
    visible_hi: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Fused scores + top-k: ``indexer_topk(indexer_scores(q, keys, weights), lo, hi, k)`` without [S, N]."""
    if q.dim() != 4 or not native(q) or q.dtype == torch.float64:
        return _ref.indexer_topk(_ref.indexer_scores(q, keys, weights), visible_lo, visible_hi, k)
    B, S, _, _ = q.shape
    N = keys.shape[1]
    return _launch(
        None,
        q.detach().contiguous(),
        keys.detach().contiguous(),
        weights.detach().contiguous(),
        visible_lo,
        visible_hi,
        k,
        B,
        S,
        N,
        True,
    )
