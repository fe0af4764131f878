"""Parameter counts and KV-cache size of a V4 config, from the model's own module classes on the meta device.

    python -m pretrain.model.param_count [--config flash pro ...]

Counting (docs/MODEL.md §13, §14): one block of every distinct kind (attention type × hash/learned routing)
is built with ``torch.device("meta")`` (no memory), its parameters are counted and multiplied by how often the
kind occurs; embedding and head are counted once each (untied). MTP is counted separately.
* total  = embedding + head + hc_head + final norm + Σ blocks
* active = the same, minus the (N_r − K_r) routed experts a token does not use in each block, minus the
  embedding (a lookup, not a matmul) — "attention + K_r routed + shared expert + router + head".
KV cache per token at long context (steady state; windows are O(1)): a compressed entry holds the
head_dim − rope_head_dim "nope" dims in FP8 and the rope dims in BF16 (448 + 128 = 576 B for V4); CSA stores
one entry per m tokens plus an FP4 indexer key (c^I/2 B), HCA one entry per m' tokens. V3.2 baseline (61 MLA
layers × (656 B + 132 B indexer key)) = 48,068 B/token.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

V32_KV_BYTES_PER_TOKEN = 61 * (656 + 132)  # DeepSeek-V3.2 FP8 MLA cache + indexer key (§13)
CONTEXT = 1 << 20


@dataclass
class Count:
    name: str
    total: int
    active: int
    mtp: int
    kv_bytes_per_token: float

    @property
    def kv_vs_v32(self) -> float:
        return self.kv_bytes_per_token / V32_KV_BYTES_PER_TOKEN


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _expert_numel(block: torch.nn.Module) -> int:
    return _numel(block.mlp.layer.experts.local_experts[0])


def kv_bytes_per_token(cfg: Any) -> float:
    entry = (cfg.head_dim - cfg.rope_head_dim) * 1 + cfg.rope_head_dim * 2  # FP8 nope + BF16 rope
    per = {
        "sliding": 0.0,
        "csa": (entry + cfg.index_head_dim / 2) / cfg.compress_rate_csa,
        "hca": entry / cfg.compress_rate_hca,
    }
    return sum(per[t] for t in cfg.layer_types)


def count(cfg: Any, name: str = "") -> Count:
    """Count ``cfg`` (a ModelConfig). Needs megatron's parallel state (one rank is enough)."""
    from pretrain.model.mhc import HyperHead
    from pretrain.model.moe import megatron_moe_config
    from pretrain.model.transformer import V4Block

    moe_cfg = megatron_moe_config(cfg, perform_initialization=False)
    kinds = Counter((t, i < cfg.n_hash_layers) for i, t in enumerate(cfg.layer_types))
    total = active = 0
    with torch.device("meta"):
        for (layer_type, is_hash), times in kinds.items():
            idx = 0 if is_hash else cfg.n_hash_layers
            block = V4Block(cfg, idx, layer_type, moe_cfg, 0.0)
            n, e = _numel(block), _expert_numel(block)
            total += times * n
            active += times * (n - (cfg.n_routed_experts - cfg.num_experts_per_tok) * e)
        mtp = 0
        if cfg.num_mtp_layers:
            block = V4Block(cfg, cfg.num_layers, cfg.mtp_layer_type, moe_cfg, 0.0, is_mtp=True)
            d = cfg.hidden_size
            mtp = _numel(block) + 2 * d * d + 3 * d + _numel(HyperHead(d, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps))
        head_side = _numel(HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)) + cfg.hidden_size
    vocab = cfg.vocab_size * cfg.hidden_size
    total += 2 * vocab + head_side
    active += vocab + head_side
    return Count(name, total, active, mtp, kv_bytes_per_token(cfg))


def table(counts: list[Count]) -> str:
    rows = [f"{'model':<8}{'total':>12}{'active':>11}{'MTP':>9}{'KV B/token':>12}{'KV @1M':>10}{'vs V3.2':>9}"]
    for c in counts:
        rows.append(
            f"{c.name:<8}{c.total / 1e9:>11.1f}B{c.active / 1e9:>10.1f}B{c.mtp / 1e9:>8.1f}B"
            f"{c.kv_bytes_per_token:>12.1f}{c.kv_bytes_per_token * CONTEXT / 2**30:>8.2f}GiB"
            f"{100 * c.kv_vs_v32:>8.1f}%"
        )
    rows.append(
        f"{'V3.2':<8}{'':>12}{'':>11}{'':>9}{V32_KV_BYTES_PER_TOKEN:>12.1f}"
        f"{V32_KV_BYTES_PER_TOKEN * CONTEXT / 2**30:>8.2f}GiB{100.0:>8.1f}%"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from parallel.process_groups import init_distributed, teardown
    from pretrain.config import ParallelConfig, load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", nargs="+", default=["flash", "pro"], help="config names or YAML paths")
    ap.add_argument("--json", help="also write the counts to this JSON file")
    args = ap.parse_args(argv)
    cfgs = {name: load_config(name).model for name in args.config}
    init_distributed(ParallelConfig())
    try:
        counts = [count(cfg, name) for name, cfg in cfgs.items()]
    finally:
        teardown()
    print(table(counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(c.__dict__, kv_vs_v32=c.kv_vs_v32) for c in counts], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
