"""Moving Muon's per-unit tensors between the ranks that hold slices and the ranks that own units.

Two collective phases per direction, each one packed buffer per step (see ``parallel.muon_sharding`` for
units, modes and owners):

``to_owners`` (slices -> owners), used for gradients and for loading momentum:
  local units: the owner already holds the full matrix; gram units: every TP rank keeps its slice;
  gather units: one ``all_to_all_single`` inside the owner replica's TP group sends each slice to the
  owning TP rank, which concatenates them along ``shard_dim`` into the full matrix.

``from_owners`` (owners -> every rank's slice), used for updates and for saving momentum:
  1. TP phase (``all_to_all_single`` in the TP group of the owner replica): the owner of a gather unit sends
     TP rank t its slice t; the owner of a local unit sends the full matrix to every TP rank.
  2. DP phase (``all_gather`` over the DP group, padded to the longest buffer because gloo has no
     all_gather_v): every rank contributes its slices of the units its replica owns, so afterwards every
     rank holds its slice of every unit. Members of a DP group share the TP index, hence slice shapes.

Deadlock freedom: every rank runs the phases in the same order (TP then DP) and every member of a group
derives the same unit lists from the same deterministic plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
import torch.distributed as dist

from parallel.muon_sharding import Plan, Unit

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


class Exchange:
    """The two collective paths for one engine (one plan, one TP group, one DP group)."""

    def __init__(self, plan: Plan, tp_group: Group, dp_group: Group):
        self.plan = plan
        self.tp_group = tp_group if plan.tp > 1 else None
        self.dp_group = dp_group if plan.dp > 1 else None
        self.t = group_rank(self.tp_group)
        self.d = group_rank(self.dp_group)

    def owns(self, u: Unit) -> bool:
        return u.owned_by(self.d, self.t)

    def _mine(self, units: Iterable[Unit]) -> list[Unit]:
        return [u for u in units if u.owner_dp == self.d]

    def _all_to_all(
        self, send: list[list[torch.Tensor]], recv_sizes: list[int], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """send[peer] = tensors for that peer; returns the flat buffer received from each peer."""
        flat = [
            torch.cat([x.reshape(-1).to(dtype) for x in chunk]) if chunk else torch.empty(0, dtype=dtype, device=device)
            for chunk in send
        ]
        send_sizes = [f.numel() for f in flat]
        out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(
            out, torch.cat(flat), output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=self.tp_group
        )
        return list(torch.split(out, recv_sizes))

    def to_owners(
        self, units: list[Unit], local: Callable[[Unit], torch.Tensor], dtype: torch.dtype, device: torch.device
    ) -> dict[int, torch.Tensor]:
        """``local(u)``: this rank's slice of unit u. Returns, for units this rank owns, the full matrix
        (local/gather) or this rank's slice (gram)."""
        mine = self._mine(units)
        out: dict[int, torch.Tensor] = {}
        for u in mine:
            if u.mode == "gram" or (u.mode == "local" and u.owner_tp == self.t):
                out[u.uid] = local(u).to(dtype)
        gather = [u for u in mine if u.mode == "gather"]
        if not gather:
            return out
        T = self.plan.tp
        send = [[local(u) for u in gather if u.owner_tp == peer] for peer in range(T)]
        owned = [u for u in gather if u.owner_tp == self.t]
        recv_sizes = [sum(u.numel_local(peer) for u in owned) for peer in range(T)]
        recv = self._all_to_all(send, recv_sizes, dtype, device)
        offs = [0] * T
        for u in owned:
            pieces = []
            for peer in range(T):
                k = u.numel_local(peer)
                pieces.append(recv[peer][offs[peer] : offs[peer] + k].view(u.local_shapes[peer]))
                offs[peer] += k
            out[u.uid] = u.join(pieces)
        return out

    def from_owners(
        self, units: list[Unit], owned: dict[int, torch.Tensor], dtype: torch.dtype, device: torch.device
    ) -> dict[int, torch.Tensor]:
        """``owned``: what ``to_owners`` returns (per unit this rank owns). Returns this rank's slice of
        every unit in ``units``."""
        mine = self._mine(units)
        res: dict[int, torch.Tensor] = {}
        via_tp = []
        for u in mine:
            if u.mode == "gram" or self.plan.tp == 1:
                res[u.uid] = owned[u.uid]
            else:
                via_tp.append(u)
        if via_tp:
            T = self.plan.tp
            src = [u for u in via_tp if u.owner_tp == self.t]
            splits = {u.uid: u.split_full(owned[u.uid]) for u in src}
            send = [[splits[u.uid][peer] for u in src] for peer in range(T)]
            recv_sizes = [sum(u.numel_local(self.t) for u in via_tp if u.owner_tp == peer) for peer in range(T)]
            recv = self._all_to_all(send, recv_sizes, dtype, device)
            offs = [0] * T
            for u in via_tp:
                k = u.numel_local(self.t)
                res[u.uid] = recv[u.owner_tp][offs[u.owner_tp] : offs[u.owner_tp] + k].view(u.local_shapes[self.t])
                offs[u.owner_tp] += k
        D = self.plan.dp
        if D > 1:
            by_d = [[u for u in units if u.owner_dp == d] for d in range(D)]
            sizes = [sum(u.numel_local(self.t) for u in lst) for lst in by_d]
            width = max(sizes)
            if width > 0:
                buf = torch.zeros(width, dtype=dtype, device=device)
                if mine:
                    torch.cat([res[u.uid].reshape(-1).to(dtype) for u in mine], out=buf[: sizes[self.d]])
                bufs = [torch.empty(width, dtype=dtype, device=device) for _ in range(D)]
                dist.all_gather(bufs, buf, group=self.dp_group)
                for d in range(D):
                    if d == self.d:
                        continue
                    off = 0
                    for u in by_d[d]:
                        k = u.numel_local(self.t)
                        res[u.uid] = bufs[d][off : off + k].view(u.local_shapes[self.t])
                        off += k
        return res
