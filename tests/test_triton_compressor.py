"""Triton compressor pooling (ops/triton/compressor.py) against ops.compressor.compressor_pool.

CSA (overlapping, rate 4, C = 2c) and HCA (rate 8 here, C = c) with packed documents (segment-restarting
block grid, unused slots, first blocks without a previous window), B = 2. Output and the gradients of kv,
gate and position_bias on fresh random inputs; the output is poisoned (NaN) before each kernel run.
Tolerances (‖out − ref‖/‖ref‖): fp32 1e-5 (same fp32 softmax, different summation order); bf16 1e-2 (the
reference multiplies and sums in bf16, the kernel in fp32 after the same bf16 cast of the weights).
"""

from __future__ import annotations

import pytest
import torch

from ops.triton import testing

ON_GPU = testing.setup()
DEV = "cuda" if ON_GPU else "cpu"
pytest.importorskip("triton")

from ops import compressor as ref  # noqa: E402

rel = testing.rel


_poison = pytest.fixture(autouse=True)(testing.poison_outputs)


@pytest.mark.parametrize("rate,dtype", [(4, torch.float32), (8, torch.float32), (4, torch.bfloat16)])
def test_compressor_pool_matches_reference(rate, dtype):
    k = testing.kernels("compressor")
    B, S, c = 2, 40, 24  # c not a multiple of the channel block
    overlap = rate == 4
    C = 2 * c if overlap else c
    g = torch.Generator().manual_seed(rate)
    doc_ids = torch.stack(
        [torch.zeros(S, dtype=torch.long), (torch.arange(S) >= 11).long() + (torch.arange(S) >= 30).long()]
    )
    seg = ref.segment_starts(doc_ids, B, S)
    lay = ref.compressed_layout(seg, ref.document_positions(seg), rate)
    kv = torch.randn(B, S, C, generator=g).to(dtype).to(DEV)
    gate = (2 * torch.randn(B, S, C, generator=g)).to(dtype).to(DEV)
    bias = torch.randn(rate, C, generator=g).to(DEV)
    bs = lay.block_start.to(DEV)
    pv = lay.prev_valid.to(DEV) if overlap else None
    assert bool((lay.block_start < 0).any()) and (not overlap or bool((~lay.prev_valid & (lay.block_start >= 0)).any()))
    go = torch.randn(B, bs.shape[1], c, generator=g).to(dtype).to(DEV)

    def run(f):
        leaves = [t.detach().clone().requires_grad_() for t in (kv, gate, bias)]
        y = f(*leaves, bs, pv)
        y.backward(go)
        return y, [t.grad for t in leaves]

    y_t, g_t = run(k.compressor_pool)
    y_r, g_r = run(ref.compressor_pool)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y_t.dtype == y_r.dtype and y_t.shape == y_r.shape
    assert rel(y_t, y_r) <= tol, rel(y_t, y_r)
    for name, a, b in zip(("dkv", "dgate", "dbias"), g_t, g_r):
        assert a.dtype == b.dtype, name
        assert rel(a, b) <= tol, (name, rel(a, b))
