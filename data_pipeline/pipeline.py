"""The pipeline: docs (ingest + clean) -> dedup -> tokenizer -> tokens (filter, split, tokenize) -> pack.

Every stage is a list of Ray tasks run by :class:`~data_pipeline.runner.Runner`, one per input file (pack:
one per group of consecutive files of a source), with the task functions of :mod:`data_pipeline.stages`
and :func:`data_pipeline.dedup.dedup_stage`. The driver lists the input files, launches tasks and adds up
their small summaries; it never holds documents, and no text crosses between workers.

Caching and resume. Each stage writes under ``<work>/<stage>-<key>/`` where the key hashes the stage's own
settings and the previous stage's key (:meth:`~data_pipeline.config.MixtureConfig.stage_settings`), and
each finished task leaves a completion record there. So:

- rerunning a killed build with the same command skips every finished task and ends byte-identical to an
  uninterrupted build (the outputs depend only on the data, never on timing or on the cluster);
- a new ``seq_len`` (the next stage of a long-context run) reruns only the pack stage; new mixture weights
  rerun nothing (mixing happens in the loader); new clean settings rerun everything after ingest.

Layout of a dataset directory ``<out>``::

    manifest.json  report.md  report.png  tokenizer.json  quarantine.jsonl
    shards/<source>/parts.json + part-NNNNNN/{index.json, shard.*.mds.zstd}   training split
    val/<source>/parts.json + part-NNNNNN/...                                held-out split
    _pack/<key>/_done/                                                       pack completion records
    work/  (unless ``work_dir`` is elsewhere)  docs-*/ dedup-*/ tokenizer-*/ tokens-*/ embedded/

``<out>`` and ``<work>`` may be local paths or object-store URLs (``s3://bucket/prefix``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.config import DedupConfig, MixtureConfig, SourceConfig, SourceInput, settings_key
from data_pipeline.doc_ids import partition_key
from data_pipeline.ingest import file_table
from data_pipeline.manifest import MANIFEST_VERSION, write_manifest, write_report
from data_pipeline.runner import Runner, Task
from data_pipeline.stages import docs_task, pack_task, part_name, sample_task, tokens_task, train_tokenizer_task

log = logging.getLogger(__name__)

PARTS = "parts.json"


def _embedded_dir(work: str) -> str:
    """Embedded corpora are written once into the work directory (uploaded when it is remote)."""
    if not storage.is_remote(work):
        return storage.join(work, "embedded")
    return tempfile.mkdtemp(prefix="dp-embedded-")


def list_inputs(cfg: MixtureConfig, work: str) -> list[dict[str, Any]]:
    files = file_table(cfg.sources, _embedded_dir(work))
    if storage.is_remote(work):  # embedded files live in a local temp dir: publish them for the workers
        for f in files:
            if f["kind"] == "embedded":
                url = storage.join(work, "embedded", f["source"], os.path.basename(f["path"]))
                storage.write_bytes(url, Path(f["path"]).read_bytes())
                f["path"], f["base"] = url, storage.join(work, "embedded", f["source"])
    for f in files:
        f["partition"] = partition_key(f["source_index"], f["file_index"])
    return files


def _merge_counts(rows: list[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        for k, v in r.get(key, {}).items():
            out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))


def _concat(urls: list[str], dest: str) -> int:
    """Stream the given files into ``dest`` in order (the quarantine of every partition)."""
    n = 0
    with storage.staged_file(dest) as local, open(local, "wb") as out:
        for u in urls:
            with storage.open_file(u, "rb") as f:
                for line in f:
                    out.write(line)
                    n += 1
    return n


class Build:
    """One run of the pipeline: the stage keys, directories and the runner's record of what ran."""

    def __init__(self, cfg: MixtureConfig, out: str, work: str | None, runner: Runner | None):
        self.cfg, self.out = cfg, str(out)
        self.work = str(work) if work else storage.join(self.out, "work")
        self.runner = runner or Runner()
        self.settings = cfg.stage_settings()
        self.dirs: dict[str, str] = {}  # stage -> its directory name under the work dir
        storage.makedirs(self.out)

    def stage_url(self, name: str, *keys: Any) -> tuple[str, str]:
        key = settings_key(list(keys))
        self.dirs[name] = f"{name}-{key}"
        return key, storage.join(self.work, self.dirs[name])

    # -------------------------------------------------------------------- stages
    def docs(self, files: list[dict[str, Any]]):
        settings = {k: getattr(self.cfg, k) for k in ("filters", "decontam") if hasattr(self.cfg, k)}
        # the file list, relative to each source's input (a moved corpus or work dir keeps its cache)
        listing = [
            (f["source"], f["path"][len(f["base"]) :] if f["path"].startswith(f["base"]) else f["path"]) for f in files
        ]
        # decontamination depends on the evaluation files' contents, not only on their names
        evals = [settings_key(storage.read_bytes(f).hex()) for f in self.cfg.decontam.files]
        key, url = self.stage_url("docs", self.settings["docs"], listing, evals)
        by_name = {s.name: s for s in self.cfg.sources}
        tasks = [
            Task(
                f"{f['partition']:010d}",
                {
                    "file": f,
                    "out_url": storage.join(url, "docs", part_name(f["partition"], "parquet")),
                    "quarantine_url": storage.join(url, "quarantine", part_name(f["partition"], "jsonl")),
                    "clean_cfg": self.cfg.clean,
                    "languages": tuple(getattr(by_name[f["source"]], "languages", []) or []),
                    "settings": settings,
                },
            )
            for f in files
        ]
        rows = self.runner.run("docs", url, docs_task, tasks)
        q = [
            storage.join(url, "quarantine", part_name(f["partition"], "jsonl"))
            for f, r in zip(files, rows)
            if r.get("quarantine")
        ]
        n_bad = _concat(q, storage.join(self.out, "quarantine.jsonl"))
        if n_bad:
            log.warning(
                "ingest: %d bad records quarantined in %s: %s",
                n_bad,
                storage.join(self.out, "quarantine.jsonl"),
                _merge_counts(rows, "quarantine"),
            )
        docs_urls = {f["partition"]: t.kwargs["out_url"] for f, t in zip(files, tasks)}
        return key, docs_urls, rows

    def dedup(self, docs_key: str, docs_urls: dict[int, str]) -> tuple[str, dict[int, str | None], dict]:
        d = self.cfg.dedup
        if not (d.exact or d.minhash):
            return docs_key, {k: None for k in docs_urls}, {"removed": 0, "exact": 0, "near": 0}
        from data_pipeline.config import DEDUP_PARALLELISM
        from data_pipeline.dedup import dedup_stage

        key = settings_key([docs_key, self.settings["dedup"]])  # what later stages depend on
        _, url = self.stage_url("dedup", key, {k: getattr(d, k) for k in DEDUP_PARALLELISM if hasattr(d, k)})
        stats = dedup_stage(self.runner, sorted(docs_urls.items()), url, d)
        self.dirs["dedup"] = storage.basename(url)
        return key, {k: storage.join(url, "removed", part_name(k, "npy")) for k in docs_urls}, stats

    def tokenizer(self, dedup_key: str, docs_urls, removed, docs_rows) -> tuple[str, str]:
        tcfg = self.cfg.tokenizer
        if tcfg.path:
            blob = storage.read_bytes(tcfg.path)
            key, url = self.stage_url("tokenizer", dedup_key, self.settings["tokenizer"], settings_key(blob.hex()))
            target = storage.join(url, "tokenizer.json")
            if not storage.exists(target):
                storage.write_bytes(target, blob)
            return key, target
        key, url = self.stage_url("tokenizer", dedup_key, self.settings["tokenizer"])
        total = sum(int(r.get("kept_bytes", 0)) for r in docs_rows) or 1
        fraction = min(1.0, tcfg.sample_bytes / total)
        samples = {k: storage.join(url, "sample", part_name(k, "jsonl")) for k in docs_urls}
        self.runner.run(
            "tokenizer-sample",
            storage.join(url, "sample"),
            sample_task,
            [
                Task(
                    f"{k:010d}",
                    {
                        "docs_url": docs_urls[k],
                        "removed_url": removed[k],
                        "out_url": samples[k],
                        "fraction": fraction,
                        "split": self.cfg.split,
                    },
                )
                for k in sorted(docs_urls)
            ],
        )
        target = storage.join(url, "tokenizer.json")
        self.runner.run(
            "tokenizer",
            url,
            train_tokenizer_task,
            [Task("train", {"sample_urls": [samples[k] for k in sorted(samples)], "out_url": target, "cfg": tcfg})],
        )
        return key, target

    def tokens(self, tok_key: str, tokenizer_url: str, docs_urls, removed):
        _, url = self.stage_url("tokens", tok_key)
        urls = {k: storage.join(url, "tokens", part_name(k, "npz")) for k in docs_urls}
        rows = self.runner.run(
            "tokens",
            url,
            tokens_task,
            [
                Task(
                    f"{k:010d}",
                    {
                        "docs_url": docs_urls[k],
                        "removed_url": removed[k],
                        "tokenizer_url": tokenizer_url,
                        "out_url": urls[k],
                        "split": self.cfg.split,
                    },
                )
                for k in sorted(docs_urls)
            ],
        )
        return urls, dict(zip(sorted(docs_urls), rows))

    def pack(self, tok_key: str, token_urls, token_rows, files, ids) -> tuple[str, dict, dict]:
        pcfg = self.cfg.pack
        pack_key = settings_key([tok_key, self.settings["pack"]])
        stage = storage.join(self.out, "_pack", pack_key)
        for old in storage.list_files(storage.join(self.out, "_pack")):
            if f"/_pack/{pack_key}/" not in old.replace(os.sep, "/"):  # other settings: start clean
                for d in ("shards", "val", "_pack"):
                    storage.remove(storage.join(self.out, d))
                break
        groups: list[tuple[str, str, list[int]]] = []  # (split, source, partitions)
        for split in ("train", "val"):
            for src in self.cfg.sources:
                keys = [f["partition"] for f in files if f["source"] == src.name]
                current: list[int] = []
                tokens = 0
                for k in keys:
                    current.append(k)
                    tokens += token_rows[k][f"{split}_tokens"]
                    if tokens >= pcfg.part_tokens:
                        groups.append((split, src.name, current))
                        current, tokens = [], 0
                if current:
                    groups.append((split, src.name, current))
        counters: dict[tuple[str, str], int] = {}
        tasks, meta = [], []
        for split, source, keys in groups:
            i = counters.get((split, source), 0)
            counters[(split, source)] = i + 1
            top = "shards" if split == "train" else "val"
            name = f"part-{i:06d}"
            tasks.append(
                Task(
                    f"{split}-{source}-{i:06d}",
                    {
                        "token_urls": [token_urls[k] for k in keys],
                        "split_name": split,
                        "out_url": storage.join(self.out, top, source, name),
                        "cfg": pcfg,
                        "eos": ids.eos,
                        "bos": ids.bos,
                    },
                )
            )
            meta.append((top, source, name))
        rows = self.runner.run(
            "pack",
            stage,
            pack_task,
            tasks,
            output_urls=(storage.join(self.out, "shards"), storage.join(self.out, "val")),
        )
        per: dict[tuple[str, str], dict[str, Any]] = {}
        for (top, source, name), r in zip(meta, rows):
            entry = per.setdefault(
                (top, source), {"parts": [], "documents": 0, "samples": 0, "tokens": 0, "dropped_tokens": 0, "bytes": 0}
            )
            if r["samples"]:
                entry["parts"].append({"name": name, "samples": r["samples"], "bytes": r["bytes"]})
            for k in ("documents", "samples", "tokens", "dropped_tokens", "bytes"):
                entry[k] += r[k]
        train, val = {}, {}
        total_w = sum(s.weight for s in self.cfg.sources)
        for (top, source), e in sorted(per.items()):
            storage.write_json(
                storage.join(self.out, top, source, PARTS), {"version": 1, "samples": e["samples"], "parts": e["parts"]}
            )
            row = {
                "dir": f"{top}/{source}",
                "documents": e["documents"],
                "tokens": e["tokens"],
                "samples": e["samples"],
                "parts": len(e["parts"]),
                "dropped_tokens": e["dropped_tokens"],
                "bytes": e["bytes"],
            }
            if top == "shards":
                weight = next(s.weight for s in self.cfg.sources if s.name == source) / total_w
                train[source] = {"weight": weight, **row}
            elif e["samples"]:
                val[source] = row
        for src in self.cfg.sources:
            if not train.get(src.name, {}).get("samples"):
                raise ValueError(
                    f"source '{src.name}' has no training samples after cleaning and dedup (fewer "
                    "tokens than one sample); check its input and the clean filters (counts in "
                    f"{storage.join(self.out, 'report.md')} of a smaller build, or the log above)"
                )
        order = [s.name for s in self.cfg.sources]
        return pack_key, {n: train[n] for n in order}, {n: val[n] for n in order if n in val}


