"""The layout dry-run: shards built on the meta device under a fake process group add up to the full model."""

from __future__ import annotations

import pytest

from tests.test_parallel_layouts import model_config


def _total_params(cfg) -> int:
    """Single-process parameter count (every layer, MTP, one embedding) from meta-device stages."""
    from pretrain.config import ParallelConfig
    from pretrain.dry_run import plan

    _, rows = plan(cfg, 1, ParallelConfig(), micro_batch=1, seq_len=32, global_batch=1)
    return rows[0].mem.params


@pytest.mark.slow
def test_shards_add_up_and_validate():
    from pretrain.config import ParallelConfig
    from pretrain.dry_run import plan, render

    cfg = model_config()
    full = _total_params(cfg)
    d, v = cfg.hidden_size, cfg.vocab_size
    # pp=2, ep=2, tp=2 on 8 fake ranks: stage params × their replication must give the full model + the MTP
    # copy of the embedding on the last stage
    layout, rows = plan(
        cfg, 8, ParallelConfig(tp=2, pp=2, ep=2, pp_layer_split=[1, 3]), micro_batch=1, seq_len=32, global_batch=4
    )
    assert (layout.dp, layout.expert_dp) == (2, 2)
    assert [r.layers for r in rows] == ["0-0", "1-3"]
    expert = sum(r.mem.expert_params for r in rows) * layout.ep  # experts split over ep (etp 1)
    dense = sum(r.mem.params - r.mem.expert_params for r in rows)
    # tp shards the big matrices only: recount with tp=1 on 2 fake ranks instead of modelling which
    _, rows1 = plan(cfg, 2, ParallelConfig(pp=2, pp_layer_split=[1, 3]), micro_batch=1, seq_len=32, global_batch=2)
    assert sum(r.mem.params for r in rows1) == full + v * d
    assert expert == sum(r.mem.expert_params for r in rows1)
    assert dense < sum(r.mem.params - r.mem.expert_params for r in rows1)  # tp=2 shards something
    text = render("tiny", cfg, layout, rows, 1, 32, 4)
    assert "| pp rank |" in text and "tp=2 pp=2" in text
    from parallel.process_groups import LayoutError

    with pytest.raises(LayoutError, match=r"n_routed_experts=4 is not divisible by parallel.ep=3"):
        plan(cfg, 3, ParallelConfig(ep=3), micro_batch=1, seq_len=32, global_batch=3)
