"""The blocked hybrid attention (ops/blocked_attention.py) against the reference (ops/sparse_attention.py).

Every mode the model uses — sliding-only, HCA-style visible range, CSA top-k through the gather path and
through the dense-span path — with packed documents (three documents in row 0), a sequence that is not a
multiple of the window, -1 slots, and several query chunks (``CHUNK_ELEMENTS`` lowered so one chunk holds one
window block). Outputs (o, lse) and the gradients of q, kv, sinks, comp_kv under random upstream gradients on
BOTH outputs. Tolerances: fp32 ≤ 1e-5 relative (same fp32 arithmetic, different summation order: observed
~1e-7); float64 ≤ 1e-12 absolute against the reference, plus a float64 gradcheck of the hand-written backward.
"""

from __future__ import annotations

import pytest
import torch

from ops import blocked_attention, dispatch
from ops.blocked_attention import blocked_hybrid_attention
from ops.compressor import compressed_layout, document_positions, segment_starts
from ops.indexer import indexer_topk
from ops.sparse_attention import hybrid_attention
from ops.triton.testing import attention_fwd_bwd, rel


def _case(
    seed: int,
    mode: str,
    dtype: torch.dtype,
    topk: int = 2,
    B: int = 2,
    S: int = 37,
    H: int = 3,
    D: int = 8,
    window: int = 5,
    rate: int = 2,
):
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.stack(
        [(torch.arange(S) >= 11).long() + (torch.arange(S) >= 20).long(), torch.zeros(S, dtype=torch.long)]
    )[:B]
    seg = segment_starts(doc_ids, B, S)
    args = [
        torch.randn(B, S, H, D, generator=g, dtype=dtype),
        torch.randn(B, S, D, generator=g, dtype=dtype),
        torch.randn(H, generator=g, dtype=dtype),
    ]
    kw: dict = dict(seg_start=seg)
    if mode != "window":
        lay = compressed_layout(seg, document_positions(seg), rate)
        kw["comp_kv"] = torch.randn(B, lay.num_slots, D, generator=g, dtype=dtype)
        kw["comp_lo"], kw["comp_hi"] = lay.visible_lo, lay.visible_hi
        if mode == "topk":
            scores = torch.randn(B, S, lay.num_slots, generator=g, dtype=dtype)
            kw["comp_idx"] = indexer_topk(scores, lay.visible_lo, lay.visible_hi, topk)
    return args, kw, window, D**-0.5


def _run(fn, args, kw, window, scale, seed):
    """[o, lse, dq, dkv, dsinks(, dcomp_kv)] under random upstream gradients on both outputs."""
    outs, grads = attention_fwd_bwd(fn, args, kw, window, scale, seed)
    return list(outs) + grads


@pytest.fixture
def gather_flags(monkeypatch):
    """Records, per chunk, whether the compressed entries were gathered (True) or scored over a span."""
    flags: list[bool] = []

    class Spy(blocked_attention._Compressed):
        def __init__(self, *a):
            super().__init__(*a)
            flags.append(self.gather)

    monkeypatch.setattr(blocked_attention, "_Compressed", Spy)
    return flags


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunk-per-block"])
@pytest.mark.parametrize(
    "mode,topk,path",
    [("window", 0, None), ("range", 0, False), ("topk", 2, True), ("topk", 2, False)],
    ids=["sliding", "range", "topk-gather", "topk-dense-span"],
)
def test_matches_reference_fp32(mode, topk, path, chunked, gather_flags, monkeypatch) -> None:
    if chunked:
        monkeypatch.setattr(blocked_attention, "CHUNK_ELEMENTS", 1)
    if path is not None:  # the cost model's switch, forced each way at these small shapes
        monkeypatch.setattr(blocked_attention, "GATHER_COST", 1 if path else 10**9)
    args, kw, window, scale = _case(11 + topk, mode, torch.float32, topk=topk)
    ref = _run(hybrid_attention, args, kw, window, scale, seed=3)
    got = _run(blocked_hybrid_attention, args, kw, window, scale, seed=3)
    names = ["o", "lse", "dq", "dkv", "dsinks", "dcomp_kv"]
    for name, r, x in zip(names, ref, got):
        assert x.dtype == r.dtype and x.shape == r.shape, name
        err = rel(x, r)
        assert err <= 1e-5, f"{mode}: {name} relative error {err:.2e}"
    if path is not None:  # (early chunks see few entries: a dense span there is the cheaper choice)
        assert gather_flags and any(gather_flags) == path, gather_flags
    if chunked:
        assert len(gather_flags) > 2 or mode == "window"


