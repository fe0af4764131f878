"""Triton lightning-indexer top-k (ops/triton/indexer.py) against ops.indexer.

* ``indexer_topk`` on given scores must return exactly the reference indices (same values in, and the
  tie rule is exact): scores are rounded to a coarse grid so that ties are frequent, plus exact 0 ties.
* ``indexer_select`` (fused scores): the kernel sums the head products in another order than the reference,
  so near-equal scores may swap; the check is that the selected set is an optimal top-k: the reference
  scores of the chosen entries, sorted, equal the reference top-k scores (fp32: 1e-5 relative), the −1
  slots agree exactly, and ≥ 95% of the indices agree position by position.
The index output is poisoned (−2³⁰) before each run. Several blocks of KP = 16 entries are merged.
"""

from __future__ import annotations

import pytest
import torch

from ops.triton import testing

ON_GPU = testing.setup()
DEV = "cuda" if ON_GPU else "cpu"
pytest.importorskip("triton")

from ops import indexer as ref  # noqa: E402

_poison = pytest.fixture(autouse=True)(testing.poison_outputs)


def _visibility(B, S, N, seed):
    """Random non-empty visible ranges [lo, hi) over N entries (several KP-blocks per query)."""
    g = torch.Generator().manual_seed(seed)
    hi = torch.randint(N // 2, N + 1, (B, S), generator=g)
    lo = torch.randint(0, 4, (B, S), generator=g)
    hi[0, 0] = 3  # fewer visible entries than k: −1 slots
    lo[0, 0] = 0
    return lo.to(DEV), hi.to(DEV)


def test_indexer_topk_exact_with_ties():
    k = testing.kernels("indexer")
    B, S, N = 1, 6, 36
    lo, hi = _visibility(B, S, N, 0)
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(B, S, N, generator=g) * 2).round() / 2  # coarse grid: many ties
    scores = torch.relu(scores).to(DEV)  # and exact zeros (incl. −0.0)
    for kk in (5, 20):
        got = k.indexer_topk(scores, lo, hi, kk)
        want = ref.indexer_topk(scores, lo, hi, kk)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), kk


def test_indexer_select_fused():
    k = testing.kernels("indexer")
    B, S, N, HI, CI = 2, 4, 40, 3, 16
    lo, hi = _visibility(B, S, N, 2)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, S, HI, CI, generator=g).to(DEV)
    keys = torch.randn(B, N, CI, generator=g).to(DEV)
    w = torch.randn(B, S, HI, generator=g).to(DEV)
    kk = 6
    got = k.indexer_select(q, keys, w, lo, hi, kk)
    sc = ref.indexer_scores(q, keys, w)
    want = ref.indexer_topk(sc, lo, hi, kk)
    assert got.shape == want.shape
    assert torch.equal(got < 0, want < 0)
    pick = lambda idx: torch.where(idx >= 0, sc.gather(-1, idx.clamp(min=0)), torch.zeros((), device=DEV))  # noqa
    a = pick(got).sort(-1).values
    b = pick(want).sort(-1).values
    assert testing.rel(a, b) <= 1e-5
    assert (got == want).float().mean().item() >= 0.95
