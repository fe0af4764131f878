"""mHC reference ops (ops/mhc.py): float64 gradcheck, Sinkhorn properties, agreement with HF's modules, and the
hand-written Sinkhorn backward (``sinkhorn``) against its plain-autograd definition (``sinkhorn_autograd``)."""

from __future__ import annotations

import pytest
import torch

from ops import dispatch, mhc
from ops.mhc import hc_head, mhc_post, mhc_pre, sinkhorn, sinkhorn_autograd
from ops.triton.testing import rel


def _inputs(seed: int, t: int = 3, n: int = 2, d: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rows = (2 + n) * n
    x = torch.randn(t, n, d, generator=g, dtype=dtype)
    fn = torch.randn(rows, n * d, generator=g, dtype=dtype) * 0.5
    base = torch.randn(rows, generator=g, dtype=dtype) * 0.5
    scale = torch.rand(3, generator=g, dtype=dtype) + 0.5
    return x, fn, base, scale


def test_gradcheck_sinkhorn():
    logits = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3 on finite differences) are right for fp64
    assert torch.autograd.gradcheck(lambda l: sinkhorn(l, 5, 1e-6), (logits,))


def test_gradcheck_mhc_pre():
    x, fn, base, scale = (t.requires_grad_() for t in _inputs(2))
    assert torch.autograd.gradcheck(lambda *a: mhc_pre(*a, 1e-6, 1e-6, 4), (x, fn, base, scale))


