"""Scaling of ``python -m data_pipeline dedup`` with the number of Ray nodes (local Ray cluster, 1 CPU each).

    .venv/bin/python benchmarks/bench_dedup_nodes.py [--mb 50] [--files 16]

Writes the recombined-English corpus of ``benchmarks/bench_dedup.py`` (planted exact and near duplicates) as
``--files`` JSONL files, starts a real local Ray cluster (``tests/cluster_fixtures.RayCluster``: a head and
worker nodes as separate ``ray start`` processes with token authentication) of 1 node, runs the dedup
command against it (``RAY_ADDRESS``), stops it, then does the same with 2 nodes. Each node has 1 CPU.
Prints seconds and speedup, checks that both runs remove the same documents, and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_on(nodes: int, corpus: Path, base: Path) -> dict:
    from tests.cluster_fixtures import RayCluster

    cluster = RayCluster(base / f"ray{nodes}", workers=nodes - 1, cpus_per_node=1).start()
    try:
        env = {
            **cluster.env,
            "RAY_ADDRESS": cluster.address,
            "DATA_PIPELINE_PROGRESS": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
        out = base / f"out{nodes}"
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "data_pipeline", "dedup", "--input", str(corpus), "--output", str(out)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        seconds = time.time() - t0
        if r.returncode:
            raise RuntimeError(f"dedup on {nodes} node(s) failed:\n{r.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        removed = sorted(json.loads(x)["id"] for x in (out / "removed.jsonl").read_text().splitlines())
        return {
            "nodes": nodes,
            "seconds": seconds,
            "removed": len(removed),
            "removed_ids": removed,
            "stages": summary["stages"],
        }
    finally:
        cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_dedup_nodes.json"))
    args = ap.parse_args()
    from bench_dedup import make_corpus, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    try:
        nbytes = write_jsonl(make_corpus(args.mb, args.seed), tmp / "corpus", args.files)
        runs = [run_on(n, tmp / "corpus", tmp) for n in (1, 2)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = runs[0]["removed_ids"] == runs[1]["removed_ids"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs",
        "mb": nbytes / 1e6,
        "files": args.files,
        "runs": [{k: v for k, v in r.items() if k != "removed_ids"} for r in runs],
        "speedup": runs[0]["seconds"] / runs[1]["seconds"],
        "same_removed": same,
    }
    print(
        f"\ndedup of {nbytes / 1e6:.0f} MB in {args.files} files on a local Ray cluster (1 CPU per node), "
        f"{result['machine']}, {result['date']}"
    )
    print(f"{'nodes':>5} {'seconds':>8} {'MB/s':>6} {'removed':>8}")
    for r in runs:
        print(f"{r['nodes']:>5} {r['seconds']:>8.1f} {nbytes / 1e6 / r['seconds']:>6.2f} {r['removed']:>8}")
    print(f"speedup 2 nodes / 1 node: {result['speedup']:.2f}x; same documents removed: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
