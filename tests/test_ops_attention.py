"""Reference ops of the hybrid attention (ops.rope, ops.compressor, ops.indexer, ops.sparse_attention) and the
attention-mode / indexer-loss behaviour of V4Attention.

Every check compares against an independent brute-force formulation (Python loops over queries / entries)
or HF's own helpers, on fresh seeded random inputs; gradients are checked with float64 gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch

from ops import dispatch
from ops.compressor import compressed_layout, compressor_pool, document_positions, segment_starts
from ops.indexer import indexer_kl_loss, indexer_scores, indexer_topk
from ops.rope import apply_rope, rope_cos_sin, rope_inv_freq
from ops.sparse_attention import compressed_attention_mass, compressed_entry_mask, hybrid_attention

DOCS = torch.tensor([[0] * 7 + [1] * 2 + [2] * 9, [5] * 18])  # row 0: three documents, row 1: one


# ----------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------


def test_rope_inverse_and_relative_position() -> None:
    torch.manual_seed(0)
    inv = rope_inv_freq(8, 10000.0)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    pos = torch.randint(0, 500, (3, 5))
    cos, sin = rope_cos_sin(pos, inv, dtype=torch.float64)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., :4], x[..., :4])  # nope dims untouched
    torch.testing.assert_close(apply_rope(y, cos, sin, inverse=True), x, rtol=0, atol=1e-12)
    # <R_p a, R_s b> depends only on p - s: shift both positions by 37
    a, b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)

    def dot(p, s):
        cp, sp = rope_cos_sin(torch.tensor(p), inv, dtype=torch.float64)
        cs, ss = rope_cos_sin(torch.tensor(s), inv, dtype=torch.float64)
        return (apply_rope(a, cp, sp) * apply_rope(b, cs, ss)).sum()

    torch.testing.assert_close(dot(50, 20), dot(87, 57), rtol=0, atol=1e-10)  # float64 rounding only


def test_rope_matches_hf_interleaved_and_yarn() -> None:
    hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    from transformers import DeepseekV4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = DeepseekV4Config(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=32,
        partial_rotary_factor=0.25,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 16.0,
            "beta_fast": 32,
            "beta_slow": 1,
            "original_max_position_embeddings": 64,
        },
        compress_rope_theta=160000.0,
        max_position_embeddings=1024,
    )
    hf_inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, None, layer_type="compress")
    assert att == 1.0
    ours = torch.tensor(rope_inv_freq(8, 160000.0, 16.0, 64, 32.0, 1.0))
    # HF forms the frequencies in float32: 1 ulp of float32 relative
    torch.testing.assert_close(ours.float(), hf_inv, rtol=2e-7, atol=0)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 32)  # [B, H, S, D] as HF applies it
    pos = torch.arange(6).expand(2, 6)
    cos, sin = rope_cos_sin(pos, hf_inv.tolist())
    ref = hf.apply_rotary_pos_emb(x, cos, sin)
    got = apply_rope(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # same fp32 formula, op order differs


# ----------------------------------------------------------------------------------------------------
# compressed layout and pooling
# ----------------------------------------------------------------------------------------------------


def brute_layout(doc_row: list[int], rate: int):
    """Per document, blocks [j*m, (j+1)*m) of its local positions; entries listed by end token."""
    S = len(doc_row)
    starts, _ends, prev_ok, pos = [], [], [], []
    t = 0
    while t < S:
        e = t
        while e < S and doc_row[e] == doc_row[t]:
            e += 1
        for j in range((e - t) // rate):
            starts.append(t + j * rate)
            prev_ok.append(j > 0)
            pos.append(j * rate)
        t = e
    lo, hi = [], []  # None where the query sees no entry (then any empty range lo == hi is fine)
    for q in range(S):
        vis = [n for n, s in enumerate(starts) if s + rate - 1 <= q and doc_row[s] == doc_row[q]]
        lo.append(vis[0] if vis else None)
        hi.append(vis[-1] + 1 if vis else None)
    return starts, prev_ok, pos, lo, hi


@pytest.mark.parametrize("rate", [2, 4])
def test_compressed_layout_matches_per_document_blocks(rate: int) -> None:
    B, S = DOCS.shape
    seg = segment_starts(DOCS, B, S)
    pos = document_positions(seg)
    lay = compressed_layout(seg, pos, rate)
    for b in range(B):
        starts, prev_ok, epos, lo, hi = brute_layout(DOCS[b].tolist(), rate)
        n = len(starts)
        assert lay.block_start[b, :n].tolist() == starts and (lay.block_start[b, n:] == -1).all()
        assert lay.prev_valid[b, :n].tolist() == prev_ok and not lay.prev_valid[b, n:].any()
        assert lay.entry_position[b, :n].tolist() == epos
        for t in range(S):
            l, h = lay.visible_lo[b, t].item(), lay.visible_hi[b, t].item()
            if lo[t] is None:
                assert l == h
            else:
                assert (l, h) == (lo[t], hi[t]), (b, t)
    # one document: the plain spec, s < floor((t+1)/m)
    one = compressed_layout(torch.zeros(1, S, dtype=torch.long), torch.arange(S)[None], rate)
    assert one.visible_hi[0].tolist() == [(t + 1) // rate for t in range(S)]
    assert (one.visible_lo == 0).all()


def brute_pool(kv, gate, bias, start, prev_ok, overlap):
    m, C = bias.shape
    c = C // 2 if overlap else C
    if start < 0:
        return torch.zeros(c, dtype=kv.dtype)
    vals, logits = [], []
    if overlap and prev_ok:
        for j in range(m):
            vals.append(kv[start - m + j, :c])
            logits.append(gate[start - m + j, :c] + bias[j, :c])
    for j in range(m):
        sl = slice(c, 2 * c) if overlap else slice(0, c)
        vals.append(kv[start + j, sl])
        logits.append(gate[start + j, sl] + bias[j, sl])
    w = torch.softmax(torch.stack(logits), dim=0)
    return (w * torch.stack(vals)).sum(0)


@pytest.mark.parametrize("overlap", [False, True], ids=["hca", "csa"])
def test_compressor_pool_matches_brute_force(overlap: bool) -> None:
    torch.manual_seed(2)
    B, S = DOCS.shape
    m, c = 2, 3
    C = 2 * c if overlap else c
    kv, gate = torch.randn(B, S, C, dtype=torch.float64), torch.randn(B, S, C, dtype=torch.float64)
    bias = torch.randn(m, C, dtype=torch.float64)
    seg = segment_starts(DOCS, B, S)
    lay = compressed_layout(seg, document_positions(seg), m)
    out = compressor_pool(kv, gate, bias, lay.block_start, lay.prev_valid if overlap else None)
    for b in range(B):
        for n in range(lay.num_slots):
            ref = brute_pool(kv[b], gate[b], bias, lay.block_start[b, n].item(), lay.prev_valid[b, n].item(), overlap)
            torch.testing.assert_close(out[b, n], ref, rtol=1e-12, atol=1e-12)  # float64, same formula


@pytest.mark.parametrize("overlap", [False, True], ids=["hca", "csa"])
def test_compressor_pool_gradcheck(overlap: bool) -> None:
    torch.manual_seed(3)
    B, S = DOCS.shape
    m, c = 2, 2
    C = 2 * c if overlap else c
    seg = segment_starts(DOCS, B, S)
    lay = compressed_layout(seg, document_positions(seg), m)
    kv = torch.randn(B, S, C, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(B, S, C, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m, C, dtype=torch.float64, requires_grad=True)
    fn = lambda k, g, p: compressor_pool(k, g, p, lay.block_start, lay.prev_valid if overlap else None)  # noqa
    assert torch.autograd.gradcheck(fn, (kv, gate, bias))


# ----------------------------------------------------------------------------------------------------
# hybrid attention
# ----------------------------------------------------------------------------------------------------


def brute_attention(q, kv, sinks, scale, window, doc_row, comp_kv, entry_sets):
    """Python loop: for each query build the key list (window of its document ∪ its entry set)."""
    S, H, D = q.shape
    out = torch.zeros_like(q)
    lse = torch.zeros(S, H, dtype=q.dtype)
    for t in range(S):
        keys = [kv[s] for s in range(max(0, t - window + 1), t + 1) if doc_row[s] == doc_row[t]]
        keys += [comp_kv[n] for n in entry_sets[t]]
        K = torch.stack(keys)
        for h in range(H):
            z = torch.cat([K @ q[t, h] * scale, sinks[h : h + 1]])
            lse[t, h] = torch.logsumexp(z, 0)
            p = torch.softmax(z, 0)[:-1]
            out[t, h] = p @ K
    return out, lse


def _attention_case(seed: int, sparse: bool):
    torch.manual_seed(seed)
    B, S = DOCS.shape
    H, D, m, W = 2, 4, 2, 3
    seg = segment_starts(DOCS, B, S)
    lay = compressed_layout(seg, document_positions(seg), m)
    N = lay.num_slots
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    kv = torch.randn(B, S, D, dtype=torch.float64)
    comp = torch.randn(B, N, D, dtype=torch.float64)
    sinks = torch.randn(H, dtype=torch.float64)
    idx = None
    if sparse:  # top-2 of random scores among each query's visible entries, padded with -1
        scores = torch.randn(B, S, N, dtype=torch.float64)
        idx = indexer_topk(scores, lay.visible_lo, lay.visible_hi, 2)
    return q, kv, sinks, comp, seg, lay, idx, W


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-range", "sparse-index"])
def test_hybrid_attention_matches_brute_force(sparse: bool) -> None:
    q, kv, sinks, comp, seg, lay, idx, W = _attention_case(4, sparse)
    scale = 0.5
    o, lse = hybrid_attention(q, kv, sinks, scale, W, seg, comp, lay.visible_lo, lay.visible_hi, idx)
    mask = compressed_entry_mask(comp.shape[1], lay.visible_lo, lay.visible_hi, idx)
    for b in range(q.shape[0]):
        sets = [mask[b, t].nonzero().flatten().tolist() for t in range(q.shape[1])]
        ro, rl = brute_attention(q[b], kv[b], sinks, scale, W, DOCS[b].tolist(), comp[b], sets)
        torch.testing.assert_close(o[b], ro, rtol=1e-12, atol=1e-12)  # float64; same math
        torch.testing.assert_close(lse[b], rl, rtol=1e-12, atol=1e-12)
    # the target mass of the indexer loss equals the brute-force probabilities summed over heads
    mass = compressed_attention_mass(q, comp, lse, scale, mask)
    z = torch.einsum("bshd,bnd->bshn", q, comp) * scale
    ref = (torch.exp(z - lse[..., None]) * mask[:, :, None]).sum(2)
    torch.testing.assert_close(mass, ref, rtol=1e-12, atol=1e-12)


def test_hybrid_attention_sliding_only_and_window_larger_than_sequence() -> None:
    torch.manual_seed(5)
    q, kv = torch.randn(1, 5, 2, 4, dtype=torch.float64), torch.randn(1, 5, 4, dtype=torch.float64)
    sinks = torch.randn(2, dtype=torch.float64)
    o, _ = hybrid_attention(q, kv, sinks, 0.5, 64, None)
    ro, _ = brute_attention(q[0], kv[0], sinks, 0.5, 64, [0] * 5, None, [[] for _ in range(5)])
    torch.testing.assert_close(o[0], ro, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-range", "sparse-index"])
def test_hybrid_attention_gradcheck(sparse: bool) -> None:
    q, kv, sinks, comp, seg, lay, idx, W = _attention_case(6, sparse)
    args = [t.requires_grad_() for t in (q, kv, sinks, comp)]

    def fn(q_, kv_, sinks_, comp_):
        o, lse = hybrid_attention(q_, kv_, sinks_, 0.5, W, seg, comp_, lay.visible_lo, lay.visible_hi, idx)
        return o, lse

    assert torch.autograd.gradcheck(fn, args)


# ----------------------------------------------------------------------------------------------------
# indexer
# ----------------------------------------------------------------------------------------------------


def test_indexer_scores_formula() -> None:
    torch.manual_seed(7)
    B, S, H, c, N = 2, 5, 3, 8, 4
    q, keys, w = torch.randn(B, S, H, c), torch.randn(B, N, c), torch.randn(B, S, H)
    got = indexer_scores(q, keys, w)
    ref = torch.zeros(B, S, N)
    for b in range(B):
        for t in range(S):
            for s in range(N):
                ref[b, t, s] = sum(
                    w[b, t, h] / math.sqrt(H) * torch.relu(q[b, t, h] @ keys[b, s]) / math.sqrt(c) for h in range(H)
                )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # fp32, different summation order


def test_indexer_topk_breaks_ties_by_lower_index() -> None:
    torch.manual_seed(8)
    B, S, N, k = 2, 30, 12, 4
    scores = torch.relu(torch.randn(B, S, N)).round()  # many exact ties (0, 1, 2)
    lo = torch.randint(0, 4, (B, S))
    hi = torch.minimum(lo + torch.randint(0, 9, (B, S)), torch.tensor(N))
    got = indexer_topk(scores, lo, hi, k)
    for b in range(B):
        for t in range(S):
            vis = list(range(lo[b, t].item(), hi[b, t].item()))
            want = sorted(vis, key=lambda s: (-scores[b, t, s].item(), s))[:k]
            assert got[b, t].tolist() == want + [-1] * (k - len(want)), (b, t)


def test_indexer_kl_loss_matches_direct_formula() -> None:
    torch.manual_seed(9)
    B, S, N = 2, 6, 5
    scores = torch.randn(B, S, N, dtype=torch.float64, requires_grad=True)
    mass = torch.rand(B, S, N, dtype=torch.float64)
    mask = torch.rand(B, S, N) < 0.6
    mask[0, 0] = False  # a query with an empty set
    loss = indexer_kl_loss(scores, mass, mask)
    terms = []
    for b in range(B):
        for t in range(S):
            sel = mask[b, t].nonzero().flatten()
            if len(sel) == 0:
                continue
            p = mass[b, t, sel] / mass[b, t, sel].sum()
            logq = torch.log_softmax(scores[b, t, sel], 0)
            terms.append((p * (p.log() - logq)).sum())
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: indexer_kl_loss(s, mass, mask), (scores,))


def test_ops_are_registered() -> None:
    names = dispatch.registered()
    for op in (
        "compressor_pool",
        "indexer_topk",
        "indexer_scores",
        "hybrid_attention",
        "apply_rope",
        "indexer_kl_loss",
        "compressed_attention_mass",
    ):
        assert "reference" in names[op], op


# ----------------------------------------------------------------------------------------------------
# attention modes and the indexer loss (module level)
# ----------------------------------------------------------------------------------------------------


def _csa_module(mode: str):
    from pretrain.config import ModelConfig, YarnConfig
    from pretrain.model.attention import V4Attention

    cfg = ModelConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        head_dim=16,
        rope_head_dim=4,
        q_lora_rank=16,
        o_groups=2,
        o_lora_rank=8,
        sliding_window=4,
        compress_rate_csa=4,
        compress_rate_hca=8,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=2,
        layer_types=["csa"],
        yarn=YarnConfig(factor=4.0, original_max_position=32),
        attention_mode=mode,
    )
    torch.manual_seed(10)
    attn = V4Attention(cfg, "csa", 0)
    with torch.no_grad():  # non-trivial sinks / biases / indexer weights
        attn.sinks.normal_()
        attn.compressor.position_bias.normal_()
        attn.compressor.indexer.position_bias.normal_()
        for p in attn.compressor.indexer.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return attn


@pytest.mark.parametrize("mode", ["indexer_warmup", "sparse"])
def test_indexer_loss_trains_only_the_indexer(mode: str) -> None:
    attn = _csa_module(mode)
    x = torch.randn(2, 27, 32, requires_grad=True)
    doc = torch.tensor([[0] * 14 + [1] * 13, [0] * 27])
    out = attn(x, doc_ids=doc)
    loss = attn.indexer_loss
    assert loss is not None and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0  # indexer inputs are detached
    for name, p in attn.named_parameters():
        if name.startswith("compressor.indexer."):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    # and the LM output sends no gradient into the indexer
    attn.zero_grad(set_to_none=True)
    out.sum().backward()
    for name, p in attn.named_parameters():
        if name.startswith("compressor.indexer."):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert attn.q_b_proj.weight.grad is not None and torch.count_nonzero(attn.q_b_proj.weight.grad) > 0


def test_dense_mode_has_no_indexer_loss_and_sparse_with_full_topk_equals_dense() -> None:
    dense = _csa_module("dense")
    torch.manual_seed(12)
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        a = dense(x)
        assert dense.indexer_loss is None
        dense.attention_mode = "sparse"
        dense.index_topk = 64  # >= every visible set: all selected
        b = dense(x)
        assert dense.indexer_loss is not None
        dense.index_topk = 1  # a real selection changes the output
        c = dense(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same entries; fp32 summation order
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["dense", "indexer_warmup", "sparse"])
def test_sequences_shorter_than_the_compression_rate(mode: str) -> None:
    """S < m (no compressed entry at all) and S just above it: finite outputs and gradients, and with no
    entry the CSA/HCA layer equals sliding-window attention with the same weights (compressed set empty)."""
    attn = _csa_module(mode)
    for S in (1, 3, 5):
        x = torch.randn(2, S, 32, requires_grad=True)
        y = attn(x)
        loss = y.square().sum() + (attn.indexer_loss if attn.indexer_loss is not None else 0.0)
        loss.backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), S
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        with_compressor = attn(x)
        attn.compressor, saved = None, attn.compressor  # same layer without compressed entries
        window_only = attn(x)
        attn.compressor = saved
    assert torch.equal(with_compressor, window_only)  # identical computation when N = 0
