"""Hybrid attention in plain PyTorch, query chunk by query chunk, with a recomputing backward (CPU fast path).

Same contract and math as the reference ``ops.sparse_attention.hybrid_attention`` (read its docstring): for
head h of query t with J_t = W_t ∪ C_t, one shared K=V head (v_j = k_j) and the sink logit z'_h,

    z_j = scale · q_{t,h}·k_j,   lse_{t,h} = log(Σ_{j∈J_t} e^{z_j} + e^{z'_h}),   o_{t,h} = Σ_j e^{z_j − lse} k_j

What differs is only how it is evaluated, so that a CPU training step costs what the sparse attention costs:

* Queries are cut into chunks of whole window blocks (block = n_win queries scoring the 2·n_win keys of its
  band, as in the reference). The compressed entries of a chunk are scored either
  - by **gathering** each query's K selected entries (CSA sparse: ``comp_idx``): cost ∝ K per query, not N —
    the reference (and HF's eager model) score all N = S/m entries and mask, i.e. O(S²/m);
  - or **densely over the chunk's visible span** [min lo, max hi) with a mask (HCA, CSA dense / indexer
    warm-up, and CSA sparse when K is at least half of that span, where the gather would not pay).
* bf16 inputs: the products run in bf16 with bf16 results (``BF16_PRODUCTS``; HF's eager attention does the
  same), the softmax statistics and every accumulation in fp32 — 5x the fp32 matmul rate on an AMX core.
* Only (inputs, o, lse) are saved. The backward recomputes the probabilities chunk by chunk from lse
  (FlashAttention-style), with Δ_{t,h} = Σ_d dO⊙O − ∂lse (lse is a differentiable output):

      p_j = e^{z_j − lse},  dp_j = dO·k_j,  ds_j = p_j (dp_j − Δ)
      dq  = scale Σ_j ds_j k_j
      dk_j = scale Σ_{t,h} ds_j q_{t,h} + Σ_{t,h} p_j dO_{t,h}        (k = v: key and value gradients added)
      dz'_h = −Σ_t e^{z'_h − lse_{t,h}} Δ_{t,h}

  so activation memory is O(S·H·D) per layer instead of the reference's saved [S, H, 2·n_win + N] scores.
  Peak scratch memory is bounded by ``CHUNK_ELEMENTS`` per large temporary.

Selected indices must be distinct per query (the top-k output is), exactly as for the Triton kernel.
Registered in ``ops.dispatch`` as the ``blocked`` backend of ``hybrid_attention``; ``auto`` uses it wherever
no Triton kernel applies (CPU). Correctness: ``tests/test_ops_blocked_attention.py`` (against the reference and
float64 gradcheck).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ops.blocked_indexer_select import visible
from ops.dispatch import chunk_rows, register
from ops.sparse_attention import _window_blocks, check_attention_inputs

__all__ = ["blocked_hybrid_attention", "blocked_compressed_attention_mass", "rows_t_rows", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 24  # elements of the largest per-chunk temporary (64 MiB in fp32)
# Gather the K selected entries of a query iff H·span > GATHER_COST·K: the dense span costs H·span·D
# multiply-adds per query at matmul speed; the gather moves K·D values per query several times (gather, two
# products forward, three backward, scatter-add) in per-query products with only H rows. Measured on one
# Sapphire Rapids core: tiny (H=4, D=32, K=8) gathers 16x faster at S=4096; small (H=8, D=512, K=512) is 2-5x
# SLOWER gathered at S=8192 (span 2048) — 64 puts the switch between the two.
GATHER_COST = 64
# bf16 inputs: the products (q·k, p·v and the backward's) run in bf16 with fp32 accumulation inside the matmul
# and bf16 results (as HF's eager attention does; 5x the fp32 matmul rate on an AMX core), the softmax
# statistics (max, lse, Δ) and all accumulations across chunks stay fp32. False: every product in fp32.
BF16_PRODUCTS = True


class _Plan:
    """What forward and backward share: shapes, window blocks, chunking, and the padded fp32/fp64 inputs."""

    def __init__(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        sinks: torch.Tensor,
        comp_kv: Optional[torch.Tensor],
        window: int,
        seg_start: Optional[torch.Tensor],
        comp_lo: Optional[torch.Tensor],
        comp_hi: Optional[torch.Tensor],
        comp_idx: Optional[torch.Tensor],
    ):
        B, S, H, D = q.shape
        self.B, self.S, self.H, self.D = B, S, H, D
        self.cdt = torch.promote_types(q.dtype, torch.float32)
        # dtype of the matmul operands (``BF16_PRODUCTS``); results are cast to cdt right after each product
        self.mdt = q.dtype if (q.dtype == torch.bfloat16 and BF16_PRODUCTS) else self.cdt
        self.Q, self.nb, self.ok = _window_blocks(S, window, seg_start, q.device, B)  # ok [B|1, nb, Q, 2Q]
        self.Sp = Sp = self.nb * self.Q
        self.has_comp = comp_kv is not None and comp_kv.shape[1] > 0
        K = comp_idx.shape[-1] if (self.has_comp and comp_idx is not None) else 0
        per_query = H * (2 * self.Q + 1) + (H + D) * (K if K else (comp_kv.shape[1] if self.has_comp else 0))
        rows = max(self.Q, CHUNK_ELEMENTS // max(1, B * per_query))
        self.blocks_per_chunk = max(1, rows // self.Q)
        self.q_pad = _pad_rows(q.to(self.mdt), Sp, 0.0)
        kv_pad = F.pad(kv.to(self.mdt), (0, 0, self.Q, Sp - S))  # [B, Q + Sp, D]
        self.kv_bands = kv_pad.unfold(1, 2 * self.Q, self.Q).transpose(-1, -2)  # [B, nb, 2Q, D] (view)
        self.sinks = sinks.to(self.cdt)
        self.ck = comp_kv.to(self.mdt) if self.has_comp else None
        self.lo, self.hi = _pad_rows(comp_lo, Sp, 0), _pad_rows(comp_hi, Sp, 0)
        self.idx = _pad_rows(comp_idx, Sp, -1)

    def chunks(self):
        for i0 in range(0, self.nb, self.blocks_per_chunk):
            yield i0, min(self.nb, i0 + self.blocks_per_chunk)

    def compressed(self, i0: int, i1: int) -> Optional["_Compressed"]:
        """The compressed entries the queries of blocks [i0, i1) score (None on sliding-only layers)."""
        if not self.has_comp:
            return None
        r0, r1 = i0 * self.Q, i1 * self.Q
        rows = [None if t is None else t[:, r0:r1] for t in (self.lo, self.hi, self.idx)]
        return _Compressed(self.ck, *rows, self.H, self.cdt)

    def scores(
        self, i0: int, i1: int, scale: float, comp: Optional["_Compressed"]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits of the queries of blocks [i0, i1): (window band [B, C, H, 2Q], compressed [B, C, H, K|span] or
        None), -inf where not attended. Kept as separate tensors (the sink logit is ``self.sinks``): one
        concatenation would copy every logit once more, and slicing it again for the two products twice more."""
        B, H, D, Q = self.B, self.H, self.D, self.Q
        nbc = i1 - i0
        q_c = self.q_pad[:, i0 * Q : i1 * Q]
        z_win = torch.einsum("biqhd,bikd->biqhk", q_c.view(B, nbc, Q, H, D), self.kv_bands[:, i0:i1])
        z_win = _scaled(z_win, self.cdt, scale)
        z_win = z_win.masked_fill_(~self.ok[:, i0:i1, :, None, :], float("-inf")).view(B, nbc * Q, H, 2 * Q)
        return z_win, (comp.scores(q_c, scale) if comp is not None else None)

    def probabilities(
        self, z_win: torch.Tensor, z_comp: Optional[torch.Tensor], lse: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Softmax-with-sink over the parts, IN PLACE on the logits: (p_win, p_comp, p_sink [B, C, H], lse).

        ``lse`` None (forward): mx = max(z_win, z_comp, z'), e = e^{z − mx}, s = Σ e + e^{z' − mx},
        lse = mx + log s, p = e / s (finite: the sink logit is in every row). Given ``lse`` (backward):
        p = e^{z − lse}, as the forward's up to rounding."""
        sink = self.sinks.view(1, 1, -1)
        parts = [z for z in (z_win, z_comp) if z is not None and z.shape[-1] > 0]
        if lse is None:
            mx = sink.expand(z_win.shape[:3]).clone()
            for z in parts:
                mx = torch.maximum(mx, z.amax(-1))
            tot = torch.exp(sink - mx)
            for z in parts:
                tot += z.sub_(mx[..., None]).exp_().sum(-1)
            inv = tot.reciprocal()
            for z in parts:
                z.mul_(inv[..., None])
            lse = mx + torch.log(tot)
            p_sink = inv * torch.exp(sink - mx)
        else:
            for z in parts:
                z.sub_(lse[..., None]).exp_()
            p_sink = torch.exp(sink - lse)
        return z_win, z_comp, p_sink, lse


def _scaled(z: torch.Tensor, cdt: torch.dtype, scale: float) -> torch.Tensor:
    """A fresh product in the compute dtype, times ``scale`` (in place when no cast was needed)."""
    return z.to(cdt) * scale if z.dtype != cdt else z.mul_(scale)


def _pad_rows(x: Optional[torch.Tensor], rows: int, value: float) -> Optional[torch.Tensor]:
    """Pad dim 1 of x ([B, S, ...]) to ``rows`` with ``value``."""
    if x is None or x.shape[1] == rows:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, rows - x.shape[1]]
    return F.pad(x, pad, value=value)


