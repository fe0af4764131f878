"""Layout dry-run: memory per rank of a V4 config on N GPUs, from the real shards built on the meta device.

    python -m pretrain.dry_run --config flash --world 256 parallel.pp=4 parallel.ep=64 \
        'parallel.pp_layer_split=[10,11,11,11]'
    python -m pretrain.dry_run --readme          # the Flash / Pro tables on 256 and 1024 GPUs

For every pipeline rank (one representative rank each, :mod:`parallel.layout_plan`) the rank's model chunks
are built with the training code (``pretrain.model.build`` → ``DeepSeekV4Model`` stages) under
``torch.device("meta")`` and a fake process group, then counted: parameters, fp32 gradients, optimizer
state (Muon 1 × fp32, AdamW 2 × fp32). The layout is validated first (``compute_layout``, ``validate_batch``).

Activations are an ESTIMATE (bf16 activations A = 2 B, fp32 F = 4 B; no recomputation; FlashAttention-style
attention that saves q, k=v, o and the log-sum-exp, a fused indexer that keeps the top-k indices, not the
[S, S/m] score matrix). Per token of this rank (T = micro_batch · seq_len / sp tokens; h = n_h / tp local
heads; routed experts see T/tp tokens under TP), per layer:

    mHC (2 sites)   2 · (F·n·d + A·d)                      stream state X and the sub-layer output
    norms           2 · A·d
    attention       A·(d + 2·d_c + 5·h·c + 3·c·sp + 2·(g/tp)·d_g) + F·h
    compressor      A·2·w   (w = 2c CSA, c HCA)            kv / gate projections
    indexer (CSA)   A·(2·n_I·c_I + 4·c_I) + F·n_I + 4·k    query, its compressor, weights, top-k indices
    MoE             F·2·N_r + A·d + A·K_r·(4d + 3I)/tp + A·3·I_s/tp     router, dispatch, experts, shared

The last stage adds the fp32 logits of the head and of MTP (2 · F · V/tp per token) and one MTP block.
In-flight micro-batches per pipeline rank r (1F1B): min(pp − r, M); interleaved (vpp > 1, megatron's warm-up):
min((pp − r − 1)·2 + (vpp − 1)·pp + 1, M·vpp) chunk-forwards. Peak activations = in-flight × per-micro-batch
activations of one chunk (the rank's mean chunk).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from parallel import layout_plan
from parallel.pipeline import chunk_stages, stage_layer_ranges
from parallel.process_groups import Layout, compute_layout, validate_batch

log = logging.getLogger(__name__)

README_LAYOUTS = [   # (config, world, parallel overrides)
    ("flash", 256, {"tp": 1, "pp": 4, "ep": 64, "pp_layer_split": [10, 11, 11, 11]}),
    ("flash", 1024, {"tp": 1, "pp": 4, "ep": 128, "pp_layer_split": [10, 11, 11, 11]}),
    ("pro", 256, {"tp": 1, "pp": 8, "ep": 32, "pp_layer_split": [7, 8, 8, 8, 8, 8, 8, 6]}),
    ("pro", 1024, {"tp": 1, "pp": 8, "ep": 128, "pp_layer_split": [7, 8, 8, 8, 8, 8, 8, 6]}),
]


def layer_activation_bytes_per_token(cfg: Any, layer_type: str, tp: int, sp: int, k_top: int) -> float:
    """Saved activations of one block per token of this rank (see the module docstring)."""
    A, F = 2, 4
    d, n, c, dc = cfg.hidden_size, cfg.hc_mult, cfg.head_dim, cfg.q_lora_rank
    h = cfg.num_heads / tp
    mhc = 2 * (F * n * d + A * d)
    norms = 2 * A * d
    attn = A * (d + 2 * dc + 5 * h * c + 3 * c * sp + 2 * (cfg.o_groups / tp) * cfg.o_lora_rank) + F * h
    comp = {"csa": A * 2 * 2 * c, "hca": A * 2 * c, "sliding": 0}[layer_type]
    idx = 0.0
    if layer_type == "csa":
        idx = A * (2 * cfg.index_n_heads * cfg.index_head_dim + 4 * cfg.index_head_dim) + F * cfg.index_n_heads \
            + 4 * k_top
    inter, shared = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    moe = F * 2 * cfg.n_routed_experts + A * d + A * cfg.num_experts_per_tok * (4 * d + 3 * inter) / tp \
        + A * 3 * shared / tp
    return mhc + norms + attn + comp + idx + moe


def in_flight(layout: Layout, pp_rank: int, microbatches: int) -> int:
    """Chunk-forwards whose activations are alive at the peak of the schedule on ``pp_rank``."""
    pp, vpp = layout.pp, layout.vpp
    if vpp == 1:
        return min(pp - pp_rank, microbatches)
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, microbatches * vpp)


@dataclass
class RankRow:
    pp_rank: int
    layers: str
    mem: layout_plan.ShardMemory
    act_bytes: float


def plan(cfg: Any, world: int, pcfg: Any, micro_batch: int, seq_len: int, global_batch: int) -> tuple[Layout, list[RankRow]]:
    """Validate the layout, build every pipeline rank's shard on meta, return per-rank memory."""
    from pretrain.model.build import build_model

    layout = compute_layout(world, pcfg.tp, pcfg.pp, pcfg.vpp, pcfg.ep, pcfg.etp, pcfg.sp, model=cfg,
                            pp_layer_split=list(pcfg.pp_layer_split or []))
    m = validate_batch(layout, global_batch, micro_batch, seq_len, cfg)
    ranges = stage_layer_ranges(cfg.num_layers, layout.pp, layout.vpp, pcfg.pp_layer_split or None)
    tokens = micro_batch * seq_len / layout.sp
    k_top = cfg.index_topk
    rows = []
    for pp_rank, rank in enumerate(layout_plan.representative_ranks(layout)):
        with layout_plan.fake_rank(world, rank, layout), torch.device("meta"):
            chunks = build_model(cfg, seed=0, pp_layer_split=pcfg.pp_layer_split or None, wrap_ddp=False)
        mem = layout_plan.shard_memory(chunks)
        stages = chunk_stages(pp_rank, layout.pp, layout.vpp)
        chunk_bytes = []
        for s in stages:
            lo, hi = ranges[s]
            b = sum(layer_activation_bytes_per_token(cfg, cfg.layer_types[i], layout.tp, layout.sp, k_top)
                    for i in range(lo, hi))
            if s == layout.pp * layout.vpp - 1:
                b += 2 * 4 * cfg.vocab_size / layout.tp
                b += layer_activation_bytes_per_token(cfg, cfg.mtp_layer_type, layout.tp, layout.sp, k_top)
            chunk_bytes.append(b * tokens)
        act = in_flight(layout, pp_rank, m) * sum(chunk_bytes) / len(chunk_bytes)
        rows.append(RankRow(pp_rank, ", ".join(f"{ranges[s][0]}-{ranges[s][1] - 1}" if ranges[s][1] > ranges[s][0]
                                               else "-" for s in stages), mem, act))
        del chunks
    return layout, rows


