"""End-to-end MinHash dedup, ours next to datatrove's, on real English with planted duplicates.

    .venv/bin/python benchmarks/bench_dedup.py [--sizes 50,200] [--files 8] [--workers 2]
                                               [--out benchmarks/results/bench_dedup.json]

Corpus: documents made of runs of consecutive sentences of the bundled text (King James Bible, Shakespeare,
Python reference; :mod:`data_pipeline.embedded_corpus`), three runs from random places per document
(~2 KB). Then planted duplicates: 8% exact copies and 12% near copies at target word-5-gram Jaccard
0.95 / 0.9 / 0.85 / 0.8 (k words replaced by fresh ones at positions >= 5 apart, k from
J = (S - 5k) / (S + 5k) as in :mod:`data_pipeline.synthetic_dups`), shuffled in, written as ``--files``
JSONL files ``{"id", "text"}``.

Both tools: word 5-grams, 14 bands x 8 rows, ``--workers`` processes (datatrove: LocalPipelineExecutor with
that many tasks and workers, its 4 stages signature -> buckets -> cluster -> filter, configured as in
``run_datatrove``: a whitespace word tokenizer, so both see the same words; ours: a local Ray
of that many CPUs). Each tool runs in its own subprocess so that its peak memory is its own: "driver" is
the subprocess (its VmHWM), "worker" the largest worker process (datatrove: RUSAGE_CHILDREN of its pool;
ours: the largest peak RSS the Ray tasks recorded in their summaries).

Ours, two ways (both by default, ``--ours pipeline,stage``), each on a local Ray, the time including Ray's start:
``ours-pipeline`` = ``data_pipeline.pipeline.run_dedup`` end to end (its ingest, ``dedup_stage``, its streamed
filter; JSONL out, as ``python -m data_pipeline dedup``); ``ours-stage`` = a minimal ingest here (JSONL -> one
Parquet partition per file with compact doc ids) + ``dedup_stage`` + a streamed filter here (``removal_mask``
per partition, kept rows written as Parquet), all as :class:`~data_pipeline.runner.Runner` stages.

Agreement = |A ∩ B| / |A ∪ B| of the two removed-id sets (the survivor rules differ only in which member of a
cluster is kept when a cluster spans datatrove's tasks).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NEAR_TARGETS = (0.95, 0.9, 0.85, 0.8)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a forked child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ corpus


def sentences() -> list[str]:
    from data_pipeline.embedded_corpus import _READERS

    out: list[str] = []
    for name in ("kjv", "shakespeare", "python_docs"):
        for d in _READERS[name]():
            out += [s.strip() for s in re.split(r"(?<=[.!?;:])\s+|\n+", d["text"]) if len(s.split()) >= 3]
    return out


def near_copy(words: list[str], target: float, rng, fresh: list[int]) -> list[str]:
    n = 5
    s = len(words) - n + 1
    k = round(s * (1 - target) / (n * (1 + target)))
    out = list(words)
    slots = np.arange(0, len(words), n)
    for p in rng.choice(slots, size=min(k, len(slots)), replace=False):
        fresh[0] += 1
        out[p] = f"zq{fresh[0]:x}"
    return out


def make_corpus(megabytes: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sents = sentences()
    docs: list[dict] = []
    nbytes, fresh = 0, [0]
    target = megabytes * 1e6
    while nbytes < target:
        parts = []
        for _ in range(3):
            i = int(rng.integers(0, len(sents) - 12))
            parts.append(" ".join(sents[i : i + int(rng.integers(4, 12))]))
        text = " ".join(parts)
        docs.append({"id": f"d{len(docs):08d}", "text": text})
        nbytes += len(text.encode())
        u = rng.random()
        if u < 0.08:
            docs.append({"id": f"d{len(docs):08d}", "text": text})
            nbytes += len(text.encode())
        elif u < 0.20:
            t = NEAR_TARGETS[int(rng.integers(len(NEAR_TARGETS)))]
            var = " ".join(near_copy(text.split(), t, rng, fresh))
            docs.append({"id": f"d{len(docs):08d}", "text": var})
            nbytes += len(var.encode())
    order = rng.permutation(len(docs))
    return [docs[j] for j in order]


def write_jsonl(docs: list[dict], d: Path, files: int) -> int:
    d.mkdir(parents=True, exist_ok=True)
    nbytes = 0
    bounds = np.linspace(0, len(docs), files + 1).astype(int)
    for f in range(files):
        with open(d / f"part-{f:04d}.jsonl", "w", encoding="utf-8") as fh:
            for doc in docs[bounds[f] : bounds[f + 1]]:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
                nbytes += len(doc["text"].encode())
    return nbytes


# -------------------------------------------------------------------------------------------------- ours


def ingest_task(src: str, key: int, out: str) -> dict:
    """JSONL file -> Parquet partition (doc_id, id, text), doc ids in line order."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from data_pipeline.doc_ids import make_doc_ids

    table = pj.read_json(src).select(["id", "text"])
    ids = make_doc_ids(key, np.arange(table.num_rows))
    table = table.add_column(0, "doc_id", pa.array(ids, pa.uint64()))
    pq.write_table(table, out + ".tmp", compression="zstd")
    os.replace(out + ".tmp", out)
    return {"documents": table.num_rows, "bytes": int(table.column("text").nbytes)}


