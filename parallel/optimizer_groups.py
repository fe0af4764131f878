"""Split a model's parameters between Muon and AdamW (deepseek-v4.md §12.1) and build both optimizers.

Rule, per parameter:
1. The ``v4_optimizer`` attribute set by the model (``"muon"`` / ``"adamw"``) decides when present.
2. Otherwise: megatron's ``is_embedding_or_output_parameter``, names that look like an embedding or the
   output head, and tensors with fewer than 2 or more than 3 dims -> AdamW; other 2-D/3-D -> Muon.

V4's table: AdamW for the embedding, the prediction head, all RMSNorm weights and the mHC static
biases and gates (``base``, ``scale``); Muon for every other matrix (attention, compressor and indexer
projections, router, experts, mHC dynamic projections). The 1-D leftovers the paper does not name --
attention sinks and compressor position biases (``ape``) -- are recommended AdamW: they are not matrices
(``ape`` is [m, 2c] but a table of biases, not a linear map); the model's ``v4_optimizer`` decides.

``build_optimizers(model_or_named_params, optim_cfg, lr, groups=...)`` returns ``(muon, adamw)`` (either
None when it gets no parameters) with the OptimConfig values (duck-typed: ``muon_momentum``,
``muon_nesterov``, ``muon_update_rms``, ``muon_ns_steps``, ``muon_tp_mode``, ``weight_decay``,
``adam_beta1/2``, ``adam_eps``, ``fp32_newton_schulz``, ``shard_adamw``). AdamW: with ``shard_adamw`` and a
data-parallel group of more than one rank, ``parallel.zero_adamw.ZeroAdamW`` (each DP rank keeps and updates the
state of its share, then the new values are all-gathered: bit-identical to the replicated optimizer); otherwise
``torch.optim.AdamW`` replicated (with DP-averaged gradients every replica computes the same update).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch

from parallel.muon import Muon, parallel_state_groups
from parallel.muon_comm import group_size
from parallel.zero_adamw import ZeroAdamW

log = logging.getLogger(__name__)

_EMBED_OR_HEAD = re.compile(r"(^|\.)(embed\w*|word_embeddings|embedding|lm_head|head|output_layer)(\.|$)")


def optimizer_of(name: str, p: torch.Tensor) -> str:
    """``"muon"`` or ``"adamw"`` for one parameter (rule in the module doc)."""
    tag = getattr(p, "v4_optimizer", None)
    if tag is not None:
        if tag not in ("muon", "adamw"):
            raise ValueError(f"parameter '{name}': v4_optimizer={tag!r}, expected 'muon' or 'adamw'")
        return tag
    if getattr(p, "is_embedding_or_output_parameter", False) or _EMBED_OR_HEAD.search(name):
        return "adamw"
    return "muon" if p.dim() in (2, 3) else "adamw"


def _named(model_or_named: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]
           ) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named, torch.nn.Module):
        return list(model_or_named.named_parameters())
    return list(model_or_named)


def split_params(model_or_named: Any) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(muon, adamw) lists of ``(name, parameter)``; frozen parameters are left out."""
    muon, adamw = [], []
    for name, p in _named(model_or_named):
        if p.requires_grad:
            (muon if optimizer_of(name, p) == "muon" else adamw).append((name, p))
    return muon, adamw


def adamw_is_sharded(optim_cfg: Any, dp_size: int, expert_dp_size: int) -> bool:
    """Whether AdamW runs as ``ZeroAdamW``: ``optim.shard_adamw`` and a data-parallel group (dense or expert) of
    more than one rank. Also what the dry run's accounting assumes (``parallel.optimizer_memory``)."""
    return bool(getattr(optim_cfg, "shard_adamw", False)) and max(dp_size, expert_dp_size) > 1


def build_optimizers(model_or_named: Any, optim_cfg: Any, lr: float, groups: str | dict | None = None,
                     **muon_overrides: Any) -> tuple[Muon | None, torch.optim.Optimizer | None]:
    """Build Muon and AdamW from ``optim_cfg`` (an OptimConfig). ``groups``: None (single process),
    ``"parallel_state"`` (megatron-core groups of this stage), or a dict of Muon's group keywords."""
    muon_params, adam_params = split_params(model_or_named)
    if groups == "parallel_state":
        groups = parallel_state_groups()
    muon = None
    if muon_params:
        kw = dict(lr=lr, momentum=optim_cfg.muon_momentum, nesterov=optim_cfg.muon_nesterov,
                  weight_decay=optim_cfg.weight_decay, update_rms=optim_cfg.muon_update_rms,
                  ns_steps=[tuple(s) for s in optim_cfg.muon_ns_steps], tp_mode=optim_cfg.muon_tp_mode,
                  fp32_newton_schulz=optim_cfg.fp32_newton_schulz, **(groups or {}))
        kw.update(muon_overrides)
        muon = Muon(muon_params, **kw)
    adamw: torch.optim.Optimizer | None = None
    if adam_params:
        hyper = dict(lr=lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps,
                     weight_decay=optim_cfg.weight_decay)
        dp, edp = (groups or {}).get("dp_group"), (groups or {}).get("expert_dp_group")
        if adamw_is_sharded(optim_cfg, group_size(dp), group_size(edp)):
            adamw = ZeroAdamW(adam_params, **hyper, dp_group=dp, expert_dp_group=edp)
        else:
            adamw = torch.optim.AdamW(adam_params, **hyper)
    log.info("optimizers: %d Muon tensors, %d AdamW tensors (%s)", len(muon_params), len(adam_params),
             type(adamw).__name__)
    return muon, adamw