class _Compressed:
    """The compressed entries one chunk of queries scores: gathered top-k rows or a dense span with a mask."""

    def __init__(
        self,
        ck: torch.Tensor,
        lo: Optional[torch.Tensor],
        hi: Optional[torch.Tensor],
        idx: Optional[torch.Tensor],
        heads: int,
        cdt: torch.dtype,
    ):
        B, N, D = ck.shape
        self.cdt = cdt  # results' dtype (ck, the operands, may be bf16: see BF16_PRODUCTS)
        self.gather = False
        self.mask: Optional[torch.Tensor] = None  # [B, C, span] (selected entries of a span), else edges only
        self.edges: list[tuple[int, int, torch.Tensor]] = []
        if idx is not None:
            valid = idx >= 0
            if not bool(valid.any()):
                self.span = (0, 0)
                self.mask = valid[..., :0]
                self.keys = ck[:, :0]
                return
            mn = int(torch.where(valid, idx, N).min())
            mx = int(torch.where(valid, idx, -1).max()) + 1
            if heads * (mx - mn) > GATHER_COST * idx.shape[-1]:  # sparse enough: gather K entries per query
                self.gather = True
                self.valid = valid
                self.safe = idx.clamp(min=0)  # [B, C, K]
                C, K = idx.shape[1], idx.shape[2]
                self.keys = torch.gather(ck, 1, self.safe.reshape(B, C * K, 1).expand(-1, -1, D)).view(B, C, K, D)
                return
            self.span = (mn, mx)
            span = mx - mn
            sel = torch.where(valid, idx - mn, torch.full_like(idx, span))
            mask = torch.zeros(*idx.shape[:2], span + 1, dtype=torch.bool, device=idx.device)
            self.mask = mask.scatter_(-1, sel, True)[..., :span]
        else:
            mn = int(lo.min())
            mx = max(mn, int(hi.max()))
            self.span = (mn, mx)
            # entries [lo.max(), hi.min()) are visible to every query of the chunk: only the ragged edges
            # around them get a mask (for one document: the last few entries of the span)
            a = min(max(int(lo.max()), mn), mx)
            b = max(min(int(hi.min()), mx), a)
            for e0, e1 in ((mn, a), (b, mx)):
                if e1 > e0:
                    self.edges.append((e0 - mn, e1 - mn, visible(lo, hi, e0, e1)))
        self.keys = ck[:, self.span[0] : self.span[1]]  # [B, span, D]

    def scores(self, qc: torch.Tensor, scale: float) -> torch.Tensor:
        """z_c [B, C, H, K|span] with -inf where the entry is not attended."""
        if self.gather:
            z = _scaled(torch.einsum("bqhd,bqkd->bqhk", qc, self.keys), self.cdt, scale)
            return z.masked_fill_(~self.valid[:, :, None, :], float("-inf"))
        z = _scaled(torch.einsum("bqhd,bnd->bqhn", qc, self.keys), self.cdt, scale)
        if self.mask is not None:
            return z.masked_fill_(~self.mask[:, :, None, :], float("-inf"))
        for e0, e1, m in self.edges:
            z[..., e0:e1].masked_fill_(~m[:, :, None, :], float("-inf"))
        return z

    def apply(self, p: torch.Tensor) -> torch.Tensor:
        """Σ_j p_j k_j over these entries: [B, C, H, D]."""
        p = p.to(self.keys.dtype)
        if self.gather:
            return torch.einsum("bqhk,bqkd->bqhd", p, self.keys).to(self.cdt)
        return torch.einsum("bqhn,bnd->bqhd", p, self.keys).to(self.cdt)

    def dp(self, go: torch.Tensor) -> torch.Tensor:
        """dp_j = dO·k_j for these entries: [B, C, H, K|span] (``go`` in the operand dtype)."""
        if self.gather:
            return torch.einsum("bqhd,bqkd->bqhk", go, self.keys).to(self.cdt)
        return torch.einsum("bqhd,bnd->bqhn", go, self.keys).to(self.cdt)

    def backward(
        self, ds: torch.Tensor, p: torch.Tensor, qc: torch.Tensor, go: torch.Tensor, scale: float, dck: torch.Tensor
    ) -> torch.Tensor:
        """Adds the entries' gradient into ``dck`` [B, N, D] (cdt); returns this part's dq [B, C, H, D] (cdt).
        ``qc`` and ``go`` are in the operand dtype, ``ds`` and ``p`` in cdt."""
        mdt, cdt = self.keys.dtype, self.cdt
        ds_m, dss_m, p_m = ds.to(mdt), (ds * scale).to(mdt), p.to(mdt)
        if self.gather:
            dq = torch.einsum("bqhk,bqkd->bqhd", ds_m, self.keys).to(cdt) * scale
            dkeys = torch.einsum("bqhk,bqhd->bqkd", dss_m, qc).to(cdt) + torch.einsum("bqhk,bqhd->bqkd", p_m, go).to(
                cdt
            )
            B, C, K, D = dkeys.shape
            dck.scatter_add_(1, self.safe.reshape(B, C * K, 1).expand(-1, -1, D), dkeys.reshape(B, C * K, D))
            return dq
        dq = torch.einsum("bqhn,bnd->bqhd", ds_m, self.keys).to(cdt) * scale
        lo, hi = self.span
        if hi > lo:
            dck[:, lo:hi] += rows_t_rows(dss_m, qc).to(cdt) + rows_t_rows(p_m, go).to(cdt)
        return dq


