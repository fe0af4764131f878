"""Muon, DeepSeek-V4 variant (deepseek-v4.md §12.2), single-process and distributed (TP x DP x EP).

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
  any DP size (any owner layout). ``sharded_state_dict`` wraps it for megatron dist_checkpointing.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ops import dispatch
from ops.newton_schulz import (
    GRAM_RESTARTS,
    V4_NS_STEPS,
    expand_steps,
    newton_schulz,
    newton_schulz_gram,
)
from parallel.muon_comm import Exchange, Group, group_size
from parallel.muon_sharding import CostModel, ParamInfo, Plan, Unit, fingerprint, plan

log = logging.getLogger(__name__)

STATE_FORMAT = "v4-muon/1"


def is_expert_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "v4_expert", False)) or getattr(p, "allreduce", True) is False


def _grad_of(p: torch.Tensor) -> torch.Tensor | None:
    if p.grad is not None:
        return p.grad
    return getattr(p, "main_grad", None)


def _norm_steps(steps: Sequence[Sequence[float]]) -> tuple[tuple[int, float, float, float], ...]:
    out = tuple((int(s[0]), float(s[1]), float(s[2]), float(s[3])) for s in steps)
    expand_steps(out)  # validates
    return out


class _Engine:
    """Plan + exchange + momentum for one set of parameters over one (TP, DP) pair of groups."""

    def __init__(self, entries: list[tuple[str, torch.Tensor, int]], tp_group: Group, dp_group: Group,
                 tp_mode: str, ns_impl: str, iters: int, cost: CostModel, label: str):
        self.entries = entries                      # (name, param, group index)
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
                raise ValueError(f"Muon {label} parameters differ across data-parallel ranks "
                                 f"(counts {[len(f) for f in fps]}); every DP replica must pass the same list")
        self.plan: Plan = plan(all_infos, D, tp_mode, iters, ns_impl, len(GRAM_RESTARTS), cost)
        self.ex = Exchange(self.plan, tp_group, dp_group)
        self.momentum: dict[int, torch.Tensor] = {}
        self.device = entries[0][1].device if entries else torch.device("cpu")
        # state / traffic dtype: fp32, or fp64 when every parameter is fp64 (exactness tests)
        self.dtype = (torch.float64 if entries and all(p.dtype == torch.float64 for _, p, _ in entries)
                      else torch.float32)
        log.info("Muon %s engine: %s", label, self.plan.summary())

    # ---- helpers -------------------------------------------------------------------------------
    def _reduce_tp(self, A: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(A, group=self.ex.tp_group)
        return A

    def _active(self) -> list[Unit]:
        has = torch.tensor([_grad_of(p) is not None for _, p, _ in self.entries], dtype=torch.uint8,
                           device=self.device)
        for g in (self.ex.tp_group, self.ex.dp_group):
            if g is not None and has.numel():
                dist.all_reduce(has, op=dist.ReduceOp.MAX, group=g)
        self._has = has.tolist()
        return [u for u in self.plan.units if self._has[u.pidx]]

    def _grad_view(self, u: Unit) -> torch.Tensor:
        p = self.entries[u.pidx][1]
        g = _grad_of(p)
        if g is None:    # another rank of the grid has a gradient for it: this one contributes zeros
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

    def _orthogonalise(self, units: list[Unit], inputs: dict[int, torch.Tensor],
                       groups: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
        """NS of every owned input, batched per (shape, schedule); scaled by gamma sqrt(max(n, m))."""
        batches: dict[tuple, list[Unit]] = {}
        for u in units:                       # uid order: identical batch order on all TP ranks
            if u.uid not in inputs:
                continue
            grp = groups[self.entries[u.pidx][2]]
            key = (u.mode == "gram", u.full_shape, u.shard_dim if u.mode == "gram" else None,
                   u.local_shapes if u.mode == "gram" else None, grp["ns_steps"], grp["fp32_newton_schulz"],
                   grp["ns_impl"])
            batches.setdefault(key, []).append(u)
        out: dict[int, torch.Tensor] = {}
        for key, lst in batches.items():
            gram_mode, (n, m), shard_dim, _, steps, fp32, impl = key
            fp32 = bool(fp32) or self.device.type != "cuda"   # bf16 matmuls only pay off on GPU
            X = torch.stack([inputs[u.uid] for u in lst])
            if gram_mode:
                X = X if shard_dim == 1 else X.mT     # wide orientation, sharded (long) dim last
                fn = newton_schulz_gram if impl == "gram" else newton_schulz
                Y = fn(X, steps, fp32, reduce=self._reduce_tp)
                Y = Y if shard_dim == 1 else Y.mT
            else:
                Y = dispatch.get("newton_schulz_gram" if impl == "gram" else "newton_schulz", X)(X, steps, fp32)
            for u, y in zip(lst, Y.unbind(0)):
                gamma = groups[self.entries[u.pidx][2]]["update_rms"]
                out[u.uid] = y.to(self.dtype).mul_(gamma * math.sqrt(max(n, m)))
        return out

    # ---- state ---------------------------------------------------------------------------------
    def local_momentum(self) -> dict[str, torch.Tensor]:
        """Collective: every rank gets the momentum of its own parameter slices, keyed by name."""
        units = self.plan.units
        owned = {u.uid: self.momentum.get(u.uid) for u in units if self.ex.owns(u) or
                 (u.mode == "gram" and u.owner_dp == self.ex.d)}
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
                raise ValueError(f"Muon momentum for '{name}' has shape {tuple(t.shape)}, the parameter "
                                 f"{tuple(p.shape)}: a different TP layout needs dist_checkpointing "
                                 f"(sharded_state_dict), not this state dict")
            bufs[name] = (t if t is not None else torch.zeros(p.shape)).to(self.device, self.dtype)
        owned = self.ex.to_owners(self.plan.units,
                                  lambda u: u.local_view(bufs[self.entries[u.pidx][0]], self.ex.t),
                                  self.dtype, self.device)
        self.momentum = {uid: t.clone() for uid, t in owned.items()}


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

    def __init__(self, params: Iterable[Any], lr: float = 2.7e-4, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, update_rms: float = 0.18,
                 ns_steps: Sequence[Sequence[float]] = V4_NS_STEPS, fp32_newton_schulz: bool = False,
                 ns_impl: str = "plain", tp_mode: str = "auto", tp_group: Group = None, dp_group: Group = None,
                 expert_tp_group: Group = None, expert_dp_group: Group = None,
                 cost_model: CostModel | None = None):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or update_rms <= 0:
            raise ValueError(f"invalid Muon hyper-parameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} update_rms={update_rms}")
        if ns_impl not in ("plain", "gram"):
            raise ValueError(f"ns_impl '{ns_impl}' unknown; choose plain or gram")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        update_rms=update_rms, ns_steps=_norm_steps(ns_steps),
                        fp32_newton_schulz=fp32_newton_schulz, ns_impl=ns_impl)
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
            raise NotImplementedError("Muon plans owners and shards at construction (collectively); "
                                      "build a new optimizer instead of adding parameter groups")
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
        for eng in self._engines:             # zeros for units never stepped (== no momentum)
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

    def sharded_state_dict(self, model_sharded: dict[str, Any], prefix: str = "optimizer.muon.") -> dict[str, Any]:
        """megatron dist_checkpointing form: each momentum buffer as a ShardedTensor laid out like its
        parameter. ``model_sharded`` maps parameter name -> the parameter's ShardedTensor (from the
        model's ``sharded_state_dict``, keys matching the names given to the optimizer). Collective."""
        from megatron.core.dist_checkpointing.optimizer import (
            make_sharded_optimizer_tensor,
        )
        out: dict[str, Any] = {}
        for eng in self._engines:
            for name, buf in eng.local_momentum().items():
                if name not in model_sharded:
                    raise KeyError(f"no ShardedTensor for Muon parameter '{name}' in the model's sharded state")
                out[name] = make_sharded_optimizer_tensor(model_sharded[name], buf, prefix + "momentum")
        return out

    def load_sharded_momentum(self, loaded: dict[str, torch.Tensor]) -> None:
        """Collective: restore from what ``dist_checkpointing.load`` returned for :meth:`sharded_state_dict`."""
        for eng in self._engines:
            eng.load_local_momentum(loaded)


def parallel_state_groups() -> dict[str, Group]:
    """This rank's Muon groups from megatron-core ``parallel_state`` (dense DP includes context parallel)."""
    from megatron.core import parallel_state as ps
    return dict(tp_group=ps.get_tensor_model_parallel_group(),
                dp_group=ps.get_data_parallel_group(with_context_parallel=True),
                expert_tp_group=ps.get_expert_tensor_parallel_group(),
                expert_dp_group=ps.get_expert_data_parallel_group())
