"""Streamed (O(S)-memory) indexer ops against their references, on small shapes with fresh seeds.

- ``indexer_select`` (ops/blocked_indexer_select.py): top-k streamed in query chunks and key blocks with a
  block-wise merge must return EXACTLY the reference indices (tie rule: lower index first). Inputs are small
  integers times powers of two, so every score is exact in both evaluations and ties (ReLU zeros, repeated
  values) are frequent; tiles are made tiny so that every query chunk spans several key blocks.
- ``indexer_attention_kl`` (ops/indexer_kl.py): loss, qualifying-row count and gradients equal the reference
  composition (scores, mask, mass, ``indexer_kl_loss``). float64: 1e-10 (only summation order differs; the
  streamed form KL = A/M − log M − B/M + L cancels terms of size O(log N), so 1e-10 leaves ~5 digits of margin
  over float64 rounding); float32: 2e-5 relative (the same cancellation at float32's 6e-8 epsilon).
"""

from __future__ import annotations

import pytest
import torch

from ops import blocked_indexer_select as bis
from ops import dispatch
from ops.blocked_indexer_select import blocked_indexer_select
from ops.compressor import compressed_layout, segment_starts
from ops.indexer import indexer_scores, indexer_topk
from ops.indexer_kl import blocked_indexer_attention_kl, indexer_attention_kl


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(bis, "TILE_ELEMENTS", {"cpu": 96, "cuda": 96})
    monkeypatch.setattr(bis, "KEY_BLOCK", {"cpu": 5, "cuda": 5})


def _layout(B: int, S: int, m: int, packed: bool, g: torch.Generator):
    if packed:
        cuts = torch.randint(1, 4, (B, S), generator=g).cumsum(1) // 9  # segments of ~18 tokens
        seg = segment_starts(cuts, B, S)
    else:
        seg = torch.zeros(B, S, dtype=torch.long)
    pos = torch.arange(S).expand(B, S) - seg
    return compressed_layout(seg, pos, m)


def _exact_inputs(B, S, N, H, c, g, dtype=torch.float32):
    """Small integers × 2^-2: products and sums are exact, ties frequent."""
    q = torch.randint(-2, 3, (B, S, H, c), generator=g).to(dtype) / 4
    k = torch.randint(-2, 3, (B, N, c), generator=g).to(dtype) / 4
    w = torch.randint(-2, 3, (B, S, H), generator=g).to(dtype)
    return q, k, w


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("packed", [False, True])
def test_select_equals_reference_with_ties(seed, packed, tiny_tiles):
    g = torch.Generator().manual_seed(seed * 1009 + int(torch.randint(0, 1000, (1,))))
    B, S, m, H, c = 2, 53, 2, 3, 4
    lay = _layout(B, S, m, packed, g)
    N = lay.num_slots
    q, k, w = _exact_inputs(B, S, N, H, c, g)
    for kk in (1, 3, 7, N + 2):
        want = indexer_topk(indexer_scores(q, k, w), lay.visible_lo, lay.visible_hi, kk)
        got = blocked_indexer_select(q, k, w, lay.visible_lo, lay.visible_hi, kk)
        assert torch.equal(got, want), (kk, (got != want).nonzero()[:5])
    scores = indexer_scores(q, k, w)
    assert (scores == 0).sum() > S  # the case this test exists for: many exact ties


def test_select_float64_random_and_dispatch(tiny_tiles):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    B, S, m = 1, 40, 4
    lay = _layout(B, S, m, False, g)
    q = torch.randn(B, S, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, lay.num_slots, 8, generator=g, dtype=torch.float64)
    w = torch.randn(B, S, 2, generator=g, dtype=torch.float64)
    want = indexer_topk(indexer_scores(q, k, w), lay.visible_lo, lay.visible_hi, 4)
    assert torch.equal(blocked_indexer_select(q, k, w, lay.visible_lo, lay.visible_hi, 4), want)
    with dispatch.backend("auto"):
        assert dispatch.get("indexer_select", q) is blocked_indexer_select
        assert dispatch.get("indexer_attention_kl", q) is blocked_indexer_attention_kl


def _kl_inputs(dtype, g, B=2, S=45, m=3, H_I=2, c_I=4, H=3, D=6, packed=False):
    lay = _layout(B, S, m, packed, g)
    N = lay.num_slots
    q_i = torch.randn(B, S, H_I, c_I, generator=g, dtype=dtype, requires_grad=True)
    k_i = torch.randn(B, N, c_I, generator=g, dtype=dtype, requires_grad=True)
    w_i = torch.randn(B, S, H_I, generator=g, dtype=dtype, requires_grad=True)
    q = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    ck = torch.randn(B, N, D, generator=g, dtype=dtype)
    # lse of a real softmax that includes these entries and a sink: mass per head <= 1
    z = torch.einsum("bshd,bnd->bshn", q, ck) * 0.4
    vis = lay.visible_mask()[:, :, None, :]
    lse = torch.logaddexp(torch.logsumexp(z.masked_fill(~vis, float("-inf")), -1), torch.zeros((), dtype=dtype))
    return lay, (q_i, k_i, w_i, q, ck, lse, 0.4)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_kl_equals_reference_with_gradients(dtype, tol, sparse, packed, tiny_tiles):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    lay, (q_i, k_i, w_i, q, ck, lse, scale) = _kl_inputs(dtype, g, packed=packed)
    idx = None
    if sparse:
        idx = blocked_indexer_select(q_i.detach(), k_i.detach(), w_i.detach(), lay.visible_lo, lay.visible_hi, 4)
    args = (q, ck, lse, scale, lay.visible_lo, lay.visible_hi, idx)
    ref, ref_rows = indexer_attention_kl(q_i, k_i, w_i, *args)
    gr = torch.autograd.grad(ref, (q_i, k_i, w_i))
    got, rows = blocked_indexer_attention_kl(q_i, k_i, w_i, *args)
    gg = torch.autograd.grad(got, (q_i, k_i, w_i))
    assert int(rows) == int(ref_rows) > 0
    assert abs(float(got) - float(ref)) <= tol * max(1.0, abs(float(ref)))
    for a, b in zip(gg, gr):
        assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))


def test_kl_float64_gradcheck(tiny_tiles):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    lay, (q_i, k_i, w_i, q, ck, lse, scale) = _kl_inputs(torch.float64, g, B=1, S=14, m=2)
    for idx in (
        None,
        blocked_indexer_select(q_i.detach(), k_i.detach(), w_i.detach(), lay.visible_lo, lay.visible_hi, 3),
    ):

        def f(a, b, c, idx=idx):
            return blocked_indexer_attention_kl(a, b, c, q, ck, lse, scale, lay.visible_lo, lay.visible_hi, idx)[0]

        assert torch.autograd.gradcheck(f, (q_i, k_i, w_i))


def test_kl_no_qualifying_row_is_zero_and_attached():
    q_i = torch.randn(1, 3, 2, 4, requires_grad=True)
    k_i = torch.randn(1, 1, 4)
    w_i = torch.randn(1, 3, 2)
    lo = hi = torch.zeros(1, 3, dtype=torch.long)  # nothing visible
    loss, rows = blocked_indexer_attention_kl(
        q_i, k_i, w_i, torch.randn(1, 3, 2, 4), torch.randn(1, 1, 4), torch.zeros(1, 3, 2), 0.5, lo, hi, None
    )
    assert float(loss) == 0.0 and int(rows) == 0
    loss.backward()
    assert torch.count_nonzero(q_i.grad) == 0
