"""The indexer's KL training loss fused with its target, streamed in query chunks and key blocks (§12.4).

Op ``indexer_attention_kl(q_i, keys_i, w_i, q, comp_kv, lse, scale, lo, hi, idx) -> (loss, rows)``:

    I_{t,s}  = c_I^{-1/2} Σ_h (w_{t,h} H_I^{-1/2}) ReLU(q_i{t,h} · keys_i{s})           index scores
    m_{t,s}  = Σ_h exp(scale · q_{t,h} · comp_kv_s − lse_{t,h})                         main-attention mass
    E_t      = {s : lo[t] <= s < hi[t]} (idx None) or the selected {idx[t, j] >= 0}
    KL_t     = Σ_{s∈E_t} p_s log p_s − Σ_{s∈E_t} p_s log softmax_{E_t}(I_t)_s,   p = m / M_t,  M_t = Σ_{E_t} m
    loss     = mean of KL_t over the queries with E_t ≠ ∅ and M_t > 0 (``rows`` of them; 0 if none)

The gradient reaches q_i, keys_i and w_i only (the mass is a constant target). The reference is the
composition of the reference ops (``indexer_scores``, ``compressed_entry_mask``, ``compressed_attention_mass``,
``indexer_kl_loss``), which materialise [B, S, N] scores, mask, mass and every KL intermediate.

Streamed evaluation (``blocked``): per query chunk only four running statistics per query are kept,

    M_t = Σ m,   A_t = Σ m log m,   B_t = Σ m I,   L_t = logsumexp I      (over E_t, block by block)
    KL_t = A_t / M_t − log M_t − B_t / M_t + L_t

and the backward recomputes I and m per tile:  ∂KL_t/∂I_{t,s} = softmax_{E_t}(I_t)_s − p_s = e^{I − L_t} − m / M_t,
back through I as in ``ops.blocked_indexer``. Sparse training (``idx``): the K selected keys of each query are
gathered (cost ∝ K, not N); warm-up (``idx`` None): key blocks of the visible span with a per-block mask.
Memory O(S·(K + H·c)): nothing of size [S, N]. Correctness: ``tests/test_long_context_ops.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ops.blocked_attention import rows_t_rows
from ops.blocked_indexer_select import key_block, key_blocks, query_chunks, visible
from ops.dispatch import register
from ops.indexer import check_indexer_inputs

__all__ = ["indexer_attention_kl", "blocked_indexer_attention_kl"]


def indexer_attention_kl(
    q_i: torch.Tensor,
    keys_i: torch.Tensor,
    w_i: torch.Tensor,
    q: torch.Tensor,
    comp_kv: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    lo: torch.Tensor,
    hi: torch.Tensor,
    idx: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (see the module docstring). q_i [B,S,H_I,c_I], keys_i [B,N,c_I], w_i [B,S,H_I]; q [B,S,H,D],
    comp_kv [B,N,D], lse [B,S,H] (the main attention's, constants); lo, hi [B,S]; idx [B,S,K] or None.
    Returns (loss scalar, rows int64 scalar)."""
    from ops.indexer import indexer_kl_loss, indexer_scores
    from ops.sparse_attention import compressed_attention_mass, compressed_entry_mask

    scores = indexer_scores(q_i, keys_i, w_i)
    mask = compressed_entry_mask(comp_kv.shape[1], lo, hi, idx)
    with torch.no_grad():
        mass = compressed_attention_mass(q.detach(), comp_kv.detach(), lse.detach(), scale, mask)
    loss = indexer_kl_loss(scores, mass, mask)
    rows = ((torch.where(mask, mass, torch.zeros_like(mass)).sum(-1) > 0) & mask.any(-1)).sum()
    return loss, rows