def rows_t_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_{q,h} a[..., q, h, n] b[..., q, h, d] -> [..., n, d] as ONE batched aᵀb over the merged (q, h) rows:
    a transposed view into ``bmm`` (einsum would first copy a into [n, q, h] order, a full extra pass)."""
    lead, n, d = a.shape[:-3], a.shape[-1], b.shape[-1]
    rows = a.shape[-3] * a.shape[-2]
    out = torch.bmm(a.reshape(-1, rows, n).transpose(1, 2), b.reshape(-1, rows, d))
    return out.view(*lead, n, d)


class _BlockedHybridAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, sinks, comp_kv, scale, window, seg_start, comp_lo, comp_hi, comp_idx):
        plan = _Plan(q, kv, sinks, comp_kv, window, seg_start, comp_lo, comp_hi, comp_idx)
        B, S, H, D, Q = plan.B, plan.S, plan.H, plan.D, plan.Q
        o = torch.empty(B, plan.Sp, H, D, dtype=plan.cdt, device=q.device)
        lse = torch.empty(B, plan.Sp, H, dtype=plan.cdt, device=q.device)
        for i0, i1 in plan.chunks():
            r0, r1, nbc = i0 * Q, i1 * Q, i1 - i0
            comp = plan.compressed(i0, i1)
            p_win, p_comp, _, l_c = plan.probabilities(*plan.scores(i0, i1, scale, comp))
            o_c = (
                torch.einsum("biqhk,bikd->biqhd", p_win.view(B, nbc, Q, H, 2 * Q).to(plan.mdt), plan.kv_bands[:, i0:i1])
                .to(plan.cdt)
                .reshape(B, nbc * Q, H, D)
            )
            if comp is not None:
                o_c = o_c + comp.apply(p_comp)
            o[:, r0:r1] = o_c
            lse[:, r0:r1] = l_c
        o_out = o[:, :S].to(q.dtype)
        lse_out = lse[:, :S].contiguous()
        ctx.save_for_backward(q, kv, sinks, comp_kv, seg_start, comp_lo, comp_hi, comp_idx, o_out, lse_out)
        ctx.scale, ctx.window = scale, window
        return o_out, lse_out

    @staticmethod
    def backward(ctx, g_o, g_lse):
        q, kv, sinks, comp_kv, seg_start, comp_lo, comp_hi, comp_idx, o, lse = ctx.saved_tensors
        scale = ctx.scale
        plan = _Plan(q, kv, sinks, comp_kv, ctx.window, seg_start, comp_lo, comp_hi, comp_idx)
        B, S, H, D, Q, Sp, cdt, mdt = plan.B, plan.S, plan.H, plan.D, plan.Q, plan.Sp, plan.cdt, plan.mdt
        g_o = g_o.to(cdt)
        go = _pad_rows(g_o.to(mdt), Sp, 0.0)  # operand of the products
        delta = _pad_rows((g_o * o.to(cdt)).sum(-1) - g_lse.to(cdt), Sp, 0.0)  # [B, Sp, H]
        lse_p = _pad_rows(lse.to(cdt), Sp, 0.0)
        dq = torch.empty(B, Sp, H, D, dtype=cdt, device=q.device)
        dkv = torch.zeros(B, plan.nb + 1, Q, D, dtype=cdt, device=q.device)  # kv_pad in blocks of Q rows
        dck = torch.zeros(plan.ck.shape, dtype=cdt, device=q.device) if plan.has_comp else None
        dsink = torch.zeros(H, dtype=cdt, device=q.device)
        for i0, i1 in plan.chunks():
            r0, r1, nbc = i0 * Q, i1 * Q, i1 - i0
            comp = plan.compressed(i0, i1)
            kv_blk = plan.kv_bands[:, i0:i1]
            p_win, p_c, p_sink, _ = plan.probabilities(*plan.scores(i0, i1, scale, comp), lse_p[:, r0:r1])
            dl = delta[:, r0:r1]
            go_c, q_c = go[:, r0:r1], plan.q_pad[:, r0:r1]
            dsink -= (p_sink * dl).sum(dim=(0, 1))
            # window band
            go_blk = go_c.view(B, nbc, Q, H, D)
            p_win = p_win.view(B, nbc, Q, H, 2 * Q)
            ds_win = p_win * (torch.einsum("biqhd,bikd->biqhk", go_blk, kv_blk).to(cdt) - dl.view(B, nbc, Q, H, 1))
            dq_c = torch.einsum("biqhk,bikd->biqhd", ds_win.to(mdt), kv_blk).to(cdt).reshape(B, nbc * Q, H, D) * scale
            dband = rows_t_rows((ds_win * scale).to(mdt), q_c.view(B, nbc, Q, H, D)).to(cdt) + rows_t_rows(
                p_win.to(mdt), go_blk
            ).to(cdt)  # [B, nbc, 2Q, D]
            dkv[:, i0:i1] += dband[:, :, :Q]
            dkv[:, i0 + 1 : i1 + 1] += dband[:, :, Q:]
            if comp is not None:
                ds_c = p_c * (comp.dp(go_c) - dl[..., None])
                dq_c = dq_c + comp.backward(ds_c, p_c, q_c, go_c, scale, dck)
            dq[:, r0:r1] = dq_c
        d_kv = dkv.view(B, (plan.nb + 1) * Q, D)[:, Q : Q + S]
        return (
            dq[:, :S].to(q.dtype),
            d_kv.to(kv.dtype),
            dsink.to(sinks.dtype),
            None if dck is None else dck.to(comp_kv.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def blocked_hybrid_attention(
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
    """Drop-in for ``ops.sparse_attention.hybrid_attention`` (same arguments, shapes, dtypes and results up to
    floating-point summation order); see the module docstring for how it is evaluated."""
    check_attention_inputs(q, kv, sinks, comp_kv, comp_lo, comp_hi, comp_idx)
    return _BlockedHybridAttention.apply(q, kv, sinks, comp_kv, scale, window, seg_start, comp_lo, comp_hi, comp_idx)


# [B, C, H, span] temporaries of the mass (CPU 16 MiB fp32: no fresh mmap per chunk)
MASS_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}


@torch.no_grad()
def blocked_compressed_attention_mass(
    q: torch.Tensor, comp_kv: torch.Tensor, lse: torch.Tensor, scale: float, entry_mask: torch.Tensor
) -> torch.Tensor:
    """Drop-in for ``ops.sparse_attention.compressed_attention_mass`` (the indexer's KL target
    ``Σ_h e^{scale·q_{t,h}·c_n − lse_{t,h}}`` on the entries of ``entry_mask``, 0 elsewhere).

    Evaluated query chunk by query chunk, each scoring only the span of entries its queries attend
    (causality halves the products on average), with the head sum taken before the mask (the mask does not
    depend on h). Differs from the reference only by summation order — and where the reference would give
    ``inf·0 = nan`` for an unattended entry whose logit exceeds lse by ~88, this gives 0.
    """
    B, S, H, D = q.shape
    N = comp_kv.shape[1]
    cdt = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(B, S, N, dtype=cdt, device=q.device)
    if N == 0 or S == 0:
        return out
    ck = comp_kv.to(cdt)
    any_query = entry_mask.any(dim=0)  # [S, N]
    rows = chunk_rows(MASS_CHUNK_ELEMENTS, B * H * N, q.device)
    for t0 in range(0, S, rows):
        t1 = min(S, t0 + rows)
        used = any_query[t0:t1].any(dim=0).nonzero()
        if used.numel() == 0:
            continue
        n0, n1 = int(used[0]), int(used[-1]) + 1
        z = torch.einsum("bthd,bnd->bthn", q[:, t0:t1].to(cdt), ck[:, n0:n1]).mul_(scale)
        p = z.sub_(lse[:, t0:t1, :, None].to(cdt)).exp_().sum(dim=2)  # [B, C, span]
        m = entry_mask[:, t0:t1, n0:n1]
        out[:, t0:t1, n0:n1] = torch.where(m, p, torch.zeros((), dtype=cdt, device=q.device))
    return out


register("hybrid_attention", blocked=blocked_hybrid_attention)
register("compressed_attention_mass", blocked=blocked_compressed_attention_mass)
