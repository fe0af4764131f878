"""Fast checks (no ranks): bad layouts fail with the numbers, the stage split, init-seed naming and slicing."""

from __future__ import annotations

import pytest
import torch

from parallel import init_seed
from parallel.pipeline import chunk_stages, stage_layer_ranges
from parallel.process_groups import LayoutError, compute_layout, validate_batch
from pretrain.config import ModelConfig


def tiny(**kw) -> ModelConfig:
    base = {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 4,
        "num_heads": 4,
        "head_dim": 32,
        "rope_head_dim": 8,
        "q_lora_rank": 32,
        "o_groups": 2,
        "o_lora_rank": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_hash_layers": 1,
        "index_n_heads": 2,
        "index_head_dim": 16,
    }
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    "kwargs,model_kw,message",
    [
        ({"world": 6, "tp": 4}, {}, r"world size 6 is not divisible by tp\*pp\*sp = 4\*1\*1 = 4"),
        ({"world": 8, "tp": 8}, {}, r"num_heads=4 is not divisible by parallel.tp=8"),
        ({"world": 4, "tp": 4}, {"num_heads": 8}, r"o_groups=2 is not divisible by parallel.tp=4"),
        ({"world": 3, "ep": 3}, {}, r"n_routed_experts=4 is not divisible by parallel.ep=3"),
        ({"world": 2, "tp": 2}, {"vocab_size": 255}, r"vocab_size=255 is not divisible by parallel.tp=2"),
        ({"world": 3, "pp": 3}, {}, r"num_layers=4 is not divisible by pp\*vpp = 3"),
        ({"world": 2, "pp": 2, "vpp": 2}, {"num_layers": 6}, r"num_layers=6 is not divisible by pp\*vpp = 4"),
        ({"world": 2, "pp": 2, "pp_layer_split": [1, 2]}, {}, r"pp_layer_split \[1, 2\] sums to 3, model.num_layers=4"),
        ({"world": 2, "pp": 2, "pp_layer_split": [4]}, {}, r"pp_layer_split has 1 entries; need pp\*vpp = 2"),
        ({"world": 8, "tp": 2, "sp": 4}, {}, r"num_heads=4 is not divisible by tp\*sp=8"),
        ({"world": 4, "ep": 2, "etp": 2}, {"moe_intermediate_size": 33}, r"moe_intermediate_size=33 is not divisible"),
        ({"world": 4, "ep": 2, "etp": 2, "backend": "gloo"}, {}, r"parallel.etp=2 needs NCCL"),
        ({"world": 4, "pp": 2, "ep": 4}, {}, r"ep\*etp = 4\*1 = 4 must divide world/pp = 2"),
        ({"world": 2, "vpp": 2}, {}, r"vpp=2 needs pipeline parallelism"),
    ],
)
def test_bad_layouts_name_the_numbers(kwargs, model_kw, message):
    with pytest.raises(LayoutError, match=message):
        compute_layout(model=tiny(**model_kw), **kwargs)


def test_good_layouts_and_batches():
    lay = compute_layout(8, tp=2, pp=2, vpp=2, ep=2, model=tiny(num_heads=8, o_groups=2))
    assert (lay.dp, lay.expert_dp) == (2, 2)
    assert validate_batch(lay, global_batch=8, micro_batch=1, seq_len=32) == 4
    with pytest.raises(LayoutError, match=r"global_batch=6 is not divisible by micro_batch\*dp = 2\*2 = 4"):
        validate_batch(lay, 6, 2, 32)
    with pytest.raises(LayoutError, match=r"3 micro-batches .* must be divisible by pp=2"):
        validate_batch(lay, 6, 1, 32)
    with pytest.raises(LayoutError, match=r"seq_len=33 is not divisible by sp\*tp = 1\*2"):
        validate_batch(lay, 8, 1, 33)


def test_stage_split():
    assert stage_layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert stage_layer_ranges(4, 2, 2) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert stage_layer_ranges(43, 4, 1, [10, 11, 12, 10]) == [(0, 10), (10, 21), (21, 33), (33, 43)]
    assert chunk_stages(1, 2, 2) == [1, 3]  # megatron's interleaving: rank r holds v*pp + r
    with pytest.raises(ValueError, match="not divisible by pp\\*vpp = 3"):
        stage_layer_ranges(4, 3)


def test_canonical_names_and_slices():
    assert (
        init_seed.canonical_name(
            "module.module.layers.3.mlp.layer.experts.local_experts.1.linear_fc2.weight", ep_rank=2, num_local_experts=4
        )
        == "layers.3.mlp.layer.experts.local_experts.9.linear_fc2.weight"
    )
    assert init_seed.canonical_name("mtp_embed_tokens.weight", aliases={"mtp_embed_tokens.weight": "e"}) == "e"
    full = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.tensor_model_parallel, p.partition_dim = True, 0
    # gated fc1 [gate; up]: rank r holds [gate_r; up_r]
    got = init_seed.local_slice(full, p, "x.linear_fc1.weight", 2, 1)
    assert torch.equal(got, torch.cat([full[2:4], full[6:8]]))
    assert torch.equal(init_seed.local_slice(full, p, "x.linear_fc2.weight", 2, 1), full[4:8])
    assert init_seed.full_shape(p, 2) == (8, 3)


def test_seed_of_is_stable():
    assert init_seed.seed_of(1234, "embed_tokens.weight") == init_seed.seed_of(1234, "embed_tokens.weight")
    assert init_seed.seed_of(1234, "a") != init_seed.seed_of(1235, "a")
