"""V4 MoE on megatron's MoELayer: parity with HF's sparse MoE block, hash table, balance loss, expert-bias step."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig


def _cfg(**over) -> ModelConfig:
    base = dict(
        vocab_size=50,
        hidden_size=24,
        num_layers=2,
        layer_types=["sliding", "sliding"],
        num_heads=2,
        head_dim=8,
        rope_head_dim=4,
        q_lora_rank=8,
        o_groups=1,
        o_lora_rank=8,
        n_routed_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=10,
        n_hash_layers=1,
        routed_scaling_factor=2.5,
        swiglu_limit=0.5,
    )  # a small clamp so that the SwiGLU clamps are active for unit-scale inputs
    base.update(over)
    return ModelConfig(**base)


@pytest.mark.parametrize("is_hash", [True, False])
def test_matches_hf_sparse_moe_block(is_hash, one_rank):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    from pretrain.model.hf import hf_config_from_model_config
    from pretrain.model.moe import V4MoE, megatron_moe_config

    cfg = _cfg()
    torch.manual_seed(11 + is_hash)
    hf = DeepseekV4SparseMoeBlock(hf_config_from_model_config(cfg), 0 if is_hash else 1).eval()
    ours = V4MoE(cfg, 1 if is_hash else 2, is_hash, megatron_moe_config(cfg)).eval()
    g = torch.Generator().manual_seed(5)
    e, _i = cfg.n_routed_experts, cfg.moe_intermediate_size
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        layer = ours.layer
        layer.router.weight.copy_(hf.gate.weight)
        if is_hash:
            hf.gate.tid2eid.copy_(layer.router.tid2eid)
        else:
            hf.gate.e_score_correction_bias.copy_(torch.randn(e, generator=g))
            layer.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
        for k in range(e):
            layer.experts.local_experts[k].linear_fc1.weight.copy_(hf.experts.gate_up_proj[k])
            layer.experts.local_experts[k].linear_fc2.weight.copy_(hf.experts.down_proj[k])
        se = hf.shared_experts
        layer.shared_experts.linear_fc1.weight.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight]))
        layer.shared_experts.linear_fc2.weight.copy_(se.down_proj.weight)
    x = torch.randn(3, 7, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
    with torch.no_grad():
        ref = hf(x, input_ids=ids)
        got = ours(x, ids)
    # fp32; megatron applies the gate before W2 and sums experts in a different order: rounding-level only
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert int(ours.router.tokens_per_expert.sum()) == 3 * 7 * cfg.num_experts_per_tok


def test_hash_table_deterministic_distinct_balanced():
    from pretrain.model.moe import make_hash_table

    t = make_hash_table(129280, 256, 6, seed=0)
    assert t.shape == (129280, 6) and t.dtype == torch.int64
    assert torch.equal(t, make_hash_table(129280, 256, 6, seed=0))
    assert not torch.equal(t, make_hash_table(129280, 256, 6, seed=1))
    assert (t.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct experts per token
    loads = torch.bincount(t.flatten(), minlength=256).float()
    # ideal 129280·6/256 = 3030; leftovers of each permutation are random, so a few % spread (measured ~1%)
    assert loads.max() / loads.min() < 1.05
    exact = torch.bincount(make_hash_table(4096, 8, 2, seed=3).flatten(), minlength=8)
    assert (exact == 4096 * 2 // 8).all()  # K | N_r: exactly balanced


def test_balance_loss_is_v4_sequence_formula(one_rank):
    from pretrain.model.moe import V4MoE, megatron_moe_config

    cfg = _cfg()
    alpha = 0.3
    torch.manual_seed(3)
    moe = V4MoE(cfg, 2, False, megatron_moe_config(cfg), balance_loss_coeff=alpha).train()
    b, s = 3, 9
    x = torch.randn(b, s, cfg.hidden_size)
    moe(x, None)
    logits = x @ moe.router.weight.t()  # [B, S, E]
    aff = torch.nn.functional.softplus(logits).sqrt()
    p = aff / aff.sum(-1, keepdim=True)
    top = aff.topk(cfg.num_experts_per_tok, dim=-1).indices  # unbiased top-k (V3 / megatron)
    f = torch.zeros(b, cfg.n_routed_experts).scatter_add_(1, top.reshape(b, -1), torch.ones(b, s * 3))
    f = f * cfg.n_routed_experts / (cfg.num_experts_per_tok * s)
    expect = alpha * (f * p.mean(1)).sum(-1).mean()
    # fp32 reductions over ≤ 27 terms in a different order: 1e-5 relative
    torch.testing.assert_close(moe.router.balance_loss, expect, rtol=1e-5, atol=0)


def test_expert_bias_update_moves_towards_balance(one_rank):
    from pretrain.model.moe import V4MoE, megatron_moe_config, update_expert_bias

    cfg = _cfg()
    torch.manual_seed(4)
    model = torch.nn.Module()
    model.moe = V4MoE(cfg, 2, False, megatron_moe_config(cfg)).train()
    x = torch.randn(2, 16, cfg.hidden_size)
    model.moe(x, None).sum().backward()
    router = model.moe.router
    loads = router.local_tokens_per_expert.clone()
    assert loads.sum() == 2 * 16 * cfg.num_experts_per_tok
    before = router.expert_bias.clone()
    update_expert_bias(model, rate=0.01)
    expect = before + 0.01 * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(router.expert_bias, expect, rtol=0, atol=1e-7)
    assert router.local_tokens_per_expert.sum() == 0


def test_parameter_metadata(one_rank):
    from parallel.optimizer_groups import optimizer_of
    from pretrain.model.moe import V4MoE, megatron_moe_config

    cfg = _cfg()
    moe = V4MoE(cfg, 2, False, megatron_moe_config(cfg))
    for name, p in moe.named_parameters():
        assert optimizer_of(f"layers.2.mlp.{name}", p) == "muon", name  # its name inside the model
        if "local_experts" in name:
            assert p.v4_expert
        if "linear_fc1" in name:
            assert p.v4_blocks == [cfg.moe_intermediate_size] * 2 and sum(p.v4_blocks) == p.shape[0]


def test_hash_layer_requires_token_ids(one_rank):
    from pretrain.model.moe import V4MoE, megatron_moe_config

    cfg = _cfg()
    moe = V4MoE(cfg, 1, True, megatron_moe_config(cfg))
    with pytest.raises(ValueError, match="input_ids"):
        moe(torch.randn(2, 3, cfg.hidden_size), None)
