"""Command line: ``python -m data_pipeline <command> ...``.

- ``run --mixture YAML --output DIR``: the whole pipeline (ingest, clean, dedup, tokenizer, pack) into DIR.
- ``dedup --input PATH --output DIR``: ingest + dedup alone on JSONL ``{"id", "text"}``; writes ``DIR/kept/``
  (JSONL parts), ``DIR/removed.jsonl`` (``{"id", "kept_id"}`` per removed document), ``DIR/summary.json``.
- ``verify --manifest PATH``: re-check every shard against the manifest's sizes and sha256 checksums.

Ray: joins ``RAY_ADDRESS`` when set (``ray://host:10001`` or ``host:6379``), otherwise starts a local Ray
with the machine's CPUs and stops it at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from data_pipeline.config import DedupConfig, load_mixture


def _print_summary(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n== {title} ==")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_run(args: argparse.Namespace) -> int:
    from data_pipeline.pipeline import run_pipeline
    from data_pipeline.ray_session import ray_session

    cfg = load_mixture(args.mixture)
    if args.vocab_size:
        cfg.tokenizer.vocab_size = args.vocab_size
    if args.seq_len:
        cfg.pack.seq_len = args.seq_len
    if args.tokenizer:
        cfg.tokenizer.path = args.tokenizer
    with ray_session(cfg.ray.num_cpus, cfg.ray.object_store_mb):
        path = run_pipeline(cfg, args.output, keep_work=args.keep_work)
    m = json.loads(path.read_text())
    c = m["counts"]
    rows = [("manifest", path), ("report", path.parent / "report.md"),
            ("documents ingested", c["ingest"]["documents"]),
            ("quarantined", f"{c['ingest']['quarantined']} {c['quarantine'] or ''}"),
            ("filtered", f"{sum(c['clean'].values())} {c['clean'] or ''}"),
            ("duplicates", f"{c['dedup']['removed']} (exact {c['dedup']['exact']}, near {c['dedup']['near']})"),
            ("documents kept", c["kept"])]
    rows += [(f"tokens {n}", f"{s['tokens']} ({s['samples']} samples of {m['sample_len']})")
             for n, s in m["sources"].items()]
    rows += [(f"stage {s['name']}", f"{s['seconds']:.1f} s, {s['docs_per_s']:.0f} docs/s, {s['mb_per_s']:.2f} MB/s")
             for s in m["stages"]]
    _print_summary("data pipeline summary", rows)
    if c["ingest"]["quarantined"]:
        print(f"WARNING: {c['ingest']['quarantined']} bad input records, see {path.parent / 'quarantine.jsonl'}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from data_pipeline.pipeline import run_dedup
    from data_pipeline.ray_session import ray_session

    dcfg = DedupConfig(exact=not args.no_exact, minhash=not args.no_minhash, ngram=args.ngram, bands=args.bands,
                       rows=args.rows, seed=args.seed)
    with ray_session(args.num_cpus, args.object_store_mb):
        summary = run_dedup(args.input, args.output, dcfg, args.text_field, args.id_field)
    out = Path(args.output)
    rows = [(k, summary[k]) for k in ("documents", "kept", "removed", "exact", "near")]
    rows += [("quarantined", f"{sum(summary['quarantine'].values())} {summary['quarantine'] or ''}"),
             ("removed.jsonl", out / "removed.jsonl"), ("kept", out / "kept")]
    _print_summary("dedup summary", rows)
    if summary["quarantine"]:
        print(f"WARNING: bad input records quarantined, see {out / 'quarantine.jsonl'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data_pipeline.manifest import read_manifest

    path, m = read_manifest(args.manifest)
    if "shards" not in m:        # the packed layout (parts.json per source): every part index and shard checked
        from data_pipeline import storage
        from data_pipeline.manifest import dataset_root
        from data_pipeline.mds_reader import ShardError, SourceShards

        bad = 0
        for name, src in m["sources"].items():
            try:
                SourceShards(storage.join(dataset_root(path), src["dir"])).verify()
            except ShardError as e:
                print(f"CORRUPT {name}: {e}")
                bad += 1
        print(f"{len(m['sources']) - bad}/{len(m['sources'])} sources OK")
        return 1 if bad else 0
    bad = 0
    for s in m["shards"]:
        f = path.parent / "shards" / s["file"]
        if not f.is_file():
            print(f"MISSING {f}")
            bad += 1
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if f.stat().st_size != s["bytes"] or digest != s["sha256"]:
            print(f"CORRUPT {f}")
            bad += 1
    print(f"{len(m['shards']) - bad}/{len(m['shards'])} shards OK")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole pipeline")
    r.add_argument("--mixture", required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--vocab-size", type=int, default=0)
    r.add_argument("--seq-len", type=int, default=0)
    r.add_argument("--tokenizer", default="", help="an existing tokenizer.json (skip training)")
    r.add_argument("--keep-work", action="store_true", help="keep the intermediate Parquet stages")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("dedup", help="ingest + exact/MinHash dedup of JSONL {id, text}")
    d.add_argument("--input", required=True)
    d.add_argument("--output", required=True)
    d.add_argument("--text-field", default="text")
    d.add_argument("--id-field", default="id")
    defaults = DedupConfig()
    for f in ("ngram", "bands", "rows", "seed"):
        d.add_argument(f"--{f}", type=int, default=getattr(defaults, f))
    d.add_argument("--no-exact", action="store_true")
    d.add_argument("--no-minhash", action="store_true")
    d.add_argument("--num-cpus", type=int, default=0)
    d.add_argument("--object-store-mb", type=int, default=300)
    d.set_defaults(fn=cmd_dedup)
    v = sub.add_parser("verify", help="check shard sizes and sha256 against the manifest")
    v.add_argument("--manifest", required=True)
    v.set_defaults(fn=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


