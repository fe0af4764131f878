"""The FLOP model of a step (pretrain/flop_model.py): closed-form sums against brute force, the quadratic terms'
scaling, and the recompute accounting."""

from __future__ import annotations

import random

from pretrain.config import load_config
from pretrain.flop_model import step_flops, visible_sum, window_sum


def test_closed_form_sums_equal_brute_force():
    rng = random.Random()
    for _ in range(200):
        S, m, cap, W = rng.randint(0, 300), rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 64)
        assert visible_sum(S, m) == sum((t + 1) // m for t in range(S))
        assert visible_sum(S, m, cap) == sum(min(cap, (t + 1) // m) for t in range(S))
        assert window_sum(S, W) == sum(min(t + 1, W) for t in range(S))


def test_quadratic_terms_scale_with_s_squared_and_recompute_adds_a_forward():
    cfg = load_config("tiny").model
    a, b = step_flops(cfg, 1 << 16), step_flops(cfg, 1 << 17)
    assert 3.9 < b.quadratic / a.quadratic < 4.0  # Σ floor((t+1)/m) = S²/2m - O(S)
    lin_a = a.total - a.quadratic
    assert abs((b.total - b.quadratic) / lin_a - 2.0) < 1e-12
    full = step_flops(cfg, 1 << 16, recompute="full")
    # full: one more forward of every block = (total - head) / 3 for the 3x-counted terms, less for attention
    assert a.total < full.total < a.total * 4 / 3
    dense = step_flops(cfg, 1 << 16, attention_mode="dense")
    assert (
        "indexer scores (top-k)" not in dense.terms
        and dense.terms["compressed attention (CSA)"] > a.terms["compressed attention (CSA)"]
    )
