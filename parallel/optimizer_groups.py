"""Split a model's parameters between Muon and AdamW (docs/MODEL.md §12.1) and build both optimizers.

The route is one table, :data:`OPTIMIZER_ROUTES`: (regular expression over the parameter's name, optimizer),
searched in order, first match wins (torchtitan-style name-pattern parameter groups). The model sets no
optimizer attribute: parameters carry only structural metadata (``v4_blocks``, ``v4_expert``, ...;
docs/CONTRACTS.md). A parameter that no row names (a model other than DeepSeek-V4, e.g. in tests) takes the
generic rule :func:`default_optimizer`: embedding / output-head names, megatron's
``is_embedding_or_output_parameter`` and tensors with fewer than 2 or more than 3 dims -> AdamW; other
2-D/3-D tensors -> Muon. Every parameter of the V4 model is named by a row (tests/test_optimizer_routes.py).

V4's split (paper §2.4 and §4.2.2): AdamW for the embedding, the prediction head, all RMSNorm weights and the
mHC static biases and gates (``base``, ``scale``); Muon for every other matrix (attention, compressor and
indexer projections, router, experts, mHC dynamic projections, MTP projections). The paper does not name the
attention sinks and the compressor position biases (``position_bias``, HF's name for ``ape``): our choice is
AdamW -- a sink is a vector and ``position_bias`` [m, 2c] is a table of additive biases, not a linear map. To
route differently, pass another table (``routes=``) to :func:`split_params` / :func:`build_optimizers`.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.muon import Muon, parallel_state_groups
from parallel.muon_comm import group_size
from parallel.zero_adamw import ZeroAdamW

log = logging.getLogger(__name__)

OPTIMIZERS = ("muon", "adamw")


@dataclass(frozen=True)
class Route:
    """One row of the table: parameters whose name matches ``pattern`` (``re.search``) go to ``optimizer``."""

    pattern: str
    optimizer: str
    why: str
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer route {self.pattern!r}: optimizer {self.optimizer!r}, expected one of {OPTIMIZERS}"
            )
        object.__setattr__(self, "regex", re.compile(self.pattern))


# Names are those of pretrain.model (HF's names); "(^|\.)" lets a wrapper prefix ("module.") through.
OPTIMIZER_ROUTES: tuple[Route, ...] = (
    Route(r"(^|\.)(mtp_)?embed_tokens\.weight$", "adamw", "token embedding (and its copy on the last PP stage)"),
    Route(r"(^|\.)lm_head\.weight$", "adamw", "prediction head"),
    Route(r"(^|\.)\w*norm\.weight$", "adamw", "RMSNorm weights (layer, q_a, kv, compressor, final, MTP norms)"),
    Route(r"(^|\.)(attn_hc|ffn_hc)\.(base|scale)$", "adamw", "mHC static biases S and gates alpha"),
    Route(r"(^|\.)hc_head\.(hc_base|hc_scale)$", "adamw", "mHC head static bias and gate"),
    Route(r"(^|\.)self_attn\.sinks$", "adamw", "attention sink logits (a vector; paper silent: our choice)"),
    Route(r"(^|\.)position_bias$", "adamw", "compressor position biases (bias table; paper silent: our choice)"),
    Route(r"(^|\.)(attn_hc|ffn_hc)\.fn$", "muon", "mHC dynamic projections [W_pre; W_post; W_res]"),
    Route(r"(^|\.)hc_head\.hc_fn$", "muon", "mHC head dynamic projection"),
    Route(
        r"(^|\.)self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj)\.weight$",
        "muon",
        "attention projections (o_a_proj: each group its own matrix, v4_blocks)",
    ),
    Route(r"(^|\.)compressor\.(indexer\.)?(kv_proj|gate_proj)\.weight$", "muon", "compressor projections"),
    Route(r"(^|\.)indexer\.(q_b_proj|scorer\.weights_proj)\.weight$", "muon", "lightning-indexer projections"),
    Route(r"(^|\.)mlp\.layer\.", "muon", "MoE: router W_g, routed and shared experts (each expert its own)"),
    Route(r"(^|\.)mtp\.(e_proj|h_proj)\.weight$", "muon", "MTP input projections"),
)

_EMBED_OR_HEAD = re.compile(r"(^|\.)(embed\w*|word_embeddings|embedding|lm_head|head|output_layer)(\.|$)")


def route_of(name: str, routes: Sequence[Route] = OPTIMIZER_ROUTES) -> Route | None:
    """The first row of ``routes`` whose pattern matches ``name``, or None."""
    return next((r for r in routes if r.regex.search(name)), None)


def default_optimizer(name: str, p: torch.Tensor) -> str:
    """The rule for a parameter no route names (module doc)."""
    if getattr(p, "is_embedding_or_output_parameter", False) or _EMBED_OR_HEAD.search(name):
        return "adamw"
    return "muon" if p.dim() in (2, 3) else "adamw"


def optimizer_of(name: str, p: torch.Tensor, routes: Sequence[Route] = OPTIMIZER_ROUTES) -> str:
    """``"muon"`` or ``"adamw"`` for one parameter: the table, else :func:`default_optimizer`."""
    route = route_of(name, routes)
    return route.optimizer if route is not None else default_optimizer(name, p)


def _named(model_or_named: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named, torch.nn.Module):
        return list(model_or_named.named_parameters())
    return list(model_or_named)


def split_params(
    model_or_named: Any, routes: Sequence[Route] = OPTIMIZER_ROUTES
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(muon, adamw) lists of ``(name, parameter)`` by ``routes``; frozen parameters are left out."""
    muon, adamw = [], []
    for name, p in _named(model_or_named):
        if p.requires_grad:
            (muon if optimizer_of(name, p, routes) == "muon" else adamw).append((name, p))
    return muon, adamw


