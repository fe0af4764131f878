"""Optimizer state per rank of one pipeline stage, from the optimizers' own placement plans (for the dry run).

What the optimizers really keep (``parallel.optimizer_groups`` splits the parameters):

* **Muon** (``parallel.muon``): one fp32 momentum per *unit*, held only by the unit's owner. Dense units are
  planned over (TP, DP x CP), routed-expert units over (expert TP, expert DP), each by
  :func:`parallel.muon_sharding.plan` -- the same function, on the same parameter descriptions, that the
  optimizer runs at construction. Per rank (dp index d, tp index t) of an engine:

      momentum(d, t) = sum_{u: local/gather unit, owner (d, t)} n_u m_u
                     + sum_{u: gram unit, owner replica d} |slice_t(u)|

  (a local/gather owner holds the FULL matrix, a gram owner replica its TP slices). Exact, not an estimate:
  the plan only needs shapes and sharding attributes, which the meta-device shard has, and the parameter
  descriptions of the other TP ranks are this rank's (shard shapes are identical across the TP ranks of a
  stage: ``compute_layout`` checks that heads, widths and vocabulary divide evenly).
* **AdamW**: two moments in the parameter dtype (fp32: 8 B per element). With ``optim.shard_adamw`` and more
  than one data-parallel rank (``parallel.zero_adamw.ZeroAdamW``, as ``build_optimizers`` decides) only for the
  cells DP rank d owns, from the optimizer's own :func:`parallel.zero_adamw.plan_cells` (dense parameters over
  DP x CP, routed-expert ones over expert DP):

      adamw(d) = 2 x elem_bytes x sum_{cells c owned by d} |c|

  otherwise for every local AdamW parameter (torch's replicated ``AdamW``). The per-parameter ``step`` scalars
  (4 B each) are left out.

A global rank r of the stage sits at dense coordinates (dp-cp index, tp index) and expert coordinates (expert
dp index, expert tp index), taken from megatron's rank generator for the ``tp-cp-ep-dp-pp`` order (what
``initialize_model_parallel`` builds); its state is the sum over both engines. The dry run reports the most
loaded rank of each stage (:attr:`StageOptimizerMemory.max_bytes`): it decides whether the stage fits.
Transient buffers (Muon's gathered gradients and updates, ZeroAdamW's all-gather rounds) are not state and not
counted; checkpoint saves add none (both optimizers write their owned state as it lies).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.process_groups import Layout

log = logging.getLogger(__name__)

MUON_ELEM_BYTES = 4  # fp32 momentum (parallel.muon._Engine.dtype; fp64 only for all-fp64 exactness tests)
ADAMW_MOMENTS = 2  # exp_avg, exp_avg_sq


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank of a stage sits in the dense and the expert groups."""

    rank: int
    dp: int  # index in the dense data-parallel group (with context parallel)
    tp: int
    expert_dp: int
    expert_tp: int


@dataclass
class StageOptimizerMemory:
    """Optimizer state bytes of every global rank of one pipeline stage (by global rank)."""

    muon: dict[int, int] = field(default_factory=dict)
    adamw: dict[int, int] = field(default_factory=dict)
    muon_replicated: int = 0  # what every rank would hold with momentum on every DP replica
    adamw_replicated: int = 0

    def total(self, rank: int) -> int:
        return self.muon.get(rank, 0) + self.adamw.get(rank, 0)

    @property
    def max_rank(self) -> int:
        """The most loaded rank (lowest global rank among equals)."""
        return min(self.muon.keys() | self.adamw.keys(), key=lambda r: (-self.total(r), r))

    @property
    def max_bytes(self) -> int:
        return self.total(self.max_rank) if (self.muon or self.adamw) else 0


def stage_coords(layout: Layout, pp_rank: int) -> list[RankCoords]:
    """Dense and expert group coordinates of every global rank of pipeline stage ``pp_rank`` (megatron's order)."""
    from megatron.core.parallel_state import RankGenerator

    dense = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=layout.sp, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=layout.etp, ep=layout.ep, dp=layout.expert_dp, pp=layout.pp, cp=1, order="tp-cp-ep-dp-pp")

    def index(groups: list[list[int]]) -> dict[int, int]:
        return {r: i for g in groups for i, r in enumerate(g)}

    d, t = index(dense.get_ranks("dp-cp")), index(dense.get_ranks("tp"))
    ed, et = index(expert.get_ranks("dp")), index(expert.get_ranks("tp"))
    stage = sorted(g[pp_rank] for g in dense.get_ranks("pp"))
    return [RankCoords(r, d[r], t[r], ed[r], et[r]) for r in stage]