def run_pipeline(
    cfg: MixtureConfig, out_dir: str | Path, work_dir: str | Path | None = None, runner: Runner | None = None
) -> str:
    """Run (or resume) every stage of ``cfg`` into ``out_dir``; returns the manifest's path/URL. Needs Ray
    initialised (:func:`~data_pipeline.ray_session.ray_session`) unless ``runner`` runs in-process."""
    from data_pipeline import tokenizer as tokenizer_mod

    t0 = time.time()
    b = Build(cfg, str(out_dir), str(work_dir) if work_dir else None, runner)
    files = list_inputs(cfg, b.work)
    log.info("pipeline: %d input files from %d sources -> %s", len(files), len(cfg.sources), b.out)
    docs_key, docs_urls, docs_rows = b.docs(files)
    dedup_key, removed, dstats = b.dedup(docs_key, docs_urls)
    tok_key, tok_url = b.tokenizer(dedup_key, docs_urls, removed, docs_rows)
    tok_blob = storage.read_bytes(tok_url)
    storage.write_bytes(storage.join(b.out, "tokenizer.json"), tok_blob)
    tok = tokenizer_mod.from_str(tok_blob.decode())
    ids = tokenizer_mod.special_ids(tok, cfg.tokenizer)
    token_urls, token_rows = b.tokens(tok_key, tok_url, docs_urls, removed)
    pack_key, sources, val = b.pack(tok_key, token_urls, token_rows, files, ids)
    languages: dict[str, dict[str, int]] = {}
    for r in token_rows.values():
        for lang, (n, t) in r.get("languages", {}).items():
            e = languages.setdefault(lang, {"documents": 0, "tokens": 0})
            e["documents"] += n
            e["tokens"] += t
    ingested = sum(r["ingested"] for r in docs_rows)
    per_source: dict[str, dict[str, Any]] = {}
    for f, r in zip(files, docs_rows):
        e = per_source.setdefault(f["source"], {"ingested": 0, "kept": 0, "decontam_removed": 0, "decontam_tagged": 0})
        e["ingested"] += r["ingested"]
        e["kept"] += r["documents"]
        e["decontam_removed"] += r["filtered"].get("decontam", 0)
        e["decontam_tagged"] += r.get("decontam_tagged", 0)
    quarantine = _merge_counts(docs_rows, "quarantine")
    manifest = {
        "version": MANIFEST_VERSION,
        "name": cfg.name,
        "fingerprint": pack_key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seq_len": cfg.pack.seq_len,
        "sample_len": cfg.pack.seq_len + 1,
        "vocab_size": cfg.tokenizer.vocab_size,
        "tokenizer_vocab": tok.get_vocab_size(),
        "tokenizer": "tokenizer.json",
        "special_tokens": {"pad": ids.pad, "bos": ids.bos, "eos": ids.eos},
        "sources": sources,
        "validation": val,
        "languages": {k: languages[k] for k in sorted(languages, key=lambda x: (-languages[x]["tokens"], x))},
        "counts": {
            "ingest": {"documents": ingested, "quarantined": sum(quarantine.values())},
            "quarantine": quarantine,
            "clean": _merge_counts(docs_rows, "filtered"),
            "dedup": {k: v for k, v in dstats.items() if isinstance(v, int)},
            "kept": sum(s["documents"] for s in sources.values()),
            "validation": sum(s["documents"] for s in val.values()),
            "per_source": per_source,
        },
        "metadata": _merge_metadata(docs_rows),
        "stages": [r.row() for r in b.runner.runs],
        "seconds": round(time.time() - t0, 3),
        "stage_keys": {"docs": docs_key, "dedup": dedup_key, "tokenizer": tok_key, "pack": pack_key},
        "stage_dirs": dict(sorted(b.dirs.items())),
        "mixture": cfg.to_dict(),
    }
    write_report(b.out, manifest)
    return write_manifest(b.out, manifest)


