"""Triton batched Newton-Schulz (ops/triton/newton_schulz.py) against ops.newton_schulz.newton_schulz.

Interpreter on CPU (tiles 16×16, so the tiny shapes below still cover several triangle tiles, partial tiles
and the transposed orientation); compiled on CUDA. Tolerances (‖out − ref‖/‖ref‖):
* fp32: 1e-5 — same iteration in fp32 on both sides, only summation order differs (GPU: 3-pass tf32).
* bf16 (fp32=False): 2e-2 — both sides round X, A and bA + cA² to bf16 at the same points, but the
  accumulation order inside each product differs, so the 2⁻⁹ rounding decisions differ and 30 chained
  bf16 products (10 iterations × 3) compound to ~1e-2; the result is still checked against the fp32 answer.
Outputs are poisoned (NaN) before each kernel run.
"""

from __future__ import annotations

import pytest
import torch

from ops.triton import testing

ON_GPU = testing.setup()
DEV = "cuda" if ON_GPU else "cpu"
pytest.importorskip("triton")

from ops import newton_schulz as ref  # noqa: E402

rel = testing.rel


_poison = pytest.fixture(autouse=True)(testing.poison_outputs)


@pytest.mark.parametrize("shape", [(2, 20, 36), (1, 36, 20)])  # wide, and tall (transposed internally)
def test_newton_schulz_fp32(shape):
    k = testing.kernels("newton_schulz")
    g = torch.Generator().manual_seed(sum(shape))
    X = torch.randn(*shape, generator=g).to(DEV)
    out = k.newton_schulz(X, fp32=True)
    want = ref.newton_schulz(X, fp32=True)
    assert out.shape == X.shape and out.dtype == X.dtype
    assert rel(out, want) <= 1e-5, rel(out, want)
    # and it orthogonalises: singular values of the result are near 1 (the V4 schedule ends at ~[0.7, 1.1])
    sv = torch.linalg.svdvals(out.double().cpu())
    assert sv.min() > 0.5 and sv.max() < 1.3


def test_newton_schulz_bf16():
    k = testing.kernels("newton_schulz")
    g = torch.Generator().manual_seed(5)
    X = torch.randn(1, 20, 36, generator=g).to(torch.bfloat16).to(DEV)
    out = k.newton_schulz(X, fp32=False)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref.newton_schulz(X, fp32=False)) <= 2e-2
    assert rel(out, ref.newton_schulz(X.float(), fp32=True)) <= 2e-2


def test_newton_schulz_reduce_hook_and_steps():
    """The shard hook is applied to every Gram (here: a doubling 'all-reduce' of two equal shards)."""
    k = testing.kernels("newton_schulz")
    g = torch.Generator().manual_seed(9)
    X = torch.randn(1, 20, 36, generator=g).to(DEV)
    calls = []

    def reduce(t):
        calls.append(tuple(t.shape))
        return t * 2.0

    steps = ((3, 3.4445, -4.7750, 2.0315), (1, 2.0, -1.5, 0.5))
    out = k.newton_schulz(X, steps=steps, fp32=True, reduce=reduce)
    n_ref = len(calls)
    want = ref.newton_schulz(X, steps=steps, fp32=True, reduce=reduce)
    assert len(calls) == 2 * n_ref and n_ref == 1 + 4  # norm + one Gram per iteration
    assert rel(out, want) <= 1e-5


@pytest.mark.parametrize("variant", ["mixed", "torch"])
def test_newton_schulz_variants(variant, monkeypatch):
    """The GPU picks the fastest of three variants by timing; each must give the reference's answer."""
    k = testing.kernels("newton_schulz")
    monkeypatch.setenv("V4_NS_VARIANT", variant)
    g = torch.Generator().manual_seed(12)
    X = torch.randn(1, 20, 36, generator=g).to(DEV)
    out = k.newton_schulz(X, fp32=True)
    assert rel(out, ref.newton_schulz(X, fp32=True)) <= 1e-5