def adamw_is_sharded(optim_cfg: Any, dp_size: int, expert_dp_size: int) -> bool:
    """Whether AdamW runs as ``ZeroAdamW``: ``optim.shard_adamw`` and a data-parallel group (dense or expert) of
    more than one rank. Also what the dry run's accounting assumes (``parallel.optimizer_memory``)."""
    return bool(getattr(optim_cfg, "shard_adamw", False)) and max(dp_size, expert_dp_size) > 1


def build_optimizers(
    model_or_named: Any,
    optim_cfg: Any,
    lr: float,
    groups: str | dict | None = None,
    routes: Sequence[Route] = OPTIMIZER_ROUTES,
    **muon_overrides: Any,
) -> tuple[Muon | None, torch.optim.Optimizer | None]:
    """Build Muon and AdamW from ``optim_cfg`` (an OptimConfig). ``groups``: None (single process),
    ``"parallel_state"`` (megatron-core groups of this stage), or a dict of Muon's group keywords;
    ``routes``: the parameter -> optimizer table (module doc)."""
    muon_params, adam_params = split_params(model_or_named, routes)
    if groups == "parallel_state":
        groups = parallel_state_groups()
    muon = None
    if muon_params:
        kw = dict(
            lr=lr,
            momentum=optim_cfg.muon_momentum,
            nesterov=optim_cfg.muon_nesterov,
            weight_decay=optim_cfg.weight_decay,
            update_rms=optim_cfg.muon_update_rms,
            ns_steps=[tuple(s) for s in optim_cfg.muon_ns_steps],
            tp_mode=optim_cfg.muon_tp_mode,
            fp32_newton_schulz=optim_cfg.fp32_newton_schulz,
            **(groups or {}),
        )
        kw.update(muon_overrides)
        muon = Muon(muon_params, **kw)
    adamw: torch.optim.Optimizer | None = None
    if adam_params:
        hyper = dict(
            lr=lr,
            betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
            eps=optim_cfg.adam_eps,
            weight_decay=optim_cfg.weight_decay,
        )
        dp, edp = (groups or {}).get("dp_group"), (groups or {}).get("expert_dp_group")
        if adamw_is_sharded(optim_cfg, group_size(dp), group_size(edp)):
            adamw = ZeroAdamW(adam_params, **hyper, dp_group=dp, expert_dp_group=edp)
        else:
            adamw = torch.optim.AdamW(adam_params, **hyper)
    log.info(
        "optimizers: %d Muon tensors, %d AdamW tensors (%s)", len(muon_params), len(adam_params), type(adamw).__name__
    )
    return muon, adamw