def muon_momentum_elements(
    named: Sequence[tuple[str, torch.Tensor]], tp: int, dp: int, optim_cfg: Any = None
) -> list[list[int]]:
    """``[d][t]``: momentum elements owner (d, t) keeps for these Muon parameters of one engine, from the
    optimizer's own plan (:func:`parallel.muon_sharding.plan`)."""
    from ops.newton_schulz import GRAM_RESTARTS, V4_NS_STEPS, expand_steps
    from parallel.muon_sharding import CostModel, ParamInfo, plan

    out = [[0] * tp for _ in range(dp)]
    if not named:
        return out
    steps = [tuple(s) for s in getattr(optim_cfg, "muon_ns_steps", V4_NS_STEPS)]
    infos = [ParamInfo.of(n, p, tp) for n, p in named]
    pl = plan(
        [infos] * tp,
        dp,
        getattr(optim_cfg, "muon_tp_mode", "auto"),
        len(expand_steps(steps)),
        "plain",
        len(GRAM_RESTARTS),
        CostModel(),
    )
    for u in pl.units:
        if u.mode == "gram":
            for t in range(tp):
                out[u.owner_dp][t] += u.numel_local(t)
        else:
            n, m = u.full_shape
            out[u.owner_dp][u.owner_tp] += n * m
    return out


def adamw_state_bytes(named: Sequence[tuple[str, torch.Tensor]], dp: int) -> list[int]:
    """``[d]``: AdamW moment bytes DP rank d keeps for these parameters (``dp`` = 1: replicated), from
    ZeroAdamW's own cell plan."""
    from parallel.zero_adamw import plan_cells

    if not named:
        return [0] * dp
    elem = named[0][1].element_size()
    plan = plan_cells([tuple(p.shape) for _, p in named], dp)
    return [n * elem * ADAMW_MOMENTS for n in plan.load]


def stage_optimizer_memory(
    named: Sequence[tuple[str, torch.Tensor]], layout: Layout, pp_rank: int, optim_cfg: Any = None
) -> StageOptimizerMemory:
    """Optimizer state per global rank of stage ``pp_rank`` for this stage's parameters (see the module doc)."""
    from parallel.optimizer_groups import adamw_is_sharded, split_params
    from parallel.param_meta import is_expert_param

    muon, adamw = split_params(named)

    def by_kind(named: list[tuple[str, torch.Tensor]], expert: bool) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in named if is_expert_param(p) == expert]

    dp, edp = layout.dp * layout.sp, layout.expert_dp
    mom_dense = muon_momentum_elements(by_kind(muon, False), layout.tp, dp, optim_cfg)
    mom_expert = muon_momentum_elements(by_kind(muon, True), layout.etp, edp, optim_cfg)
    shard = adamw_is_sharded(optim_cfg, dp, edp)
    st_dense = adamw_state_bytes(by_kind(adamw, False), dp if shard else 1)
    st_expert = adamw_state_bytes(by_kind(adamw, True), edp if shard else 1)
    out = StageOptimizerMemory(
        muon_replicated=sum(p.numel() for _, p in muon) * MUON_ELEM_BYTES,
        adamw_replicated=adamw_state_bytes(adamw, 1)[0],
    )
    for c in stage_coords(layout, pp_rank):
        out.muon[c.rank] = (mom_dense[c.dp][c.tp] + mom_expert[c.expert_dp][c.expert_tp]) * MUON_ELEM_BYTES
        out.adamw[c.rank] = st_dense[c.dp if shard else 0] + st_expert[c.expert_dp if shard else 0]
    r = out.max_rank
    log.debug(
        "stage %d optimizer state: most loaded rank %d: Muon %.2f GiB (replicated %.2f), AdamW %.2f GiB",
        pp_rank,
        r,
        out.muon[r] / 2**30,
        out.muon_replicated / 2**30,
        out.adamw[r] / 2**30,
    )
    return out
