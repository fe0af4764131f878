"""ZeRO-1 AdamW (``parallel.zero_adamw``) and the optimizer state the dry run counts per rank.

- ``test_plan_*`` (one process): the cell plan is deterministic, row blocks are 64-aligned and cover every
  parameter once, the LPT assignment keeps the most loaded rank within one cell of the mean.
- ``test_sharded_equals_replicated`` (2 and 4 gloo ranks): ZeroAdamW vs ``torch.optim.AdamW`` on the same
  seeded random parameters (2-D split into row-block cells, 1-D split and unsplit, 0-d, 3-D, an expert tensor
  sharded over its own expert-DP groups of 2) and fresh seeded random gradients for 5 steps, two parameter
  groups, the learning rate changed every step as the trainer does, one parameter without a gradient at one
  step (torch skips it), the all-gather in several rounds. Tolerance: exact (max abs difference 0) for the
  parameters and for the full state (``exp_avg``, ``exp_avg_sq``, ``step``): AdamW is elementwise, the owner runs
  torch's own AdamW on row views (same for-loop CPU kernels), cells are 64-aligned and the tests run one
  intra-op thread, so every element sees the same instructions (parallel.zero_adamw, Exactness). Replicas
  stay bit-identical; the moments held per rank sum to the replicated total, each rank at most total/dp plus
  one cell.
- ``test_checkpoint_reshards_across_dp_sizes``: megatron dist_checkpointing with hand-made model ShardedTensors
  (replicated, a TP-like pair of shards of one key, a layer-stacked key with a prepended axis): ZeroAdamW
  saved at dp2 after 3 steps and loaded at dp1 (and by the replicated torch AdamW), saved at dp1 (ZeroAdamW
  and torch AdamW) and loaded at dp2; each continues 2 steps and equals the uninterrupted 5-step torch AdamW
  exactly (the save/load moves bits; the arithmetic is the same).
- ``test_trainer_dp2_sharded_equals_replicated_and_resumes``: the trainer on the tiny model, 2 ranks (dp2):
  ``optim.shard_adamw=true`` gives the same losses and gradient norms as ``false``, bit for bit, for 4 steps;
  its step-2 checkpoint resumed with ``shard_adamw=false`` (and =true) continues bit-identically.
- ``test_dry_run_accounting_matches_optimizer_state``: the tiny model on 4 gloo ranks under tp1 x ep2 (dense
  dp4, expert dp2) and tp2 x ep2 (dense tp2 x dp2 with Muon's Gram mode: owner replicas keep TP slices),
  Muon and ZeroAdamW built as the trainer builds them, one step on seeded random gradients: every rank's Muon
  momentum and AdamW moment bytes equal what :mod:`parallel.optimizer_memory` computes for that global rank
  from the meta-device shards -- exactly, since both come from the optimizers' own plans.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.harness import run_ranks

CELL = 1024  # small cells so that the test tensors are split
SHAPES = {  # name: (local shape, how the model's ShardedTensor lays it out)
    "embed": ((96, 64), "rep"),  # 6 cells of 16 rows
    "head.0": ((48, 64), ("tp", 0)),  # two shards of one key "head" along dim 0 (like vocab-parallel TP)
    "head.1": ((48, 64), ("tp", 1)),
    "stack.0": ((80, 32), ("layer", 0)),  # megatron's layer stacking: key "stack", prepended axis of 2
    "stack.1": ((80, 32), ("layer", 1)),
    "big1d": ((4096,), "rep"),  # 4 cells
    "norm": ((64,), "rep"),
    "gate": ((3,), "rep"),
    "scalar": ((), "rep"),
    "cube": ((5, 3, 4), "rep"),
}
CKPT = [n for n in SHAPES if n != "scalar"]  # ckpt_state's replicated format has no 0-d parameters (V4 has none)
GROUP1 = ("norm", "gate", "scalar")  # second parameter group: no weight decay, half the learning rate
HYPER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 5
NO_GRAD = ("norm", 2)  # this parameter gets no gradient at step 2


def _lr(k: int) -> float:
    return 1e-2 * (1 + k) / STEPS


def _params(names: list[str], expert: tuple[str, ...] = ()) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for i, n in enumerate(names):
        p = torch.nn.Parameter(torch.randn(SHAPES[n][0], generator=torch.Generator().manual_seed(10 + i)))
        if n in expert:
            p.v4_expert, p.allreduce = True, False
        out.append((n, p))
    return out


def _groups(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict]:
    return [
        {"params": [(n, p) for n, p in named if n not in GROUP1]},
        {"params": [(n, p) for n, p in named if n in GROUP1], "weight_decay": 0.0},
    ]


def _step(opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]], k: int) -> None:
    for i, (n, p) in enumerate(named):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 + 37 * k + i))
        p.grad = None if (n, k) == NO_GRAD else g
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = _lr(k), _lr(k) / 2
    opt.step()


def _reference(names: list[str], steps: int) -> tuple[list, torch.optim.AdamW]:
    named = _params(names)
    opt = torch.optim.AdamW(_groups(named), lr=_lr(0), **HYPER)
    for k in range(steps):
        _step(opt, named, k)
    return named, opt


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------- plan
def test_plan_cells_cover_align_and_balance():
    from parallel.zero_adamw import ALIGN, plan_cells, row_blocks

    assert row_blocks((129280, 7168)) == 808  # V4's embedding: 160-row cells of 1.15M elements
    assert row_blocks((7168,)) == 1 and row_blocks(()) == 1 and row_blocks((96, 64), cell_elems=CELL) == 6
    assert row_blocks((101, 64), cell_elems=CELL) == 1  # prime rows: no equal blocks, one cell
    shapes = [s for s, _ in SHAPES.values()] + [(129280 // 40, 7168)]
    for dp in (1, 2, 3, 8):
        plan = plan_cells(shapes, dp, cell_elems=CELL)
        assert plan_cells(shapes, dp, cell_elems=CELL) == plan  # deterministic
        for i, s in enumerate(shapes):
            cells = [c for c in plan.cells if c.pidx == i]
            assert sum(c.numel for c in cells) == math.prod(s)
            assert [c.row0 for c in cells] == [j * cells[0].rows for j in range(len(cells))]
            if len(cells) > 1:
                assert all(c.numel % ALIGN == 0 and c.numel >= CELL for c in cells)
        assert sum(plan.load) == sum(math.prod(s) for s in shapes)
        assert max(plan.load) <= sum(plan.load) / dp + max(c.numel for c in plan.cells)


# ------------------------------------------------------------------------------- sharded vs replicated
def _sharded_vs_replicated(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from parallel.zero_adamw import ZeroAdamW

    names = list(SHAPES)
    expert = ("cube",)
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]  # expert DP groups of 2
    named = _params(names, expert)
    opt = ZeroAdamW(
        _groups(named),
        lr=_lr(0),
        **HYPER,
        dp_group=dist.group.WORLD,
        expert_dp_group=pairs[rank // 2],
        cell_elems=CELL,
        gather_elems=700 * world,
    )
    for k in range(STEPS):
        _step(opt, named, k)
    ref_named, ref = _reference(names, STEPS)
    ref_p = dict(ref_named)
    sd = opt.state_dict()
    state_diff = max(
        _maxdiff(sd["state"][n][k], ref.state[ref_p[n]][k]) for n in names for k in ("exp_avg", "exp_avg_sq", "step")
    )
    ref_bytes = sum(v.numel() * v.element_size() for st in ref.state.values() for k, v in st.items() if k != "step")
    return {
        "param_diff": max(_maxdiff(p, ref_p[n]) for n, p in named),
        "state_diff": state_diff,
        "bytes": opt.state_bytes(),
        "ref_bytes": ref_bytes,
        "flat": torch.cat([p.detach().reshape(-1) for _, p in named]),
        "rounds": math.ceil(max(opt.plans["dense"].load) / 700),
        "max_cell": max(c.numel for c in opt.plans["dense"].cells) * 8,
    }


def _four_ranks(rank: int, world: int) -> dict:
    """One 4-rank launch for two tests: ZeroAdamW vs torch AdamW, then the dry-run accounting's rank state."""
    return {"sharded": _sharded_vs_replicated(rank, world), "sizes": _state_sizes(rank, world)}


