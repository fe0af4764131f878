"""The CPU (``blocked``) implementations of the smaller ops against their PyTorch references.

- ``indexer_scores`` (ops/blocked_indexer.py): chunked forward, recomputing backward;
- ``compressed_attention_mass`` (ops/blocked_attention.py): chunked, span-restricted, head sum before the mask;
- ``apply_rope`` (ops/rope.py): rotation written into one copy, inverse rotation as the backward;
- ``linear_cross_entropy`` (ops/linear_cross_entropy.py): head + CE chunk by chunk, gradients in the forward;
- ``rms_norm`` (ops/rms_norm.py): weighted and unweighted, hand-written backward.

Inputs are random (fresh seeds), shapes not multiples of anything, chunk sizes lowered so every op runs
several chunks (a chunk-boundary bug shows). Tolerances: fp32 ≤ 1e-5 relative to the largest reference value
(the same fp32 arithmetic in a different summation order; observed ≤ 6e-7); float64 ≤ 1e-12 and a float64
gradcheck of each hand-written backward; RoPE and the RMSNorm forward are bit-identical (same elementwise
formula); bf16 head + CE and bf16 RMSNorm gradients ≤ 2e-2 (rounded to bf16 at another point of the chain —
before the scalar scale, or after an fp32 instead of a bf16 product: about one bf16 ulp, 2^-8).
"""

from __future__ import annotations

import pytest
import torch

from ops import blocked_attention, blocked_indexer, dispatch
from ops import linear_cross_entropy as lce
from ops.blocked_attention import blocked_compressed_attention_mass
from ops.blocked_indexer import blocked_indexer_scores
from ops.indexer import indexer_scores
from ops.rms_norm import rms_norm, rms_norm_fused
from ops.rope import apply_rope, apply_rope_inplace_copy
from ops.sparse_attention import compressed_attention_mass
from ops.triton.testing import rel


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(blocked_indexer, "CHUNK_ELEMENTS", {"cpu": 150, "cuda": 150})
    monkeypatch.setattr(blocked_attention, "MASS_CHUNK_ELEMENTS", {"cpu": 150, "cuda": 150})
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", {"cpu": 7 * 53, "cuda": 7 * 53})


def test_dispatch_picks_the_blocked_cpu_paths():
    with dispatch.backend("auto"):
        x = torch.zeros(1)
        assert dispatch.get("indexer_scores", x) is blocked_indexer_scores
        assert dispatch.get("compressed_attention_mass", x) is blocked_compressed_attention_mass
        assert dispatch.get("apply_rope", x) is apply_rope_inplace_copy
        assert dispatch.get("linear_cross_entropy", x) is lce.blocked_linear_cross_entropy
        assert dispatch.get("rms_norm", x) is rms_norm_fused
    with dispatch.backend("reference"):
        assert dispatch.get("indexer_scores", torch.zeros(1)) is indexer_scores


@pytest.mark.parametrize("seed", [0, 1])
def test_indexer_scores_match_reference(seed, small_chunks):
    g = torch.Generator().manual_seed(100 + seed)
    B, S, H, c, N = 2, 29, 3, 8, 11
    q = torch.randn(B, S, H, c, generator=g, requires_grad=True)
    k = torch.randn(B, N, c, generator=g, requires_grad=True)
    w = torch.randn(B, S, H, generator=g, requires_grad=True)
    go = torch.randn(B, S, N, generator=g)
    ref = indexer_scores(q, k, w)
    got = blocked_indexer_scores(q, k, w)
    assert rel(got, ref) <= 1e-5
    for a, b in zip(torch.autograd.grad(got, (q, k, w), go), torch.autograd.grad(ref, (q, k, w), go)):
        assert rel(a, b) <= 1e-5
    with pytest.raises(ValueError, match="shapes disagree"):
        blocked_indexer_scores(q, k[..., :-1], w)


