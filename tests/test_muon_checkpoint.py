"""Muon's momentum checkpoint (``Muon.sharded_state_dict`` / ``load_sharded_state``, megatron
dist_checkpointing, gloo ranks): saved from where it lives (one ShardedTensor per unit, only owners write),
loaded under another TP / DP / EP layout.

Parameters and gradients are those of tests/test_muon_dist.py (column / row parallel, a fused [gate; up]
projection, uneven TP splits, a replicated matrix given a prepended axis like megatron's layer index, a 3-D
expert stack split over EP with its global expert offset). Each case: 2 Muon steps at layout A, save, then a
fresh Muon at layout B, weights of the uninterrupted (single-process) run after 2 steps, load, step 3.

* The loaded momentum equals the uninterrupted run's bit for bit: M_t = mu M_{t-1} + G_t is elementwise on
  the same gradients in every layout, and the checkpoint moves it without arithmetic.
* Step 3 equals the uninterrupted 3-step run within 1e-5 relative (TOL of test_muon_dist): the weights
  after step 3 go through Newton-Schulz, whose fp32 summation order differs between layouts (gathered full
  matrix, per-shard Grams, single process); measured ~1e-7.
* Same layout (tp2 x dp2, gram): save, load into a fresh optimizer, step 3 -- bit-identical to the run
  that was not interrupted.

Memory: per rank, the bytes of the tensors in Muon's sharded state dict are the rank's owned momentum
(16 equal matrices: exactly total / dp at dp2 and dp4, the saved tensors ARE the live momentum buffers).
(Recorded state keys without the unit format are refused: tests/test_muon.py.)
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_ranks
from tests.test_muon_dist import (
    HYPER,
    SPECS,
    TOL,
    _coords,
    _copy_params,
    _init,
    _make_local,
    _reference,
    _set_grads,
    _slice,
)

pytestmark = pytest.mark.slow

NAMES = list(SPECS)


def _model_sharded(params):
    """The model's ShardedTensors as megatron builds them, as far as Muon's checkpoint uses them: key,
    prepended axes, replica id, the expert offset of a 3-D stack."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    T, t, ep, e = _coords()
    d, edp = ps.get_data_parallel_rank(), ps.get_expert_data_parallel_rank()
    out = {}
    for name, p in params:
        kind, key = SPECS[name][0], f"model.{name}"
        if kind == "expert":
            out[name] = ShardedTensor.from_rank_offsets(key, p.detach(), (0, e, ep), replica_id=edp)
        elif kind == "replicated":
            out[name] = ShardedTensor.from_rank_offsets(
                key, p.detach(), (0, 0, 1), replica_id=(t, d), prepend_axis_num=1
            )
        else:
            out[name] = ShardedTensor.from_rank_offsets(key, p.detach(), replica_id=d)
    return out


def _nbytes(sd) -> int:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return sum(v.data.numel() * v.data.element_size() for v in nested_values(sd))


def _train(tp_mode, steps=2):
    from parallel.muon import Muon

    T, t, ep, e = _coords()
    params = _make_local(NAMES, T, t, ep, e)
    opt = Muon.from_parallel_state(params, **HYPER, tp_mode=tp_mode)
    for k in range(steps):
        _set_grads(params, k, T, t, ep, e)
        opt.step()
    return params, opt


def _save(path, tp_mode):
    from megatron.core import dist_checkpointing as dc

    params, opt = _train(tp_mode)
    dc.save(opt.sharded_state_dict(_model_sharded(params)), path)
    return params, opt


def _load(opt, params, path):
    from megatron.core import dist_checkpointing as dc

    keys = opt.checkpoint_state_keys()
    opt.load_sharded_state(dc.load(opt.sharded_state_dict(_model_sharded(params), keys=keys), path))


def _resume(label, path, tp_mode="auto"):
    """Fresh Muon at the current layout, the 2-step reference weights, momentum from ``path``; step 3.
    Returns (label, loaded momentum bit-identical, {name: rel err of step 3 vs the 3-step reference})."""
    from parallel.muon import Muon

    T, t, ep, e = _coords()
    ref2, ref2_opt = _reference(NAMES, 2)
    params = _make_local(NAMES, T, t, ep, e)
    for name, p in params:
        p.data.copy_(_slice(name, ref2[name], T, t, ep, e))
    opt = Muon.from_parallel_state(params, **HYPER, tp_mode=tp_mode)
    _load(opt, params, path)
    got, want = opt.state_dict()["state"], ref2_opt.state_dict()["state"]
    exact = {
        n: torch.equal(got[n]["momentum_buffer"], _slice(n, want[n]["momentum_buffer"], T, t, ep, e)) for n in NAMES
    }
    _set_grads(params, 2, T, t, ep, e)
    opt.step()
    ref3, _ = _reference(NAMES, 3)
    errs = {}
    for name, p in params:
        w = _slice(name, ref3[name], T, t, ep, e)
        errs[name] = ((p.detach() - w).norm() / w.norm()).item()
    return label, exact, errs


