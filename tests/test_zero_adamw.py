"""Optimizer state per rank: the dry run's accounting against the optimizer objects.

``test_dry_run_accounting_matches_optimizer_state``: the tiny model on 4 gloo ranks under tp1 x ep2 (dense dp4,
expert dp2) and tp2 x ep2 (dense tp2 x dp2 with Muon's Gram mode: owner replicas keep TP slices; expert dp2),
Muon and AdamW built as the trainer builds them, one
step on seeded random gradients; every rank's Muon momentum bytes (what the engines hold after a step on
every parameter) must equal what :mod:`parallel.optimizer_memory` computes for that global rank from the
meta-device shards -- exactly, since both come from the same plan.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.harness import run_ranks

# name: (parallel sizes, config overrides)
LAYOUTS = {"tp1_ep2": (dict(tp=1, ep=2), []), "tp2_ep2_gram": (dict(tp=2, ep=2), ["optim.muon_tp_mode=gram"])}


def _tiny(over: list[str] = ()):
    from pretrain.config import load_config
    return load_config("tiny", ["train.seq_len=32", "train.global_batch=8", "train.micro_batch=1", *over])


def _muon_bytes(muon) -> int:
    return sum(t.numel() * t.element_size() for eng in muon._engines for t in eng.momentum.values())


def _state_sizes(rank: int, world: int) -> dict[str, tuple[int, int]]:
    """Rank function: per layout, (Muon momentum bytes, AdamW state bytes) after one step."""
    from parallel.optimizer_groups import build_optimizers
    from parallel.process_groups import init_distributed
    from pretrain.model.build import build_model
    out = {}
    for key, (par, over) in LAYOUTS.items():
        cfg = _tiny(over)
        init_distributed(SimpleNamespace(pp=1, vpp=1, etp=1, sp=1, **par), cfg.model)
        chunks = build_model(cfg.model, seed=0, wrap_ddp=False)
        named = [(n, p) for c in chunks for n, p in c.named_parameters()]
        muon, adamw = build_optimizers(named, cfg.optim, 1e-3, groups="parallel_state")
        gen = torch.Generator().manual_seed(5)          # same draws on every rank: DP replicas agree
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen)
        muon.step()
        adamw.step()
        adam = sum(t.numel() * t.element_size() for st in adamw.state.values() for t in st.values()
                   if t.dim() > 0)
        out[key] = (_muon_bytes(muon), adam)
    return out


@pytest.mark.slow
def test_dry_run_accounting_matches_optimizer_state():
    from pretrain.config import ParallelConfig
    from pretrain.dry_run import plan
    actual = run_ranks(_state_sizes, 4, timeout=300)
    for key, (par, over) in LAYOUTS.items():
        cfg = _tiny(over)
        layout, rows = plan(cfg.model, 4, ParallelConfig(**par), micro_batch=1, seq_len=32, global_batch=8,
                            optim=cfg.optim)
        mem = rows[0].mem.optimizer
        got = {r: actual[r][key][0] for r in range(4)}
        assert mem.muon == got, f"{key}: dry run {mem.muon} vs Muon's momentum {got}"
        # owners only: every rank holds less than the replicated momentum, and together each DP group
        # holds each unit once
        assert max(got.values()) < mem.muon_replicated
        assert rows[0].mem.optimizer_bytes == max(mem.total(r) for r in range(4))