def filter_task(src: str, removed: str, kept_out: str, removed_out: str) -> dict:
    """Stream one partition in its own order: keep the rows ``removal_mask`` does not flag."""
    import pyarrow.parquet as pq

    from data_pipeline import storage
    from data_pipeline.dedup import removal_mask

    rem = storage.load_array(removed)
    pf = pq.ParquetFile(src)
    writer = None
    gone: list[str] = []
    for batch in pf.iter_batches(batch_size=8192):
        mask = removal_mask(batch.column("doc_id").to_numpy(), rem)
        if mask.any():
            kept_of = rem["kept"][np.searchsorted(rem["doc"], batch.column("doc_id").to_numpy()[mask])]
            gone += [f"{i}\t{k}" for i, k in zip(batch.column("id").filter(mask).to_pylist(), kept_of.tolist())]
        kept = batch.filter(~mask)
        if writer is None:
            writer = pq.ParquetWriter(kept_out + ".tmp", kept.schema, compression="zstd")
        writer.write_batch(kept)
    if writer is not None:
        writer.close()
        os.replace(kept_out + ".tmp", kept_out)
    Path(removed_out).write_text("".join(g + "\n" for g in gone))
    return {"removed": len(gone)}


def run_ours(input_dir: str, work: str, workers: int) -> dict:
    from data_pipeline.config import DedupConfig
    from data_pipeline.dedup import dedup_stage, removed_url
    from data_pipeline.doc_ids import partition_key
    from data_pipeline.ray_session import ray_session
    from data_pipeline.runner import Runner, Task

    t0 = time.time()
    files = sorted(Path(input_dir).glob("*.jsonl"))
    Path(work, "parts").mkdir(parents=True)
    Path(work, "kept").mkdir()
    Path(work, "removed_ids").mkdir()
    times = {}
    with ray_session(workers, 300):
        times["ray_start"] = time.time() - t0
        times["rss_after_ray_start_mb"] = peak_rss_mb()
        runner = Runner(use_ray=True)
        parts = [(partition_key(0, i), str(Path(work, "parts", f"{i:06d}.parquet"))) for i in range(len(files))]
        t = time.time()
        runner.run(
            "ingest",
            str(Path(work, "ingest")),
            ingest_task,
            [Task(f"{i:06d}", {"src": str(f), "key": k, "out": u}) for i, (f, (k, u)) in enumerate(zip(files, parts))],
        )
        times["ingest"] = time.time() - t
        times["rss_after_ingest_mb"] = peak_rss_mb()
        t = time.time()
        summary = dedup_stage(runner, parts, str(Path(work, "dedup")), DedupConfig())
        times["dedup"] = time.time() - t
        t = time.time()
        runner.run(
            "filter",
            str(Path(work, "filter")),
            filter_task,
            [
                Task(
                    f"{k:010d}",
                    {
                        "src": u,
                        "removed": removed_url(str(Path(work, "dedup")), k),
                        "kept_out": str(Path(work, "kept", f"{k:010d}.parquet")),
                        "removed_out": str(Path(work, "removed_ids", f"{k:010d}.txt")),
                    },
                )
                for k, u in parts
            ],
        )
        times["filter"] = time.time() - t
    seconds = time.time() - t0
    driver = peak_rss_mb()  # before this file's own scoring
    pairs = [x.split("\t") for f in sorted(Path(work, "removed_ids").glob("*.txt")) for x in f.read_text().splitlines()]
    removed = [i for i, _ in pairs]
    clusters = survivor_clusters(pairs, sorted(Path(work, "kept").glob("*.parquet")))
    worker = max(r.worker_peak_rss_mb for r in runner.runs)
    steps = {k: v["seconds"] for k, v in summary["tasks"].items()}
    return {
        "seconds": seconds,
        "removed": removed,
        "clusters": clusters,
        "times": times,
        "dedup_steps": steps,
        "worker_peak_rss_mb": worker,
        "driver_peak_rss_mb": driver,
        "summary": {
            k: summary[k] for k in ("documents", "removed", "exact", "near", "edges", "largest_cluster", "cc_mode")
        },
        "sign": summary["tasks"]["sign"],
    }


