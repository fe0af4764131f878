"""V4Attention against HF transformers' DeepseekV4Attention / DeepseekV4Indexer (fp32, CPU), and the
document-packing guarantees (no leakage between documents).

Tiny shapes as in docs/MODEL.md §15.3. HF zero-initialises ``sinks`` and ``position_bias`` and builds
norms with weight 1, which would leave those code paths untested, so every HF tensor is overwritten with
seeded random values before the weights are copied (by name, no renaming) into our module.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ModelConfig, YarnConfig
from pretrain.model.attention import V4Attention

hf_mod = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import DeepseekV4Config  # noqa: E402

HF_TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
LAYERS = ["sliding", "csa", "hca"]
YARN = dict(factor=4.0, original_max_position=64, beta_fast=32.0, beta_slow=1.0)


def make_configs(yarn: bool, index_topk: int, mode: str = "sparse") -> tuple[ModelConfig, DeepseekV4Config]:
    ours = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        head_dim=32,
        rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        compress_rate_csa=4,
        compress_rate_hca=8,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=index_topk,
        layer_types=list(LAYERS),
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        yarn=YarnConfig(enabled=yarn, **YARN),
        max_position_embeddings=256,
        attention_mode=mode,
    )
    rope = None
    if yarn:
        rope = {
            "rope_type": "yarn",
            "factor": YARN["factor"],
            "original_max_position_embeddings": YARN["original_max_position"],
            "beta_fast": YARN["beta_fast"],
            "beta_slow": YARN["beta_slow"],
        }
    hf = DeepseekV4Config(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        partial_rotary_factor=8 / 32,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=index_topk,
        sliding_window=8,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=[HF_TYPES[t] for t in LAYERS],
        mlp_layer_types=["moe"] * 3,
        max_position_embeddings=256,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_parameters=rope,
        attention_dropout=0.0,
    )
    hf._attn_implementation = "eager"
    return ours, hf


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter (norm weights around 1, the rest N(0, 0.1) / N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("sinks") or name.endswith("position_bias"):
                p.copy_(r)
            else:
                p.copy_(0.15 * r)


def copy_weights(hf: torch.nn.Module, ours: torch.nn.Module) -> None:
    result = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not result.unexpected_keys, f"HF tensors without a home in our module: {result.unexpected_keys}"
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not missing, f"our tensors that HF does not have: {missing}"


def hf_attention_inputs(hf_cfg: DeepseekV4Config, x: torch.Tensor):
    B, S, _ = x.shape
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    rot = hf_mod.DeepseekV4RotaryEmbedding(hf_cfg)
    pe = {"main": rot(x, pos, layer_type="main"), "compress": rot(x, pos, layer_type="compress")}
    t = torch.arange(S)
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - hf_cfg.sliding_window)
    mask = torch.zeros(S, S).masked_fill(~allowed, float("-inf")).expand(B, 1, S, S)
    return pe, pos, mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("yarn", [False, True], ids=["plain-rope", "yarn"])
@pytest.mark.parametrize("layer_type", LAYERS)
@pytest.mark.parametrize("seq_len", [21, 37])  # not multiples of m=4 or m'=8
def test_attention_matches_hf(layer_type: str, yarn: bool, seq_len: int) -> None:
    # index_topk >= S/m: the selection is every visible entry, so HF's tie order cannot matter (§15.5 #3)
    ours_cfg, hf_cfg = make_configs(yarn, index_topk=16)
    idx = LAYERS.index(layer_type)
    hf_attn = hf_mod.DeepseekV4Attention(hf_cfg, idx).eval()
    randomize_(hf_attn, seed=100 + idx)
    modes = ["sparse", "dense"] if layer_type == "csa" else ["sparse"]
    torch.manual_seed(7 + seq_len)
    x = torch.randn(2, seq_len, 64)
    pe, pos, mask = hf_attention_inputs(hf_cfg, x)
    with torch.no_grad():
        ref, _ = hf_attn(x, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    for mode in modes:
        ours_cfg.attention_mode = mode
        ours = V4Attention(ours_cfg, layer_type, idx).eval()
        copy_weights(hf_attn, ours)
        with torch.no_grad():
            out = ours(x)
        # fp32 on both sides with the same operation order except: our RoPE angles are formed in float64
        # (HF: float32, error ~|p|*6e-8 rad for p < 40) and einsum vs matmul summation order; both are
        # ~1e-6 relative, so 1e-5 of the output's max magnitude is a tight but safe bound.
        assert rel_err(out, ref) < 1e-5, f"{layer_type}/{mode}: max rel err {rel_err(out, ref):.2e}"


def _tie_aware_same_topk(
    ours_idx: torch.Tensor, hf_idx: torch.Tensor, scores: torch.Tensor, visible: torch.Tensor, k: int, tol: float
) -> None:
    """Both index lists must be valid top-k sets of ``scores`` over the visible entries: same size, every
    entry strictly above the k-th score present in both, and any disagreement only among entries whose
    score equals the k-th score (ties)."""
    B, S, _ = scores.shape
    for b in range(B):
        for t in range(S):
            vis = visible[b, t].nonzero().flatten()
            a = set(i for i in ours_idx[b, t].tolist() if i >= 0)
            h = set(i for i in hf_idx[b, t].tolist() if i >= 0)
            want = min(k, len(vis))
            assert len(a) == want and len(h) == want, (b, t, a, h, want)
            if want == 0:
                continue
            s = scores[b, t, vis]
            kth = s.sort(descending=True).values[want - 1].item()
            must = set(vis[s > kth + tol].tolist())
            assert must <= a and must <= h, (b, t, must, a, h)
            for i in a ^ h:
                assert abs(scores[b, t, i].item() - kth) <= tol, (b, t, i, scores[b, t, i].item(), kth)


@pytest.mark.parametrize("yarn", [False, True], ids=["plain-rope", "yarn"])
def test_indexer_scores_and_topk_match_hf(yarn: bool) -> None:
    k = 3  # fewer than the visible entries (up to 9 at S=37)
    ours_cfg, hf_cfg = make_configs(yarn, index_topk=k)
    hf_idx = hf_mod.DeepseekV4Indexer(hf_cfg).eval()
    randomize_(hf_idx, seed=5)
    ours_attn = V4Attention(ours_cfg, "csa", 1)
    indexer = ours_attn.compressor.indexer
    copy_weights(hf_idx, indexer)
    torch.manual_seed(11)
    B, S = 2, 37
    x = torch.randn(B, S, 64)
    q_latent = torch.randn(B, S, 32)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    captured = {}
    hook = hf_idx.scorer.register_forward_hook(lambda m, i, o: captured.__setitem__("scores", o.detach()))
    with torch.no_grad():
        hf_top = hf_idx(x, q_latent, pos, None, 0)
    hook.remove()
    from ops.compressor import compressed_layout
    from ops.indexer import indexer_topk

    layout = compressed_layout(torch.zeros(B, S, dtype=torch.long), pos, 4)
    with torch.no_grad():
        scores = indexer(x, q_latent, pos, layout, ours_attn.rotary)
    visible = layout.visible_mask()
    ref = captured["scores"]
    # the case this test exists for: exact ties (ReLU zeros of every head) among the visible entries
    assert (ref[visible] == 0).sum() >= 2
    # same fp32 arithmetic up to RoPE angle precision (see test_attention_matches_hf)
    assert rel_err(scores[visible], ref[visible]) < 1e-5
    ours_top = indexer_topk(scores, layout.visible_lo, layout.visible_hi, k)
    # ties: exact zeros from ReLU (all heads negative) are common; 1e-6 absolute covers fp32 rounding of
    # scores whose magnitude is O(1)
    _tie_aware_same_topk(ours_top, hf_top, ref, visible, k, tol=1e-6 * ref.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# packed documents
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer_type,mode",
    [("sliding", "sparse"), ("hca", "sparse"), ("csa", "dense"), ("csa", "indexer_warmup"), ("csa", "sparse")],
)
def test_packed_documents_equal_separate_runs(layer_type: str, mode: str) -> None:
    # index_topk=2 < visible entries, so the sparse selection itself must be document-local too
    cfg, _ = make_configs(yarn=True, index_topk=2, mode=mode)
    torch.manual_seed(3)
    attn = V4Attention(cfg, layer_type, 0)
    randomize_(attn, seed=9)
    lens = [19, 5, 26]  # boundaries 19 and 24: not multiples of 4 or 8
    S = sum(lens)
    x = torch.randn(1, S, 64, requires_grad=True)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).unsqueeze(0)
    packed = attn(x, doc_ids=doc_ids)
    start = 0
    for n in lens:
        alone = attn(x[:, start : start + n].detach())
        # identical arithmetic per query except the size of masked reductions: float32 rounding only
        assert rel_err(packed[:, start : start + n].detach(), alone.detach()) < 1e-5, (layer_type, mode, start)
        start += n
    # no leakage: the last document's outputs do not depend on the earlier documents' inputs at all
    packed[:, lens[0] + lens[1] :].sum().backward()
    assert torch.count_nonzero(x.grad[:, : lens[0] + lens[1]]) == 0
    assert torch.count_nonzero(x.grad[:, lens[0] + lens[1] :]) > 0


def test_doc_ids_single_document_equals_none() -> None:
    cfg, _ = make_configs(yarn=True, index_topk=2, mode="sparse")
    for lt in LAYERS:
        attn = V4Attention(cfg, lt, 0)
        randomize_(attn, seed=21)
        x = torch.randn(2, 29, 64)
        with torch.no_grad():
            a = attn(x)
            b = attn(x, doc_ids=torch.full((2, 29), 4))
        assert torch.equal(a, b), lt  # the same computation: bit-identical


# ----------------------------------------------------------------------------------------------------
# tensor parallelism: tp=2 shards equal the single-rank module
# ----------------------------------------------------------------------------------------------------


def _tp2_worker(rank: int, world: int, layer_types: list[str]) -> dict:
    from parallel.process_groups import init_distributed
    from pretrain.config import ParallelConfig

    cfg, _ = make_configs(yarn=True, index_topk=2, mode="sparse")
    torch.manual_seed(0)
    fulls = {lt: V4Attention(cfg, lt, 0) for lt in layer_types}  # megatron not initialised yet: tp = 1
    init_distributed(ParallelConfig(tp=world), cfg)
    return {lt: _compare_tp_shard(cfg, fulls[lt], lt, rank, world) for lt in layer_types}


def _compare_tp_shard(cfg: ModelConfig, full: V4Attention, layer_type: str, rank: int, world: int) -> dict:
    randomize_(full, seed=31)
    part = V4Attention(cfg, layer_type, 0)
    assert part.tp_size == world
    H, c, g, dg = cfg.num_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    rows = {
        "q_b_proj.weight": (0, H * c // world),
        "o_a_proj.weight": (0, g * dg // world),
        "o_b_proj.weight": (1, g * dg // world),
        "sinks": (0, H // world),
    }
    full_sd = {k: v for k, v in full.state_dict().items() if not k.endswith("_extra_state")}
    shard = {}
    for k, v in full_sd.items():
        if k in rows:
            dim, n = rows[k]
            v = v.narrow(dim, rank * n, n)
        shard[k] = v.clone()
    part.load_state_dict(shard, strict=False)
    torch.manual_seed(1)
    x = torch.randn(2, 29, cfg.hidden_size)
    doc = torch.tensor([[0] * 13 + [1] * 16, [0] * 29])
    w = torch.randn(2, 29, cfg.hidden_size)
    outs, grads = [], []
    for mod in (full, part):
        xi = x.clone().requires_grad_()
        y = mod(xi, doc_ids=doc)
        loss = (y * w).sum() + (mod.indexer_loss if mod.indexer_loss is not None else 0.0)
        loss.backward()
        outs.append((y.detach(), xi.grad, mod.indexer_loss))
        grads.append({n: p.grad for n, p in mod.named_parameters()})
    err = {"out": rel_err(outs[1][0], outs[0][0]), "dx": rel_err(outs[1][1], outs[0][1])}
    if outs[0][2] is not None:
        err["indexer_loss"] = abs(outs[1][2].item() - outs[0][2].item()) / outs[0][2].item()
    for n, gp in grads[1].items():
        gf = grads[0][n]
        if n in rows:
            dim, k = rows[n]
            gf = gf.narrow(dim, rank * k, k)
        err["grad:" + n] = rel_err(gp, gf)
    return err


@pytest.mark.slow
def test_tensor_parallel_two_ranks_match_single_rank() -> None:
    """Output, input gradient, indexer loss and every parameter gradient (sharded ones against the
    matching slice) of a tp=2 CSA and HCA layer equal the tp=1 layer with the same full weights."""
    from tests.harness import run_ranks

    for per_rank in run_ranks(_tp2_worker, 2, ["csa", "hca"], timeout=400):
        for layer_type, err in per_rank.items():
            assert "grad:kv_proj.weight" in err and "out" in err
            # fp32; only the summation order across the two head shards differs
            bad = {k: v for k, v in err.items() if not v < 1e-5}
            assert not bad, (layer_type, bad)