@pytest.fixture(scope="module")
def four() -> list[dict]:
    return run_ranks(_four_ranks, 4, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_replicated(world, request):
    res = (
        [r["sharded"] for r in request.getfixturevalue("four")]
        if world == 4
        else run_ranks(_sharded_vs_replicated, world, timeout=240)
    )
    for r in res:
        assert r["param_diff"] == 0.0 and r["state_diff"] == 0.0, r
        assert torch.equal(r["flat"], res[0]["flat"])  # replicas bit-identical
        assert r["rounds"] > 1  # the gather ran in several rounds
    total = res[0]["ref_bytes"]
    dense_share = sum(r["bytes"] for r in res)
    # every moment element held exactly once per DP group: dense over all ranks, the expert cube once per pair
    cube = 2 * 4 * 60
    assert dense_share == (total - cube) + cube * world // 2
    most = max(r["bytes"] for r in res)
    assert most <= total / world + res[0]["max_cell"] + cube and most < 1.2 * total / world, (most, total)


# ------------------------------------------------------------------------------------------ checkpoint
def _model_sharded(named: list, d: int, rid_base: int = 0) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    out = {}
    for n, p in named:
        kind = SHAPES[n][1]
        rid = rid_base + d
        if kind == "rep":
            out[n] = ShardedTensor.from_rank_offsets(f"model.{n}", p, replica_id=rid)
        elif kind[0] == "tp":
            out[n] = ShardedTensor.from_rank_offsets("model.head", p, (0, kind[1], 2), replica_id=rid)
        else:
            out[n] = ShardedTensor.from_rank_offsets(
                "model.stack", p, (0, kind[1], 2), replica_id=rid, prepend_axis_num=1
            )
    return out


def _save(opt, named, path: str, d: int) -> None:
    from megatron.core import dist_checkpointing as dc

    from parallel import cpu_compat

    cpu_compat.apply()  # megatron's save synchronises CUDA unless patched

    from pretrain.ckpt_state import optimizer_sharded_state_dict, optimizer_state_keys

    ms = _model_sharded(named, d)
    if hasattr(opt, "checkpoint_state_keys"):
        osd, keys = opt.sharded_state_dict(ms, prefix="optimizer.adamw."), opt.checkpoint_state_keys()
    else:
        osd, keys = optimizer_sharded_state_dict("adamw", opt, {"m": ms}), optimizer_state_keys(opt)
    Path(path).mkdir(parents=True, exist_ok=True)
    dc.save({"model": ms, "optimizer": osd}, path)
    if d == 0:
        Path(path, "keys.json").write_text(json.dumps(keys))


def _load(opt, named, path: str, d: int) -> None:
    from megatron.core import dist_checkpointing as dc

    from parallel import cpu_compat
    from pretrain.ckpt_state import (
        init_optimizer_state,
        optimizer_entries,
        optimizer_sharded_state_dict,
        restore_optimizer_state,
    )

    cpu_compat.apply()
    keys = json.loads(Path(path, "keys.json").read_text())
    ms = _model_sharded(named, d)
    if hasattr(opt, "checkpoint_state_keys"):
        osd = opt.sharded_state_dict(ms, prefix="optimizer.adamw.", keys=keys)
    else:
        init_optimizer_state(opt, keys)
        entries = optimizer_entries("adamw", opt, {"m": ms})
        osd = optimizer_sharded_state_dict("adamw", opt, {"m": ms})
    loaded = dc.load({"model": ms, "optimizer": osd}, path)
    with torch.no_grad():
        for n, p in named:
            p.copy_(loaded["model"][n])
    if hasattr(opt, "load_sharded_state"):
        opt.load_sharded_state(loaded["optimizer"])
    else:
        restore_optimizer_state(opt, entries, loaded["optimizer"], keys)


def _make(kind: str, named: list, dp_group) -> torch.optim.Optimizer:
    from parallel.zero_adamw import ZeroAdamW

    if kind == "zero":
        return ZeroAdamW(_groups(named), lr=_lr(0), **HYPER, dp_group=dp_group, cell_elems=CELL)
    return torch.optim.AdamW(_groups(named), lr=_lr(0), **HYPER)


def _fresh(kind: str, dp_group) -> tuple[list, torch.optim.Optimizer]:
    named = _params(CKPT)
    for _, p in named:  # everything must come from the checkpoint
        p.data.fill_(7.0)
    return named, _make(kind, named, dp_group)


def _finish(named, opt) -> float:
    for k in range(3, STEPS):
        _step(opt, named, k)
    ref_p = dict(_reference(CKPT, STEPS)[0])
    return max(_maxdiff(p, ref_p[n]) for n, p in named)


def _ckpt_two_ranks(rank: int, world: int, root: str) -> dict:
    """dp1 -> dp2: each rank a dp=1 replica (its own full-state optimizer; rank 0 the main replica) saves, both
    load at dp2. Then a dp2 ZeroAdamW saves for the one-process load."""
    import torch.distributed as dist

    out = {}
    for kind in ("zero", "torch"):
        named = _params(CKPT)
        opt = _make(kind, named, None)
        for k in range(3):
            _step(opt, named, k)
        _save(opt, named, f"{root}/{kind}_dp1", rank)
    for kind in ("zero", "torch"):
        named, opt = _fresh("zero", dist.group.WORLD)
        _load(opt, named, f"{root}/{kind}_dp1", rank)
        out[f"{kind}_dp1->zero_dp2 rank{rank}"] = _finish(named, opt)
    named = _params(CKPT)
    opt = _make("zero", named, dist.group.WORLD)
    for k in range(3):
        _step(opt, named, k)
    _save(opt, named, f"{root}/zero_dp2", rank)
    return out


def _ckpt_one_process(rank: int, world: int, root: str) -> dict:
    """dp2 -> dp1: the dp2 ZeroAdamW checkpoint loaded by one process (ZeroAdamW and torch's AdamW)."""
    out = {}
    for kind in ("zero", "torch"):
        named, opt = _fresh(kind, None)
        _load(opt, named, f"{root}/zero_dp2", 0)
        out[f"zero_dp2->{kind}_dp1"] = _finish(named, opt)
    return out


@pytest.mark.slow
def test_checkpoint_reshards_across_dp_sizes(tmp_path):
    root = str(tmp_path)
    two = run_ranks(_ckpt_two_ranks, 2, root, timeout=240)
    one = run_ranks(_ckpt_one_process, 1, root, timeout=240)[0]
    diffs = {**two[0], **two[1], **one}
    assert len(diffs) == 6 and all(v == 0.0 for v in diffs.values()), diffs


# -------------------------------------------------------------------------------------------- trainer
TRAIN = [
    "train.seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=1",
    "train.warmup_steps=3",
    "run.tensorboard=false",
    "run.progress=false",
    "run.plot=false",
]


def _train(rank: int, world: int, root: str, runs: list[tuple[str, list[str]]]) -> dict:
    from parallel.process_groups import init_distributed
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    out = {}
    repo = Path(__file__).resolve().parents[1]
    for key, over in runs:
        t0 = time.monotonic()
        cfg = load_config(
            "tiny", [f"data.shards_dir={repo / 'runs' / 'data' / 'tiny'}", *TRAIN, f"run.dir={Path(root) / key}", *over]
        )
        tr = Trainer(cfg, init_distributed(cfg.parallel, cfg.model))
        res = tr.fit()
        recs = [json.loads(x) for x in (Path(root) / key / "metrics.jsonl").read_text().splitlines()]
        out[key] = {
            "exit": res.exit_code,
            "adamw": type(tr.optimizers["adamw"]).__name__,
            "records": {r["step"]: (r["loss"], r["grad_norm"]) for r in recs},
            "seconds": time.monotonic() - t0,
        }
    return out


@pytest.mark.slow
def test_trainer_dp2_sharded_equals_replicated_and_resumes(tmp_path):
    root = str(tmp_path)
    ckpt = f"checkpoint.load={tmp_path / 'sharded' / 'checkpoints' / 'step_00000002'}"
    runs = [
        ("replicated", ["train.steps=4", "checkpoint.interval=0", "optim.shard_adamw=false"]),
        ("sharded", ["train.steps=4", "checkpoint.interval=2", "checkpoint.keep_every=2", "optim.shard_adamw=true"]),
        ("resume_replicated", ["train.steps=4", "checkpoint.interval=0", "optim.shard_adamw=false", ckpt]),
        ("resume_sharded", ["train.steps=4", "checkpoint.interval=0", "optim.shard_adamw=true", ckpt]),
    ]
    res = run_ranks(_train, 2, root, runs, timeout=600)[0]
    assert all(v["exit"] == 0 for v in res.values()), res
    assert res["replicated"]["adamw"] == "AdamW" and res["sharded"]["adamw"] == "ZeroAdamW"
    assert res["resume_sharded"]["adamw"] == "ZeroAdamW" and res["resume_replicated"]["adamw"] == "AdamW"
    want = res["replicated"]["records"]
    assert sorted(want) == [1, 2, 3, 4]
    assert res["sharded"]["records"] == want  # bit for bit: losses and grad norms
    for key in ("resume_replicated", "resume_sharded"):
        got = res[key]["records"]
        assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got), (key, got, want)