@pytest.mark.parametrize(
    "mode,cost", [("range", 64), ("topk", 1), ("topk", 10**9)], ids=["range", "topk-gather", "topk-dense-span"]
)
def test_float64_equals_reference_and_gradcheck(mode, cost, monkeypatch) -> None:
    monkeypatch.setattr(blocked_attention, "GATHER_COST", cost)
    args, kw, window, scale = _case(21, mode, torch.float64, topk=2, B=2, S=13, H=2, D=4, window=3)
    ref = _run(hybrid_attention, args, kw, window, scale, seed=5)
    got = _run(blocked_hybrid_attention, args, kw, window, scale, seed=5)
    for r, x in zip(ref, got):
        torch.testing.assert_close(x, r, rtol=0, atol=1e-12)
    leaves = [a.detach().clone().requires_grad_() for a in args + [kw["comp_kv"]]]
    fixed = {k: v for k, v in kw.items() if k != "comp_kv"}

    def fn(q, kv, sinks, comp_kv):
        return blocked_hybrid_attention(q, kv, sinks, scale, window, comp_kv=comp_kv, **fixed)

    assert torch.autograd.gradcheck(fn, leaves)


def test_window_longer_than_sequence_and_no_selected_entries() -> None:
    args, kw, _, scale = _case(31, "topk", torch.float64, topk=2, S=6, window=64)
    kw["comp_idx"] = torch.full_like(kw["comp_idx"], -1)  # nothing selected anywhere
    ref = _run(hybrid_attention, args, kw, 64, scale, seed=7)
    got = _run(blocked_hybrid_attention, args, kw, 64, scale, seed=7)
    for r, x in zip(ref, got):
        torch.testing.assert_close(x, r, rtol=0, atol=1e-12)


def test_auto_backend_uses_blocked_on_cpu_and_bad_shapes_are_named() -> None:
    q = torch.randn(1, 4, 2, 8)
    assert dispatch.get("hybrid_attention", q) is blocked_hybrid_attention
    with dispatch.backend("reference"):
        assert dispatch.get("hybrid_attention", q) is hybrid_attention
    with dispatch.backend("blocked"):  # ops without a blocked path fall back to their reference
        assert dispatch.get("indexer_topk", q).__module__ == "ops.indexer"
    with pytest.raises(ValueError, match="sinks must be"):
        blocked_hybrid_attention(q, torch.randn(1, 4, 8), torch.randn(3), 0.3, 2)


@pytest.mark.parametrize(
    "mode,cost",
    [("window", 64), ("range", 64), ("topk", 1), ("topk", 10**9)],
    ids=["sliding", "range", "topk-gather", "topk-dense-span"],
)
def test_bf16_products_match_reference(mode, cost, monkeypatch) -> None:
    """bf16 inputs: products in bf16 (``BF16_PRODUCTS``), softmax statistics in fp32, against the reference
    (fp32 inside from the same bf16 inputs, outputs rounded to bf16): ≤ 1e-2 relative, i.e. 2–3 bf16 ulps
    (2^-8 = 3.9e-3). Observed ≤ 5e-3 with bf16 products; ≤ 4e-3 with the switch off (fp32 inside: only the
    last-ulp flips of the final bf16 rounding remain)."""
    monkeypatch.setattr(blocked_attention, "GATHER_COST", cost)
    args, kw, window, scale = _case(41, mode, torch.bfloat16, topk=3, D=32)
    ref = _run(hybrid_attention, args, kw, window, scale, seed=9)
    for products in (True, False):
        monkeypatch.setattr(blocked_attention, "BF16_PRODUCTS", products)
        got = _run(blocked_hybrid_attention, args, kw, window, scale, seed=9)
        for r, x in zip(ref, got):
            assert x.dtype == r.dtype and rel(x.float(), r.float()) <= 1e-2
