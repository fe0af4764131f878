"""Which full matrices Muon orthogonalises, where their pieces live, and who computes each one.

Vocabulary (all per *engine*: one engine for dense parameters over (tp_group, dp_group), one for routed
experts over (expert_tp_group, expert_dp_group); pipeline stages are independent):

* A **unit** is one logically independent full matrix W in R^{n x m}: a 2-D parameter, one block of a
  fused parameter (``v4_blocks``, sizes along the row dim of the local matrix), or one expert ``e`` of a
  3-D stack ``[E, out, in]`` (and one block of it). Muon orthogonalises every unit separately.
* **TP sharding** (megatron's ``tensor_model_parallel`` + ``partition_dim``): TP rank t holds a slice of
  each unit along ``shard_dim`` (0 = rows, 1 = columns of the matrix); the full unit is the concatenation
  over t in rank order. Slices may be uneven; with ``v4_blocks`` each rank holds its slice of every block,
  so block j of the full matrix is cat_t(local block j on rank t) -- never a contiguous row range of the
  concatenated local tensors (the classic way to get fused-projection Muon silently wrong).
  With ``v4_tp_whole_blocks`` (e.g. the grouped attention output projection ``o_a_proj``, whose TP shard
  along the rows is ``g / T`` whole groups) the blocks are NOT sliced: rank t holds whole blocks, and the
  full matrix's blocks are rank 0's, then rank 1's, ... Each such block is a unit that lives on one TP
  rank only (its ``holder_tp``; the other ranks hold an empty 0-row slice of it).
* **Modes** (how a TP-sharded unit is orthogonalised exactly as the full matrix):
  - ``local``: not TP-sharded (or TP size 1): one owner rank computes it from its own copy.
  - ``gather``: the owner TP rank receives all slices (all-to-all), runs NS on the full matrix and sends
    each rank its slice of the update back. Moves 2 (T-1)/T n m elements.
  - ``gram``: the slices stay put; in the wide orientation the sharded dim is the long one, so
    X X^T = sum_t X_t X_t^T and ||X||_F^2 = sum_t ||X_t||_F^2 are all-reduced over TP (once per
    iteration for plain NS, 1 + restarts times for the Gram form); each TP rank computes its slice.
    Valid only when the sharded dim is the long dim (otherwise X X^T needs cross-shard products).
* **Owners** (data parallel, ZeRO-1-like): every unit is computed once per DP group by owner replica
  ``owner_dp`` (and by TP rank ``owner_tp`` of that replica for local/gather units; by all its TP ranks
  for gram units). Owners are chosen by largest-processing-time-first greedy on the NS cost estimate
  (ties to the lowest index), so the estimated load per rank is balanced; momentum lives on owners only.

Cost model for ``tp_mode=auto`` (per unit, s = min(n, m), l = max(n, m), K iterations, T = TP size,
``b`` bytes per element): gather costs 2 latency + 2 (T-1)/T n m b / bandwidth; gram costs
R latency + R 2 (T-1)/T s^2 b / bandwidth + (T-1) K 2 s^3 / flops (the s x s products are replicated on
every TP rank), with R = K (plain NS) or 1 + restarts (Gram-form NS). The cheaper one is chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ops.newton_schulz import ns_flops

log = logging.getLogger(__name__)

MODES = ("local", "gather", "gram")
TP_MODES = ("auto", "gather", "gram")


@dataclass(frozen=True)
class ParamInfo:
    """What one rank knows about one of its local parameters (picklable; exchanged across TP ranks)."""

    name: str
    shape: tuple[int, ...]
    tp_sharded: bool
    partition_dim: int | None
    blocks: tuple[int, ...]
    whole_blocks: bool = False  # TP shards are whole v4_blocks (see the module doc)

    @staticmethod
    def of(name: str, p: torch.Tensor, tp_size: int) -> ParamInfo:
        if p.dim() not in (2, 3):
            raise ValueError(
                f"Muon parameter '{name}' has shape {tuple(p.shape)}; Muon takes 2-D matrices "
                f"or 3-D expert stacks [E, out, in] (give 1-D parameters to AdamW)"
            )
        sharded = bool(getattr(p, "tensor_model_parallel", False)) and tp_size > 1
        pdim = getattr(p, "partition_dim", None) if sharded else None
        if sharded:
            if pdim is None or pdim < 0 or pdim >= p.dim() or (p.dim() == 3 and pdim == 0):
                raise ValueError(
                    f"Muon parameter '{name}' is tensor-parallel with partition_dim={pdim}; "
                    f"need a matrix dim (0/1 for 2-D, 1/2 for 3-D [E, out, in])"
                )
        rows = p.shape[-2]
        blocks = tuple(int(b) for b in (getattr(p, "v4_blocks", None) or (rows,)))
        if sum(blocks) != rows or min(blocks) <= 0:
            raise ValueError(
                f"Muon parameter '{name}': v4_blocks {list(blocks)} must be positive and sum to "
                f"the local row count {rows}"
            )
        whole = sharded and bool(getattr(p, "v4_tp_whole_blocks", False))
        if whole and pdim != p.dim() - 2:
            raise ValueError(
                f"Muon parameter '{name}': v4_tp_whole_blocks needs the TP shard along the block "
                f"(row) dim, got partition_dim={pdim}"
            )
        return ParamInfo(name, tuple(p.shape), sharded, pdim, blocks, whole)


@dataclass
class Unit:
    """One full matrix (see the module doc). Shapes and offsets are listed per TP rank."""

    uid: int
    pidx: int  # index into the engine's parameter list
    expert: int | None  # index along dim 0 of a 3-D stack, None for 2-D
    block: int
    row_off: tuple[int, ...]  # per TP rank: first row of the block in the local matrix
    local_shapes: tuple[tuple[int, int], ...]  # per TP rank: shape of this rank's slice
    shard_dim: int | None  # 0 / 1 of the matrix; None = replicated over TP
    full_shape: tuple[int, int]
    mode: str = "local"
    owner_dp: int = 0
    owner_tp: int | None = 0  # None for gram (all TP ranks of the owner replica)
    cost: float = 0.0
    holder_tp: int | None = None  # whole-block unit: the only TP rank holding it (module doc)

    def numel_local(self, t: int) -> int:
        r, c = self.local_shapes[t]
        return r * c

    def owned_by(self, dp_rank: int, tp_rank: int) -> bool:
        return self.owner_dp == dp_rank and (self.owner_tp is None or self.owner_tp == tp_rank)

    def local_view(self, p: torch.Tensor, t: int) -> torch.Tensor:
        """This unit's slice inside the local tensor ``p`` (a view; ``t`` is this rank's TP index)."""
        mat = p[self.expert] if self.expert is not None else p
        return mat.narrow(0, self.row_off[t], self.local_shapes[t][0])

    def split_full(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Slices of a full matrix, per TP rank (the inverse of concatenation along ``shard_dim``)."""
        if self.shard_dim is None:
            return [full] * len(self.local_shapes)
        sizes = [s[self.shard_dim] for s in self.local_shapes]
        return list(torch.split(full, sizes, dim=self.shard_dim))

    def join(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        return pieces[0] if self.shard_dim is None else torch.cat(list(pieces), dim=self.shard_dim)

    def gram_ok(self) -> bool:
        """True when the sharded dim is the long dim (so the Gram is a sum of per-shard Grams)."""
        if self.shard_dim is None:
            return False
        n, m = self.full_shape
        return self.full_shape[self.shard_dim] >= (m if self.shard_dim == 0 else n)


@dataclass(frozen=True)
class CostModel:
    """Machine balance for ``tp_mode=auto`` (defaults: a GPU with NVLink-class TP links)."""

    bandwidth: float = 100e9  # bytes / s per rank for TP collectives
    flops: float = 300e12  # matmul flop / s
    latency: float = 20e-6  # s per collective
    elem_bytes: int = 4  # fp32 momentum / update traffic

    def gather_time(self, u: Unit, tp: int) -> float:
        n, m = u.full_shape
        return 2 * self.latency + 2 * (tp - 1) / tp * n * m * self.elem_bytes / self.bandwidth

    def gram_time(self, u: Unit, tp: int, iters: int, reduces: int) -> float:
        s = min(u.full_shape)
        return (
            reduces * self.latency
            + reduces * 2 * (tp - 1) / tp * s * s * self.elem_bytes / self.bandwidth
            + (tp - 1) * iters * 2.0 * s**3 / self.flops
        )


@dataclass
class Plan:
    units: list[Unit]
    tp: int
    dp: int
    load: list[list[float]] = field(default_factory=list)  # [dp][tp] estimated NS flops per rank

    def imbalance(self) -> float:
        """max / mean - 1 of the estimated per-rank NS work (0 = perfect balance)."""
        flat = [x for row in self.load for x in row]
        mean = sum(flat) / max(len(flat), 1)
        return (max(flat) / mean - 1.0) if mean > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        modes = {m: sum(1 for u in self.units if u.mode == m) for m in MODES}
        return dict(units=len(self.units), tp=self.tp, dp=self.dp, modes=modes, imbalance=round(self.imbalance(), 4))


def build_units(infos: Sequence[Sequence[ParamInfo]]) -> list[Unit]:
    """Units from the parameter descriptions of every TP rank (``infos[t][i]``: rank t's i-th param)."""
    T = len(infos)
    counts = {len(x) for x in infos}
    if len(counts) != 1:
        raise ValueError(f"TP ranks hold different numbers of Muon parameters: {[len(x) for x in infos]}")
    units: list[Unit] = []
    for i in range(len(infos[0])):
        per = [infos[t][i] for t in range(T)]
        p0 = per[0]
        if any(
            (q.tp_sharded, q.partition_dim, len(q.shape), len(q.blocks), q.whole_blocks)
            != (p0.tp_sharded, p0.partition_dim, len(p0.shape), len(p0.blocks), p0.whole_blocks)
            for q in per
        ):
            raise ValueError(f"parameter {i} ('{p0.name}') differs in sharding metadata across TP ranks: {per}")
        mdim = None if p0.partition_dim is None else p0.partition_dim - (len(p0.shape) - 2)
        for q in per:
            for d in range(len(q.shape)):
                if d != p0.partition_dim and q.shape[d] != p0.shape[d]:
                    raise ValueError(f"parameter '{p0.name}': TP ranks disagree on dim {d} ({[x.shape for x in per]})")
            if mdim != 0 and q.blocks != p0.blocks:
                raise ValueError(
                    f"parameter '{p0.name}': v4_blocks differ across TP ranks but the rows are "
                    f"not sharded ({[x.blocks for x in per]})"
                )
        experts = [None] if len(p0.shape) == 2 else list(range(p0.shape[0]))
        if p0.whole_blocks and mdim == 0:
            for e in experts:  # full block order: rank 0's blocks, then rank 1's, ...
                for h, q in enumerate(per):
                    for j, b in enumerate(q.blocks):
                        off = sum(q.blocks[:j])
                        units.append(
                            Unit(
                                uid=len(units),
                                pidx=i,
                                expert=e,
                                block=j,
                                row_off=tuple(off if t == h else 0 for t in range(T)),
                                local_shapes=tuple((b if t == h else 0, q.shape[-1]) for t in range(T)),
                                shard_dim=0,
                                full_shape=(b, q.shape[-1]),
                                holder_tp=h,
                            )
                        )
            continue
        for e in experts:
            for j in range(len(p0.blocks)):
                row_off = tuple(sum(q.blocks[:j]) for q in per)
                local = tuple((q.blocks[j], q.shape[-1]) for q in per)
                if mdim is None:
                    full = local[0]
                elif mdim == 0:
                    full = (sum(s[0] for s in local), local[0][1])
                else:
                    full = (local[0][0], sum(s[1] for s in local))
                units.append(
                    Unit(
                        uid=len(units),
                        pidx=i,
                        expert=e,
                        block=j,
                        row_off=row_off,
                        local_shapes=local,
                        shard_dim=mdim,
                        full_shape=full,
                    )
                )
    return units


def plan(
    infos: Sequence[Sequence[ParamInfo]],
    dp: int,
    tp_mode: str = "auto",
    iters: int = 10,
    ns_impl: str = "plain",
    restarts: int = 2,
    cost: CostModel = CostModel(),
) -> Plan:
    """Choose a mode and an owner for every unit (deterministic: every rank computes the same plan)."""
    if tp_mode not in TP_MODES:
        raise ValueError(f"muon tp_mode '{tp_mode}' unknown; choose one of {TP_MODES}")
    T = len(infos)
    units = build_units(infos)
    reduces = iters if ns_impl == "plain" else 1 + restarts
    for u in units:
        s, l = min(u.full_shape), max(u.full_shape)
        u.cost = ns_flops(s, l, iters, gram=ns_impl == "gram", restarts=restarts)
        if u.shard_dim is None or T == 1:
            u.mode = "local"
        elif u.holder_tp is not None:  # owned by its holder: the gather moves nothing (empty slices)
            u.mode = "gather"
        elif tp_mode == "gather" or not u.gram_ok():
            u.mode = "gather"
        elif tp_mode == "gram":
            u.mode = "gram"
        else:
            u.mode = "gram" if cost.gram_time(u, T, iters, reduces) < cost.gather_time(u, T) else "gather"
    load = [[0.0] * T for _ in range(dp)]
    for u in sorted(units, key=lambda x: (-x.cost, x.uid)):
        if u.mode == "gram":
            s, l = min(u.full_shape), max(u.full_shape)
            per_rank = iters * (4.0 * s * s * l / T + 2.0 * s**3)
            d = min(range(dp), key=lambda k: (max(load[k]), sum(load[k]), k))
            u.owner_dp, u.owner_tp = d, None
            for t in range(T):
                load[d][t] += per_rank
        else:
            ts = range(T) if u.holder_tp is None else (u.holder_tp,)
            d, t = min(((k, t) for k in range(dp) for t in ts), key=lambda kt: (load[kt[0]][kt[1]], kt))
            u.owner_dp, u.owner_tp = d, t
            load[d][t] += u.cost
    out = Plan(units=units, tp=T, dp=dp, load=load)
    log.debug("muon plan: %s", out.summary())
    return out


def fingerprint(infos: Sequence[ParamInfo]) -> tuple:
    """What must agree across data-parallel ranks (same parameters, shapes and metadata, same order)."""
    return tuple((x.shape, x.tp_sharded, x.partition_dim, x.blocks, x.whole_blocks) for x in infos)
