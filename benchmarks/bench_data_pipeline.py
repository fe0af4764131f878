"""Benchmark of the data pipeline on the bundled corpus, and of our MinHash dedup next to datatrove's.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--out runs/bench/data_pipeline.json] [--planted 1000]

1. The whole pipeline (default mixture: KJV + Shakespeare + Python docs, ~9.6 MB): documents/s and MB/s
   per stage (ingest, clean, dedup, tokenizer, pack), from the manifest's stage timings.
2. Dedup throughput on the same bundled corpus as JSONL: ours (``run_dedup``: ingest + exact + MinHash +
   connected components + anti-join, on Ray) and datatrove 0.10.1 (signature -> buckets -> cluster ->
   filter, LocalPipelineExecutor with one task per core), both with word 5-grams, 14 bands x 8 rows.
   datatrove's English word tokenizer needs spaCy; both tools see text that their own simplification
   (lower case, punctuation removed) reduced to words separated by spaces, so datatrove is given a
   whitespace word tokenizer here: same shingles, no spaCy.
3. Quality on a planted corpus (data_pipeline.synthetic_dups): recall on exact copies and J >= 0.9, false
   positives on J <= 0.5, for both tools. A pair counts as detected when one of its two documents is removed
   (the criterion that works for both outputs; planted groups are independent, so clusters are pairs).

Prints a table and writes the JSON. Timings are wall clock on whatever machine runs it (say which).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    tok = Whitespace()
    t0 = time.time()
    logs = f"{work}/logs"

    def reader():
        return JsonlReader(input_dir, text_key="text", id_key="id", glob_pattern="*.jsonl")

    LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(f"{work}/sigs", config=cfg, language=tok)],
                          tasks=tasks, workers=tasks, logging_dir=f"{logs}/1").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
                          tasks=cfg.num_buckets, workers=tasks, logging_dir=f"{logs}/2").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)],
                          tasks=1, logging_dir=f"{logs}/3").run()
    LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(f"{work}/remove",
                                                                 exclusion_writer=JsonlWriter(f"{work}/removed")),
                                    JsonlWriter(f"{work}/kept")],
                          tasks=tasks, workers=tasks, logging_dir=f"{logs}/4").run()
    seconds = time.time() - t0
    removed = set()
    for f in Path(work, "removed").glob("*.jsonl.gz"):
        with gzip.open(f, "rt") as fh:
            removed |= {json.loads(line)["id"] for line in fh}
    return {"seconds": seconds, "removed": sorted(removed)}


def run_ours(input_dir: str, work: str) -> dict:
    from data_pipeline.config import DedupConfig
    from data_pipeline.pipeline import run_dedup

    t0 = time.time()
    summary = run_dedup(input_dir, work, DedupConfig())
    seconds = time.time() - t0
    removed = [json.loads(x)["id"] for x in Path(work, "removed.jsonl").read_text().splitlines()]
    dedup_stage = next(s for s in summary["stages"] if s["name"] == "dedup")
    return {"seconds": seconds, "dedup_stage_seconds": dedup_stage["seconds"], "removed": removed}


def pair_quality(pairs, removed: set[str]) -> dict:
    def rate(sel):
        return sum((p.base in removed) or (p.variant in removed) for p in sel) / max(1, len(sel))

    exact = [p for p in pairs if p.jaccard >= 1.0]
    high = [p for p in pairs if 0.9 <= p.jaccard < 1.0]
    low = [p for p in pairs if p.jaccard <= 0.5]
    mid = [p for p in pairs if 0.7 < p.jaccard <= 0.8]
    return {"recall_exact": rate(exact), "recall_j_ge_0.9": rate(high), "detected_j_0.7_0.8": rate(mid),
            "false_positive_j_le_0.5": rate(low), "pairs": len(pairs)}


def write_jsonl(docs: list[dict], d: Path, parts: int = 2) -> int:
    d.mkdir(parents=True, exist_ok=True)
    nbytes = 0
    for p in range(parts):
        with open(d / f"part-{p}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs[p::parts]:
                line = json.dumps({"id": doc["id"], "text": doc["text"]}, ensure_ascii=False)
                f.write(line + "\n")
                nbytes += len(doc["text"].encode())
    return nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/data_pipeline.json")
    ap.add_argument("--planted", type=int, default=1000, help="planted base documents (each with one variant)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DATA_PIPELINE_PROGRESS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from data_pipeline.config import load_mixture
    from data_pipeline.embedded_corpus import _READERS
    from data_pipeline.pipeline import run_pipeline
    from data_pipeline.ray_session import ray_session
    from data_pipeline.synthetic_dups import make_corpus

    results: dict = {"machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        with ray_session(os.cpu_count() or 1, 300):
            if not args.skip_pipeline:
                cfg = load_mixture(ROOT / "data_pipeline/configs/default_mixture.yaml")
                manifest = json.loads(run_pipeline(cfg, tmp / "pipeline").read_text())
                results["pipeline_stages"] = manifest["stages"]
                results["pipeline_tokens"] = {n: s["tokens"] for n, s in manifest["sources"].items()}

            corpus = [d for name in ("kjv", "shakespeare", "python_docs") for d in _READERS[name]()]
            nbytes = write_jsonl(corpus, tmp / "bundled")
            planted_docs, pairs = make_corpus(args.planted, (1.0, 0.95, 0.9, 0.8, 0.75, 0.5, 0.4, 0.3), seed=99)
            write_jsonl(planted_docs, tmp / "planted")
            ours = run_ours(str(tmp / "bundled"), str(tmp / "ours-bundled"))
            ours_q = run_ours(str(tmp / "planted"), str(tmp / "ours-planted"))
        results["dedup_input"] = {"documents": len(corpus), "bytes": nbytes}
        results["ours"] = {"seconds": ours["seconds"], "dedup_stage_seconds": ours["dedup_stage_seconds"],
                           "docs_per_s": len(corpus) / ours["seconds"], "mb_per_s": nbytes / 1e6 / ours["seconds"],
                           "removed": len(ours["removed"]), "quality": pair_quality(pairs, set(ours_q["removed"]))}
        if not args.skip_datatrove:
            dt = run_datatrove(str(tmp / "bundled"), str(tmp / "dt-bundled"), os.cpu_count() or 1)
            dt_q = run_datatrove(str(tmp / "planted"), str(tmp / "dt-planted"), os.cpu_count() or 1)
            results["datatrove"] = {"seconds": dt["seconds"], "docs_per_s": len(corpus) / dt["seconds"],
                                    "mb_per_s": nbytes / 1e6 / dt["seconds"], "removed": len(dt["removed"]),
                                    "quality": pair_quality(pairs, set(dt_q["removed"]))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmachine: {results['machine']}")
    if "pipeline_stages" in results:
        print("\npipeline on the bundled corpus (default mixture)")
        print(f"{'stage':<10} {'seconds':>8} {'docs':>7} {'MB':>7} {'docs/s':>8} {'MB/s':>7}")
        for s in results["pipeline_stages"]:
            print(f"{s['name']:<10} {s['seconds']:>8.1f} {s['documents']:>7} {s['bytes'] / 1e6:>7.2f} "
                  f"{s['docs_per_s']:>8.0f} {s['mb_per_s']:>7.2f}")
    print(f"\nMinHash dedup, 5-grams, 14x8, bundled corpus ({results['dedup_input']['documents']} docs, "
          f"{results['dedup_input']['bytes'] / 1e6:.1f} MB) and planted pairs ({args.planted})")
    print(f"{'tool':<10} {'seconds':>8} {'docs/s':>8} {'MB/s':>6} {'removed':>8} {'recall exact':>13} "
          f"{'recall J>=0.9':>14} {'J 0.7-0.8':>10} {'FP J<=0.5':>10}")
    for tool in ("ours", "datatrove"):
        if tool in results:
            r, q = results[tool], results[tool]["quality"]
            print(f"{tool:<10} {r['seconds']:>8.1f} {r['docs_per_s']:>8.0f} {r['mb_per_s']:>6.2f} {r['removed']:>8} "
                  f"{q['recall_exact']:>13.3f} {q['recall_j_ge_0.9']:>14.3f} {q['detected_j_0.7_0.8']:>10.3f} "
                  f"{q['false_positive_j_le_0.5']:>10.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