def test_indexer_scores_float64_gradcheck(small_chunks):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 9, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert (blocked_indexer_scores(q, k, w) - indexer_scores(q, k, w)).abs().max() <= 1e-12
    assert torch.autograd.gradcheck(blocked_indexer_scores, (q, k, w))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_compressed_attention_mass_matches_reference(dtype, tol, small_chunks):
    g = torch.Generator().manual_seed(11)
    B, S, H, D, N = 2, 31, 3, 8, 13
    q = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    ck = torch.randn(B, N, D, generator=g, dtype=dtype)
    lse = torch.randn(B, S, H, generator=g, dtype=dtype) + 2.0
    t, n = torch.arange(S), torch.arange(N)
    visible = (n[None, :] < (t[:, None] + 1) // 3)[None].expand(B, S, N)  # causal, as CSA's rate-3 entries
    mask = visible & (torch.rand(B, S, N, generator=g) < 0.6)
    mask[1, 20:] = False  # rows and chunks with no entry
    ref = compressed_attention_mass(q, ck, lse, 0.4, mask)
    got = blocked_compressed_attention_mass(q, ck, lse, 0.4, mask)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert rel(got, ref) <= tol
    assert bool((got[~mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_copy_is_bit_identical(dtype, inverse):
    g = torch.Generator().manual_seed(3 + inverse)
    x = torch.randn(2, 7, 3, 40, generator=g).to(dtype).requires_grad_()
    ang = torch.randn(2, 7, 1, 8, generator=g, dtype=torch.float64)
    cos, sin = ang.cos().float(), ang.sin().float()
    go = torch.randn(2, 7, 3, 40, generator=g).to(dtype)
    ref = apply_rope(x, cos, sin, inverse)
    got = apply_rope_inplace_copy(x, cos, sin, inverse)
    assert torch.equal(got, ref)
    assert torch.equal(torch.autograd.grad(got, x, go)[0], torch.autograd.grad(ref, x, go)[0])
    x64 = torch.randn(2, 5, 2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    a64 = torch.randn(2, 5, 1, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: apply_rope_inplace_copy(v, a64.cos(), a64.sin(), inverse), (x64,))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_linear_cross_entropy_matches_reference(dtype, tol, small_chunks):
    g = torch.Generator().manual_seed(21)
    T, d, V = 23, 16, 53
    h = torch.randn(T, d, generator=g).to(dtype).requires_grad_()
    w = torch.randn(V, d, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[[3, 10, 22]] = -100
    ref = lce.linear_cross_entropy(h, w, y) * 0.37  # a scale as the token mean gives
    got = lce.blocked_linear_cross_entropy(h, w, y) * 0.37
    assert got.dtype == ref.dtype
    assert rel(got, ref) <= min(tol, 1e-5)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert a.dtype == b.dtype and rel(a.float(), b.float()) <= tol
    with torch.no_grad():  # loss only: no gradient work, same value
        assert rel(lce.blocked_linear_cross_entropy(h, w, y), ref / 0.37) <= min(tol, 1e-5)
    y[:] = -100
    assert float(lce.blocked_linear_cross_entropy(h, w, y)) == 0.0


def test_linear_cross_entropy_float64_gradcheck(small_chunks):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 53, (9,), generator=g)
    y[2] = -100
    assert torch.autograd.gradcheck(lambda a, b: lce.blocked_linear_cross_entropy(a, b, y), (h, w))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_reference(dtype, tol, weighted):
    g = torch.Generator().manual_seed(31 + weighted)
    x = torch.randn(3, 5, 24, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(24, generator=g) + 1).requires_grad_() if weighted else None
    go = torch.randn(3, 5, 24, generator=g).to(dtype)
    ins = (x, w) if weighted else (x,)
    ref, got = rms_norm(x, w, 1e-6), rms_norm_fused(x, w, 1e-6)
    assert torch.equal(got, ref)
    for a, b in zip(torch.autograd.grad(got, ins, go), torch.autograd.grad(ref, ins, go)):
        assert a.dtype == b.dtype and rel(a.float(), b.float()) <= tol
    x64 = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if weighted else None
    assert torch.autograd.gradcheck(
        lambda a, *b: rms_norm_fused(a, b[0] if b else None, 1e-6), (x64, w64) if weighted else (x64,)
    )
    with pytest.raises(ValueError, match="must be"):
        rms_norm_fused(x, torch.ones(5), 1e-6)
