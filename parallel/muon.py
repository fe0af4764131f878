"""Muon, DeepSeek-V4 variant (docs/MODEL.md §12.2), single-process and distributed (TP x DP x EP).

Per logically independent matrix W in R^{n x m} (a *unit*, see ``parallel.muon_sharding``), lr eta,
momentum mu, weight decay lambda, RMS factor gamma:

    M_t = mu M_{t-1} + G_t
    U_t = mu M_t + G_t                    (Nesterov; U_t = M_t without)
    O_t = NS(U_t) * sqrt(max(n, m)) * gamma
    W_t = W_{t-1} (1 - eta lambda) - eta O_t

NS is the hybrid Newton-Schulz of ``ops.newton_schulz`` (default 8 x (3.4445, -4.7750, 2.0315) then
2 x (2, -1.5, 0.5), on X_0 = U / ||U||_F in the wide orientation). Defaults are V4's: mu = 0.95,
Nesterov, lambda = 0.1, gamma = 0.18. Units: a 2-D parameter; each block of a fused parameter
(``v4_blocks`` attribute: sizes along dim 0 of the local matrix -- for a 3-D stack, along the row dim of
each expert matrix); each expert of a 3-D ``[E, out, in]`` stack.

Distributed use (``Muon(params, ..., tp_group=, dp_group=, expert_tp_group=, expert_dp_group=)`` or
``Muon.from_parallel_state(params, ...)`` with megatron-core's ``parallel_state``):

* Gradients must already be averaged over data parallel (megatron DDP's ``finalize_model_grads``, or the
  caller) and identical on every DP replica when ``step()`` runs. ``p.grad`` is read, else megatron's
  ``p.main_grad``.
* Every unit is orthogonalised as the FULL matrix, exactly once per DP group, by an owner chosen by the
  load-balanced plan; TP-sharded units by ``gather`` or ``gram`` (``tp_mode``; see muon_sharding).
  Momentum lives on the owner only (ZeRO-1-like). Owners send the update O (fp32) back; every rank
  applies W <- W (1 - eta lambda) - eta O to its own slice, so replicas stay bit-identical.
* Routed-expert parameters (``v4_expert`` or megatron's ``allreduce=False``) form a second engine over
  the expert TP / expert DP groups; they are never reduced over the EP group; local experts of equal shape
  are orthogonalised in one batched NS per owner.
* Pipeline stages hold disjoint parameters and need nothing: pass the groups of the stage.
* ``state_dict()``/``load_state_dict()`` are collective; the saved momentum is keyed by parameter name
  and laid out like the local parameter (TP slice), so it is identical on all DP ranks and restores under
  any DP size (any owner layout). It materialises every rank's whole momentum: for tests and small runs.

Checkpoint (``sharded_state_dict`` / ``load_sharded_state``, megatron dist_checkpointing; collective):
the momentum is saved from where it lives, nothing is gathered. Each unit is one ShardedTensor (format
``CKPT_FORMAT``) whose global shape is the unit's FULL matrix, after the parameter's prepended global axes
(megatron's layer / expert index, from the model's ShardedTensor) and, for a 3-D stack, the global expert
index; key ``<prefix>momentum_unit.<parameter key>.block<j>`` with j the block's index in the full matrix.
So the key and the global tensor do not depend on TP, DP, EP or PP. Only owners contribute: the owner of a
local / gather unit its full matrix, every TP rank of a gram unit's owner replica its slice (at its offset
along the sharded dim; uneven slices are first gathered to TP rank 0 of that replica). The replica id is
main unless the parameter's main replica lives outside this engine's TP x DP grid. A load requests exactly
the units (slices) this rank owns under the new plan and torch_dist reads the overlapping parts, so TP, DP,
EP and owner changes between save and load work. Recorded state keys without this ``format`` (the
pre-release parameter-layout momentum) are refused with an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ops import functional as op
from ops.newton_schulz import (
    GRAM_RESTARTS,
    V4_NS_STEPS,
    expand_steps,
    newton_schulz,
    newton_schulz_gram,
)
from parallel.muon_comm import Exchange, Group, group_size
from parallel.muon_sharding import CostModel, ParamInfo, Plan, Unit, fingerprint, plan
from parallel.param_meta import is_expert_param

log = logging.getLogger(__name__)

STATE_FORMAT = "v4-muon/1"
CKPT_FORMAT = "v4-muon-units/1"  # sharded_state_dict: momentum per unit, saved by its owner


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient an optimizer step reads: ``p.grad``, else megatron DDP's ``p.main_grad``."""
    if p.grad is not None:
        return p.grad
    return getattr(p, "main_grad", None)