def survivor_clusters(pairs: list[list[str]], kept_files: list[Path]) -> list[list[str]]:
    """Clusters [survivor id, removed ids...] from (removed id, survivor doc_id) and the kept partitions."""
    import pyarrow.parquet as pq

    by_kept: dict[int, list[str]] = {}
    for i, k in pairs:
        by_kept.setdefault(int(k), []).append(i)
    want = np.array(sorted(by_kept), dtype=np.uint64)
    name: dict[int, str] = {}
    for f in kept_files:
        t = pq.read_table(f, columns=["doc_id", "id"])
        d = t.column("doc_id").to_numpy()
        sel = np.flatnonzero(np.isin(d, want))
        name.update(zip(d[sel].tolist(), t.column("id").take(sel).to_pylist()))
    return [[name[k]] + v for k, v in by_kept.items()]


def run_ours_pipeline(input_dir: str, work: str, workers: int) -> dict:
    """``data_pipeline.pipeline.run_dedup`` (ingest + dedup_stage + filter, JSONL out) on a local Ray."""
    from data_pipeline.config import DedupConfig
    from data_pipeline.doc_ids import describe
    from data_pipeline.pipeline import run_dedup
    from data_pipeline.ray_session import ray_session

    t0 = time.time()
    with ray_session(workers, 300):
        t_ray = time.time() - t0
        summary = run_dedup(input_dir, work, DedupConfig())
    seconds = time.time() - t0
    driver = peak_rss_mb()  # before this file's own scoring
    rows = [json.loads(x) for x in Path(work, "removed.jsonl").read_text().splitlines()]
    # the survivor's id from its integer id (source 0, file = index in the sorted input files, row = line)
    files = sorted(Path(input_dir).glob("*.jsonl"))
    ids = [[json.loads(line)["id"] for line in f.read_text().splitlines()] for f in files]
    by_kept: dict[str, list[str]] = {}
    for r in rows:
        _, f, row = describe(r["kept_doc"])
        by_kept.setdefault(ids[f][row], []).append(r["id"])
    stages = {s["name"]: round(s["seconds"], 2) for s in summary["stages"]}
    return {
        "seconds": seconds,
        "removed": [r["id"] for r in rows],
        "clusters": [[k] + v for k, v in by_kept.items()],
        "times": {"ray_start": t_ray, **stages},
        "driver_peak_rss_mb": driver,
        "worker_peak_rss_mb": max(s.get("worker_peak_rss_mb", 0.0) for s in summary["stages"]),
    }


# --------------------------------------------------------------------------------------------- datatrove


