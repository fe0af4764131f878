"""What fits at long context: per-GPU memory and step time of Flash / Pro at 128K, 256K and 1M tokens on N×8 H200.

    python -m pretrain.dry_run --long-context [--gpu-gb 141] [--mfu 0.4]

For each (config, world, sequence length S) the layout is proposed by search: the config's shipped tp / pp /
ep / pp_layer_split (``README_LAYOUTS`` of :mod:`pretrain.dry_run`) with micro-batch 1 × S, and the smallest
Ulysses degree sp (1, 2, 4, ... up to the heads) for which some recompute setting (none, then selective, then
full) leaves at least ``--reserve-gib`` of the GPU free at the peak pipeline rank (the memory of
:func:`pretrain.dry_run.plan`: real meta-device shards, optimizer state, the activation estimate with S/sp
tokens per rank and min(pp − r, M) micro-batches in flight). A layout ``compute_layout`` rejects is skipped.

Step time = FLOPs of the global batch (``pretrain.flop_model.step_flops``, the quadratic indexer / CSA / HCA
terms exact) / (world · peak · MFU) × the 1F1B bubble (1 + (pp − 1)/M), with M = 2·pp micro-batches per
data-parallel rank (global batch = M · dp sequences), peak = 989 TFLOP/s (H200 dense bf16) and an assumed
MFU (default 0.4; an assumption, not a measurement).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Proposal", "propose", "render_proposals", "LENGTHS", "H200_PEAK_FLOPS"]

LENGTHS = (131072, 262144, 1048576)
H200_PEAK_FLOPS = 989e12
SETTING_ORDER = (("none", 0), ("selective", 0), ("full", 0))


@dataclass
class Proposal:
    config: str
    world: int
    seq_len: int
    layout: str
    recompute: str
    peak_gib: float  # per GPU, the peak pipeline rank
    free_gib: float
    global_batch: int  # sequences
    step_s: float
    quadratic_share: float  # of the step's FLOPs
    fits: bool


def _sp_candidates(cfg: Any, tp: int) -> list[int]:
    heads = cfg.num_heads // tp
    return [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= heads and heads % s == 0]


def propose(
    config: str, world: int, par: dict, seq_len: int, gpu_gb: float = 141.0, mfu: float = 0.4, reserve_gib: float = 10.0
) -> Proposal:
    """The first (sp, recompute) that fits, or the best that does not (see the module docstring)."""
    from parallel.layout_plan import GiB
    from parallel.process_groups import LayoutError
    from pretrain.config import load_config
    from pretrain.dry_run import plan
    from pretrain.flop_model import step_flops

    best: Proposal | None = None
    for sp in _sp_candidates(load_config(config).model, par.get("tp", 1)):
        ov = [f"parallel.{k}={v}".replace(" ", "") for k, v in par.items()] + [f"parallel.sp={sp}"]
        cfg = load_config(config, ov)
        pp, tp = cfg.parallel.pp, cfg.parallel.tp
        if world % (tp * pp * sp):
            continue
        dp = world // (tp * pp * sp)
        M = 2 * pp
        gb = M * dp
        try:
            layout, rows = plan(
                cfg.model, world, cfg.parallel, 1, seq_len, gb, settings=list(SETTING_ORDER), optim=cfg.optim
            )
        except LayoutError as e:
            log.info("%s on %d, sp=%d: %s", config, world, sp, e)
            continue
        for setting in SETTING_ORDER:
            peak = max(r.total(setting) for r in rows)
            free = gpu_gb * 1e9 - peak
            fl = step_flops(cfg.model, seq_len, batch=gb, recompute=setting[0])
            step = fl.total / (world * H200_PEAK_FLOPS * mfu) * (1 + (pp - 1) / M)
            prop = Proposal(
                config,
                world,
                seq_len,
                f"tp{tp} pp{pp} sp{sp} ep{cfg.parallel.ep} dp{dp}",
                setting[0],
                peak / GiB,
                free / GiB,
                gb,
                step,
                fl.quadratic / fl.total,
                free / GiB >= reserve_gib,
            )
            if prop.fits:
                return prop
            if best is None or prop.free_gib > best.free_gib:
                best = prop
    if best is None:
        raise ValueError(f"{config} on {world} GPUs at {seq_len} tokens: no valid layout with its tp/pp/ep")
    return best


def render_proposals(props: list[Proposal], gpu_gb: float, mfu: float) -> str:
    from parallel.layout_plan import format_table

    header = [
        "model",
        "GPUs",
        "tokens",
        "proposed layout",
        "recompute",
        "peak GiB/GPU",
        f"free of {gpu_gb:g} GB",
        "global batch (seq)",
        "step s",
        "quadratic FLOP share",
        "fits",
    ]
    body = [
        [
            p.config,
            str(p.world),
            f"{p.seq_len // 1024}K",
            p.layout,
            p.recompute,
            f"{p.peak_gib:.1f}",
            f"{p.free_gib:.1f}",
            str(p.global_batch),
            f"{p.step_s:.1f}",
            f"{100 * p.quadratic_share:.0f}%",
            "yes" if p.fits else "NO",
        ]
        for p in props
    ]
    title = (
        f"What fits at long context (H200 {gpu_gb:g} GB; step time at {mfu:.0%} MFU of 989 TFLOP/s, an "
        f"assumption; micro-batch 1 × S, 2·pp micro-batches per dp rank)"
    )
    return format_table(title, header, body)
