"""ZeRO-1 AdamW: every data-parallel rank keeps, and updates, the AdamW state of its share of the parameters.

torch's AdamW (``torch.optim.AdamW``; lr eta, betas b1 b2, eps, weight decay lambda, step t of the parameter):

    W <- W (1 - eta lambda)
    m <- b1 m + (1 - b1) g                    (``m.lerp_(g, 1 - b1)``)
    v <- b2 v + (1 - b2) g^2
    W <- W - eta / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Every operation is elementwise, so any partition of the elements computes the same numbers.

**Cells.** Each local AdamW parameter of shape [R, ...] (C elements per row) is cut along dim 0 into ``count``
equal row blocks, *cells*: the largest ``count`` dividing R whose cells keep >= ``cell_elems`` elements (default
2^20: 4 MiB per fp32 moment) and a multiple of ``ALIGN`` = 64 elements; a parameter smaller than that (every norm,
gate and bias) is one cell. Cells go to the DP ranks largest first, each to the least loaded rank (ties to the
lower cell index, then the lower rank): deterministic, so every rank derives the same plan from the same shapes,
and the most loaded rank holds at most mean + one cell. ``plan_cells`` is also what the dry run uses
(:mod:`parallel.optimizer_memory`).

**Step.** The owner of a cell runs torch's own ``AdamW`` on it: an inner ``torch.optim.AdamW`` whose parameters
are views of the owner's cells (rows of ``param.data``) and whose gradients are the same rows of ``p.grad`` (or
megatron's ``main_grad``), with the outer optimizer's hyper-parameters copied in before every step. Then each
rank's updated cells are all-gathered over the DP group (rounds of at most ``gather_elems`` received elements;
gloo has no all-gather-v, so every rank's buffer is padded to the most loaded rank's) and copied into the other
replicas bit for bit. Contract (as for ``parallel.muon``): gradients are DP-averaged and identical on every
replica when ``step()`` runs; the parameters stay bit-identical across replicas.

**Exactness** against the replicated ``torch.optim.AdamW``: the same code path (torch picks foreach/for-loop from
the device, as it does for the whole parameters) applies the same per-element arithmetic. On CUDA every element
of an elementwise kernel runs the same instructions wherever it sits, so the result is bit-identical. On CPU a
kernel runs vectorised blocks and a scalar tail, which may round differently (``lerp`` uses an FMA in the
vector path); a cell starts at a multiple of 64 elements of its parameter and is a multiple of 64 long unless it
ends the parameter, so with one intra-op thread (the tests' setting) every element falls in the same kind of
block as in the whole tensor: bit-identical. With several CPU threads torch splits tensors into per-thread
ranges that depend on the tensor size, which may move an element between vector body and tail: differences of
one rounding of the moment update are then possible (the replicated optimizer has the same dependence on the
thread count).

**Memory** per rank: 2 moments x (the rank's load) instead of x (all local AdamW elements); transient per step:
its own packed cells plus DP x (one round) elements for the gather.

**Checkpoint** (collective; megatron dist_checkpointing, same keys as ``pretrain.ckpt_state``'s replicated
format: ``optimizer.adamw.<exp_avg|exp_avg_sq>.<param key>`` and ``optimizer.adamw.scalar.step.<param key>``):
each owner saves its cells directly, as ShardedTensors that are row blocks of the parameter's shard (offset
along the parameter's first local dim, that axis' fragmentation x count), so nothing is gathered. The main
replica of each cell is its owner in the DP group that holds the parameter's main replica (one all-reduce of
flags over DP); the ``step`` scalar is saved by the owner of the first cell. Loading requests only the owned
cells; torch_dist reshards, so checkpoints load under any DP size, with or without ``shard_adamw`` on either
side, and into the replicated ``torch.optim.AdamW``.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.muon import grad_of
from parallel.muon_comm import Group, group_rank, group_size
from parallel.param_meta import is_expert_param

log = logging.getLogger(__name__)

CELL_ELEMS = 1 << 20  # smallest cell of a split parameter (elements)
ALIGN = 64  # cell sizes and offsets inside a parameter: multiples of this (see Exactness)
GATHER_ELEMS = 1 << 26  # received elements per all-gather round (256 MiB of fp32)
STATE_FORMAT = "v4-zero-adamw/1"
HYPER = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def row_blocks(shape: Sequence[int], cell_elems: int = CELL_ELEMS, align: int = ALIGN) -> int:
    """Number of equal row blocks (cells) a parameter of ``shape`` is cut into (see the module doc)."""
    if len(shape) == 0 or shape[0] == 0:
        return 1
    rows, per_row = shape[0], math.prod(shape[1:])
    best = 1
    for g in _divisors(rows):
        size = rows // g * per_row
        if g > best and size >= cell_elems and size % align == 0:
            best = g
    return best


@dataclass(frozen=True)
class Cell:
    """Rows ``[row0, row0 + rows)`` of parameter ``pidx`` (block ``part`` of ``count``), kept by DP rank ``owner``."""

    index: int
    pidx: int
    part: int
    count: int
    row0: int
    rows: int
    numel: int
    owner: int


@dataclass
class ZeroPlan:
    cells: list[Cell]
    dp: int
    load: list[int]  # elements per DP rank

    def owned(self, d: int) -> list[Cell]:
        return [c for c in self.cells if c.owner == d]

    def imbalance(self) -> float:
        """max / mean - 1 of the per-rank load (0 = perfect balance)."""
        mean = sum(self.load) / max(len(self.load), 1)
        return max(self.load) / mean - 1.0 if mean > 0 else 0.0


def plan_cells(shapes: Sequence[Sequence[int]], dp: int, cell_elems: int = CELL_ELEMS, align: int = ALIGN) -> ZeroPlan:
    """Cells of every parameter and their owners among ``dp`` ranks (deterministic; see the module doc)."""
    raw: list[tuple[int, int, int, int, int, int]] = []  # pidx, part, count, row0, rows, numel
    for i, shape in enumerate(shapes):
        g = row_blocks(shape, cell_elems, align)
        n = math.prod(shape)
        rows = shape[0] // g if len(shape) else 1
        raw.extend((i, j, g, j * rows, rows, n // g) for j in range(g))
    owner = [0] * len(raw)
    heap = [(0, d) for d in range(dp)]
    for k in sorted(range(len(raw)), key=lambda k: (-raw[k][5], k)):
        load, d = heapq.heappop(heap)
        owner[k] = d
        heapq.heappush(heap, (load + raw[k][5], d))
    cells = [Cell(k, *r, owner=owner[k]) for k, r in enumerate(raw)]
    loads = [0] * dp
    for c in cells:
        loads[c.owner] += c.numel
    return ZeroPlan(cells, dp, loads)


def _rows(t: torch.Tensor, c: Cell) -> torch.Tensor:
    return t if c.count == 1 else t.narrow(0, c.row0, c.rows)


class _Bucket:
    """The cells of one set of parameters over one DP group (dense: data parallel; routed experts: expert DP)."""

    def __init__(
        self, entries: list[tuple[str, torch.Tensor, int]], group: Group, cell_elems: int, gather_elems: int, label: str
    ):
        self.entries, self.label = entries, label
        D = group_size(group)
        self.group = group if D > 1 else None
        self.rank = group_rank(self.group)
        self.gather_elems = gather_elems
        dtypes = {p.dtype for _, p, _ in entries}
        if len(dtypes) > 1:
            raise ValueError(
                f"ZeroAdamW {label}: parameters of several dtypes {sorted(map(str, dtypes))}; "
                f"one flat all-gather needs one dtype"
            )
        for name, p, _ in entries:
            if not p.is_contiguous():
                raise ValueError(f"ZeroAdamW {label}: parameter '{name}' is not contiguous")
        self.dtype = dtypes.pop() if dtypes else torch.float32
        self.device = entries[0][1].device if entries else torch.device("cpu")
        shapes = [tuple(p.shape) for _, p, _ in entries]
        if D > 1:
            seen: list[Any] = [None] * D
            dist.all_gather_object(seen, (shapes, str(self.dtype)), group=self.group)
            if any(s != seen[0] for s in seen):
                raise ValueError(
                    f"ZeroAdamW {label} parameters differ across data-parallel ranks; every DP "
                    f"replica must pass the same parameters in the same order"
                )
        self.plan = plan_cells(shapes, D, cell_elems)
        self.mine = self.plan.owned(self.rank)
        # per rank: its cells in plan order and their offsets in its packed buffer
        self.packed: list[list[Cell]] = [self.plan.owned(d) for d in range(D)]
        self.offsets: list[list[int]] = []
        for cells in self.packed:
            offs, o = [], 0
            for c in cells:
                offs.append(o)
                o += c.numel
            self.offsets.append(offs)
        self.views = {c.index: _rows(self.entries[c.pidx][1].detach(), c) for c in self.mine}
        if entries:
            log.info(
                "ZeroAdamW %s: %d parameters, %d cells over dp=%d, %d elements here (imbalance %.3f)",
                label,
                len(entries),
                len(self.plan.cells),
                D,
                self.plan.load[self.rank],
                self.plan.imbalance(),
            )

    def param_rows(self, c: Cell) -> torch.Tensor:
        return _rows(self.entries[c.pidx][1].detach(), c)

    def exchange(self, src: Callable[[Cell], torch.Tensor], dst: Callable[[Cell], torch.Tensor]) -> None:
        """Collective: every rank's ``src(cell)`` of its own cells lands in ``dst(cell)`` on every other rank."""
        if self.group is None:
            return
        D, me = self.plan.dp, self.rank
        mine = [src(c).reshape(-1) for c in self.mine]
        packed = torch.cat(mine) if mine else torch.empty(0, dtype=self.dtype, device=self.device)
        total = max(self.plan.load)
        step = max(ALIGN, self.gather_elems // D)
        for lo in range(0, total, step):
            n = min(step, total - lo)
            send = packed[lo : lo + n]
            if send.numel() < n:
                send = torch.cat([send, send.new_zeros(n - send.numel())])
            recv = [torch.empty(n, dtype=self.dtype, device=self.device) for _ in range(D)]
            dist.all_gather(recv, send.contiguous(), group=self.group)
            for d in range(D):
                if d == me:
                    continue
                offs, cells = self.offsets[d], self.packed[d]
                k = max(bisect.bisect_right(offs, lo) - 1, 0)
                while k < len(cells) and offs[k] < lo + n:
                    c, off = cells[k], offs[k]
                    a, b = max(off, lo), min(off + c.numel, lo + n)
                    if b > a:
                        out = dst(c).view(-1)
                        out[a - off : b - off].copy_(recv[d][a - lo : b - lo])
                    k += 1

    def main_flags(self, model_sharded: dict[str, Any]) -> list[tuple[bool, bool]]:
        """Collective: per parameter, (does this DP group hold its main replica, ... of its first shard)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        flags = []
        for name, _, _ in self.entries:
            sh = model_sharded.get(name)
            if not isinstance(sh, ShardedTensor):
                raise KeyError(
                    f"ZeroAdamW: no ShardedTensor for parameter '{name}' in the model's sharded state "
                    f"(got {type(sh).__name__})"
                )
            rid = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
            main = all(r == 0 for r in rid)
            flags.append([int(main), int(main and all(o == 0 for o in sh.global_offset))])
        t = torch.tensor(flags, dtype=torch.int32, device=self.device).reshape(-1, 2)
        if self.group is not None and t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [(bool(a), bool(b)) for a, b in t.tolist()]


def _cell_sharded(sh: Any, data: torch.Tensor, key: str, c: Cell, main: bool) -> Any:
    """The ShardedTensor of cell ``c`` of the parameter whose ShardedTensor is ``sh`` (rows of its first local dim)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rid = 0 if main else 1
    if c.count == 1:
        return dataclasses.replace(sh, key=key, data=data, dtype=data.dtype, replica_id=rid)
    P = sh.prepend_axis_num
    if sh.axis_fragmentations is None or sh.local_shape[0] != c.rows * c.count:
        raise NotImplementedError(
            f"ZeroAdamW: cannot cut {sh.key} (local shape {sh.local_shape}, regular grid "
            f"{sh.axis_fragmentations is not None}) into {c.count} row blocks"
        )
    off, frag = list(sh.global_offset), list(sh.axis_fragmentations)
    off[P] += c.row0
    frag[P] *= c.count
    return ShardedTensor(
        key,
        data,
        data.dtype,
        tuple(data.shape),
        sh.global_shape,
        tuple(off),
        tuple(frag),
        rid,
        P,
        sh.allow_shape_mismatch,
    )


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW with its state sharded over data parallel (see the module doc). ``params``: tensors,
    ``(name, tensor)`` pairs, or groups; hyper-parameters as ``torch.optim.AdamW``.

    Args:
        dp_group: dense parameters' data-parallel group (megatron's, with context parallel);
            expert_dp_group: routed-expert parameters' (``v4_expert`` / ``allreduce=False``). None = one rank.
        cell_elems: smallest cell of a split parameter; gather_elems: received elements per all-gather round.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        dp_group: Group = None,
        expert_dp_group: Group = None,
        cell_elems: int = CELL_ELEMS,
        gather_elems: int = GATHER_ELEMS,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=None,
        )
        super().__init__(params, defaults)
        dense, expert, names = [], [], set()
        k = 0
        for gi, g in enumerate(self.param_groups):
            for name, p in zip(g.get("param_names") or [None] * len(g["params"]), g["params"]):
                name = name or f"param.{k}"
                if name in names:
                    raise ValueError(f"ZeroAdamW: parameter name '{name}' appears twice")
                names.add(name)
                (expert if is_expert_param(p) else dense).append((name, p, gi))
                k += 1
        self._buckets = [
            _Bucket(dense, dp_group, cell_elems, gather_elems, "dense"),
            _Bucket(expert, expert_dp_group, cell_elems, gather_elems, "expert"),
        ]
        inner_groups: list[dict[str, Any]] = [{"params": [], **{h: g[h] for h in HYPER}} for g in self.param_groups]
        for b in self._buckets:
            for c in b.mine:
                inner_groups[b.entries[c.pidx][2]]["params"].append(b.views[c.index])
        self._inner = torch.optim.AdamW(inner_groups)
        self._stepped = False
        self._ckpt_keys: dict[str, dict[str, str]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_inner"):
            raise NotImplementedError(
                "ZeroAdamW plans its cells at construction (collectively); build a new "
                "optimizer instead of adding parameter groups"
            )
        super().add_param_group(param_group)

    @property
    def plans(self) -> dict[str, ZeroPlan]:
        return {b.label: b.plan for b in self._buckets}

    def _owned(self) -> Iterable[tuple[_Bucket, Cell, torch.Tensor]]:
        for b in self._buckets:
            for c in b.mine:
                yield b, c, b.views[c.index]

    def state_bytes(self) -> int:
        """Bytes of the per-element state (the moments; not the ``step`` scalars) this rank holds."""
        return sum(
            v.numel() * v.element_size()
            for st in self._inner.state.values()
            for k, v in st.items()
            if isinstance(v, torch.Tensor) and k != "step"
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g, ig in zip(self.param_groups, self._inner.param_groups):
            for h in HYPER:
                ig[h] = g[h]
        for b, c, view in self._owned():
            p = b.entries[c.pidx][1]
            view.data = b.param_rows(c)  # the parameter's storage, even if p.data was rebound
            grad = grad_of(p)
            view.grad = None if grad is None else _rows(grad, c)
        self._inner.step()
        for _, _, view in self._owned():
            view.grad = None  # no reference to the gradient outlives the step
        for b in self._buckets:
            b.exchange(b.param_rows, b.param_rows)
        self._stepped = True
        return loss

    # ---- state (collective) --------------------------------------------------------------------------
    def checkpoint_state_keys(self) -> dict[str, dict[str, str]]:
        """Per-parameter state keys in ``pretrain.ckpt_state.optimizer_state_keys``' format: what torch's AdamW
        holds after a step (identical on every rank; empty before the first step, as for torch)."""
        if not self._stepped:
            return {}
        scalar = "float64" if torch.get_default_dtype() == torch.float64 else "float32"  # torch's step dtype
        dtype = str(next((b.dtype for b in self._buckets if b.entries), torch.float32)).replace("torch.", "")
        keys = {
            "step": {"kind": "scalar", "dtype": scalar},
            "exp_avg": {"kind": "param", "dtype": dtype},
            "exp_avg_sq": {"kind": "param", "dtype": dtype},
        }
        if any(g["amsgrad"] for g in self.param_groups):
            keys["max_exp_avg_sq"] = {"kind": "param", "dtype": dtype}
        return keys

    def _ensure_state(self, keys: dict[str, dict[str, str]]) -> None:
        """Zero state (torch's initial values) for owned cells not stepped yet: save / load targets."""
        for _, _, view in self._owned():
            st = self._inner.state[view]
            for k, spec in keys.items():
                if k in st:
                    continue
                if spec["kind"] == "param":
                    st[k] = torch.zeros_like(view, dtype=getattr(torch, spec["dtype"]))
                elif spec["kind"] == "scalar":
                    st[k] = torch.zeros((), dtype=getattr(torch, spec["dtype"]))
                else:
                    st[k] = 0

    def sharded_state_dict(
        self,
        model_sharded: dict[str, Any],
        prefix: str = "optimizer.adamw.",
        keys: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """megatron dist_checkpointing form of the owned cells (module doc). ``model_sharded`` maps parameter
        name -> its ShardedTensor; ``keys`` (for a load: the checkpoint's) defaults to
        :meth:`checkpoint_state_keys`. Collective over the DP groups."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        keys = self.checkpoint_state_keys() if keys is None else keys
        self._ckpt_keys = dict(keys)
        out: dict[str, Any] = {}
        if not keys:
            return out
        self._ensure_state(keys)
        for b in self._buckets:
            flags = b.main_flags(model_sharded) if b.entries else []
            for c in b.mine:
                name = b.entries[c.pidx][0]
                sh = model_sharded[name]
                st = self._inner.state[b.views[c.index]]
                main, main_first = flags[c.pidx]
                for k, spec in keys.items():
                    if spec["kind"] == "param":
                        out[f"{k}.{name}.{c.part}"] = _cell_sharded(sh, st[k], f"{prefix}{k}.{sh.key}", c, main)
                    elif f"{k}.{name}" not in out:  # cells in index order: part 0 first if owned
                        v = st[k]
                        data = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                        data = data.detach().reshape(1).to(torch.float64).clone()
                        out[f"{k}.{name}"] = ShardedTensor.from_rank_offsets(
                            f"{prefix}scalar.{k}.{sh.key}", data, replica_id=0 if (c.part == 0 and main_first) else 1
                        )
        return out

    def load_sharded_state(self, loaded: dict[str, Any]) -> None:
        """Restore from what ``dist_checkpointing.load`` returned for :meth:`sharded_state_dict`."""
        keys = self._ckpt_keys
        for b, c, view in self._owned():
            name = b.entries[c.pidx][0]
            st = self._inner.state[view]
            for k, spec in keys.items():
                if spec["kind"] == "param":
                    st[k].copy_(loaded[f"{k}.{name}.{c.part}"])
                else:
                    v = loaded[f"{k}.{name}"]
                    if spec["kind"] == "scalar":
                        st[k] = v.reshape(()).to(getattr(torch, spec["dtype"])).clone()
                    else:
                        st[k] = int(v.item()) if spec["dtype"] == "int" else float(v.item())
        self._stepped = self._stepped or bool(keys)

    def state_dict(self) -> dict[str, Any]:
        """Collective. The full state, laid out like the local parameters and identical on every DP rank:
        ``{"format", "state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [hyper + names]}``
        (transient: the whole AdamW state of this rank's parameters)."""
        keys = self.checkpoint_state_keys()
        self._ensure_state(keys)
        state: dict[str, dict[str, Any]] = {}
        for b in self._buckets:
            full = {
                k: [torch.zeros_like(p, dtype=getattr(torch, s["dtype"])) for _, p, _ in b.entries]
                for k, s in keys.items()
                if s["kind"] == "param"
            }
            for k, bufs in full.items():
                for c in b.mine:
                    _rows(bufs[c.pidx], c).copy_(self._inner.state[b.views[c.index]][k])
                b.exchange(
                    lambda c, k=k: self._inner.state[b.views[c.index]][k], lambda c, bufs=bufs: _rows(bufs[c.pidx], c)
                )
            steps = torch.zeros(len(b.entries), dtype=torch.float64, device=b.device)
            for c in b.mine:
                if c.part == 0 and "step" in keys:
                    steps[c.pidx] = float(self._inner.state[b.views[c.index]]["step"])
            if b.group is not None and steps.numel():
                dist.all_reduce(steps, group=b.group)  # exactly one owner of cell 0 contributes
            for i, (name, _, _) in enumerate(b.entries):
                if keys:
                    state[name] = {k: full[k][i] for k in full}
                    state[name]["step"] = torch.tensor(steps[i].item(), dtype=getattr(torch, keys["step"]["dtype"]))
        groups = []
        for gi, g in enumerate(self.param_groups):
            hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            hyper["params"] = [n for b in self._buckets for (n, _, i) in b.entries if i == gi]
            groups.append(hyper)
        return {"format": STATE_FORMAT, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (any DP size): hyper-parameters, and each owned cell's rows."""
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"not a ZeroAdamW state dict (format {state_dict.get('format')!r})")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(state_dict['param_groups'])} param groups, optimizer {len(self.param_groups)}"
            )
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        saved_state = state_dict["state"]
        for b, c, view in self._owned():
            name = b.entries[c.pidx][0]
            if name in saved_state:
                self._inner.state[view] = {
                    k: (v.detach().reshape(()).clone() if k == "step" else _rows(v, c).detach().clone().to(view.device))
                    for k, v in saved_state[name].items()
                }
        self._stepped = bool(saved_state)
