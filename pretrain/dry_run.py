"""Layout dry-run: memory per rank of a V4 config on N GPUs, from the real shards built on the meta device.

    python -m pretrain.dry_run --config flash --world 256 parallel.pp=4 parallel.ep=64 \
        'parallel.pp_layer_split=[10,11,11,11]'
    python -m pretrain.dry_run --config flash model.recompute=selective     # another recompute setting
    python -m pretrain.dry_run --readme          # the Flash / Pro tables on 256 and 1024 GPUs
    python -m pretrain.dry_run --long-context    # what fits at 128K / 256K / 1M tokens (pretrain.long_context_plan)

For every pipeline rank (one representative rank each, :mod:`parallel.layout_plan`) the rank's model chunks
are built with the training code (``pretrain.model.build`` → ``DeepSeekV4Model`` stages) under
``torch.device("meta")`` and a fake process group, then counted: parameters, fp32 gradients, optimizer
state of the stage's most loaded rank (:mod:`parallel.optimizer_memory`: Muon's fp32 momentum only on the owner
ranks of Muon's own load-balanced plan; AdamW 2 × fp32, with ``optim.shard_adamw`` only for the cells the rank
owns in ZeroAdamW's plan). The layout is validated first (``compute_layout``, ``validate_batch``).

Activations are an ESTIMATE (bf16 activations A = 2 B, fp32 F = 4 B; FlashAttention-style attention that saves
q, k=v, o and the log-sum-exp, a fused indexer that keeps the top-k indices, not the [S, S/m] score matrix).
Per token of this rank (T = micro_batch · seq_len / sp tokens; h = n_h / tp local heads; routed experts see
T/tp tokens under TP), per layer without recomputation (``model.recompute=none``):

    mHC (2 sites)   2 · (F·n·d + A·d)                      stream state X and the sub-layer output
    norms           2 · A·d
    attention       A·(d + 2·d_c + 5·h·c + 3·c·sp + 2·(g/tp)·d_g) + F·h
    compressor      A·2·w   (w = 2c CSA, c HCA)            kv / gate projections
    indexer (CSA)   A·(2·n_I·c_I + 4·c_I) + F·n_I + 4·k    query, its compressor, weights, top-k indices
    MoE             F·2·N_r + A·d + A·K_r·(4d + 3I)/tp + A·3·I_s/tp     router, dispatch, experts, shared

With activation recomputation (``model.recompute``, :mod:`pretrain.model.recompute`) a block keeps
    selective       the above − A·4·h·c − F·h    q up-projection, its norm, RoPE'd q, o and lse are rebuilt
    full            F·n·d                        only its input stream state X
and ``recompute_num_layers`` = N > 0 applies the setting to the first N blocks of every chunk only (the MTP
block then keeps everything). During the backward of a recomputed block its rebuilt activations exist once
more (one block, one micro-batch): the largest such working set of the rank is added to the peak.

The last stage adds the fp32 logits of the head and of MTP (2 · F · V/tp per token) and one MTP block.
In-flight micro-batches per pipeline rank r (1F1B): min(pp − r, M); interleaved (vpp > 1, megatron's warm-up):
min((pp − r − 1)·2 + (vpp − 1)·pp + 1, M·vpp) chunk-forwards. Peak activations = in-flight × per-micro-batch
activations of one chunk (the rank's mean chunk) + the recompute working set.

Output: a comparison of the peak rank under none / selective / full / the config's setting against the GPU's
memory (``--gpu-gb``, H200: 141 GB = 131.3 GiB; "free" < 0: does not fit), then the per-rank table for the
config's setting, which names the setting it assumed and shows the total without recomputation beside it.
The estimate leaves out the CUDA context and library workspaces, NCCL buffers and allocator fragmentation:
keep several GiB free (the shipped Flash/Pro settings keep ≥ 10 GiB, see their YAML files).
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
from pretrain.config import RECOMPUTE_MODES

log = logging.getLogger(__name__)

README_LAYOUTS = [  # (config, world, parallel overrides)
    ("flash", 256, {"tp": 1, "pp": 4, "ep": 64, "pp_layer_split": [10, 11, 11, 11]}),
    ("flash", 1024, {"tp": 1, "pp": 4, "ep": 128, "pp_layer_split": [10, 11, 11, 11]}),
    ("pro", 256, {"tp": 1, "pp": 8, "ep": 32, "pp_layer_split": [7, 8, 8, 8, 8, 8, 8, 6]}),
    ("pro", 1024, {"tp": 1, "pp": 8, "ep": 128, "pp_layer_split": [7, 8, 8, 8, 8, 8, 8, 6]}),
]


Setting = tuple[str, int]  # (model.recompute, model.recompute_num_layers)


def setting_of(cfg: Any) -> Setting:
    return (getattr(cfg, "recompute", "none"), getattr(cfg, "recompute_num_layers", 0))


def setting_name(setting: Setting) -> str:
    mode, n = setting
    return mode if not n or mode == "none" else f"{mode} on the first {n} blocks per chunk"


def layer_activation_bytes_per_token(
    cfg: Any, layer_type: str, tp: int, sp: int, k_top: int, recompute: str = "none"
) -> float:
    """Activations one block keeps for its backward per token of this rank (see the module docstring)."""
    A, F = 2, 4
    d, n, c, dc = cfg.hidden_size, cfg.hc_mult, cfg.head_dim, cfg.q_lora_rank
    h = cfg.num_heads / tp
    if recompute == "full":
        return F * n * d  # the block's input stream state X; the rest is rebuilt in backward
    mhc = 2 * (F * n * d + A * d)
    norms = 2 * A * d
    attn = A * (d + 2 * dc + 5 * h * c + 3 * c * sp + 2 * (cfg.o_groups / tp) * cfg.o_lora_rank) + F * h
    if recompute == "selective":  # q up-projection, its norm, RoPE'd q, o and lse are recomputed
        attn -= A * 4 * h * c + F * h
    comp = {"csa": A * 2 * 2 * c, "hca": A * 2 * c, "sliding": 0}[layer_type]
    idx = 0.0
    if layer_type == "csa":
        idx = (
            A * (2 * cfg.index_n_heads * cfg.index_head_dim + 4 * cfg.index_head_dim)
            + F * cfg.index_n_heads
            + 4 * k_top
        )
    inter, shared = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    moe = (
        F * 2 * cfg.n_routed_experts
        + A * d
        + A * cfg.num_experts_per_tok * (4 * d + 3 * inter) / tp
        + A * 3 * shared / tp
    )
    return mhc + norms + attn + comp + idx + moe


def chunk_activation_bytes(
    cfg: Any, layout: Layout, stage: int, ranges: list[tuple[int, int]], tokens: float, setting: Setting
) -> tuple[float, float]:
    """(bytes one micro-batch of virtual stage ``stage`` keeps, the largest transient a recomputed block
    rebuilds during its backward) for ``setting``."""
    mode, first_n = setting
    lo, hi = ranges[stage]
    blocks = [
        (cfg.layer_types[i], mode if (first_n == 0 or k < first_n) else "none") for k, i in enumerate(range(lo, hi))
    ]
    kept = 0.0
    if stage == layout.pp * layout.vpp - 1:  # head + MTP logits (fp32), and the MTP block
        kept += 2 * 4 * cfg.vocab_size / layout.tp
        blocks.append((cfg.mtp_layer_type, mode if first_n == 0 else "none"))
    work = 0.0
    for layer_type, m in blocks:
        b = layer_activation_bytes_per_token(cfg, layer_type, layout.tp, layout.sp, cfg.index_topk, m)
        kept += b
        work = max(work, layer_activation_bytes_per_token(cfg, layer_type, layout.tp, layout.sp, cfg.index_topk) - b)
    return kept * tokens, work * tokens


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
    act: dict[Setting, float]  # peak activation bytes per recompute setting
    setting: Setting  # the config's setting (``act_bytes``)

    @property
    def act_bytes(self) -> float:
        return self.act[self.setting]

    def total(self, setting: Setting | None = None) -> float:
        act = self.act_bytes if setting is None else self.act[setting]
        return self.mem.param_bytes + self.mem.grad_bytes + self.mem.optimizer_bytes + act


def plan(
    cfg: Any,
    world: int,
    pcfg: Any,
    micro_batch: int,
    seq_len: int,
    global_batch: int,
    settings: list[Setting] | None = None,
    optim: Any = None,
) -> tuple[Layout, list[RankRow]]:
    """Validate the layout, build every pipeline rank's shard on meta, return per-rank memory. Activations for
    the config's recompute setting and for each of ``settings`` (the shards are built once); optimizer state
    for ``optim`` (an OptimConfig; None = its defaults)."""
    from parallel.optimizer_memory import stage_optimizer_memory
    from pretrain.config import OptimConfig
    from pretrain.model.build import build_model

    optim = optim if optim is not None else OptimConfig()

    layout = compute_layout(
        world,
        pcfg.tp,
        pcfg.pp,
        pcfg.vpp,
        pcfg.ep,
        pcfg.etp,
        pcfg.sp,
        model=cfg,
        pp_layer_split=list(pcfg.pp_layer_split or []),
    )
    m = validate_batch(layout, global_batch, micro_batch, seq_len, cfg)
    ranges = stage_layer_ranges(cfg.num_layers, layout.pp, layout.vpp, pcfg.pp_layer_split or None)
    tokens = micro_batch * seq_len / layout.sp
    own = setting_of(cfg)
    settings = list(dict.fromkeys(list(settings or []) + [own]))
    rows = []
    for pp_rank, rank in enumerate(layout_plan.representative_ranks(layout)):
        with layout_plan.fake_rank(world, rank, layout), torch.device("meta"):
            chunks = build_model(cfg, seed=0, pp_layer_split=pcfg.pp_layer_split or None, wrap_ddp=False)
        mem = layout_plan.shard_memory(chunks)
        mem.optimizer = stage_optimizer_memory(
            [(n, p) for c in chunks for n, p in c.named_parameters()], layout, pp_rank, optim
        )
        stages = chunk_stages(pp_rank, layout.pp, layout.vpp)
        act = {}
        for setting in settings:
            per_chunk = [chunk_activation_bytes(cfg, layout, s, ranges, tokens, setting) for s in stages]
            kept = sum(k for k, _ in per_chunk) / len(per_chunk)
            act[setting] = in_flight(layout, pp_rank, m) * kept + max(w for _, w in per_chunk)
        rows.append(
            RankRow(
                pp_rank,
                ", ".join(f"{ranges[s][0]}-{ranges[s][1] - 1}" if ranges[s][1] > ranges[s][0] else "-" for s in stages),
                mem,
                act,
                own,
            )
        )
        del chunks
    return layout, rows


def render(
    name: str, cfg: Any, layout: Layout, rows: list[RankRow], micro_batch: int, seq_len: int, global_batch: int
) -> str:
    G = layout_plan.GiB
    none = ("none", 0)
    header = [
        "pp rank",
        "layers",
        "params (B)",
        "of which experts (B)",
        "weights GiB",
        "grads GiB",
        "optimizer GiB",
        "activations GiB",
        "total GiB",
    ]
    compare = rows[0].setting != none and none in rows[0].act
    if compare:
        header.append("total GiB, recompute=none")
    body = []
    for r in rows:
        body.append(
            [
                str(r.pp_rank),
                r.layers,
                f"{r.mem.params / 1e9:.2f}",
                f"{r.mem.expert_params / 1e9:.2f}",
                f"{r.mem.param_bytes / G:.1f}",
                f"{r.mem.grad_bytes / G:.1f}",
                f"{r.mem.optimizer_bytes / G:.1f}",
                f"{r.act_bytes / G:.1f}",
                f"{r.total() / G:.1f}",
            ]
            + ([f"{r.total(none) / G:.1f}"] if compare else [])
        )
    title = (
        f"{name} on {layout.world} GPUs: tp={layout.tp} pp={layout.pp} vpp={layout.vpp} ep={layout.ep} "
        f"etp={layout.etp} sp={layout.sp} → dp={layout.dp}, expert-dp={layout.expert_dp}; micro_batch "
        f"{micro_batch} × seq {seq_len}, global batch {global_batch} "
        f"({global_batch // (micro_batch * layout.dp)} micro-batches per dp rank); "
        f"activations with recompute={setting_name(setting_of(cfg))}"
    )
    return layout_plan.format_table(title, header, body)


def render_comparison(entries: list[tuple[str, Layout, list[RankRow]]], gpu_gb: float) -> str:
    """One row per (config, layout, recompute setting): the rank with the largest total and whether it fits."""
    G = layout_plan.GiB
    cap = gpu_gb * 1e9
    header = [
        "model",
        "GPUs",
        "layout",
        "recompute",
        "peak pp rank",
        "activations GiB",
        "total GiB",
        f"free of {gpu_gb:g} GB, GiB",
    ]
    body = []
    for name, layout, rows in entries:
        for setting in rows[0].act:
            peak = max(rows, key=lambda r: r.total(setting))
            label = setting_name(setting) + (" (config)" if setting == rows[0].setting else "")
            body.append(
                [
                    name,
                    str(layout.world),
                    f"tp{layout.tp} pp{layout.pp} ep{layout.ep} dp{layout.dp}",
                    label,
                    str(peak.pp_rank),
                    f"{peak.act[setting] / G:.1f}",
                    f"{peak.total(setting) / G:.1f}",
                    f"{(cap - peak.total(setting)) / G:.1f}",
                ]
            )
    title = (
        f"Peak memory per GPU by activation recomputation ({gpu_gb:g} GB = {cap / G:.1f} GiB per GPU; "
        f"negative = does not fit)"
    )
    return layout_plan.format_table(title, header, body)


COMPARE = [(mode, 0) for mode in RECOMPUTE_MODES]  # every mode on every block


def run(
    config: str, world: int, overrides: list[str], global_batch: int | None = None, gpu_gb: float = 141.0
) -> tuple[str, tuple[str, Layout, list[RankRow]]]:
    """(the per-rank table for the config's recompute setting, the entry for :func:`render_comparison`)."""
    from pretrain.config import load_config

    cfg = load_config(config, overrides)
    t = cfg.train
    gb = global_batch or t.global_batch
    t0 = time.monotonic()
    layout, rows = plan(cfg.model, world, cfg.parallel, t.micro_batch, t.seq_len, gb, settings=COMPARE, optim=cfg.optim)
    out = render(config, cfg.model, layout, rows, t.micro_batch, t.seq_len, gb)
    log.info("%s on %d: %.1f s", config, world, time.monotonic() - t0)
    return out, (config, layout, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="flash")
    ap.add_argument("--world", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=None, help="default: train.global_batch of the config")
    ap.add_argument("--gpu-gb", type=float, default=141.0, help="memory per GPU in GB (10^9 B); H200: 141")
    ap.add_argument("--readme", action="store_true", help="the Flash/Pro tables on 256 and 1024 GPUs")
    ap.add_argument(
        "--long-context",
        action="store_true",
        help="Flash/Pro at 128K, 256K, 1M tokens on 256 and 1024 GPUs: proposed sp/recompute, memory, time",
    )
    ap.add_argument("--mfu", type=float, default=0.4, help="--long-context: assumed model FLOP utilisation")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.pp=4 model.recompute=full")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.long_context:
        from pretrain.long_context_plan import LENGTHS, propose, render_proposals

        props = [propose(name, world, par, S, a.gpu_gb, a.mfu) for name, world, par in README_LAYOUTS for S in LENGTHS]
        print(render_proposals(props, a.gpu_gb, a.mfu), flush=True)
        return 0
    runs = []
    if a.readme:
        for name, world, par in README_LAYOUTS:
            ov = [f"parallel.{k}={v}".replace(" ", "") for k, v in par.items()]
            runs.append(run(name, world, ov, a.global_batch, a.gpu_gb))
    else:
        runs.append(run(a.config, a.world, a.overrides, a.global_batch, a.gpu_gb))
    print(render_comparison([entry for _, entry in runs], a.gpu_gb), end="\n\n")
    for table, _ in runs:
        print(table, end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