class _Tiles:
    """The tiles of one query chunk [t0, t1): (scores I, mass m, entry mask, gathered keys or key block)."""

    def __init__(self, inputs: "_Inputs", t0: int, t1: int):
        self.c = c = inputs
        self.t0, self.t1 = t0, t1
        self.q_i = c.q_i[:, t0:t1].to(c.cdt)
        self.w = c.w[:, t0:t1]
        self.q = c.q[:, t0:t1].to(c.cdt)
        self.lse = c.lse[:, t0:t1].to(c.cdt)
        self.lo, self.hi = c.lo[:, t0:t1], c.hi[:, t0:t1]
        self.idx = None if c.idx is None else c.idx[:, t0:t1]

    def __iter__(self):
        """Yields (keys_i tile, d = q_i·keys_i before ReLU, I, m, mask, where) per tile; ``where`` is the entry
        slice (s0, s1) of a key block or the clamped indices [B, C, K] of the gathered entries."""
        c = self.c
        B = self.q_i.shape[0]
        if self.idx is not None:
            mask = self.idx >= 0
            safe = self.idx.clamp(min=0)
            C, K = safe.shape[1], safe.shape[2]
            if K == 0:
                return
            flat = safe.reshape(B, C * K, 1)
            kt = torch.gather(c.keys_i, 1, flat.expand(-1, -1, c.keys_i.shape[-1])).view(B, C, K, -1)
            ct = torch.gather(c.comp_kv, 1, flat.expand(-1, -1, c.comp_kv.shape[-1])).view(B, C, K, -1)
            d = torch.einsum("bthc,btkc->bthk", self.q_i, kt)
            z = torch.einsum("bthd,btkd->bthk", self.q, ct)
            yield kt, d, self._scores(d), self._mass(z), mask, safe
            return
        for s0, s1 in key_blocks(self.lo, self.hi, key_block(self.q_i.device)):
            kt = c.keys_i[:, s0:s1]
            d = torch.einsum("bthc,bnc->bthn", self.q_i, kt)
            z = torch.einsum("bthd,bnd->bthn", self.q, c.comp_kv[:, s0:s1])
            yield kt, d, self._scores(d), self._mass(z), visible(self.lo, self.hi, s0, s1), (s0, s1)

    def _scores(self, d: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bthn,bth->btn", d.relu(), self.w) * self.c.a

    def _mass(self, z: torch.Tensor) -> torch.Tensor:
        return z.mul_(self.c.scale).sub_(self.lse[..., None]).exp_().sum(dim=2)


class _Inputs:
    """Inputs in compute dtype shared by forward and backward."""

    def __init__(self, q_i, keys_i, w_i, q, comp_kv, lse, scale, lo, hi, idx):
        self.cdt = torch.promote_types(q_i.dtype, torch.float32)
        H_I, c_I = q_i.shape[2], q_i.shape[3]
        self.a = c_I**-0.5
        self.q_i, self.keys_i = q_i, keys_i.to(self.cdt)
        self.w = w_i.to(self.cdt) * H_I**-0.5
        self.q, self.comp_kv, self.lse = q, comp_kv.to(self.cdt), lse
        self.scale, self.lo, self.hi, self.idx = scale, lo, hi, idx

    def chunks(self):
        B, S, H_I, _ = self.q_i.shape
        H = self.q.shape[2]
        width = self.idx.shape[-1] if self.idx is not None else min(self.keys_i.shape[1], key_block(self.q.device))
        for t0, t1 in query_chunks(S, B * max(H_I, H) * max(1, width), self.q.device):
            yield _Tiles(self, t0, t1)


class _StreamedIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_i, keys_i, w_i, q, comp_kv, lse, scale, lo, hi, idx):
        inp = _Inputs(q_i, keys_i, w_i, q, comp_kv, lse, scale, lo, hi, idx)
        B, S = q_i.shape[:2]
        cdt = inp.cdt
        stats = torch.zeros(4, B, S, dtype=cdt, device=q_i.device)  # M, A, B (Σ m I), running max of I
        stats[3] = float("-inf")
        sumexp = torch.zeros(B, S, dtype=cdt, device=q_i.device)
        anyent = torch.zeros(B, S, dtype=torch.bool, device=q_i.device)
        zero = torch.zeros((), dtype=cdt, device=q_i.device)
        for tiles in inp.chunks():
            sl = slice(tiles.t0, tiles.t1)
            M, A, Bs, mx, se, an = (
                stats[0, :, sl],
                stats[1, :, sl],
                stats[2, :, sl],
                stats[3, :, sl],
                sumexp[:, sl],
                anyent[:, sl],
            )
            for _kt, _d, I, m, mask, _ in tiles:
                m = torch.where(mask, m, zero)
                M += m.sum(-1)
                A += torch.xlogy(m, m).sum(-1)
                Bs += (m * I).sum(-1)
                Im = I.masked_fill(~mask, float("-inf"))
                new_mx = torch.maximum(mx, Im.amax(-1))
                safe = torch.where(torch.isneginf(new_mx), zero, new_mx)
                se.mul_(torch.exp(mx - safe)).add_(torch.exp(Im - safe[..., None]).sum(-1))
                mx.copy_(new_mx)
                an |= mask.any(-1)
        M, A, Bs, mx = stats
        ok = (M > 0) & anyent
        L = torch.where(ok, mx + torch.log(sumexp.clamp_min(torch.finfo(cdt).tiny)), zero)
        Ms = M.clamp_min(torch.finfo(cdt).tiny)
        kl = torch.where(ok, A / Ms - torch.log(Ms) - Bs / Ms + L, zero)
        rows = ok.sum()
        loss = kl.sum() / rows.clamp_min(1)
        ctx.save_for_backward(q_i, keys_i, w_i, q, comp_kv, lse, lo, hi, idx, L, Ms, ok, rows)
        ctx.scale = scale
        ctx.mark_non_differentiable(rows)
        return loss.to(cdt), rows

    @staticmethod
    def backward(ctx, g_loss, _g_rows):
        q_i, keys_i, w_i, q, comp_kv, lse, lo, hi, idx, L, Ms, ok, rows = ctx.saved_tensors
        inp = _Inputs(q_i, keys_i, w_i, q, comp_kv, lse, ctx.scale, lo, hi, idx)
        cdt, a = inp.cdt, inp.a
        B, S, H_I, c_I = q_i.shape
        dq = torch.zeros(B, S, H_I, c_I, dtype=cdt, device=q_i.device)
        dk = torch.zeros(keys_i.shape, dtype=cdt, device=q_i.device)
        dw = torch.zeros(B, S, H_I, dtype=cdt, device=q_i.device)
        coef = torch.where(
            ok, g_loss.to(cdt) / rows.clamp_min(1).to(cdt), torch.zeros((), dtype=cdt, device=q_i.device)
        )
        for tiles in inp.chunks():
            sl = slice(tiles.t0, tiles.t1)
            for kt, d, I, m, mask, where in tiles:
                # ∂loss/∂I = coef_t (e^{I − L_t} − m / M_t) on E_t
                gI = (torch.exp(I - L[:, sl, None]) - m / Ms[:, sl, None]) * coef[:, sl, None]
                gI = gI.masked_fill_(~(mask & ok[:, sl, None]), 0.0)  # also clears e^{I−L} overflow
                dw[:, sl] += torch.einsum("bthn,btn->bth", d.relu(), gI) * (a * H_I**-0.5)
                gd = (d > 0).to(cdt).mul_(gI[:, :, None, :]).mul_((tiles.w * a)[..., None])  # [B, C, H, n]
                if isinstance(where, tuple):
                    dq[:, sl] += torch.einsum("bthn,bnc->bthc", gd, kt)
                    dk[:, where[0] : where[1]] += rows_t_rows(gd, tiles.q_i)
                else:
                    dq[:, sl] += torch.einsum("bthk,btkc->bthc", gd, kt)
                    dkt = torch.einsum("bthk,bthc->btkc", gd, tiles.q_i)
                    Bc, C, K, c = dkt.shape
                    dk.scatter_add_(1, where.reshape(Bc, C * K, 1).expand(-1, -1, c), dkt.reshape(Bc, C * K, c))
        return (dq.to(q_i.dtype), dk.to(keys_i.dtype), dw.to(w_i.dtype), None, None, None, None, None, None, None)


def blocked_indexer_attention_kl(
    q_i: torch.Tensor,
    keys_i: torch.Tensor,
    w_i: torch.Tensor,
    q: torch.Tensor,
    comp_kv: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    lo: torch.Tensor,
    hi: torch.Tensor,
    idx: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for the reference :func:`indexer_attention_kl`, streamed (see the module docstring)."""
    check_indexer_inputs(q_i, keys_i, w_i)
    return _StreamedIndexerKL.apply(q_i, keys_i, w_i, q.detach(), comp_kv.detach(), lse.detach(), scale, lo, hi, idx)


register("indexer_attention_kl", reference=indexer_attention_kl, blocked=blocked_indexer_attention_kl)
