"""Sequence-length + YaRN stages (pretrain/configs/long_context_stages.yaml): the schedule, the RoPE switch, and a
run that trains through two stage changes and resumes exactly across a boundary.

The e2e test scales the config's schedule down (32 -> 64 -> 128 tokens, YaRN factor 1 -> 2 -> 4) and runs
``python -m pretrain`` like tests/test_train_resume.py: an uninterrupted reference, then a run that every rank
stops right after the first step of stage 2 (its last checkpoint is AT the boundary: the step before the first
64-token step), is kill -9'd and rerun: every step's loss equals the reference bit for bit (OMP_NUM_THREADS=1,
deterministic CPU math), and the metrics show the new lengths from the stage steps on.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from tests.harness import run_command

REPO = Path(__file__).resolve().parents[1]


def test_schedule_yarn_stages_and_rope_switch():
    from pretrain.config import load_config
    from pretrain.model.rope import RotaryEmbedding, set_yarn_factor
    from pretrain.schedules import Schedules

    cfg = load_config("long_context_stages")
    s = Schedules(cfg.train)
    stages = cfg.train.seq_len_stages
    for (start, length), (ystart, factor) in zip(stages, cfg.train.yarn_stages):
        assert start == ystart
        at = s.at(start)
        assert (at.seq_len, at.yarn_factor) == (length, factor)
        if start > 0:
            assert s.at(start - 1).seq_len < length
    m = cfg.model
    rope = RotaryEmbedding.for_layer(m, "hca")
    plain = list(rope.inv_freq)
    holder = __import__("torch").nn.ModuleList([rope, RotaryEmbedding.for_layer(m, "sliding")])
    set_yarn_factor(holder, 16.0)
    fresh = RotaryEmbedding(
        m.rope_head_dim,
        m.compress_rope_theta,
        type(m.yarn)(enabled=True, factor=16.0, original_max_position=m.yarn.original_max_position),
    )
    assert rope.inv_freq == fresh.inv_freq and rope.inv_freq != plain
    assert holder[1].inv_freq == RotaryEmbedding.for_layer(m, "sliding").inv_freq  # sliding: untouched
    set_yarn_factor(holder, 1.0)
    assert rope.inv_freq == plain
    with pytest.raises(ValueError, match="yarn_stages"):
        Schedules(type(cfg.train)(**{**cfg.train.__dict__, "yarn_stages": [[1.5, 2.0]]}))


SCALED = [
    "train.seq_len=32",
    "train.global_batch=2",
    "train.micro_batch=1",
    "train.warmup_steps=2",
    "train.steps=5",
    "checkpoint.interval=2",
    "model.recompute=none",
    "train.seq_len_stages=[[0,32],[2,64],[4,128]]",
    "train.yarn_stages=[[0,1.0],[2,2.0],[4,4.0]]",
    "model.yarn.original_max_position=32",
    "model.max_position_embeddings=4096",
    "run.tensorboard=false",
    "run.progress=false",
]


def _cmd(run_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        "long_context_stages",
        f"run.dir={run_dir}",
        f"data.shards_dir={REPO / 'runs' / 'data' / 'tiny'}",
        *SCALED,
        *extra,
    ]


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_trains_through_stages_and_resumes_exactly_at_a_boundary(tmp_path):
    from tests.test_train_resume import _start_and_signal

    ref = tmp_path / "ref"
    r = run_command(_cmd(ref, []), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    want = _records(ref)
    assert [want[k]["seq_len"] for k in sorted(want)] == [32, 32, 64, 64, 128]
    run = tmp_path / "killed"
    code, out = _start_and_signal(
        _cmd(run, ["train.fault_inject_pause_step=3"]), run, signal.SIGKILL, after_step=3, need_ckpt=True, timeout=900
    )
    assert code in (-signal.SIGKILL, 128 + signal.SIGKILL), out[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # the boundary
    r = run_command(_cmd(run, []), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr
    got = _records(run)
    assert sorted(got) == list(range(1, 6))
    assert {k: v["loss"] for k, v in got.items()} == {k: v["loss"] for k, v in want.items()}
