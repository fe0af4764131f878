"""Lightning-indexer top-k streamed in query chunks and key blocks with a block-wise top-k merge (CPU path).

Same contract as the reference ``indexer_select`` = ``indexer_topk(indexer_scores(q, keys, w), lo, hi, k)``
(``ops.indexer``): for query t the kk = min(k, N) highest scores

    I_{t,s} = c^{-1/2} Σ_h (w_{t,h} H^{-1/2}) ReLU(q_{t,h} · k_s)

among the visible entries lo[t] <= s < hi[t], in descending score order, equal scores by the LOWER entry index
first, -1 in the slots beyond the number of visible entries.

The reference materialises I as [B, S, N] (N = S/m) and sorts every row. Here the queries are cut into chunks
of C rows and each chunk's visible span [min lo, max hi) into key blocks of ``KEY_BLOCK`` entries, so the
largest temporary is the [B, C, H, n] product of one (chunk, block) tile, O(S) memory in all. Per tile:

1. the tile's exact top-kb (kb = min(kk, n)) under the tie rule: ``torch.topk`` of kb + 1 values; the
   selected SET is exact unless the (kb+1)-th value equals the kb-th (a tie straddles the boundary), and only
   those rows are re-selected by a stable sort (which keeps the lower index first);
2. merge with the running top-kk of the chunk: of the 2·kk candidates (running and the tile's) the first kk
   in the total order (score desc, index asc) are kept — for float32 scores one ``torch.topk`` over distinct
   int64 keys (orderable score bits, then the complemented index), else two stable sorts — so the result does
   not depend on the tiling.

Invisible entries are -inf and come out as -1. No gradient (selection is not differentiable).
Registered in ``ops.dispatch`` as the ``blocked`` backend of ``indexer_select``; correctness:
``tests/test_long_context_ops.py`` (equal to the reference, ties included).
"""

from __future__ import annotations

from typing import Iterator

import torch

from ops.dispatch import chunk_rows, register
from ops.indexer import check_indexer_inputs

__all__ = ["blocked_indexer_select", "query_chunks", "key_blocks", "TILE_ELEMENTS", "KEY_BLOCK"]

# elements of the largest per-tile temporary [B, C, H, n] (CPU 4 MiB in fp32: the tile stays in cache — its
# products have an inner dim of only c_I, so they are bound by writing the tile, measured ~10% faster than 16 MiB)
TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 28}
# entries per key block (n): bounds the tile independently of N = S/m, so the chunk height C does not shrink
# as the sequence grows
KEY_BLOCK = {"cpu": 1024, "cuda": 16384}


def key_block(device: torch.device) -> int:
    return KEY_BLOCK["cuda" if device.type == "cuda" else "cpu"]


