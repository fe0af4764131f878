"""DeepSeekV4Model forward contract: logits, loss dict (LM, MTP, balance, indexer), ignored labels, gradients,
pipeline-stage split, parameter metadata, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig, YarnConfig


def _cfg(**over) -> ModelConfig:
    base = dict(
        vocab_size=61,
        hidden_size=32,
        num_layers=4,
        layer_types=["sliding", "csa", "hca", "csa"],
        num_heads=4,
        head_dim=16,
        rope_head_dim=8,
        q_lora_rank=24,
        o_groups=2,
        o_lora_rank=12,
        sliding_window=8,
        compress_rate_csa=4,
        compress_rate_hca=8,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_hash_layers=1,
        hc_mult=3,
        max_position_embeddings=256,
        attention_mode="sparse",
        yarn=YarnConfig(enabled=True, factor=2.0, original_max_position=16),
    )
    base.update(over)
    return ModelConfig(**base)


def _batch(cfg, b=2, s=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 2), generator=g)
    ids, labels, mtp = tokens[:, :-2], tokens[:, 1:-1].clone(), tokens[:, 2:].clone()
    labels[0, 3] = -100  # some ignored positions
    mtp[:, -1] = -100
    return ids, labels, mtp


def test_loss_dict_terms(one_rank):
    from pretrain.model.transformer import DeepSeekV4Model

    cfg = _cfg()
    torch.manual_seed(1)
    model = DeepSeekV4Model(cfg, balance_loss_coeff=1e-2).train()
    ids, labels, mtp = _batch(cfg)
    logits = model(ids)
    assert logits.shape == (*ids.shape, cfg.vocab_size)
    out = model(ids, labels=labels, mtp_labels=mtp, mtp_lambda=0.3)
    assert set(out) == {"loss", "lm_loss", "mtp_loss", "balance_loss", "indexer_loss"}
    # the same weights and inputs (no dropout): the LM loss is the CE of the logits over non-ignored labels;
    # fp32 with an identical graph: 1e-6
    expect = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out["lm_loss"], expect, rtol=1e-6, atol=1e-6)
    total = out["lm_loss"] + 0.3 * out["mtp_loss"] + out["balance_loss"] + cfg.indexer_loss_coeff * out["indexer_loss"]
    torch.testing.assert_close(out["loss"], total, rtol=1e-6, atol=1e-6)
    # 3 learned routers (layers 2, 3 and the MTP block) each contribute ≈ α at near-uniform routing
    assert 0 < out["balance_loss"].item() < 3 * 1e-2 * 2
    assert out["indexer_loss"].item() > 0 and out["mtp_loss"].item() > 0
    out["loss"].backward()
    assert model.mtp.e_proj.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.layers["0"].attn_hc.scale.grad.abs().sum() > 0
    idx = model.layers["1"].self_attn.compressor.indexer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in idx.parameters())


def test_ignored_labels_do_not_contribute(one_rank):
    from pretrain.model.transformer import DeepSeekV4Model

    cfg = _cfg(num_mtp_layers=0)
    torch.manual_seed(2)
    model = DeepSeekV4Model(cfg).eval()
    ids, labels, _ = _batch(cfg, seed=3)
    lab2 = labels.clone()
    lab2[:, :5] = -100
    with torch.no_grad():
        logits = model(ids)
        out = model(ids, labels=lab2)
    expect = F.cross_entropy(logits[:, 5:].flatten(0, 1), labels[:, 5:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out["lm_loss"], expect, rtol=1e-6, atol=1e-6)  # same graph, fp32
    assert out["mtp_loss"].item() == 0.0 and out["balance_loss"].item() == 0.0  # eval: no balance loss


def test_pipeline_split_equals_full_model(one_rank):
    from pretrain.model.transformer import DeepSeekV4Model

    cfg = _cfg()
    torch.manual_seed(5)
    full = DeepSeekV4Model(cfg).eval()
    first = DeepSeekV4Model(cfg, pre_process=True, post_process=False, layer_range=(0, 2)).eval()
    last = DeepSeekV4Model(cfg, pre_process=False, post_process=True, layer_range=(2, 4)).eval()
    sd = full.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if k in first.state_dict()}, strict=True)
    last_sd = {k: v for k, v in sd.items() if k in last.state_dict()}
    last_sd["mtp_embed_tokens.weight"] = sd["embed_tokens.weight"]
    last.load_state_dict(last_sd, strict=True)
    assert last.mtp_embed_tokens.weight.shared_embedding
    ids, labels, mtp = _batch(cfg, seed=7)
    with torch.no_grad():
        ref = full(ids, labels=labels, mtp_labels=mtp)
        streams = first(ids)
        assert streams.shape == (*ids.shape, cfg.hc_mult, cfg.hidden_size)
        last.set_input_tensor(streams)
        got = last(ids, labels=labels, mtp_labels=mtp)
    for k in ("lm_loss", "mtp_loss"):  # the identical computation split in two: bit-level equality expected
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_every_parameter_has_optimizer_metadata(one_rank):
    from parallel.optimizer_groups import optimizer_of
    from pretrain.model.transformer import DeepSeekV4Model

    model = DeepSeekV4Model(_cfg())
    owners = {n: optimizer_of(n, p) for n, p in model.named_parameters()}
    assert set(owners.values()) == {"muon", "adamw"}
    for name in (
        "embed_tokens.weight",
        "lm_head.weight",
        "norm.weight",
        "layers.0.attn_hc.base",
        "layers.0.attn_hc.scale",
        "hc_head.hc_base",
        "layers.1.self_attn.sinks",
    ):
        assert owners[name] == "adamw", name
    for name in ("layers.0.attn_hc.fn", "hc_head.hc_fn", "layers.1.mlp.layer.router.weight", "mtp.e_proj.weight"):
        assert owners[name] == "muon", name


def test_bad_inputs_are_named(one_rank):
    from pretrain.model.transformer import DeepSeekV4Model

    cfg = _cfg(num_mtp_layers=0)
    model = DeepSeekV4Model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="layer_range"):
        DeepSeekV4Model(cfg, layer_range=(3, 9))