def _merge_metadata(rows: list[dict]) -> dict[str, Any]:
    from data_pipeline.stages import TOP_DOMAINS

    out: dict[str, Any] = {}
    for r in rows:
        for name, e in r.get("metadata", {}).items():
            acc = out.setdefault(name, {"present": 0})
            acc["present"] += e["present"]
            for host, n in e.get("top_domains", {}).items():
                acc.setdefault("top_domains", {})[host] = acc.get("top_domains", {}).get(host, 0) + n
    for acc in out.values():
        if "top_domains" in acc:
            top = sorted(acc["top_domains"].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_DOMAINS]
            acc["top_domains"] = dict(top)
    return out


def filter_task(docs_url: str, removed_url: str | None, kept_url: str, removed_out: str) -> dict[str, Any]:
    """The dedup command's output for one partition: kept documents ``{id, text}`` and removed ones
    ``{id, loc, kept_doc}`` (survivor's integer id), both JSONL in input order."""
    from data_pipeline.dedup import removal_mask
    from data_pipeline.stages import read_docs

    docs = read_docs(docs_url, ["doc_id", "id", "text", "loc", "nbytes"])
    drop = np.zeros(len(docs["doc_id"]), dtype=bool)
    survivor: dict[int, int] = {}
    if removed_url:
        arr = storage.load_array(removed_url)
        drop = removal_mask(docs["doc_id"], arr)
        survivor = dict(zip(arr["doc"].tolist(), arr["kept"].tolist()))
    kept = "".join(
        json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
        for i, t, d in zip(docs["id"], docs["text"], drop)
        if not d
    )
    gone = "".join(
        json.dumps({"id": i, "loc": loc, "kept_doc": survivor.get(int(doc), -1)}) + "\n"
        for i, loc, doc, d in zip(docs["id"], docs["loc"], docs["doc_id"], drop)
        if d
    )
    storage.write_bytes(kept_url, kept.encode("utf-8"))
    storage.write_bytes(removed_out, gone.encode("utf-8"))
    return {"documents": int(len(drop)), "bytes": int(docs["nbytes"].sum()), "removed": int(drop.sum())}


