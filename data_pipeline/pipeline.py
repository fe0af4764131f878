"""The pipeline: ingest -> clean -> dedup -> tokenizer -> pack, each stage a Ray Data job over blocks.

Stage outputs are Parquet directories under ``<out>/work`` (distributed writes, read back lazily by the next
stage), so no stage pulls the corpus into the driver; the driver only lists files, sums per-block counts,
streams the quarantine/removal records into their JSONL files, and trains the tokenizer on a bounded sample.

Reproducible: the same inputs and mixture give byte-identical outputs (tokenizer, shards, indexes, quarantine
and removal lists, manifest except its ``created`` time and stage wall times), whatever the Python hash seed,
the task completion order or how Ray splits the data into blocks (which follows random samples in its sorts
and the cluster's CPU count). Each stage's output is a function of the documents alone: dedup leaves them in
(id, source, loc) order, each source's tokenizer sample is a prefix of that order, pack cuts each source
into consecutive runs of exactly ``docs_per_block`` documents (:func:`pack_blocks`), and the manifest's count
dicts are in key order. It needs Ray Data's ``preserve_order`` (set by
:func:`~data_pipeline.ray_session.configure_data_context`).

Layout of ``<out>``::

    manifest.json  report.md  report.png  tokenizer.json
    quarantine.jsonl   {reason, source, location, snippet}   bad input (ingest)
    removed.jsonl      {id, kept_id, source}                 duplicates (dedup)
    shards/<source>/index.json + part-*/shard.*.mds.zstd      MDS, one dataset per source
    work/{ingest,clean,dedup}/                                 Parquet (deleted unless keep_work)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_pipeline import clean, dedup, ingest, pack
from data_pipeline import tokenizer as tokenizer_mod
from data_pipeline.config import DedupConfig, MixtureConfig, SourceConfig, SourceInput
from data_pipeline.manifest import MANIFEST_VERSION, write_manifest, write_report

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """Wall time, documents and bytes per stage (documents/s and MB/s in the manifest and benchmark)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, seconds: float, documents: int, nbytes: int) -> None:
        s = max(seconds, 1e-9)
        self.rows.append({"name": name, "seconds": round(seconds, 3), "documents": int(documents),
                          "bytes": int(nbytes), "docs_per_s": documents / s, "mb_per_s": nbytes / 1e6 / s})
        log.info("stage %-9s %7.1f s  %8d docs  %8.2f MB  %8.0f docs/s  %6.2f MB/s", name, seconds, documents,
                 nbytes / 1e6, documents / s, nbytes / 1e6 / s)


def _block_counts(batch: pd.DataFrame) -> pd.DataFrame:
    nbytes = batch["nbytes"] if "nbytes" in batch else batch["text"].str.len()
    g = batch.assign(nbytes=nbytes, n=1).groupby(["source", "reason"], as_index=False)[["n", "nbytes"]].sum()
    return g


def count_by(ds) -> dict[tuple[str, str], tuple[int, int]]:
    """(source, reason) -> (documents, bytes), summed from per-block counts (no shuffle), in key order (the
    order the blocks report keys in depends on the block layout; the manifest's dicts must not)."""
    out: dict[tuple[str, str], list[int]] = {}
    for row in ds.map_batches(_block_counts, batch_format="pandas", batch_size=None).iter_rows():
        acc = out.setdefault((row["source"], row["reason"]), [0, 0])
        acc[0] += int(row["n"])
        acc[1] += int(row["nbytes"])
    return {k: (out[k][0], out[k][1]) for k in sorted(out)}


