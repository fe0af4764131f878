"""A build killed mid-way (SIGKILL of its whole process tree, Ray included) and rerun with the same command
skips the finished tasks and ends byte-identical to an uninterrupted build.

Two ``python -m data_pipeline run`` builds of one corpus (8 input files, dedup on): A runs to the end; B is
killed as soon as the tokens stage has recorded two finished tasks (so docs, dedup and the tokenizer are
done and tokens is half done), then rerun. Every output file of B (shards, parts.json, tokenizer,
quarantine, the stage caches under work/) must equal A's byte for byte; the manifests must agree except for
the run record (times, and the per-stage count of tasks skipped); the rerun's manifest must show skipped
tasks in every stage that finished before the kill. Completion records (``_done/``) are outputs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from data_pipeline.embedded_corpus import shakespeare_documents
from tests.harness import run_command

pytestmark = pytest.mark.slow
ENV = {"DATA_PIPELINE_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _corpus(root: Path) -> Path:
    scenes = list(shakespeare_documents())[:240]
    (root / "raw").mkdir()
    for f in range(8):
        part = scenes[f * 30 : (f + 1) * 30]
        lines = [json.dumps({"id": d["id"], "text": d["text"]}) for d in part]
        lines.append(json.dumps({"id": f"copy-{f}", "text": scenes[(f * 37) % 240]["text"]}))  # exact copies
        if f == 3:
            lines.insert(4, '{"id": "broken", "text": ')
        (root / "raw" / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    mixture = root / "mix.yaml"
    mixture.write_text(
        yaml.safe_dump(
            {
                "name": "resume",
                "seed": 5,
                "sources": [{"name": "plays", "weight": 1.0, "input": {"kind": "jsonl", "path": str(root / "raw")}}],
                "clean": {"min_words": 20, "max_symbol_word_ratio": 0.3, "min_alpha_word_frac": 0.5},
                "tokenizer": {"vocab_size": 512, "sample_bytes": 300_000},
                "pack": {"seq_len": 64, "part_tokens": 20_000},
                "split": {"val_fraction": 0.05, "min_val_docs_per_file": 1},
                "ray": {"num_cpus": 1, "object_store_mb": 200},
            }
        )
    )
    return mixture


def _command(mixture: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "run", "--mixture", str(mixture), "--output", str(out)]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the build and every process it started (raylet, GCS, workers), all at once."""
    procs = [psutil.Process(proc.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def _records(out: Path, stage: str) -> int:
    return sum(len(list(d.glob("*.json"))) for d in out.glob(f"work/{stage}-*/_done"))


def _files(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if not p.is_file() or rel in ("manifest.json", "report.md", "report.png"):
            continue
        out[rel] = p.read_bytes()
    return out


def test_killed_build_resumes_byte_identical(tmp_path: Path) -> None:
    mixture = _corpus(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_command(_command(mixture, a), timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]

    env = {**os.environ, **ENV}
    proc = subprocess.Popen(_command(mixture, b), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while _records(b, "tokens") < 2:
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.time() < deadline, "the tokens stage never started"
            time.sleep(0.05)
    finally:
        _kill_tree(proc)
    assert not (b / "manifest.json").exists()
    killed_at = {s: _records(b, s) for s in ("docs", "tokens")}
    assert 2 <= killed_at["tokens"] < 8, killed_at

    r = run_command(_command(mixture, b), timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    differing = [k for k in fa if fa[k] != fb[k]]
    assert not differing, f"{len(differing)} files differ after the resume: {differing[:5]}"

    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for k in ("created", "seconds", "stages"):
            m.pop(k)
    assert ma == mb
    stages = {s["name"]: s for s in json.loads((b / "manifest.json").read_text())["stages"]}
    assert stages["docs"]["skipped"] == stages["docs"]["tasks"] == 8  # nothing re-read from raw text
    assert stages["tokens"]["skipped"] >= killed_at["tokens"]
    assert stages["tokens"]["skipped"] < stages["tokens"]["tasks"]  # the rest ran after the kill
    assert any(k.startswith("shards/plays/part-000001/") for k in fb)  # several parts were packed


def test_new_seq_len_or_weights_rebuild_nothing_but_the_packing(tmp_path: Path) -> None:
    """The next sequence-length stage of a run re-packs the cached tokens: every task of docs, dedup,
    tokenizer and tokens is skipped (nothing is re-read from raw text); new mixture weights skip everything."""
    from data_pipeline.config import load_mixture
    from data_pipeline.pipeline import run_pipeline
    from data_pipeline.runner import Runner

    cfg = load_mixture(_corpus(tmp_path))
    work = tmp_path / "work"
    run_pipeline(cfg, tmp_path / "s64", work_dir=work, runner=Runner(use_ray=False))
    cfg.pack.seq_len = 128
    m = json.loads(Path(run_pipeline(cfg, tmp_path / "s128", work_dir=work, runner=Runner(use_ray=False))).read_text())
    for st in m["stages"]:
        assert (st["skipped"] == st["tasks"]) == (st["name"] != "pack"), st
    assert m["seq_len"] == 128 and m["sources"]["plays"]["samples"] > 0
    cfg.sources[0].weight = 3.0
    m = json.loads(Path(run_pipeline(cfg, tmp_path / "s128", work_dir=work, runner=Runner(use_ray=False))).read_text())
    assert all(st["skipped"] == st["tasks"] for st in m["stages"])