def _same_layout_bitwise(path):
    """tp2 x dp2 (gram): save after 2 steps, continue 1 step; a fresh optimizer on copies of the weights
    loads and steps: bit-identical."""
    from parallel.muon import Muon

    T, t, ep, e = _coords()
    params, opt = _save(path, "gram")
    copies = _copy_params(params)
    _set_grads(params, 2, T, t, ep, e)
    opt.step()
    opt2 = Muon.from_parallel_state(copies, **HYPER, tp_mode="gram")
    _load(opt2, copies, path)
    _set_grads(copies, 2, T, t, ep, e)
    opt2.step()
    return all(torch.equal(p.detach(), q.detach()) for (_, p), (_, q) in zip(params, copies))


def _memory():
    """16 equal matrices, tp1, dp = world: bytes in Muon's sharded state dict on this rank, the whole
    momentum's bytes, whether the saved tensors are the live buffers, and how many tensors it saves."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from parallel.muon import Muon

    gen = torch.Generator().manual_seed(7)
    params = [(f"w{i}", torch.nn.Parameter(torch.randn(32, 32, generator=gen))) for i in range(16)]
    opt = Muon(params, **HYPER, dp_group=dist.group.WORLD)
    for _, p in params:
        p.grad = torch.randn(32, 32, generator=gen)
    opt.step()
    d = dist.get_rank()
    ms = {n: ShardedTensor.from_rank_offsets(f"model.{n}", p.detach(), replica_id=d) for n, p in params}
    new = opt.sharded_state_dict(ms)
    live = {b.data_ptr() for b in opt._engines[0].momentum.values()}
    is_live = all(v.data.data_ptr() in live for v in nested_values(new))
    return _nbytes(new), sum(p.numel() * 4 for _, p in params), is_live, len(new)


def _four(rank, world, root):
    out, mem = [], {}
    _init(tp=2, ep=2)  # dense tp2 x dp2, experts ep2 x expert-dp2
    same = _same_layout_bitwise(f"{root}/same")
    _save(f"{root}/s1", "gram")
    _init(tp=1)  # dp4, experts expert-dp4
    out.append(_resume("tp2xdp2xep2(gram) -> dp4", f"{root}/s1"))
    _init(tp=1, ep=4)  # dp4, one expert per rank
    _save(f"{root}/s2", "auto")
    mem["dp4"] = _memory()
    _init(tp=2, ep=2)
    out.append(_resume("dp4xep4 -> tp2xdp2xep2(gather)", f"{root}/s2", tp_mode="gather"))
    return out, mem, same


def _one(rank, world, root):
    _init()
    out = [_resume("tp2xdp2xep2(gram) -> 1 process", f"{root}/s1"), _resume("dp4xep4 -> 1 process", f"{root}/s2")]
    _save(f"{root}/s3", "auto")
    return out


def _two(rank, world, root):
    _init(tp=1)  # dp2
    out = [_resume("1 process -> dp2", f"{root}/s3")]
    mem = {"dp2": _memory()}
    _init(tp=2)
    out.append(_resume("1 process -> tp2(gram)", f"{root}/s3", tp_mode="gram"))
    _init(tp=1, ep=2)
    out.append(_resume("1 process -> ep2", f"{root}/s3"))
    return out, mem


def _check(results):
    for rank, cases in enumerate(results):
        for label, exact, errs in cases:
            assert all(exact.values()), f"rank {rank} {label}: loaded momentum differs: {exact}"
            bad = {n: e for n, e in errs.items() if not e < TOL}
            assert not bad, f"rank {rank} {label}: step 3 off by more than {TOL}: {bad}"


def test_muon_checkpoint_reshards_and_saves_owned_momentum_only(tmp_path):
    root = tmp_path / "ck"
    for d in ("same", "s1", "s2", "s3"):
        (root / d).mkdir(parents=True)
    four = run_ranks(_four, 4, str(root), timeout=300)
    assert all(same for _, _, same in four), "same-layout resume is not bit-identical"
    _check([cases for cases, _, _ in four])
    _check(run_ranks(_one, 1, str(root), timeout=200))
    two = run_ranks(_two, 2, str(root), timeout=200)
    _check([cases for cases, _ in two])
    for dp, results in ((4, [m for _, m, _ in four]), (2, [m for _, m in two])):
        per_rank = [m[f"dp{dp}"] for m in results]
        total = per_rank[0][1]
        assert sum(new for new, _, _, _ in per_rank) == total  # every unit saved exactly once
        for new, _, is_live, count in per_rank:
            assert new == total // dp and count == 16 // dp  # balanced: 16 / dp units per rank
            assert is_live  # no copy: the live momentum buffers