def test_gradcheck_mhc_post():
    g = torch.Generator().manual_seed(3)
    t, n, d = 3, 2, 4
    o = torch.randn(t, d, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(t, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    post = torch.rand(t, n, generator=g, dtype=torch.float64, requires_grad=True)
    comb = torch.rand(t, n, n, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mhc_post, (o, x, post, comb))


def test_gradcheck_hc_head():
    g = torch.Generator().manual_seed(4)
    t, n, d = 3, 3, 4
    x = torch.randn(t, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    fn = (torch.randn(n, n * d, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    base = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: hc_head(*a, 1e-6, 1e-6), (x, fn, base, scale))


def test_sinkhorn_columns_sum_to_one_and_rows_converge():
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    comb = sinkhorn(logits, 20, 1e-6)
    # the last step normalises columns: their sums are 1 up to the +eps in the denominator (~n*eps)
    torch.testing.assert_close(comb.sum(-2), torch.ones(64, 4, dtype=torch.float64), atol=1e-5, rtol=0)
    # rows after 20 iterations for unit-std logits: measured ~6e-6 off 1 (geometric convergence); 1e-4
    # leaves margin for other seeds while still failing if a row/column step were dropped or swapped
    assert (comb.sum(-1) - 1).abs().max() < 1e-4
    assert (comb > 0).all()


def test_mhc_post_applies_comb_transposed():
    g = torch.Generator().manual_seed(6)
    t, n, d = 2, 3, 5
    x = torch.randn(t, n, d, generator=g)
    o = torch.randn(t, d, generator=g)
    post = torch.rand(t, n, generator=g)
    comb = torch.rand(t, n, n, generator=g)
    out = mhc_post(o, x, post, comb)
    k = 1
    expect = post[:, k, None] * o + sum(comb[:, j, k, None] * x[:, j] for j in range(n))
    # fp32 sums of 3 products: 1e-6 absolute is a few ulps
    torch.testing.assert_close(out[:, k], expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [2, 4])
def test_matches_hf_hyper_connection_and_head(n):
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    d = 16
    cfg = DeepseekV4Config(hidden_size=d, hc_mult=n, num_hidden_layers=1, vocab_size=32)
    torch.manual_seed(7 + n)
    hc = DeepseekV4HyperConnection(cfg)
    head = DeepseekV4HyperHead(cfg)
    for p in list(hc.parameters()) + list(head.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, n, d)
    post_hf, comb_hf, x_in_hf = hc(x)
    x_in, post, comb = dispatch.call(
        "mhc_pre", x.view(-1, n, d), hc.fn, hc.base, hc.scale, cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters
    )
    # fp32, same formulas with a different order of the RMS scaling (before vs after the matmul):
    # differences are rounding-level, 1e-5 relative covers them
    torch.testing.assert_close(x_in, x_in_hf.view(-1, d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, post_hf.view(-1, n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comb, comb_hf.view(-1, n, n), rtol=1e-5, atol=1e-5)
    y = dispatch.call(
        "hc_head", x.view(-1, n, d), head.hc_fn, head.hc_base, head.hc_scale, cfg.rms_norm_eps, cfg.hc_eps
    )
    torch.testing.assert_close(y, head(x).view(-1, d), rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_argument():
    x, fn, base, scale = _inputs(8, dtype=torch.float32)
    with pytest.raises(ValueError, match="fn must be"):
        mhc_pre(x, fn[:-1], base, scale, 1e-6, 1e-6, 3)
    with pytest.raises(ValueError, match="scale must be"):
        mhc_pre(x, fn, base, scale[:2], 1e-6, 1e-6, 3)
    with pytest.raises(ValueError, match="logits must be"):
        sinkhorn(torch.randn(2, 3, 4), 3, 1e-6)


def _sinkhorn_fwd_bwd(f, logits: torch.Tensor, grad_out: torch.Tensor):
    leaf = logits.detach().clone().requires_grad_()
    out = f(leaf)
    out.backward(grad_out)
    return out, leaf.grad


def _logits(seed: int, t: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # scale 3: rows of softmax(L) far from doubly stochastic, so every iteration changes M (and some
    # entries are ~e^-10, where the +eps matters); an upstream gradient with no structure
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, n, n, generator=g, dtype=dtype) * 3, torch.randn(t, n, n, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn_function_matches_autograd(iters, n, dtype):
    logits, grad_out = _logits(10 + n + iters, 37, n, dtype)
    ref, ref_grad = _sinkhorn_fwd_bwd(lambda l: sinkhorn_autograd(l, iters, 1e-6), logits, grad_out)
    out, grad = _sinkhorn_fwd_bwd(lambda l: sinkhorn(l, iters, 1e-6), logits, grad_out)
    assert type(out.grad_fn).__name__ == "_SinkhornFnBackward"  # one autograd node, not ~6 per step
    # forward: the same ops on the same values (the softmax in [T, n, n], sums of n <= 4 terms add in the
    # same order in both layouts, IEEE division) -> bit-for-bit, also on the no-grad path
    assert out.dtype == ref.dtype and out.is_contiguous()
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(sinkhorn(logits, iters, 1e-6), ref)
    # backward: the same derivative in another order: (∂Y − Σ ∂Y⊙Y) / D by hand, ∂Y/D − Σ(∂Y⊙X)/D² by
    # autograd. Measured ‖Δ‖/‖ref‖ ~2e-7 in fp32 (≈ each version's own distance to the float64 gradient);
    # not elementwise: both subtract nearly equal terms, so entries near 0 carry large relative rounding
    # in either version. 1e-6 of the norm and of the largest entry.
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert rel(grad, ref_grad) <= tol
    assert (grad - ref_grad).abs().max() <= tol * ref_grad.abs().max()
    if dtype == torch.float32:
        _, grad64 = _sinkhorn_fwd_bwd(lambda l: sinkhorn_autograd(l, iters, 1e-6), logits.double(), grad_out.double())
        assert rel(grad, grad64) <= 1e-6 and rel(ref_grad, grad64) <= 1e-6


@pytest.mark.parametrize("n,iters", [(2, 1), (2, 20), (4, 1), (4, 20)])
def test_sinkhorn_function_gradcheck(n, iters):
    logits, _ = _logits(20 + n + iters, 3, n, torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda l: mhc._SinkhornFn.apply(l, iters, 1e-6), (logits,))


def test_sinkhorn_function_keeps_input_dtype_and_refuses_double_backward():
    logits, grad_out = _logits(30, 6, 4, torch.float32)
    ref, ref_grad = _sinkhorn_fwd_bwd(lambda l: sinkhorn_autograd(l, 5, 1e-6), logits.bfloat16(), grad_out)
    out, grad = _sinkhorn_fwd_bwd(lambda l: sinkhorn(l, 5, 1e-6), logits.bfloat16(), grad_out)
    # bf16 logits: fp32 math, gradient rounded once to bf16 in both; ≤ 1 bf16 ulp apart (2^-8 relative)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    assert rel(grad, ref_grad) <= 2**-8
    leaf = logits.double().requires_grad_()
    (g,) = torch.autograd.grad(sinkhorn(leaf, 3, 1e-6).square().sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_mhc_pre_grads_unchanged_by_sinkhorn_function(monkeypatch):
    t, n, d = 24, 4, 16
    x, fn, base, scale = _inputs(40, t=t, n=n, d=d, dtype=torch.float32)
    base[2 * n :] *= 6  # comb logits ~N(0, 3): the iterations matter
    g = torch.Generator().manual_seed(41)
    grads_out = (torch.randn(t, d, generator=g), torch.randn(t, n, generator=g), torch.randn(t, n, n, generator=g))

    def run():
        args = [a.detach().clone().requires_grad_() for a in (x, fn, base, scale)]
        outs = mhc_pre(*args, 1e-6, 1e-6, 20)
        torch.autograd.backward(outs, grads_out)
        return outs, [a.grad for a in args]

    outs, grads = run()
    monkeypatch.setattr(mhc, "sinkhorn", sinkhorn_autograd)
    ref_outs, ref_grads = run()
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    # the Sinkhorn gradient differs by ~2e-7 (see above); the rest of mhc_pre is the same autograd graph
    for name, a, b in zip(("dx", "dfn", "dbase", "dscale"), grads, ref_grads):
        assert rel(a, b) <= 1e-6, (name, rel(a, b))
