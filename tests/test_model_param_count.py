"""param_count on the real Flash/Pro configs (meta device): totals, active parameters, MTP, KV cache (§13, §14)."""

from __future__ import annotations

import pytest

from pretrain.config import load_config


# expected values: docs/MODEL.md §14 (paper 284B/13B and 1.6T/49B) and §13; ±0.5% as the task specifies
@pytest.mark.parametrize(
    "name,total,active,mtp,kv_pct", [("flash", 284.3e9, 13.3e9, 6.6e9, 7.2), ("pro", 1573e9, 48.9e9, 25.8e9, 10.3)]
)
def test_flash_pro_counts(name, total, active, mtp, kv_pct, one_rank):
    from pretrain.model.param_count import count

    c = count(load_config(name).model, name)
    assert c.total == pytest.approx(total, rel=5e-3)
    assert c.active == pytest.approx(active, rel=5e-3)
    assert c.mtp == pytest.approx(mtp, rel=1e-2)  # §14 gives MTP to one decimal (6.6B / 25.8B)
    assert 100 * c.kv_vs_v32 == pytest.approx(kv_pct, abs=0.05)  # §13 rounds to 0.1%


def test_kv_bytes_formula_counts_layer_types():
    from pretrain.model.param_count import kv_bytes_per_token

    cfg = load_config("flash").model
    # Flash: 21 CSA × (576 + 64)/4 + 20 HCA × 576/128 (§13)
    assert kv_bytes_per_token(cfg) == 21 * 160 + 20 * 4.5
