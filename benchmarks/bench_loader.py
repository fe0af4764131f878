"""Loader throughput from local disk and from a local S3 server, prefetch on and off, against a `small` step.

    python benchmarks/bench_loader.py [--samples-per-source 1500] [--batches 400] [--prefetch 8]
        [--compute-ms 20] [--seq-len 4096] [--repeats 3]

Builds a dataset in the packed layout (data_pipeline.dataset_layout) of two sources of Zipf-distributed token
ids (vocabulary 32000, like `small`; zstd shards of 4 MB raw, parts of 500 samples), writes it to a temporary
directory and copies it into a moto S3 server started on 127.0.0.1 (tests/s3_server.py, the tests' server),
then times the exact loader (``build_loader``, micro_batch 1, global batch 8: `small`'s) in these modes:

- local: shards on local disk (warm page cache);
- s3 direct: each shard read into memory over HTTP (no cache_dir);
- s3 cold cache: a fresh cache_dir (every shard downloaded once);
- s3 warm cache: the cache_dir filled by the cold run.

Per mode, with prefetch off and on (``--prefetch`` micro-batches): (1) loader alone: samples/s over
``--batches`` micro-batches from a fresh loader (best of ``--repeats``: on the shared machine load only adds
time); (2) with a simulated training step of ``--compute-ms`` per
micro-batch (``time.sleep``: like a GPU step it releases the GIL), the mean wait per micro-batch in ``next()``
after the first (what the model would wait for data; the first micro-batch, which no read-ahead can hide, is
reported separately as ``first_wait_ms``). The reference is one optimizer step of `small` on this machine's CPU:
8 micro-batches x the per-micro-batch step time of our model at 1 x 4096 from
benchmarks/results/bench_model_cpu.json; "share of a small step" = loader seconds for 8 samples / that.
Prints a table and writes benchmarks/results/bench_loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GLOBAL_BATCH, MICRO_BATCH = 8, 1  # small.yaml's train.global_batch / micro_batch
VOCAB = 32000


def build_dataset(root: Path, seq_len: int, samples_per_source: int, seed: int = 0) -> Path:
    from data_pipeline import dataset_layout, pack
    from data_pipeline.manifest import MANIFEST_VERSION, write_manifest

    rng = np.random.default_rng(seed)
    sources = {}
    for name in ("web", "code"):
        docs, tokens = [], 0
        while tokens < samples_per_source * (seq_len + 1):
            n = int(rng.integers(50, 3000))
            docs.append((rng.zipf(1.3, size=n) % (VOCAB - 3) + 3).astype(np.int32))
            tokens += n + 1
        samples, starts, dropped = pack.pack_tokens(docs, seq_len + 1, eos=2)
        rows = list(zip(samples[:samples_per_source], starts[:samples_per_source]))
        doc = dataset_layout.write_source(root / "shards" / name, rows, 500, "zstd", 1 << 22)
        sources[name] = {
            "dir": f"shards/{name}",
            "weight": 1.0,
            "samples": doc["samples"],
            "parts": len(doc["parts"]),
            "bytes": sum(p["bytes"] for p in doc["parts"]),
            "documents": len(docs),
            "tokens": tokens,
            "dropped_tokens": dropped,
        }
    manifest = {
        "version": MANIFEST_VERSION,
        "name": "bench",
        "fingerprint": "bench",
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "vocab_size": VOCAB,
        "tokenizer": "tokenizer.json",
        "special_tokens": {"pad": 0, "bos": 1, "eos": 2},
        "sources": sources,
        "mixture": {"loader": {}},
    }
    return write_manifest(root, manifest)


def run_mode(
    dataset: str,
    seq_len: int,
    batches: int,
    prefetch: int,
    compute_s: float,
    cache_dir: str | None,
    fresh_cache: bool,
    repeats: int = 1,
) -> dict:
    from data_pipeline.api import build_loader

    def loader():
        if cache_dir and fresh_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
        return build_loader(
            dataset, None, seq_len, GLOBAL_BATCH, MICRO_BATCH, 0, 1, 7, prefetch=prefetch, cache_dir=cache_dir
        )

    alone = float("inf")
    for _ in range(repeats):  # best of `repeats`: the shared machine's load only ever adds time
        ld = loader()
        t0 = time.perf_counter()
        for _ in range(batches):
            next(ld)
        alone = min(alone, time.perf_counter() - t0)
        downloaded = sum(s.cache.downloaded for s in ld.sources if s.cache is not None)
        ld.close()
    ld = loader()
    waits = []
    n_step = max(20, batches // 4)
    for _ in range(n_step):
        t = time.perf_counter()
        next(ld)
        waits.append(time.perf_counter() - t)
        time.sleep(compute_s)
    ld.close()
    return {
        "samples_per_s": batches * MICRO_BATCH / alone,
        "seconds": alone,
        "downloaded_mb": downloaded / 1e6,
        "first_wait_ms": 1e3 * waits[0],
        "wait_ms_per_micro_batch": 1e3 * float(np.mean(waits[1:])),
        "batches_with_compute": n_step,
    }


def small_step_seconds() -> tuple[float | None, str]:
    path = ROOT / "benchmarks" / "results" / "bench_model_cpu.json"
    try:
        rows = json.loads(path.read_text())["rows"]
        per_micro = next(
            r["step_s"]
            for r in rows
            if r["config"] == "small" and r["model"] == "ours" and r["seq"] == 4096 and r["batch"] == 1
        )
        return GLOBAL_BATCH * per_micro, f"{GLOBAL_BATCH} x {per_micro:.2f} s (ours, 1x4096, {path.name})"
    except (OSError, KeyError, StopIteration, ValueError):
        return None, "benchmarks/results/bench_model_cpu.json has no small 1x4096 row"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples-per-source", type=int, default=1500)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--compute-ms", type=float, default=20.0)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_loader.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from s3_server import local_s3_server

    from data_pipeline import storage

    step_s, step_src = small_step_seconds()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    rows = []
    try:
        t0 = time.perf_counter()
        manifest = build_dataset(tmp / "ds", args.seq_len, args.samples_per_source)
        shard_bytes = sum(p.stat().st_size for p in (tmp / "ds").rglob("*.mds.zstd"))
        print(
            f"dataset: {2 * args.samples_per_source} samples of {args.seq_len + 1} tokens, "
            f"{shard_bytes / 1e6:.1f} MB of zstd shards ({time.perf_counter() - t0:.1f} s to build)"
        )
        with local_s3_server() as server:
            url = f"{server.url}/bench"
            storage.copy_tree(str(tmp / "ds"), url)
            cache = str(tmp / "cache")
            modes = [
                ("local", str(manifest.parent), None, False),
                ("s3 direct", url, None, False),
                ("s3 cold cache", url, cache, True),
                ("s3 warm cache", url, cache, False),
            ]
            run_mode(url, args.seq_len, 10, 0, 0.0, None, False)  # warm-up: connections, imports (untimed)
            for name, ds, cache_dir, fresh in modes:
                for pf in (0, args.prefetch):
                    r = run_mode(
                        ds, args.seq_len, args.batches, pf, args.compute_ms / 1e3, cache_dir, fresh, args.repeats
                    )
                    r.update(mode=name, prefetch=pf)
                    if step_s:
                        r["share_of_small_step"] = GLOBAL_BATCH / r["samples_per_s"] / step_s
                    rows.append(r)
                    print(
                        f"  {name:14s} prefetch {pf}: {r['samples_per_s']:8.1f} samples/s, wait "
                        f"{r['wait_ms_per_micro_batch']:7.2f} ms/micro-batch",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nloader, micro_batch {MICRO_BATCH} x {args.seq_len + 1} tokens; simulated step {args.compute_ms:.0f} ms per "
        f"micro-batch; small step = {step_src}" + (f" = {step_s:.1f} s" if step_s else "")
    )
    head = f"| {'mode':14s} | prefetch | samples/s | tokens/s (M) | wait/micro-batch (ms) | first (ms) | share of a small step |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        share = f"{r['share_of_small_step']:.2e}" if "share_of_small_step" in r else "n/a"
        print(
            f"| {r['mode']:14s} | {r['prefetch']:8d} | {r['samples_per_s']:9.1f} | "
            f"{r['samples_per_s'] * (args.seq_len + 1) / 1e6:12.2f} | {r['wait_ms_per_micro_batch']:21.2f} | {r['first_wait_ms']:10.1f} | "
            f"{share:>21s} |"
        )
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_end": list(os.getloadavg()),
        },
        "args": vars(args),
        "global_batch": GLOBAL_BATCH,
        "micro_batch": MICRO_BATCH,
        "small_step_s": step_s,
        "small_step_source": step_src,
        "shard_mb": shard_bytes / 1e6,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
