"""mHC reference ops (ops/mhc.py): float64 gradcheck, Sinkhorn properties, agreement with HF's modules."""
from __future__ import annotations

import pytest
import torch

from ops import dispatch
from ops.mhc import hc_head, mhc_post, mhc_pre, sinkhorn


def _inputs(seed: int, t: int = 3, n: int = 2, d: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rows = (2 + n) * n
    x = torch.randn(t, n, d, generator=g, dtype=dtype)
    fn = torch.randn(rows, n * d, generator=g, dtype=dtype) * 0.5
    base = torch.randn(rows, generator=g, dtype=dtype) * 0.5
    scale = torch.rand(3, generator=g, dtype=dtype) + 0.5
    return x, fn, base, scale


def test_gradcheck_sinkhorn():
    logits = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                         requires_grad=True)
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
    x_in, post, comb = dispatch.call("mhc_pre", x.view(-1, n, d), hc.fn, hc.base, hc.scale,
                                     cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)
    # fp32, same formulas with a different order of the RMS scaling (before vs after the matmul):
    # differences are rounding-level, 1e-5 relative covers them
    torch.testing.assert_close(x_in, x_in_hf.view(-1, d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, post_hf.view(-1, n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comb, comb_hf.view(-1, n, n), rtol=1e-5, atol=1e-5)
    y = dispatch.call("hc_head", x.view(-1, n, d), head.hc_fn, head.hc_base, head.hc_scale,
                      cfg.rms_norm_eps, cfg.hc_eps)
    torch.testing.assert_close(y, head(x).view(-1, d), rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_argument():
    x, fn, base, scale = _inputs(8, dtype=torch.float32)
    with pytest.raises(ValueError, match="fn must be"):
        mhc_pre(x, fn[:-1], base, scale, 1e-6, 1e-6, 3)
    with pytest.raises(ValueError, match="scale must be"):
        mhc_pre(x, fn, base, scale[:2], 1e-6, 1e-6, 3)
    with pytest.raises(ValueError, match="logits must be"):
        sinkhorn(torch.randn(2, 3, 4), 3, 1e-6)
