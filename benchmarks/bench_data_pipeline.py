"""Benchmark of the whole data pipeline on the bundled corpus: per-stage wall time, documents/s and MB/s.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--out benchmarks/results/bench_data_pipeline.json]

Runs ``run_pipeline`` on the default mixture (KJV + Shakespeare + Python docs, ~9.6 MB) twice into one
output directory: a cold build, then the same command again, which must find every task finished (the
resume path: it reports the time to check the completion records). Also re-packs at a second sequence
length (only the pack stage runs; the tokens are cached). MinHash dedup against datatrove is
``benchmarks/bench_dedup.py``. Prints a table and writes the JSON; timings are wall clock on whatever
machine runs it (say which).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_data_pipeline.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DATA_PIPELINE_PROGRESS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from data_pipeline.config import load_mixture
    from data_pipeline.pipeline import run_pipeline
    from data_pipeline.ray_session import ray_session

    results: dict = {
        "machine": f"{os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        with ray_session(os.cpu_count() or 1, 300):
            cfg = load_mixture(ROOT / "data_pipeline/configs/default_mixture.yaml")
            for run in ("cold", "rerun"):
                t0 = time.time()
                m = json.loads(Path(run_pipeline(cfg, tmp / "ds", work_dir=tmp / "work")).read_text())
                results[run] = {"seconds": time.time() - t0, "stages": m["stages"]}
            cfg.pack.seq_len *= 2
            t0 = time.time()
            m = json.loads(Path(run_pipeline(cfg, tmp / "ds2", work_dir=tmp / "work")).read_text())
            results["new_seq_len"] = {"seconds": time.time() - t0, "stages": m["stages"]}
            results["tokens"] = {n: s["tokens"] for n, s in m["sources"].items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmachine: {results['machine']}, {results['date']}")
    for run in ("cold", "rerun", "new_seq_len"):
        print(f"\n{run}: {results[run]['seconds']:.1f} s")
        print(
            f"{'stage':<18} {'seconds':>8} {'tasks':>6} {'skipped':>8} {'docs':>7} {'MB':>7} {'docs/s':>8} {'MB/s':>7}"
        )
        for s in results[run]["stages"]:
            print(
                f"{s['name']:<18} {s['seconds']:>8.1f} {s['tasks']:>6} {s['skipped']:>8} {s['documents']:>7} "
                f"{s['bytes'] / 1e6:>7.2f} {s['docs_per_s']:>8.0f} {s['mb_per_s']:>7.2f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