def query_chunks(S: int, per_row: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """[t0, t1) query chunks whose [C, per_row] tile fits ``TILE_ELEMENTS``."""
    rows = chunk_rows(TILE_ELEMENTS, per_row, device)
    for t0 in range(0, S, rows):
        yield t0, min(S, t0 + rows)


def key_blocks(lo: torch.Tensor, hi: torch.Tensor, block: int) -> Iterator[tuple[int, int]]:
    """[s0, s1) key blocks covering the visible span [min lo, max hi) of a chunk's queries (lo, hi [B, C])."""
    n0, n1 = int(lo.min()), int(hi.max())
    for s0 in range(n0, n1, block):
        yield s0, min(n1, s0 + block)


def tile_scores(q_c: torch.Tensor, k_blk: torch.Tensor, w_c: torch.Tensor, a: float) -> torch.Tensor:
    """I of one tile: q_c [B, C, H, c], k_blk [B, n, c], w_c [B, C, H] (already × H^{-1/2}) -> [B, C, n].
    Evaluated as in ``ops.blocked_indexer`` (ReLU of the products, head sum, then × a)."""
    d = torch.einsum("bthc,bnc->bthn", q_c, k_blk).relu_()
    return torch.einsum("bthn,bth->btn", d, w_c) * a


def visible(lo: torch.Tensor, hi: torch.Tensor, s0: int, s1: int) -> torch.Tensor:
    """bool [B, C, s1 - s0]: entry s0 + j visible to the chunk's query (the mask of one block only)."""
    n = torch.arange(s0, s1, device=lo.device)
    return (n >= lo[..., None]) & (n < hi[..., None])


def _order_keys(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Distinct int64 keys, larger = earlier in the order (score desc, index asc), for float32 ``vals``:
    ``key = (orderable_int32(score) << 32) | (2³² − 1 − index)`` (the Triton kernel's key)."""
    bits = (vals + 0.0).view(torch.int32)  # + 0.0: -0.0 -> +0.0 (equal scores, equal keys)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    return ordered * (1 << 32) + ((1 << 32) - 1 - idx.clamp(min=0))


def _ordered(vals: torch.Tensor, idx: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first kk of (vals, idx) in the order (score desc, index asc); -inf entries last.

    float32 scores: ``torch.topk`` of the distinct keys of :func:`_order_keys` (exact and deterministic);
    other dtypes: a sort by index, then a stable sort by descending score."""
    if vals.dtype == torch.float32:
        pos = torch.topk(_order_keys(vals, idx), min(kk, vals.shape[-1]), dim=-1, sorted=True).indices
        return vals.gather(-1, pos), idx.gather(-1, pos)
    by_idx = torch.sort(
        torch.where(torch.isneginf(vals), torch.iinfo(torch.int64).max, idx), dim=-1, stable=True
    ).indices
    vals, idx = vals.gather(-1, by_idx), idx.gather(-1, by_idx)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[..., :kk]
    return vals.gather(-1, order), idx.gather(-1, order)


def _tile_topk(sc: torch.Tensor, s0: int, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-kb SET of a tile sc [B, C, n] (-inf = invisible) under the tie rule: (values, entry indices).

    ``torch.topk`` of kb + 1: a tie straddles the boundary iff the (kb+1)-th value equals the kb-th (finite);
    only those rows are re-selected, by ``torch.topk`` of their distinct order keys (float32; a stable sort
    otherwise). Ties are common, not a corner case: with few index heads, every entry whose ReLU products are
    all zero scores exactly 0 (a quarter of the entries for 2 heads), so a full sort of those rows was most of
    the op's time."""
    n = sc.shape[-1]
    vals, pos = torch.topk(sc, min(kb + 1, n), dim=-1)
    if vals.shape[-1] > kb:
        amb = (vals[..., kb] == vals[..., kb - 1]) & torch.isfinite(vals[..., kb - 1])
        vals, pos = vals[..., :kb], pos[..., :kb]
        if bool(amb.any()):
            rows = amb.nonzero(as_tuple=True)
            sc_rows = sc[rows]
            if sc_rows.dtype == torch.float32:
                entry = torch.arange(n, device=sc.device).expand_as(sc_rows)
                pos_rows = torch.topk(_order_keys(sc_rows, entry), kb, dim=-1, sorted=True).indices
            else:
                pos_rows = torch.sort(sc_rows, dim=-1, descending=True, stable=True).indices[..., :kb]
            pos[rows] = pos_rows
            vals[rows] = sc_rows.gather(-1, pos_rows)
    return vals, pos + s0


@torch.no_grad()
def blocked_indexer_select(
    q: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    visible_lo: torch.Tensor,
    visible_hi: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Drop-in for the reference ``indexer_select`` (q [B,S,H,c], keys [B,N,c], weights [B,S,H], lo/hi [B,S]
    -> int64 [B, S, min(k, N)]); see the module docstring. Equal to the reference whenever the scores of the
    two agree bit for bit (same evaluation order as ``ops.blocked_indexer``)."""
    check_indexer_inputs(q, keys, weights)
    B, S, H, c = q.shape
    N = keys.shape[1]
    kk = min(k, N)
    out = torch.full((B, S, kk), -1, dtype=torch.long, device=q.device)
    if kk <= 0 or S == 0:
        return out
    cdt = torch.promote_types(q.dtype, torch.float32)
    a = c**-0.5
    kf = keys.to(cdt)
    w = weights.to(cdt) * H**-0.5
    nb = key_block(q.device)
    for t0, t1 in query_chunks(S, B * H * min(N, nb), q.device):
        lo, hi = visible_lo[:, t0:t1], visible_hi[:, t0:t1]
        q_c, w_c = q[:, t0:t1].to(cdt), w[:, t0:t1]
        best_v = torch.full((B, t1 - t0, 0), float("-inf"), dtype=cdt, device=q.device)
        best_i = torch.full((B, t1 - t0, 0), -1, dtype=torch.long, device=q.device)
        all_lo, all_hi = int(lo.max()), int(hi.min())  # entries in [all_lo, all_hi) are visible to all
        for s0, s1 in key_blocks(lo, hi, nb):
            sc = tile_scores(q_c, kf[:, s0:s1], w_c, a)
            if s0 < all_lo or s1 > all_hi:
                sc = sc.masked_fill_(~visible(lo, hi, s0, s1), float("-inf"))
            v, i = _tile_topk(sc, s0, min(kk, s1 - s0))
            best_v, best_i = _ordered(torch.cat((best_v, v), -1), torch.cat((best_i, i), -1), kk)
        got = best_i.shape[-1]
        if got:
            out[:, t0:t1, :got] = torch.where(torch.isneginf(best_v), -1, best_i)
    return out


register("indexer_select", blocked=blocked_indexer_select)