def run_dedup(
    input_path: str,
    out_dir: str | Path,
    dcfg: DedupConfig,
    text_field: str = "text",
    id_field: str = "id",
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Ingest + dedup alone (no cleaning): ``out/kept/<partition>.jsonl`` ({id, text}),
    ``out/removed.jsonl`` ({id, loc, kept_doc}), ``out/quarantine.jsonl``, ``out/summary.json``. Resumable
    like :func:`run_pipeline` (work under ``out/work``). Needs Ray initialised unless ``runner`` is given."""
    from data_pipeline.config import CleanConfig

    t0 = time.time()
    cfg = MixtureConfig(
        name="dedup",
        sources=[
            SourceConfig(
                name="input",
                input=SourceInput(kind="jsonl", path=str(input_path), text_field=text_field, id_field=id_field),
            )
        ],
        clean=CleanConfig(enabled=False, langid=False),
        dedup=dcfg,
    )
    b = Build(cfg, str(out_dir), None, runner)
    files = list_inputs(cfg, b.work)
    docs_key, docs_urls, docs_rows = b.docs(files)
    _, removed, dstats = b.dedup(docs_key, docs_urls)
    keys = sorted(docs_urls)
    kept = {k: storage.join(b.out, "kept", part_name(k, "jsonl")) for k in keys}
    gone = {k: storage.join(b.work, f"filter-{docs_key}", "removed", part_name(k, "jsonl")) for k in keys}
    rows = b.runner.run(
        "filter",
        storage.join(b.work, f"filter-{settings_key([docs_key, dcfg])}"),
        filter_task,
        [
            Task(
                f"{k:010d}",
                {"docs_url": docs_urls[k], "removed_url": removed[k], "kept_url": kept[k], "removed_out": gone[k]},
            )
            for k in keys
        ],
    )
    _concat([gone[k] for k in keys], storage.join(b.out, "removed.jsonl"))
    quarantine = _merge_counts(docs_rows, "quarantine")
    n = sum(r["documents"] for r in rows)
    n_removed = sum(r["removed"] for r in rows)
    summary = {
        "documents": n,
        "kept": n - n_removed,
        "removed": n_removed,
        "exact": int(dstats.get("exact", 0)),
        "near": int(dstats.get("near", 0)),
        "quarantine": quarantine,
        "stages": [r.row() for r in b.runner.runs],
        "seconds": round(time.time() - t0, 3),
    }
    storage.write_json(storage.join(b.out, "summary.json"), summary, indent=1)
    return summary