def run_datatrove(input_dir: str, work: str, tasks: int) -> dict:
    """datatrove's 4-stage MinHash dedup; returns wall time and the removed document ids."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    cfg = MinhashConfig(
        n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1, hash_config=HashConfig(precision=64, hash_fc="sha1")
    )
    tok = Whitespace()
    t0 = time.time()
    logs = f"{work}/logs"

    def reader():
        return JsonlReader(input_dir, text_key="text", id_key="id", glob_pattern="*.jsonl")

    LocalPipelineExecutor(
        pipeline=[reader(), MinhashDedupSignature(f"{work}/sigs", config=cfg, language=tok)],
        tasks=tasks,
        workers=tasks,
        logging_dir=f"{logs}/1",
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
        tasks=cfg.num_buckets,
        workers=tasks,
        logging_dir=f"{logs}/2",
    ).run()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)],
        tasks=1,
        logging_dir=f"{logs}/3",
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            reader(),
            MinhashDedupFilter(f"{work}/remove", exclusion_writer=JsonlWriter(f"{work}/removed")),
            JsonlWriter(f"{work}/kept"),
        ],
        tasks=tasks,
        workers=tasks,
        logging_dir=f"{logs}/4",
    ).run()
    seconds = time.time() - t0
    removed = set()
    for f in Path(work, "removed").glob("*.jsonl.gz"):
        with gzip.open(f, "rt") as fh:
            removed |= {json.loads(line)["id"] for line in fh}
    return {"seconds": seconds, "removed": sorted(removed)}


def run_datatrove_tool(input_dir: str, work: str, workers: int) -> dict:
    out = run_datatrove(input_dir, work, workers)
    out["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out["driver_peak_rss_mb"] = peak_rss_mb()
    return out


# ------------------------------------------------------------------------------------------------ driver


def child(args) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    fn = {"ours-stage": run_ours, "ours-pipeline": run_ours_pipeline, "datatrove": run_datatrove_tool}[args.child]
    res = fn(args.input, args.work, args.workers)
    Path(args.result).write_text(json.dumps(res))
    return 0


def run_child(tool: str, input_dir: Path, work: Path, workers: int) -> dict:
    result = work.parent / f"{work.name}.json"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}",
        "DATA_PIPELINE_PROGRESS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            tool,
            "--input",
            str(input_dir),
            "--work",
            str(work),
            "--workers",
            str(workers),
            "--result",
            str(result),
        ],
        check=True,
        env=env,
    )
    return json.loads(result.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,200", help="corpus sizes in MB")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--ours",
        default="pipeline,stage",
        help="pipeline = run_dedup end to end; stage = this file's ingest + dedup_stage + filter",
    )
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_dedup.json"))
    ap.add_argument("--child", default="")
    ap.add_argument("--input", default="")
    ap.add_argument("--work", default="")
    ap.add_argument("--result", default="")
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        for mb in (float(s) for s in args.sizes.split(",")):
            t = time.time()
            docs = make_corpus(mb, args.seed)
            d = tmp / f"in-{mb:g}"
            nbytes = write_jsonl(docs, d, args.files)
            del docs
            print(
                f"corpus {mb:g} MB: {nbytes / 1e6:.1f} MB of text in {args.files} files ({time.time() - t:.0f} s)",
                flush=True,
            )
            row = {"mb": nbytes / 1e6, "files": args.files, "workers": args.workers}
            ours = [f"ours-{m}" for m in args.ours.split(",")]
            tools = ours + ([] if args.skip_datatrove else ["datatrove"])
            for tool in tools:
                r = run_child(tool, d, tmp / f"{tool}-{mb:g}", args.workers)
                r["mb_per_s"] = nbytes / 1e6 / r["seconds"]
                row[tool] = r
                print(f"  {tool}: {r['seconds']:.1f} s, {len(r['removed'])} removed", flush=True)
            for tool in ours if "datatrove" in row else ():
                a, b = set(row[tool]["removed"]), set(row["datatrove"]["removed"])
                r = row[tool]
                r["agreement"] = len(a & b) / max(1, len(a | b))
                cl = r.pop("clusters")
                # a cluster agrees when datatrove removed all of its members but one (whichever it kept)
                r["cluster_agreement"] = sum(sum(m in b for m in c) == len(c) - 1 for c in cl) / max(1, len(cl))
                r["datatrove_removed_outside_our_clusters"] = len(b - {m for c in cl for m in c})
                r["speedup"] = row["datatrove"]["seconds"] / r["seconds"]
            for tool in tools:
                row[tool]["removed_count"] = len(row[tool].pop("removed"))
                row[tool].pop("clusters", None)
            rows.append(row)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nMinHash dedup end to end, 5-grams, 14 x 8, {args.workers} workers, {os.cpu_count()} CPUs")
    print(
        "agree = |A & B| / |A | B| of the removed ids; clusters = share of our clusters of which datatrove removed all\n"
        "members but one (the tools keep different members: ours the first, datatrove its union-find root)"
    )
    print(
        f"{'MB':>6} {'tool':<14} {'seconds':>8} {'MB/s':>6} {'removed':>8} {'agree':>6} {'clusters':>8} {'speedup':>7} "
        f"{'driver MB':>9} {'worker MB':>9}"
    )
    for row in rows:
        for tool in [t for t in row if t.startswith("ours-") or t == "datatrove"]:
            r = row[tool]
            agree = f"{r['agreement']:.4f}" if "agreement" in r else ""
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            clus = f"{r['cluster_agreement']:.4f}" if "cluster_agreement" in r else ""
            print(
                f"{row['mb']:>6.1f} {tool:<14} {r['seconds']:>8.1f} {r['mb_per_s']:>6.2f} {r['removed_count']:>8} "
                f"{agree:>6} {clus:>8} {speed:>7} {r['driver_peak_rss_mb']:>9.0f} {r['worker_peak_rss_mb']:>9.0f}"
            )
        for tool in [t for t in row if t.startswith("ours-")]:
            print(
                f"       {tool}: {json.dumps({k: round(v, 1) for k, v in row[tool]['times'].items()})}"
                + (f"; dedup steps {json.dumps(row[tool]['dedup_steps'])}" if "dedup_steps" in row[tool] else "")
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
