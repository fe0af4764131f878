"""Triton mHC kernels (ops/triton/mhc_pre.py, mhc_post.py) against the PyTorch reference (ops/mhc.py).

On a machine without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1 is set here,
before the kernel modules are imported); with CUDA they run compiled on the GPU. Shapes are tiny because the
interpreter costs ~1 ms per program instance.

Tolerances (relative, ‖out − ref‖ / ‖ref‖, every output and every gradient):
* fp32: 1e-5 — both sides compute in fp32 (GPU dots use 3-pass tf32 ≈ fp32); the only differences are the
  summation order of the d-long dot products and of the 40 Sinkhorn normalisations (~1e-7 each).
* bf16 activations: 1e-2 — the math is fp32 on both sides, the bf16 outputs/gradients are rounded once
  (≤ 2⁻⁸ relative per element).
Outputs are poisoned (NaN) before every kernel run, so an element that is never written fails.
"""

from __future__ import annotations

import pytest
import torch

from ops.triton import testing  # noqa: E402

ON_GPU = testing.setup()  # before triton is imported: interpreter on CPU
DEV = "cuda" if ON_GPU else "cpu"
triton = pytest.importorskip("triton")

from ops import dispatch  # noqa: E402
from ops import mhc as ref  # noqa: E402

_kernels = testing.kernels


_poison = pytest.fixture(autouse=True)(testing.poison_outputs)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


rel = testing.rel


def _inputs(seed: int, t: int, n: int, d: int, dtype: torch.dtype, rows: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, d, generator=g).to(dtype)
    fn = torch.randn(rows, n * d, generator=g) * (1.0 / (n * d) ** 0.5)
    base = torch.randn(rows, generator=g) * 0.5
    scale = torch.rand(3 if rows != n else 1, generator=g) + 0.5
    return [v.to(DEV) for v in (x, fn, base, scale)]


def _grads(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]


def _fwd_bwd(fn, args, gouts_seed):
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gouts = _grads(outs, gouts_seed)
    torch.autograd.backward(outs, gouts)
    return outs, [a.grad for a in args]


# Sinkhorn converges: at 20 iterations an off-by-one changes comb by only ~2e-5, so iters=3 is checked too.
@pytest.mark.parametrize("dtype,iters", [(torch.float32, 20), (torch.float32, 3), (torch.bfloat16, 20)])
def test_mhc_pre_matches_reference(dtype, iters):
    k = _kernels("mhc_pre")
    t, n, d = 20, 4, 16  # 2 token blocks, the second partial (masking)
    x, fn, base, scale = _inputs(11, t, n, d, dtype, (2 + n) * n)
    f_tri = lambda *a: k.mhc_pre(*a, 1e-6, 1e-6, iters)  # noqa: E731
    f_ref = lambda *a: ref.mhc_pre(*a, 1e-6, 1e-6, iters)  # noqa: E731
    o_tri, g_tri = _fwd_bwd(f_tri, [x, fn, base, scale], 5)
    o_ref, g_ref = _fwd_bwd(f_ref, [x, fn, base, scale], 5)
    tol = TOL[dtype]
    for name, a, b in zip(("x_in", "post", "comb"), o_tri, o_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) <= tol, (name, rel(a, b))
    for name, a, b in zip(("dx", "dfn", "dbase", "dscale"), g_tri, g_ref):
        assert a.dtype == b.dtype, name
        assert rel(a, b) <= tol, (name, rel(a, b))


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_matches_reference(iters):
    k = _kernels("mhc_pre")
    g = torch.Generator().manual_seed(3 + iters)
    logits = (torch.randn(19, 4, 4, generator=g) * 2).to(DEV)
    o_tri, g_tri = _fwd_bwd(lambda l: k.sinkhorn(l, iters, 1e-6), [logits], 7)
    o_ref, g_ref = _fwd_bwd(lambda l: ref.sinkhorn(l, iters, 1e-6), [logits], 7)
    assert rel(o_tri[0], o_ref[0]) <= 1e-5
    assert rel(g_tri[0], g_ref[0]) <= 1e-5
    # the result is column-stochastic (last step normalises columns)
    assert torch.allclose(o_tri[0].sum(-2), torch.ones(19, 4, device=DEV), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_head_matches_reference(dtype):
    k = _kernels("mhc_pre")
    t, n, d = 9, 4, 16
    x, fn, base, scale = _inputs(13, t, n, d, dtype, n)
    o_tri, g_tri = _fwd_bwd(lambda *a: k.hc_head(*a, 1e-6, 1e-6), [x, fn, base, scale], 9)
    o_ref, g_ref = _fwd_bwd(lambda *a: ref.hc_head(*a, 1e-6, 1e-6), [x, fn, base, scale], 9)
    assert rel(o_tri[0], o_ref[0]) <= TOL[dtype]
    for name, a, b in zip(("dx", "dfn", "dbase", "dscale"), g_tri, g_ref):
        assert rel(a, b) <= TOL[dtype], (name, rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mhc_post_matches_reference(dtype):
    k = _kernels("mhc_post")
    g = torch.Generator().manual_seed(17)
    t, n, d = 18, 4, 80  # d not a multiple of the channel block (masking)
    o = torch.randn(t, d, generator=g).to(dtype).to(DEV)
    x = torch.randn(t, n, d, generator=g).to(dtype).to(DEV)
    post = (2 * torch.rand(t, n, generator=g)).to(DEV)
    comb = torch.softmax(torch.randn(t, n, n, generator=g), -1).to(DEV)
    o_tri, g_tri = _fwd_bwd(k.mhc_post, [o, x, post, comb], 21)
    o_ref, g_ref = _fwd_bwd(ref.mhc_post, [o, x, post, comb], 21)
    assert o_tri[0].dtype == o_ref[0].dtype
    assert rel(o_tri[0], o_ref[0]) <= TOL[dtype]
    for name, a, b in zip(("do", "dx", "dpost", "dcomb"), g_tri, g_ref):
        assert a.dtype == b.dtype, name
        assert rel(a, b) <= TOL[dtype], (name, rel(a, b))


def test_dispatch_selects_triton():
    _kernels("mhc_pre")
    x, fn, base, scale = _inputs(23, 4, 4, 16, torch.float32, 24)
    assert "triton" in dispatch.registered()["mhc_pre"]
    with dispatch.backend("triton"):
        a = dispatch.call("mhc_pre", x, fn, base, scale, 1e-6, 1e-6, 20)
    with dispatch.backend("reference"):
        b = dispatch.call("mhc_pre", x, fn, base, scale, 1e-6, 1e-6, 20)
    assert dispatch.get("mhc_pre", x).__name__ == ("triton_mhc_pre" if ON_GPU else "mhc_pre")
    for u, v in zip(a, b):
        assert rel(u, v) <= 1e-5
