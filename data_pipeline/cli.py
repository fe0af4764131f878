"""Command line: ``python -m data_pipeline <command> ...``.

- ``run --mixture YAML --output DIR [--work WORK]``: the whole pipeline (ingest, clean, dedup, tokenizer,
  tokens, pack) into DIR (a local path or ``s3://bucket/prefix``); stage caches in WORK (default DIR/work).
  Rerunning the same command after a crash or a kill resumes: finished tasks are skipped.
- ``dedup --input PATH --output DIR``: ingest + dedup alone on JSONL ``{"id", "text"}``; writes ``DIR/kept/``
  (JSONL per input file), ``DIR/removed.jsonl`` (``{"id", "loc", "kept_doc"}`` per removed document),
  ``DIR/summary.json``. Resumable the same way.
- ``verify --manifest PATH``: re-check every shard of every source (training and held-out) against its part
  index (size, xxh64, decompression).

Ray: joins ``RAY_ADDRESS`` when set (``ray://host:10001`` or ``host:6379``), otherwise starts a local Ray
with the machine's CPUs and stops it at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_pipeline import storage
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
        path = run_pipeline(cfg, args.output, work_dir=args.work or None)
    m = storage.read_json(path)
    out = storage.join(args.output)
    c = m["counts"]
    rows = [
        ("manifest", path),
        ("report", storage.join(out, "report.md")),
        ("documents ingested", c["ingest"]["documents"]),
        ("quarantined", f"{c['ingest']['quarantined']} {c['quarantine'] or ''}"),
        ("filtered", f"{sum(c['clean'].values())} {c['clean'] or ''}"),
        ("duplicates", f"{c['dedup']['removed']} (exact {c['dedup']['exact']}, near {c['dedup']['near']})"),
        ("documents kept", c["kept"]),
        ("held out", c.get("validation", 0)),
    ]
    rows += [
        (f"tokens {n}", f"{s['tokens']} ({s['samples']} samples of {m['sample_len']})") for n, s in m["sources"].items()
    ]
    rows += [
        (
            f"stage {s['name']}",
            f"{s['seconds']:.1f} s, {s['tasks']} tasks ({s['skipped']} already done), "
            f"{s['docs_per_s']:.0f} docs/s, {s['mb_per_s']:.2f} MB/s",
        )
        for s in m["stages"]
    ]
    _print_summary("data pipeline summary", rows)
    if c["ingest"]["quarantined"]:
        print(f"WARNING: {c['ingest']['quarantined']} bad input records, see {storage.join(out, 'quarantine.jsonl')}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from data_pipeline.pipeline import run_dedup
    from data_pipeline.ray_session import ray_session

    dcfg = DedupConfig(
        exact=not args.no_exact,
        minhash=not args.no_minhash,
        ngram=args.ngram,
        bands=args.bands,
        rows=args.rows,
        seed=args.seed,
    )
    with ray_session(args.num_cpus, args.object_store_mb):
        summary = run_dedup(args.input, args.output, dcfg, args.text_field, args.id_field)
    out = args.output
    rows = [(k, summary[k]) for k in ("documents", "kept", "removed", "exact", "near", "seconds")]
    rows += [
        ("quarantined", f"{sum(summary['quarantine'].values())} {summary['quarantine'] or ''}"),
        ("removed.jsonl", storage.join(out, "removed.jsonl")),
        ("kept", storage.join(out, "kept")),
    ]
    _print_summary("dedup summary", rows)
    if summary["quarantine"]:
        print(f"WARNING: bad input records quarantined, see {storage.join(out, 'quarantine.jsonl')}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data_pipeline.manifest import dataset_root, read_manifest
    from data_pipeline.mds_reader import ShardError, SourceShards

    path, m = read_manifest(args.manifest)
    root = dataset_root(path)
    bad = checked = 0
    for split in ("sources", "validation"):
        for name, entry in m.get(split, {}).items():
            checked += 1
            try:
                SourceShards(storage.join(root, entry["dir"])).verify()
            except ShardError as e:
                print(f"CORRUPT {split}/{name}: {e}")
                bad += 1
    print(f"{checked - bad}/{checked} sources OK")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole pipeline")
    r.add_argument("--mixture", required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--vocab-size", type=int, default=0)
    r.add_argument("--seq-len", type=int, default=0)
    r.add_argument("--tokenizer", default="", help="an existing tokenizer.json (skip training)")
    r.add_argument("--work", default="", help="stage caches (default OUTPUT/work); keep it to resume or re-pack")
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
