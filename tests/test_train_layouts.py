"""The trainer end to end under tp2, pp2, pp2 × vpp2, sp2 (Ulysses) and, on 4 ranks, ep2 × pp2 (× dp2): the same
losses as one process, exact resume under pp2, and pp2 / tp2 checkpoints resumed by one process.

Every run is ``pretrain.trainer.Trainer(cfg, layout).fit()`` on the tiny config — what ``python -m pretrain``
runs after parsing the command line — with the real loader on the embedded corpus (``runs/data/tiny``, shared
with tests/test_train_resume.py), Muon + AdamW, gradient clipping (``train.grad_clip`` 1.0; the norms are 3-4,
so every step clips), the expert-bias updates, the NaN guard (a NaN injected at step 4 must be skipped on every
rank) and dist_checkpointing. Global batch 4 × 32 tokens, micro-batch 2, 5 steps. The runs of one world size
share one spawned launch (tests/harness.py), so the import cost is paid once per world size.

Golden losses: each layout's per-step loss, LM loss and gradient norm equal the one-process run's within
``TOL`` = 1e-5 relative, and the expert-load statistics (integer token counts of every router of every stage)
are equal. Why not bit-exact: the layouts sum the same terms in another order (TP all-reduces of partial matmuls
and the vocabulary-parallel cross-entropy, pipeline gradient accumulation, the Ulysses all-to-all), each sum
carrying fp32 rounding ~1e-7 relative; Muon's Newton-Schulz on the rank-deficient mHC gradients (the streams
start identical) amplifies such noise in those tensors' updates (README, Distributed Muon). Measured
(2026-11-28): the largest relative difference over the 4 trained steps and every layout is 1.1e-7 for the loss
and 5.4e-7 for the gradient norm, so 1e-5 leaves ~20-100× headroom; the layout bugs this test was written
against were off by ≥ 2e-3 (Ulysses ranks reading different rows) or crashed (pipeline send of a strided
tensor with micro-batch > 1). Routing is discrete: a 1e-7 perturbation could flip a near-tied top-k choice; with
this seed none does (the load statistics would differ by ~1e-2 if one did).

Resume: pp2 stopped after step 2 (``train.steps=2``, checkpoint at the end) and rerun in the same run.dir
with ``train.steps=5`` continues bit-identically to the uninterrupted pp2 run (same layout, same reduction
order). Cross-layout: the pp2 and tp2 checkpoints of step 2 loaded by one process (``checkpoint.load``;
dist_checkpointing reshards model and optimizer state) give the one-process losses at steps 3-5 within TOL.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
NAN_STEP = 4
TOL = 1e-5
BASE = [
    f"data.shards_dir={REPO / 'runs' / 'data' / 'tiny'}",
    "train.seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=2",
    "train.warmup_steps=3",
    f"train.steps={STEPS}",
    f"train.fault_inject_nan_steps=[{NAN_STEP}]",
    "checkpoint.interval=0",
    "run.tensorboard=false",
    "run.progress=false",
    "run.plot=false",
]
LAYOUTS = {
    "tp2": ["parallel.tp=2", "checkpoint.interval=2", "checkpoint.keep_every=2"],
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "sp2": ["parallel.sp=2"],
}
FOUR_RANK_LAYOUTS = {"ep2_pp2": ["parallel.ep=2", "parallel.pp=2"]}  # V4's main layout family: dp2 × pp2, ep2
STOP = 2
CKPT = f"checkpoints/step_{STOP:08d}"
log = logging.getLogger(__name__)


def train_runs(rank: int, world: int, root: str, runs: list[tuple[str, str, list[str]]]) -> dict:
    """Rank function: each (key, run dir, overrides) in turn, parallel state re-initialised for each;
    returns rank 0's view: the run's result and the metrics.jsonl records after it."""
    from parallel.process_groups import init_distributed
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    out = {}
    for key, run_dir, over in runs:
        t0 = time.monotonic()
        cfg = load_config("tiny", [*BASE, f"run.dir={Path(root) / run_dir}", *over])
        res = Trainer(cfg, init_distributed(cfg.parallel, cfg.model)).fit()
        recs = [json.loads(x) for x in (Path(root) / run_dir / "metrics.jsonl").read_text().splitlines()]
        out[key] = {
            "exit": res.exit_code,
            "steps_done": res.steps_done,
            "first_loss": res.first_loss,
            "records": recs if rank == 0 else None,
            "seconds": time.monotonic() - t0,
        }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("train_layouts"))
    two = [(k, k, v) for k, v in LAYOUTS.items()]
    two += [
        ("pp2_stop", "pp2_stop", ["parallel.pp=2", f"train.steps={STOP}", f"checkpoint.interval={STOP}"]),
        ("pp2_resume", "pp2_stop", ["parallel.pp=2"]),
    ]
    one = [
        ("one", "one", []),
        ("pp2_at_pp1", "pp2_at_pp1", [f"checkpoint.load={Path(root) / 'pp2_stop' / CKPT}"]),
        ("tp2_at_tp1", "tp2_at_tp1", [f"checkpoint.load={Path(root) / 'tp2' / CKPT}"]),
    ]
    # the first launch may build the dataset cache (~1 min) and DeepSpeed's shared-memory op for sp2 (~30 s)
    res = run_ranks(train_runs, 2, root, two, timeout=900)[0]
    res.update(run_ranks(train_runs, 4, root, [(k, k, v) for k, v in FOUR_RANK_LAYOUTS.items()], timeout=600)[0])
    res.update(run_ranks(train_runs, 1, root, one, timeout=600)[0])
    for k, v in res.items():
        log.info("%s: %.1f s", k, v["seconds"])
        assert v["exit"] == 0, f"{k}: exit code {v['exit']}"
    return res


def _by_step(recs: list[dict]) -> dict[int, dict]:
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats steps: {steps}"
    return {r["step"]: r for r in recs}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _match(got: dict[int, dict], want: dict[int, dict], steps: range, name: str) -> dict[str, float]:
    """Assert the records agree within TOL (the skipped NaN step exactly); return the largest differences."""
    worst = {"loss": 0.0, "lm_loss": 0.0, "grad_norm": 0.0}
    for s in steps:
        a, b = got[s], want[s]
        if s == NAN_STEP:
            assert a["skipped"] and b["skipped"] and math.isnan(a["loss"]) and a["grad_norm"] is None, (
                f"{name} step {s}: the injected NaN was not skipped: {a}"
            )
            assert a["expert_load_cv"] == pytest.approx(b["expert_load_cv"], rel=1e-9)
            continue
        assert not a["skipped"] and a["skipped_total"] == b["skipped_total"], f"{name} step {s}: {a}"
        for k in worst:
            worst[k] = max(worst[k], _rel(a[k], b[k]))
            assert _rel(a[k], b[k]) <= TOL, f"{name} step {s} {k}: {a[k]!r} vs one process {b[k]!r}"
        for k in ("expert_load_cv", "expert_load_max_over_mean"):  # integer loads of every router, all stages
            assert a[k] == pytest.approx(b[k], rel=1e-9), f"{name} step {s} {k}: {a[k]} vs one process {b[k]}"
    return worst


@pytest.mark.parametrize("layout", [*LAYOUTS, *FOUR_RANK_LAYOUTS])
def test_layout_losses_equal_one_process(runs, layout):
    got, want = _by_step(runs[layout]["records"]), _by_step(runs["one"]["records"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = _match(got, want, range(1, STEPS + 1), layout)
    log.info("%s vs one process, max relative difference: %s", layout, {k: f"{v:.1e}" for k, v in worst.items()})


def test_pp2_stop_and_resume_is_bit_exact(runs):
    stop, resumed = runs["pp2_stop"], runs["pp2_resume"]
    assert stop["steps_done"] == STOP and resumed["steps_done"] == STEPS
    got, want = _by_step(resumed["records"]), _by_step(runs["pp2"]["records"])
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 1-2 of the first run, 3-5 resumed
    assert resumed["first_loss"] == got[STOP + 1]["loss"]  # the rerun started at step 3
    for s in range(1, STEPS + 1):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm", "expert_load_cv", "skipped"):
            a, b = got[s][k], want[s][k]
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (
                f"pp2 resumed step {s} {k}: {a!r} vs uninterrupted {b!r}"
            )


@pytest.mark.parametrize("run", ["pp2_at_pp1", "tp2_at_tp1"])
def test_checkpoint_resumes_in_one_process(runs, run):
    res = runs[run]
    got, want = _by_step(res["records"]), _by_step(runs["one"]["records"])
    assert sorted(got) == list(range(STOP + 1, STEPS + 1)) and res["steps_done"] == STEPS
    worst = _match(got, want, range(STOP + 1, STEPS + 1), run)
    log.info("%s vs one process, max relative difference: %s", run, {k: f"{v:.1e}" for k, v in worst.items()})
