"""Object storage end to end, against the local S3 server (tests/s3_server.py, real HTTP):

1. raw JSONL objects (one with a broken line) are uploaded to ``s3://bucket/<id>/raw/``;
2. ``python -m data_pipeline run --mixture M --output s3://bucket/<id>/ds`` reads them from S3 and writes the
   dataset and its stage caches to S3 (quarantine naming the object and line);
3. ``python -m pretrain --config tiny data.dataset=s3://bucket/<id>/ds data.cache_dir=DIR`` trains with losses
   bit-identical to the same dataset copied to local disk.

The local run reads without prefetch, the S3 run with prefetch and the shard cache, so the comparison also
covers prefetch on/off inside the trainer. OMP_NUM_THREADS=1 keeps CPU math deterministic, which is what
makes bit-exactness a fair requirement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipeline import storage
from data_pipeline.embedded_corpus import shakespeare_documents
from tests.harness import run_command

pytestmark = pytest.mark.slow

SEQ = 32
STEPS = 4
ARGS = [
    f"train.seq_len={SEQ}",
    "train.global_batch=4",
    "train.micro_batch=2",
    "train.warmup_steps=3",
    f"train.steps={STEPS}",
    "checkpoint.interval=0",
    "run.tensorboard=false",
    "run.progress=false",
    "run.plot=false",
]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


def _train(run_dir: Path, extra: list[str]) -> list[float]:
    cmd = [sys.executable, "-m", "pretrain", "--config", "tiny", f"run.dir={run_dir}", *ARGS, *extra]
    p = run_command(cmd, timeout=500)
    assert p.returncode == 0, p.stderr[-4000:]
    return _losses(run_dir)


def _build_on_s3(s3_prefix: str, tmp_path: Path) -> str:
    rng = np.random.default_rng()
    scenes = list(shakespeare_documents())
    picked = [scenes[i] for i in sorted(rng.choice(len(scenes), size=90, replace=False))]
    for f in range(3):
        lines = [
            json.dumps({"id": d["id"], "text": d["text"], "url": f"https://example.org/{d['id']}"})
            for d in picked[f::3]
        ]
        if f == 1:
            lines.insert(2, '{"id": "broken", "text": ')
        storage.write_bytes(f"{s3_prefix}/raw/part-{f}.jsonl", ("\n".join(lines) + "\n").encode())
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        yaml.safe_dump(
            {
                "name": "s3",
                "seed": 2,
                "sources": [
                    {"name": "plays", "weight": 1.0, "input": {"kind": "jsonl", "path": f"{s3_prefix}/raw/"}},
                    {"name": "pydocs", "weight": 0.5, "input": {"kind": "embedded", "path": "python_docs"}},
                ],
                "clean": {"min_words": 20, "max_symbol_word_ratio": 0.3, "min_alpha_word_frac": 0.5},
                "tokenizer": {"vocab_size": 4096, "sample_bytes": 500_000},
                "pack": {"seq_len": SEQ},
                "split": {"val_fraction": 0.05, "min_val_docs_per_file": 1},
                "ray": {"num_cpus": 2},
            }
        )
    )
    url = f"{s3_prefix}/ds"
    p = run_command(
        [sys.executable, "-m", "data_pipeline", "run", "--mixture", str(mixture), "--output", url],
        timeout=600,
        env={"DATA_PIPELINE_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert p.returncode == 0, p.stderr[-4000:]
    q = [json.loads(x) for x in storage.read_bytes(f"{url}/quarantine.jsonl").decode().splitlines()]
    assert [(r["reason"], r["location"]) for r in q] == [("malformed_json", "part-1.jsonl:3")]
    assert storage.list_files(f"{url}/work/") and storage.exists(f"{url}/shards/plays/parts.json")
    return url


def test_pipeline_to_s3_then_train_from_s3_matches_local(s3_prefix, tmp_path):
    url = _build_on_s3(s3_prefix, tmp_path)
    local = tmp_path / "ds"
    for d in ("manifest.json", "tokenizer.json", "shards", "val"):
        storage.copy_tree(f"{url}/{d}", local / d) if d in ("shards", "val") else storage.download_file(
            f"{url}/{d}", local / d
        )
    cache = tmp_path / "cache"
    remote_losses = _train(
        tmp_path / "run_s3",
        [f"data.dataset={url}", f"data.cache_dir={cache}", "data.prefetch=3", "data.cache_limit_gb=1"],
    )
    local_losses = _train(tmp_path / "run_local", [f"data.dataset={local}", "data.prefetch=0"])
    assert len(remote_losses) == STEPS and all(np.isfinite(remote_losses))
    assert remote_losses == local_losses  # bit-identical, not approximately equal
    assert list(cache.rglob("*.mds.zstd"))  # the shards came through the cache
    # a missing dataset fails naming its manifest URL and the fix, before any step
    p = run_command(
        [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            "tiny",
            f"run.dir={tmp_path / 'run_bad'}",
            *ARGS,
            f"data.dataset={s3_prefix}/nothing",
        ],
        timeout=300,
    )
    assert p.returncode != 0 and f"{s3_prefix}/nothing/manifest.json: manifest not found" in p.stderr