def _norm_steps(steps: Sequence[Sequence[float]]) -> tuple[tuple[int, float, float, float], ...]:
    out = tuple((int(s[0]), float(s[1]), float(s[2]), float(s[3])) for s in steps)
    expand_steps(out)  # validates
    return out


def _even(u: Unit) -> bool:
    """A gram unit whose TP slices all have the same shape (a regular checkpoint grid)."""
    return all(s == u.local_shapes[0] for s in u.local_shapes)


@dataclass(frozen=True)
class _Ident:
    """Layout-independent identity of a parameter, from its model ShardedTensor: the key, the prepended
    global axes (megatron's layer / expert index: offsets and sizes), for a 3-D stack the global index of
    local expert 0 and the global expert count; ``main``: this rank holds the main replica."""

    key: str
    lead_off: tuple[int, ...]
    lead_shape: tuple[int, ...]
    expert_off: int
    experts: int
    main: bool


def _ident(name: str, p: torch.Tensor, sh: Any) -> _Ident:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    key, rid = getattr(sh, "key", None), getattr(sh, "replica_id", None)
    if isinstance(sh, ShardedTensorFactory):
        if p.dim() != 2:
            raise NotImplementedError(f"Muon: parameter '{name}' is a {p.dim()}-D ShardedTensorFactory")
        sh = next((v for v in nested_values(sh.build()) if isinstance(v, ShardedTensor)), None)
    if not isinstance(sh, ShardedTensor):
        raise KeyError(
            f"no ShardedTensor for Muon parameter '{name}' in the model's sharded state (got {type(sh).__name__})"
        )
    P = sh.prepend_axis_num
    rid = rid if isinstance(rid, tuple) else (rid,)
    e_off, e_n = (sh.global_offset[P], sh.global_shape[P]) if p.dim() == 3 else (0, 0)
    return _Ident(
        key, tuple(sh.global_offset[:P]), tuple(sh.global_shape[:P]), int(e_off), int(e_n), all(r == 0 for r in rid)
    )