# ------------------------------------------------------------------------------------- dry-run accounting
# name: (parallel sizes, config overrides)
LAYOUTS = {"tp1_ep2": (dict(tp=1, ep=2), []), "tp2_ep2_gram": (dict(tp=2, ep=2), ["optim.muon_tp_mode=gram"])}


def _tiny(over: list[str] = ()):
    from pretrain.config import load_config

    return load_config(
        "tiny", ["train.seq_len=32", "train.global_batch=8", "train.micro_batch=1", "optim.shard_adamw=true", *over]
    )


def _muon_bytes(muon) -> int:
    return sum(t.numel() * t.element_size() for eng in muon._engines for t in eng.momentum.values())


def _state_sizes(rank: int, world: int) -> dict[str, tuple[int, int, str]]:
    """Rank function: per layout, (Muon momentum bytes, AdamW moment bytes, AdamW class) after one step."""
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
        gen = torch.Generator().manual_seed(5)  # same draws on every rank: DP replicas agree
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen)
        muon.step()
        adamw.step()
        out[key] = (_muon_bytes(muon), adamw.state_bytes(), type(adamw).__name__)
    return out


@pytest.mark.slow
def test_dry_run_accounting_matches_optimizer_state(four):
    from pretrain.config import ParallelConfig
    from pretrain.dry_run import plan

    actual = [r["sizes"] for r in four]
    for key, (par, over) in LAYOUTS.items():
        cfg = _tiny(over)
        layout, rows = plan(
            cfg.model, 4, ParallelConfig(**par), micro_batch=1, seq_len=32, global_batch=8, optim=cfg.optim
        )
        mem = rows[0].mem.optimizer
        assert {actual[r][key][2] for r in range(4)} == {"ZeroAdamW"}
        got_muon = {r: actual[r][key][0] for r in range(4)}
        got_adam = {r: actual[r][key][1] for r in range(4)}
        assert mem.muon == got_muon, f"{key}: dry run {mem.muon} vs Muon's momentum {got_muon}"
        assert mem.adamw == got_adam, f"{key}: dry run {mem.adamw} vs ZeroAdamW's moments {got_adam}"
        # owners only: every rank holds less than the replicated state; AdamW moments once per DP group
        assert max(got_muon.values()) < mem.muon_replicated
        assert sum(got_adam.values()) == mem.adamw_replicated * (4 // layout.dp)  # once per DP group
        assert max(got_adam.values()) < mem.adamw_replicated
        assert rows[0].mem.optimizer_bytes == max(mem.total(r) for r in range(4))
