"""``python -m pretrain --config tiny data.dataset=s3://bucket/ds data.cache_dir=DIR`` trains from a dataset in
the local S3 server (tests/s3_server.py) with losses bit-identical to the same dataset on local disk.

The dataset is written by tests/dataset_writer.py in the packed layout (random documents over the tiny
vocabulary), then copied into the bucket. The local run reads without prefetch, the S3 run with prefetch and
the shard cache, so the comparison also covers prefetch on/off inside the trainer. OMP_NUM_THREADS=1 keeps
CPU math deterministic, which is what makes bit-exactness a fair requirement.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import dataset_writer
import numpy as np
import pytest

from data_pipeline import storage
from tests.harness import run_command

pytestmark = pytest.mark.slow

SEQ = 32
STEPS = 4
ARGS = [f"train.seq_len={SEQ}", "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=3",
        f"train.steps={STEPS}", "checkpoint.interval=0", "run.tensorboard=false", "run.progress=false",
        "run.plot=false"]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


def _train(run_dir: Path, extra: list[str]) -> list[float]:
    cmd = [sys.executable, "-m", "pretrain", "--config", "tiny", f"run.dir={run_dir}", *ARGS, *extra]
    p = run_command(cmd, timeout=500)
    assert p.returncode == 0, p.stderr[-4000:]
    return _losses(run_dir)


def test_train_from_s3_matches_local(s3_prefix, tmp_path):
    seed = int(np.random.default_rng().integers(1 << 30))
    local = dataset_writer.make_dataset(tmp_path / "ds", {"web": 400, "books": 250}, seed, seq_len=SEQ,
                                        samples_per_part=40, size_limit=1 << 14, vocab_size=4096)
    url = f"{s3_prefix}/ds"
    storage.copy_tree(str(local.parent), url)
    cache = tmp_path / "cache"
    remote_losses = _train(tmp_path / "run_s3", [f"data.dataset={url}", f"data.cache_dir={cache}",
                                                 "data.prefetch=3", "data.cache_limit_gb=1"])
    local_losses = _train(tmp_path / "run_local", [f"data.dataset={local.parent}", "data.prefetch=0"])
    assert len(remote_losses) == STEPS and all(np.isfinite(remote_losses))
    assert remote_losses == local_losses                   # bit-identical, not approximately equal
    assert list(cache.rglob("*.mds.zstd"))                 # the shards came through the cache
    # a missing dataset fails naming its manifest URL and the fix, before any step
    p = run_command([sys.executable, "-m", "pretrain", "--config", "tiny", f"run.dir={tmp_path / 'run_bad'}", *ARGS,
                     f"data.dataset={s3_prefix}/nothing"], timeout=300)
    assert p.returncode != 0 and f"{s3_prefix}/nothing/manifest.json: manifest not found" in p.stderr
