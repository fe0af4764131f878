"""Checkpoint save/load: round trip of model + optimizer + per-rank state, crash-safe layout, retention,
fallback from a corrupt latest checkpoint, and resharding TP2 -> TP1 (fewer ranks).

The model here is a two-layer megatron tensor-parallel MLP (a checkpointing fixture, not the V4 model);
the V4 end-to-end resume tests are in tests/test_train_resume.py.
"""

import logging
import random

import pytest
import torch

from tests.harness import run_ranks

pytestmark = pytest.mark.slow


def _mlp(seed: int):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import MegatronModule, TransformerConfig

    from parallel.process_groups import megatron_cpu_flags

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, **megatron_cpu_flags())

    class MLP(MegatronModule):
        def __init__(self):
            super().__init__(cfg)
            self.fc1 = ColumnParallelLinear(
                8, 16, config=cfg, init_method=torch.nn.init.normal_, bias=True, gather_output=False
            )
            self.fc2 = RowParallelLinear(
                16,
                8,
                config=cfg,
                init_method=torch.nn.init.normal_,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=True,
            )
            self.register_buffer("expert_bias", torch.zeros(4))

        def forward(self, x):
            h, _ = self.fc1(x)
            y, _ = self.fc2(torch.relu(h))
            return y

    torch.manual_seed(seed)
    # full weights from one seed, sliced per TP rank, so models at different TP are the same function
    w1 = torch.randn(16, 8)
    b1 = torch.randn(16)
    w2 = torch.randn(8, 16)
    m = MLP()
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        m.fc1.weight.copy_(w1.chunk(tp, 0)[r])
        m.fc1.bias.copy_(b1.chunk(tp, 0)[r])
        m.fc2.weight.copy_(w2.chunk(tp, 1)[r])
    return m


def _train_steps(m, opt, x, n):
    from megatron.core import parallel_state as ps

    for _ in range(n):
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        if ps.get_tensor_model_parallel_world_size() > 1:  # replicated bias grad is complete; fc grads too
            pass
        opt.step()
    return m(x).pow(2).mean().item()


def _save(rank, world, root, tp):
    """Train 3 steps at TP=tp, save at step 7, continue 2 steps; return the reference loss and RNG draws."""
    from megatron.core import parallel_state as ps

    from parallel import cpu_compat
    from pretrain.checkpoint import CheckpointManager
    from pretrain.ckpt_state import build_state, rng_state

    cpu_compat.apply()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    m = _mlp(seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _train_steps(m, opt, x, 3)
    m.expert_bias.copy_(torch.arange(4.0))
    random.seed(123 + rank)
    state = build_state(m, {"adamw": opt}, {"step": 7}, {"rng": rng_state(), "loader": {"pos": 10 + rank}}, rank, world)
    CheckpointManager(root, keep_last=2).save(7, state, meta={"layout": f"tp{tp}"})
    ref_next = [random.random() for _ in range(3)]
    return _train_steps(m, opt, x, 2), ref_next


def _load(rank, world, root, tp):
    from megatron.core import parallel_state as ps

    from parallel import cpu_compat
    from pretrain.checkpoint import CheckpointManager
    from pretrain.ckpt_state import load_state, set_rng_state

    cpu_compat.apply()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    m = _mlp(seed=99)  # different init: everything must come from disk
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    path = CheckpointManager(root).find_latest_valid()
    common, objs, same_world = load_state(path, m, {"adamw": opt}, rank, world)
    assert common["step"] == 7 and torch.equal(m.expert_bias, torch.arange(4.0))
    draws = None
    if same_world:
        set_rng_state(objs["rng"])
        draws = [random.random() for _ in range(3)]
    return _train_steps(m, opt, x, 2), draws, same_world, objs["loader"]


def test_roundtrip_same_layout_is_bit_exact(tmp_path):
    root = str(tmp_path / "ck")
    ref = run_ranks(_save, 2, root, 2, timeout=300)
    got = run_ranks(_load, 2, root, 2, timeout=300)
    for r in range(2):
        assert got[r][0] == ref[r][0]  # same layout, same fp32 math: identical loss
        assert got[r][1] == ref[r][1]  # per-rank Python RNG stream restored
        assert got[r][2] is True and got[r][3] == {"pos": 10 + r}
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000007"
    assert (tmp_path / "ck" / "step_00000007" / "meta.json").exists()
    assert not list((tmp_path / "ck").glob("*.tmp"))
    # reshard: saved at TP=2 on 2 ranks, loaded at TP=1 on 1 rank (model and AdamW moments)
    ((loss, _, same_world, loader),) = run_ranks(_load, 1, root, 1, timeout=300)
    assert not same_world and loader == {"pos": 10}  # the old rank 0's loader state
    # TP=2 sums the row-parallel output in another order: fp32 rounding only (~1e-7 relative)
    assert loss == pytest.approx(ref[0][0], rel=1e-5)


def _retention_and_fallback(rank, world, root):
    from megatron.core import parallel_state as ps

    from parallel import cpu_compat
    from pretrain.checkpoint import CheckpointManager
    from pretrain.ckpt_state import build_state

    cpu_compat.apply()
    ps.initialize_model_parallel()
    m = _mlp(seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    mgr = CheckpointManager(root, keep_last=2, keep_every=3)
    for step in range(1, 7):
        mgr.save(step, build_state(m, {"adamw": opt}, {"step": step}, {}, rank, world), meta={})
    kept = mgr.steps_on_disk()
    # corrupt one byte of a shard file of the newest checkpoint
    shard = sorted((mgr.root / "step_00000006").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pretrain.checkpoint").addHandler(handler)
    found = mgr.find_latest_valid()
    # a missing meta.json (crash before the rename never leaves one, but a truncated copy could)
    (mgr.root / "step_00000005" / "meta.json").unlink()
    found2 = mgr.find_latest_valid()
    (mgr.root / "latest").write_text("garbage")
    found3 = mgr.find_latest_valid()
    return kept, found.name, found2.name, found3.name, [r.getMessage() for r in records]


def test_retention_and_corrupt_latest_falls_back_with_warning(tmp_path):
    ((kept, found, found2, found3, msgs),) = run_ranks(_retention_and_fallback, 1, str(tmp_path / "ck"), timeout=300)
    assert kept == [3, 5, 6]  # last 2 plus every 3rd
    assert found == "step_00000005"
    assert found2 == "step_00000003" and found3 == "step_00000003"
    assert any("step_00000006" in m and "SHA-256 mismatch" in m for m in msgs)
    assert any("meta.json" in m for m in msgs)