def render(name: str, cfg: Any, layout: Layout, rows: list[RankRow], micro_batch: int, seq_len: int,
           global_batch: int) -> str:
    G = layout_plan.GiB
    header = ["pp rank", "layers", "params (B)", "of which experts (B)", "weights GiB", "grads GiB",
              "optimizer GiB", "activations GiB", "total GiB"]
    body = []
    for r in rows:
        tot = r.mem.param_bytes + r.mem.grad_bytes + r.mem.optimizer_bytes + r.act_bytes
        body.append([str(r.pp_rank), r.layers, f"{r.mem.params / 1e9:.2f}", f"{r.mem.expert_params / 1e9:.2f}",
                     f"{r.mem.param_bytes / G:.1f}", f"{r.mem.grad_bytes / G:.1f}", f"{r.mem.optimizer_bytes / G:.1f}",
                     f"{r.act_bytes / G:.1f}", f"{tot / G:.1f}"])
    title = (f"{name} on {layout.world} GPUs: tp={layout.tp} pp={layout.pp} vpp={layout.vpp} ep={layout.ep} "
             f"etp={layout.etp} sp={layout.sp} → dp={layout.dp}, expert-dp={layout.expert_dp}; micro_batch "
             f"{micro_batch} × seq {seq_len}, global batch {global_batch} "
             f"({global_batch // (micro_batch * layout.dp)} micro-batches per dp rank)")
    return layout_plan.format_table(title, header, body)


def run(config: str, world: int, overrides: list[str], global_batch: int | None = None) -> str:
    from pretrain.config import load_config
    cfg = load_config(config, overrides)
    t = cfg.train
    gb = global_batch or t.global_batch
    t0 = time.monotonic()
    layout, rows = plan(cfg.model, world, cfg.parallel, t.micro_batch, t.seq_len, gb)
    out = render(config, cfg.model, layout, rows, t.micro_batch, t.seq_len, gb)
    log.info("%s on %d: %.1f s", config, world, time.monotonic() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="flash")
    ap.add_argument("--world", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=None, help="default: train.global_batch of the config")
    ap.add_argument("--readme", action="store_true", help="the Flash/Pro tables on 256 and 1024 GPUs")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.pp=4")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.readme:
        for name, world, par in README_LAYOUTS:
            ov = [f"parallel.{k}={v}".replace(" ", "") for k, v in par.items()]
            print(run(name, world, ov, a.global_batch), end="\n\n", flush=True)
        return 0
    print(run(a.config, a.world, a.overrides, a.global_batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