def stream_jsonl(ds, path: Path, columns: dict[str, str], sort_key: str | None = None) -> int:
    """Write rows of ``ds`` as JSONL (column -> output key), streamed batch by batch through the driver."""
    if sort_key:
        ds = ds.sort(sort_key)
    n = 0
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
            cols = [batch[c] for c in columns]
            for values in zip(*cols):
                f.write(json.dumps({k: str(v) for k, v in zip(columns.values(), values)}, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, path)
    return n


def _only(reason_kind: str):
    def fn(batch: pd.DataFrame) -> pd.DataFrame:
        r = batch["reason"]
        if reason_kind == "bad":
            keep = (r != "") & ~r.str.startswith("filter:")
        else:
            keep = r == ""
        return batch[keep]
    return fn


def ingest_stage(sources: list[SourceConfig], out: Path, stages: Stages) -> tuple[Path, dict[str, int]]:
    """Read every source into ``work/ingest``; write ``quarantine.jsonl``. Returns its per-reason counts."""
    import ray.data

    t0 = time.time()
    files = ingest.file_table(sources, out / "work" / "embedded")
    nbytes = sum(os.path.getsize(f["path"]) for f in files)
    target = out / "work" / "ingest"
    shutil.rmtree(target, ignore_errors=True)
    log.info("ingest: %d files, %.1f MB", len(files), nbytes / 1e6)
    (ray.data.from_items(files, override_num_blocks=len(files))
     .map_batches(ingest.read_files_batch, batch_size=1, batch_format="numpy")
     .write_parquet(str(target)))
    ds = ray.data.read_parquet(str(target))
    n_bad = stream_jsonl(ds.map_batches(_only("bad"), batch_format="pandas"), out / "quarantine.jsonl",
                         {"reason": "reason", "source": "source", "loc": "location", "text": "snippet"})
    counts = count_by(ds)
    quarantine: dict[str, int] = {}
    docs = 0
    for (_src, reason), (n, _) in counts.items():
        if reason:
            quarantine[reason] = quarantine.get(reason, 0) + n
        else:
            docs += n
    stages.add("ingest", time.time() - t0, docs, nbytes)
    if n_bad:
        log.warning("ingest: %d bad records quarantined in %s: %s", n_bad, out / "quarantine.jsonl", quarantine)
    return target, dict(sorted(quarantine.items()))


def clean_stage(ingested: Path, cfg: MixtureConfig, out: Path, stages: Stages) -> tuple[Path, dict[str, int]]:
    import ray.data

    t0 = time.time()
    target = out / "work" / "clean"
    shutil.rmtree(target, ignore_errors=True)
    (ray.data.read_parquet(str(ingested)).map_batches(_only("good"), batch_format="pandas")
     .map_batches(clean.clean_batch, fn_kwargs={"cfg": cfg.clean}, batch_format="numpy", batch_size=256)
     .write_parquet(str(target)))
    counts = count_by(ray.data.read_parquet(str(target)))
    removed: dict[str, int] = {}
    docs = nbytes = 0
    for (_src, reason), (n, b) in counts.items():
        docs += n
        nbytes += b
        if reason:
            key = reason.removeprefix("filter:")
            removed[key] = removed.get(key, 0) + n
    stages.add("clean", time.time() - t0, docs, nbytes)
    return target, dict(sorted(removed.items()))


def dedup_stage(docs, dcfg: DedupConfig, out: Path, stages: Stages, partition_by_source: bool = True
                ) -> tuple[Path, dict[str, int], Any]:
    t0 = time.time()
    result = dedup.dedup_documents(docs, dcfg)
    target = out / "work" / "dedup"
    shutil.rmtree(target, ignore_errors=True)
    if partition_by_source:
        result.kept.write_parquet(str(target), partition_cols=["source"])
    n_removed = stream_jsonl(result.removed, out / "removed.jsonl",
                             {"id": "id", "kept_id": "kept_id", "source": "source"}, sort_key="id")
    docs_in = result.stats["documents"]
    nbytes = int(result.kept.sum("nbytes") or 0) if result.kept.count() else 0
    stages.add("dedup", time.time() - t0, docs_in, nbytes)
    log.info("dedup: %d of %d documents removed (%d exact, %d near)", n_removed, docs_in,
             result.stats["exact"], result.stats["near"])
    return target, result.stats, result


def _source_ds(deduped: Path, name: str):
    import ray.data

    path = deduped / f"source={name}"
    if not path.is_dir():
        raise ValueError(f"source '{name}' has no documents left after cleaning and dedup; check its input "
                         f"and the clean filters (counts in {deduped.parent.parent / 'report.md'})")
    return ray.data.read_parquet(str(path))


def tokenizer_stage(cfg: MixtureConfig, deduped: Path, out: Path, stages: Stages, source_bytes: dict[str, int]):
    t0 = time.time()
    tcfg = cfg.tokenizer
    target = out / "tokenizer.json"
    if tcfg.path:
        tok = tokenizer_mod.load(tcfg.path)
        docs = 0
        nbytes = 0
    else:
        by_source = {s.name: _source_ds(deduped, s.name) for s in cfg.sources}
        texts = []
        nbytes = 0
        for t in tokenizer_mod.sample_texts(by_source, source_bytes, tcfg.sample_bytes):
            texts.append(t)
            nbytes += len(t.encode("utf-8", "surrogatepass"))
        tok = tokenizer_mod.train_bpe(texts, tcfg)
        docs = len(texts)
    tok.save(str(target))
    ids = tokenizer_mod.special_ids(tok, tcfg)
    stages.add("tokenizer", time.time() - t0, docs, nbytes)
    return target, tok, ids


def pack_blocks(ds, docs_per_block: int):
    """``ds`` cut into consecutive blocks of exactly ``docs_per_block`` rows (the last one shorter), in dataset
    order: a streaming split and merge of neighbouring blocks, no shuffle.

    ``map_batches(batch_size=docs_per_block)`` alone would cut a batch short at every end of an input block,
    and the dedup output's block boundaries come from the random boundary sample of Ray's sort and from the
    cluster's CPU count, so the packed samples (and the tokens dropped at each block's tail) would change
    from run to run."""
    return ds.repartition(target_num_rows_per_block=docs_per_block, strict=True)


def pack_stage(cfg: MixtureConfig, deduped: Path, tokenizer_path: Path, ids, out: Path, stages: Stages):
    t0 = time.time()
    shards_dir = out / "shards"
    shutil.rmtree(shards_dir, ignore_errors=True)
    tok_json = tokenizer_path.read_text()
    per_source: dict[str, dict[str, Any]] = {}
    shards: list[dict[str, Any]] = []
    docs_total = bytes_total = 0
    mapped = [pack_blocks(_source_ds(deduped, src.name), cfg.pack.docs_per_block).map_batches(
        pack.pack_block, batch_size=cfg.pack.docs_per_block, batch_format="numpy",
        fn_kwargs={"tokenizer_json": tok_json, "out_dir": str(shards_dir), "source": src.name, "cfg": cfg.pack,
                   "eos": ids.eos, "bos": ids.bos}) for src in cfg.sources]
    all_rows = (mapped[0].union(*mapped[1:]) if len(mapped) > 1 else mapped[0]).take_all()
    for src in cfg.sources:
        rows = [r for r in all_rows if r["source"] == src.name]     # block order within the source
        pack.merge_parts(shards_dir / src.name, [r["part"] for r in rows])
        files = pack.shard_files(shards_dir / src.name)
        shards += [{"source": src.name, **f} for f in files]
        stats = {k: int(sum(int(r[k]) for r in rows)) for k in ("docs", "samples", "tokens", "dropped_tokens", "bytes")}
        per_source[src.name] = {"dir": f"shards/{src.name}", "weight": src.weight,
                                "documents": stats["docs"], "tokens": stats["tokens"], "samples": stats["samples"],
                                "dropped_tokens": stats["dropped_tokens"], "bytes": stats["bytes"]}
        docs_total += stats["docs"]
        bytes_total += stats["bytes"]
    stages.add("pack", time.time() - t0, docs_total, bytes_total)
    total_w = sum(s["weight"] for s in per_source.values())
    for s in per_source.values():
        s["weight"] = s["weight"] / total_w
    return per_source, shards


def require_ordered_execution() -> None:
    """Fail unless Ray Data keeps block order (``preserve_order``): without it the stages' outputs, and so
    the shards, would follow task completion order."""
    import ray.data

    if not ray.data.DataContext.get_current().execution_options.preserve_order:
        raise RuntimeError("Ray Data's execution_options.preserve_order is off, so the dataset would depend on "
                           "task completion order; call data_pipeline.ray_session.configure_data_context() after "
                           "ray.init (ray_session does)")


def run_pipeline(cfg: MixtureConfig, out_dir: str | Path, keep_work: bool = False) -> Path:
    """Run every stage on ``cfg`` into ``out_dir``; returns the manifest path. Needs Ray initialised and
    :func:`~data_pipeline.ray_session.configure_data_context` applied."""
    require_ordered_execution()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    bar = tqdm(total=5, desc="data pipeline", unit="stage")
    ingested, quarantine = ingest_stage(cfg.sources, out, stages)
    bar.update()
    cleaned, filtered = clean_stage(ingested, cfg, out, stages)
    bar.update()
    import ray.data

    docs = ray.data.read_parquet(str(cleaned)).map_batches(_only("good"), batch_format="pandas")
    deduped, dstats, result = dedup_stage(docs, cfg.dedup, out, stages)
    source_bytes: dict[str, int] = {}
    for (src, _), (_, b) in count_by(result.kept.map_batches(lambda b: b.assign(reason=""),
                                                             batch_format="pandas")).items():
        source_bytes[src] = source_bytes.get(src, 0) + b
    bar.update()
    tok_path, tok, ids = tokenizer_stage(cfg, deduped, out, stages, source_bytes)
    bar.update()
    sources, shards = pack_stage(cfg, deduped, tok_path, ids, out, stages)
    bar.update()
    bar.close()
    ingested_docs = stages.rows[0]["documents"]
    manifest = {
        "version": MANIFEST_VERSION, "name": cfg.name, "fingerprint": cfg.fingerprint(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seq_len": cfg.pack.seq_len,
        "sample_len": cfg.pack.seq_len + 1, "vocab_size": cfg.tokenizer.vocab_size,
        "tokenizer_vocab": tok.get_vocab_size(), "tokenizer": "tokenizer.json",
        "special_tokens": {"pad": ids.pad, "bos": ids.bos, "eos": ids.eos},
        "sources": sources,
        "counts": {"ingest": {"documents": ingested_docs, "quarantined": sum(quarantine.values())},
                   "quarantine": quarantine, "clean": filtered, "dedup": dstats,
                   "kept": sum(s["documents"] for s in sources.values())},
        "stages": stages.rows, "shards": shards, "mixture": cfg.to_dict(),
    }
    path = write_manifest(out, manifest)
    write_report(out, manifest)
    if not keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    return path


def run_dedup(input_path: str, out_dir: str | Path, dcfg: DedupConfig, text_field: str = "text",
              id_field: str = "id") -> dict[str, Any]:
    """Ingest + dedup alone: ``out/kept/*.json`` (JSONL, {id, text}), ``out/removed.jsonl`` ({id, kept_id}),
    ``out/quarantine.jsonl``, ``out/summary.json``. Needs Ray initialised."""
    import ray.data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    src = SourceConfig(name="input", input=SourceInput(kind="jsonl", path=str(input_path), text_field=text_field,
                                                       id_field=id_field))
    ingested, quarantine = ingest_stage([src], out, stages)
    docs = (ray.data.read_parquet(str(ingested)).map_batches(_only("good"), batch_format="pandas")
            .map_batches(lambda b: b.assign(nbytes=b["text"].str.len().astype(np.int64)), batch_format="pandas"))
    _, dstats, result = dedup_stage(docs, dcfg, out, stages, partition_by_source=False)
    shutil.rmtree(out / "kept", ignore_errors=True)
    result.kept.select_columns(["id", "text"]).write_json(str(out / "kept"))
    shutil.rmtree(out / "work", ignore_errors=True)
    summary = {"documents": dstats["documents"], "kept": dstats["documents"] - dstats["removed"],
               "removed": dstats["removed"], "exact": dstats["exact"], "near": dstats["near"],
               "quarantine": quarantine, "stages": stages.rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