class _Engine:
    """Plan + exchange + momentum for one set of parameters over one (TP, DP) pair of groups."""

    def __init__(
        self,
        entries: list[tuple[str, torch.Tensor, int]],
        tp_group: Group,
        dp_group: Group,
        tp_mode: str,
        ns_impl: str,
        iters: int,
        cost: CostModel,
        label: str,
    ):
        self.entries = entries  # (name, param, group index)
        self.label = label
        T, D = group_size(tp_group), group_size(dp_group)
        infos = [ParamInfo.of(n, p, T) for n, p, _ in entries]
        all_infos: list[list[ParamInfo]] = [infos]
        if T > 1:
            gathered: list[Any] = [None] * T
            dist.all_gather_object(gathered, infos, group=tp_group)
            all_infos = gathered
        if D > 1:
            fps: list[Any] = [None] * D
            dist.all_gather_object(fps, fingerprint(infos), group=dp_group)
            if any(f != fps[0] for f in fps):
                raise ValueError(
                    f"Muon {label} parameters differ across data-parallel ranks "
                    f"(counts {[len(f) for f in fps]}); every DP replica must pass the same list"
                )
        self.plan: Plan = plan(all_infos, D, tp_mode, iters, ns_impl, len(GRAM_RESTARTS), cost)
        self.ex = Exchange(self.plan, tp_group, dp_group)
        self.momentum: dict[int, torch.Tensor] = {}
        self._ckpt_units: list[tuple[Unit, str]] = []  # what the last unit_sharded saved / requested
        self.device = entries[0][1].device if entries else torch.device("cpu")
        # state / traffic dtype: fp32, or fp64 when every parameter is fp64 (exactness tests)
        self.dtype = (
            torch.float64 if entries and all(p.dtype == torch.float64 for _, p, _ in entries) else torch.float32
        )
        log.info("Muon %s engine: %s", label, self.plan.summary())

    # ---- helpers -------------------------------------------------------------------------------
    def _reduce_tp(self, A: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(A, group=self.ex.tp_group)
        return A

    def _active(self) -> list[Unit]:
        has = torch.tensor([grad_of(p) is not None for _, p, _ in self.entries], dtype=torch.uint8, device=self.device)
        for g in (self.ex.tp_group, self.ex.dp_group):
            if g is not None and has.numel():
                dist.all_reduce(has, op=dist.ReduceOp.MAX, group=g)
        self._has = has.tolist()
        return [u for u in self.plan.units if self._has[u.pidx]]

    def _grad_view(self, u: Unit) -> torch.Tensor:
        p = self.entries[u.pidx][1]
        g = grad_of(p)
        if g is None:  # another rank of the grid has a gradient for it: this one contributes zeros
            g = torch.zeros_like(p)
        return u.local_view(g, self.ex.t)

    # ---- the update ----------------------------------------------------------------------------
    def step(self, groups: list[dict[str, Any]]) -> None:
        units = self._active()
        if not units:
            return
        f32 = self.dtype
        grads = self.ex.to_owners(units, self._grad_view, f32, self.device)
        inputs: dict[int, torch.Tensor] = {}
        for u in units:
            if u.uid not in grads:
                continue
            g = grads[u.uid]
            grp = groups[self.entries[u.pidx][2]]
            mu = grp["momentum"]
            buf = self.momentum.get(u.uid)
            if buf is None:
                buf = self.momentum[u.uid] = torch.zeros_like(g, dtype=f32)
            buf.mul_(mu).add_(g)
            inputs[u.uid] = g.add(buf, alpha=mu) if grp["nesterov"] else buf
        updates = self._orthogonalise(units, inputs, groups)
        local = self.ex.from_owners(units, updates, f32, self.device)
        for u in units:
            _, p, gi = self.entries[u.pidx]
            grp = groups[gi]
            lr, wd = grp["lr"], grp["weight_decay"]
            view = u.local_view(p.data, self.ex.t)
            if wd:
                view.mul_(1.0 - lr * wd)
            view.add_(local[u.uid].to(view.dtype), alpha=-lr)

    def _orthogonalise(
        self, units: list[Unit], inputs: dict[int, torch.Tensor], groups: list[dict[str, Any]]
    ) -> dict[int, torch.Tensor]:
        """NS of every owned input, batched per (shape, schedule); scaled by gamma sqrt(max(n, m))."""
        batches: dict[tuple, list[Unit]] = {}
        for u in units:  # uid order: identical batch order on all TP ranks
            if u.uid not in inputs:
                continue
            grp = groups[self.entries[u.pidx][2]]
            key = (
                u.mode == "gram",
                u.full_shape,
                u.shard_dim if u.mode == "gram" else None,
                u.local_shapes if u.mode == "gram" else None,
                grp["ns_steps"],
                grp["fp32_newton_schulz"],
                grp["ns_impl"],
            )
            batches.setdefault(key, []).append(u)
        out: dict[int, torch.Tensor] = {}
        for key, lst in batches.items():
            gram_mode, (n, m), shard_dim, _, steps, fp32, impl = key
            fp32 = bool(fp32) or self.device.type != "cuda"  # bf16 matmuls only pay off on GPU
            X = torch.stack([inputs[u.uid] for u in lst])
            if gram_mode:
                X = X if shard_dim == 1 else X.mT  # wide orientation, sharded (long) dim last
                fn = newton_schulz_gram if impl == "gram" else newton_schulz
                Y = fn(X, steps, fp32, reduce=self._reduce_tp)
                Y = Y if shard_dim == 1 else Y.mT
            else:
                orthogonalise = op.newton_schulz_gram if impl == "gram" else op.newton_schulz
                Y = orthogonalise(X, steps=steps, fp32=fp32)
            for u, y in zip(lst, Y.unbind(0)):
                gamma = groups[self.entries[u.pidx][2]]["update_rms"]
                out[u.uid] = y.to(self.dtype).mul_(gamma * math.sqrt(max(n, m)))
        return out

    # ---- state ---------------------------------------------------------------------------------
    def local_momentum(self) -> dict[str, torch.Tensor]:
        """Collective: every rank gets the momentum of its own parameter slices, keyed by name."""
        units = self.plan.units
        owned = {
            u.uid: self.momentum.get(u.uid)
            for u in units
            if self.ex.owns(u) or (u.mode == "gram" and u.owner_dp == self.ex.d)
        }
        for u in units:
            if u.uid in owned and owned[u.uid] is None:
                full = u.mode in ("local", "gather")
                shape = u.full_shape if full else u.local_shapes[self.ex.t]
                owned[u.uid] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        local = self.ex.from_owners(units, owned, self.dtype, self.device)
        out: dict[str, torch.Tensor] = {}
        for name, p, _ in self.entries:
            out[name] = torch.zeros(p.shape, dtype=self.dtype, device=self.device)
        for u in units:
            u.local_view(out[self.entries[u.pidx][0]], self.ex.t).copy_(local[u.uid])
        return out

    def load_local_momentum(self, saved: dict[str, torch.Tensor]) -> None:
        """Collective inverse of :meth:`local_momentum` (missing names start from zero momentum)."""
        bufs = {}
        for name, p, _ in self.entries:
            t = saved.get(name)
            if t is not None and tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"Muon momentum for '{name}' has shape {tuple(t.shape)}, the parameter "
                    f"{tuple(p.shape)}: a different TP layout needs dist_checkpointing "
                    f"(sharded_state_dict), not this state dict"
                )
            bufs[name] = (t if t is not None else torch.zeros(p.shape)).to(self.device, self.dtype)
        owned = self.ex.to_owners(
            self.plan.units, lambda u: u.local_view(bufs[self.entries[u.pidx][0]], self.ex.t), self.dtype, self.device
        )
        self.momentum = {uid: t.clone() for uid, t in owned.items()}

    # ---- checkpoint in unit layout (sharded_state_dict; see the module doc) ---------------------------
    def _global_blocks(self) -> dict[int, int]:
        """uid -> the unit's block index in the FULL matrix (layout-independent). build_units lists the units
        of one (parameter, expert) in full-matrix block order (whole-block units: holder 0's, holder 1's, ...)."""
        out: dict[int, int] = {}
        seen: dict[tuple[int, int | None], int] = {}
        for u in self.plan.units:
            k = (u.pidx, u.expert)
            out[u.uid] = seen.get(k, 0)
            seen[k] = out[u.uid] + 1
        return out

    def _saved_units(self) -> list[tuple[Unit, str]]:
        """(unit, piece) this rank saves / loads: ``full`` (the owner of a local/gather unit; TP rank 0 of the
        owner replica of a gram unit with uneven TP slices) or ``slice`` (every TP rank of the owner replica of
        an evenly sliced gram unit)."""
        out = []
        for u in self.plan.units:
            if u.mode != "gram":
                if self.ex.owns(u):
                    out.append((u, "full"))
            elif u.owner_dp == self.ex.d:
                if _even(u):
                    out.append((u, "slice"))
                elif self.ex.t == 0:
                    out.append((u, "full"))
        return out

    def _uneven_owned(self) -> list[Unit]:
        """Gram units with uneven TP slices owned by this DP replica (saved whole by its TP rank 0)."""
        return [u for u in self.plan.units if u.mode == "gram" and u.owner_dp == self.ex.d and not _even(u)]

    def _main_flags(self, idents: list[_Ident]) -> list[bool]:
        """Collective (TP, then DP): per parameter, does this engine's TP x DP grid hold the main replica of
        the parameter (False e.g. for a copy of a parameter held by another pipeline stage)."""
        t = torch.tensor([int(i.main) for i in idents], dtype=torch.int32, device=self.device)
        for g in (self.ex.tp_group, self.ex.dp_group):
            if g is not None and t.numel():
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
        return [bool(x) for x in t.tolist()]

    def _gather_uneven(self, units: list[Unit]) -> dict[int, torch.Tensor]:
        """Collective in the owner replica's TP group: the slices of ``units`` (gram units with uneven TP
        slices, owned by this replica) to TP rank 0, which returns the full matrices."""
        T = self.plan.tp

        def mine(u: Unit) -> torch.Tensor:
            buf = self.momentum.get(u.uid)
            return (
                buf if buf is not None else torch.zeros(u.local_shapes[self.ex.t], dtype=self.dtype, device=self.device)
            )

        send = [[mine(u) for u in units] if peer == 0 else [] for peer in range(T)]
        recv_sizes = [sum(u.numel_local(peer) for u in units) if self.ex.t == 0 else 0 for peer in range(T)]
        recv = self.ex._all_to_all(send, recv_sizes, self.dtype, self.device)
        if self.ex.t != 0:
            return {}
        out, offs = {}, [0] * T
        for u in units:
            pieces = []
            for peer in range(T):
                k = u.numel_local(peer)
                pieces.append(recv[peer][offs[peer] : offs[peer] + k].view(u.local_shapes[peer]))
                offs[peer] += k
            out[u.uid] = u.join(pieces).contiguous()
        return out

    def unit_sharded(self, model_sharded: dict[str, Any], key_prefix: str, for_load: bool) -> dict[str, Any]:
        """ShardedTensors of the momentum this rank owns, one per unit (or gram slice): global shape = the
        unit's full matrix (after the parameter's prepended axes, and the global expert index for 3-D
        stacks), key ``<key_prefix><param key>.block<j>``. Collective over this engine's TP and DP groups.
        ``for_load``: the tensors are load targets (no gather of uneven gram slices)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        self._ckpt_units = []
        if not self.entries:
            return {}
        idents = []
        for name, p, _ in self.entries:
            if name not in model_sharded:
                raise KeyError(f"no ShardedTensor for Muon parameter '{name}' in the model's sharded state")
            idents.append(_ident(name, p, model_sharded[name]))
        main = self._main_flags(idents)
        blocks = self._global_blocks()
        saved = self._saved_units()
        self._ckpt_units = saved
        uneven = self._uneven_owned()
        full_uneven = self._gather_uneven(uneven) if uneven and not for_load else {}
        out: dict[str, Any] = {}
        for u, piece in saved:
            ident = idents[u.pidx]
            lead_off, lead_shape = list(ident.lead_off), list(ident.lead_shape)
            if u.expert is not None:
                lead_off.append(ident.expert_off + u.expert)
                lead_shape.append(ident.experts)
            n, m = u.full_shape
            off, frag = [0, 0], [1, 1]
            if piece == "full":
                local = (n, m)
                data = full_uneven.get(u.uid) if u.mode == "gram" else self.momentum.get(u.uid)
            else:
                local, sd, t = u.local_shapes[self.ex.t], u.shard_dim, self.ex.t
                off[sd] = sum(s[sd] for s in u.local_shapes[:t])
                frag[sd] = self.plan.tp
                data = self.momentum.get(u.uid)
            if data is None:  # never stepped (== zero momentum), or a load target
                data = torch.zeros(local, dtype=self.dtype, device=self.device)
            if not data.is_contiguous():
                data = data.contiguous()
            shape = (1,) * len(lead_off) + tuple(local)
            out[f"{self.label}.{u.uid}"] = ShardedTensor(
                f"{key_prefix}{ident.key}.block{blocks[u.uid]}",
                data.view(shape),
                data.dtype,
                shape,
                tuple(lead_shape) + (n, m),
                tuple(lead_off) + tuple(off),
                tuple(lead_shape) + tuple(frag),
                0 if main[u.pidx] else 1,
            )
        return out

    def load_unit_sharded(self, loaded: dict[str, Any]) -> None:
        """Collective (TP groups with uneven gram units): restore from what ``dist_checkpointing.load``
        returned for :meth:`unit_sharded`."""
        mom: dict[int, torch.Tensor] = {}
        for u, piece in self._ckpt_units:
            t = loaded[f"{self.label}.{u.uid}"]
            if u.mode == "gram" and piece == "full":
                continue
            shape = u.full_shape if piece == "full" else u.local_shapes[self.ex.t]
            mom[u.uid] = t.reshape(shape).to(self.device, self.dtype)
        uneven = self._uneven_owned()
        if uneven:  # TP rank 0 of the owner replica loaded the full matrix: scatter
            T = self.plan.tp
            full = (
                {
                    u.uid: loaded[f"{self.label}.{u.uid}"].reshape(u.full_shape).to(self.device, self.dtype)
                    for u in uneven
                }
                if self.ex.t == 0
                else {}
            )
            send = [[u.split_full(full[u.uid])[peer] for u in uneven] if self.ex.t == 0 else [] for peer in range(T)]
            recv_sizes = [sum(u.numel_local(self.ex.t) for u in uneven) if peer == 0 else 0 for peer in range(T)]
            recv = self.ex._all_to_all(send, recv_sizes, self.dtype, self.device)[0]
            off = 0
            for u in uneven:
                k = u.numel_local(self.ex.t)
                mom[u.uid] = recv[off : off + k].view(u.local_shapes[self.ex.t]).clone()
                off += k
        self.momentum = mom


class Muon(torch.optim.Optimizer):
    """DeepSeek-V4 Muon (see the module doc). ``params``: tensors, ``(name, tensor)`` pairs, or groups.

    Args:
        lr, momentum, nesterov, weight_decay, update_rms: eta, mu, Nesterov, lambda, gamma.
        ns_steps: Newton-Schulz schedule ``[(count, a, b, c), ...]``.
        fp32_newton_schulz: exactness path (fp32 matmuls); False = bf16 matmuls on CUDA (fp32 on CPU).
        ns_impl: ``plain`` or ``gram`` (Gram-form NS, ``ops.newton_schulz``).
        tp_mode: ``auto`` | ``gather`` | ``gram`` for TP-sharded matrices (cost model in muon_sharding).
        tp_group, dp_group: dense parameters' groups; expert_tp_group, expert_dp_group: routed experts'.
            All None = single process (also the behaviour without torch.distributed).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2.7e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        update_rms: float = 0.18,
        ns_steps: Sequence[Sequence[float]] = V4_NS_STEPS,
        fp32_newton_schulz: bool = False,
        ns_impl: str = "plain",
        tp_mode: str = "auto",
        tp_group: Group = None,
        dp_group: Group = None,
        expert_tp_group: Group = None,
        expert_dp_group: Group = None,
        cost_model: CostModel | None = None,
    ):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or update_rms <= 0:
            raise ValueError(
                f"invalid Muon hyper-parameters lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} update_rms={update_rms}"
            )
        if ns_impl not in ("plain", "gram"):
            raise ValueError(f"ns_impl '{ns_impl}' unknown; choose plain or gram")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            update_rms=update_rms,
            ns_steps=_norm_steps(ns_steps),
            fp32_newton_schulz=fp32_newton_schulz,
            ns_impl=ns_impl,
        )
        super().__init__(params, defaults)
        for g in self.param_groups:
            g["ns_steps"] = _norm_steps(g["ns_steps"])
            if g["ns_impl"] not in ("plain", "gram"):
                raise ValueError(f"ns_impl '{g['ns_impl']}' unknown; choose plain or gram")
        if len({expand_steps(g["ns_steps"]).__len__() for g in self.param_groups}) > 1:
            log.warning("Muon param groups use different NS lengths; the cost model uses the first")
        self.tp_mode = tp_mode
        dense, expert = [], []
        k = 0
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names") or [None] * len(g["params"])
            for name, p in zip(names, g["params"]):
                (expert if is_expert_param(p) else dense).append((name or f"param.{k}", p, gi))
                k += 1
        cost_model = cost_model or CostModel()
        iters = len(expand_steps(self.param_groups[0]["ns_steps"])) if self.param_groups else 10
        impl = self.param_groups[0]["ns_impl"] if self.param_groups else "plain"
        self._engines = [
            _Engine(dense, tp_group, dp_group, tp_mode, impl, iters, cost_model, "dense"),
            _Engine(expert, expert_tp_group, expert_dp_group, tp_mode, impl, iters, cost_model, "expert"),
        ]
        self._steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_engines"):
            raise NotImplementedError(
                "Muon plans owners and shards at construction (collectively); "
                "build a new optimizer instead of adding parameter groups"
            )
        super().add_param_group(param_group)

    @classmethod
    def from_parallel_state(cls, params: Iterable[Any], **kwargs: Any) -> Muon:
        """Build with megatron-core ``parallel_state``'s groups of this rank's pipeline stage."""
        return cls(params, **{**parallel_state_groups(), **kwargs})

    @property
    def plans(self) -> dict[str, Plan]:
        return {e.label: e.plan for e in self._engines}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for eng in self._engines:
            eng.step(self.param_groups)
        self._steps += 1
        return loss

    # ---- checkpointing (collective) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective. ``{"format", "steps", "state": {name: {"momentum_buffer": local-slice fp32}},
        "param_groups": [hyper-parameters + "params": names]}``; identical on all DP ranks."""
        state: dict[str, Any] = {}
        for eng in self._engines:  # zeros for units never stepped (== no momentum)
            for name, buf in eng.local_momentum().items():
                state[name] = {"momentum_buffer": buf}
        groups = []
        for gi, g in enumerate(self.param_groups):
            hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            hyper["params"] = [n for e in self._engines for (n, _, i) in e.entries if i == gi]
            groups.append(hyper)
        return {"format": STATE_FORMAT, "steps": self._steps, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Collective. Restores momentum under any DP size / owner layout (same TP layout)."""
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"not a Muon state dict (format {state_dict.get('format')!r}, want {STATE_FORMAT})")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, optimizer {len(self.param_groups)}")
        for g, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k not in ("params", "param_names"):
                    g[k] = _norm_steps(v) if k == "ns_steps" else v
        momentum = {n: s["momentum_buffer"] for n, s in state_dict["state"].items()}
        for eng in self._engines:
            eng.load_local_momentum(momentum)
        self._steps = int(state_dict.get("steps", 0))

    def checkpoint_state_keys(self) -> dict[str, dict[str, str]]:
        """What ``pretrain.ckpt_state`` records in the checkpoint's common state for this optimizer: the
        momentum is the optimizer's own (``kind`` own), saved in the unit format ``CKPT_FORMAT``."""
        return {"__own__": {"kind": "own", "dtype": "", "format": CKPT_FORMAT}}

    def sharded_state_dict(
        self,
        model_sharded: dict[str, Any],
        prefix: str = "optimizer.muon.",
        keys: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """megatron dist_checkpointing form of the momentum, saved from where it lives (module doc,
        "Checkpoint"). ``model_sharded`` maps parameter name -> the parameter's ShardedTensor (or
        ShardedTensorFactory) from the model's ``sharded_state_dict``; ``keys``: for a load, what the
        checkpoint recorded (:meth:`checkpoint_state_keys`). The same call builds the save state and the
        load targets. Collective."""
        fmt = CKPT_FORMAT if keys is None else (keys.get("__own__") or {}).get("format")
        if fmt != CKPT_FORMAT:
            raise ValueError(
                f"Muon checkpoint format {fmt!r}: this code reads only {CKPT_FORMAT!r} (momentum per "
                f"unit). A checkpoint without a recorded format predates it and cannot be resumed; "
                f"start from its weights with a fresh optimizer instead"
            )
        out: dict[str, Any] = {}
        for eng in self._engines:
            out.update(eng.unit_sharded(model_sharded, prefix + "momentum_unit.", for_load=keys is not None))
        return out

    def load_sharded_state(self, loaded: dict[str, torch.Tensor]) -> None:
        """Collective: restore from what ``dist_checkpointing.load`` returned for the last
        :meth:`sharded_state_dict` call."""
        for eng in self._engines:
            eng.load_unit_sharded(loaded)


def parallel_state_groups() -> dict[str, Group]:
    """This rank's Muon groups from megatron-core ``parallel_state`` (dense DP includes context parallel)."""
    from megatron.core import parallel_state as ps

    return dict(
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=True),
        expert_tp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
    )
