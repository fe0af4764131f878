"""The pipeline's per-task functions: each reads its inputs, writes its outputs atomically, returns a summary.

They run as Ray tasks through :class:`~data_pipeline.runner.Runner` (one task per input file, or per group
of consecutive files for packing); none of them sees more than its own partition, and none of them moves
text between workers: dedup (:mod:`data_pipeline.dedup`) works on integer ids, and the removal is a filter
applied by :func:`tokens_task` to each partition in its own order.

Partition files (``<stage>/<name>/<key:010d>.<ext>``, key = :func:`~data_pipeline.doc_ids.partition_key`):

- ``docs``: Parquet ``doc_id`` uint64 (ascending), ``id``, ``text`` (normalised), ``loc``, ``lang``,
  ``nbytes`` (UTF-8 bytes as ingested), ``contaminated`` (decontamination in ``tag`` mode), ``meta_<field>``
  strings; ``quarantine/<key>.jsonl`` bad input.
- ``tokens``: ``.npz`` with ``train_tokens`` / ``val_tokens`` int32 (documents concatenated, no special
  tokens), ``train_lens`` / ``val_lens`` int32 (tokens per document) and ``train_langs`` / ``val_langs``.
- ``sample``: ``.jsonl`` texts drawn for the tokenizer (about ``sample_bytes`` over the whole corpus).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from data_pipeline import clean, storage
from data_pipeline.config import CleanConfig, PackConfig, SplitConfig, TokenizerConfig
from data_pipeline.doc_ids import make_doc_ids
from data_pipeline.ingest import read_file

log = logging.getLogger(__name__)

DOC_COLUMNS = ("doc_id", "id", "text", "loc", "lang", "nbytes")


def part_name(key: int, ext: str) -> str:
    return f"{key:010d}.{ext}"


# ------------------------------------------------------------------------------------------ ingest + clean
class _Checks:
    """Metadata filters and decontamination of one docs task (built once per worker process)."""

    def __init__(self, settings: dict[str, Any]):
        self.filter = None
        fcfg = settings.get("filters")
        if fcfg is not None:
            from data_pipeline.filters import MetadataFilter

            flt = MetadataFilter(fcfg)
            self.filter = flt if flt.active else None
        dcfg = settings.get("decontam")
        self.decontam = (
            _decontaminator(json.dumps(dataclasses.asdict(dcfg), sort_keys=True))
            if (dcfg is not None and dcfg.files)
            else None
        )
        self.min_matches = dcfg.min_matches if dcfg is not None else 1
        self.tag_only = dcfg is not None and dcfg.mode == "tag"

    def reason(self, text: str, meta: dict[str, str]) -> tuple[str, bool]:
        """(removal reason or "", contaminated) of one cleaned document."""
        if self.filter is not None:
            why = self.filter.reason(meta)
            if why:
                return why, False
        if self.decontam is not None and self.decontam.matches(text) >= self.min_matches:
            return ("", True) if self.tag_only else ("decontam", True)
        return "", False


@functools.lru_cache(maxsize=2)
def _decontaminator(dcfg_json: str):
    """One n-gram index per worker process and configuration (built from the evaluation files)."""
    from data_pipeline import decontam
    from data_pipeline.config import DecontamConfig

    return decontam.Decontaminator.from_config(DecontamConfig(**json.loads(dcfg_json)))


def docs_task(
    file: dict[str, Any],
    out_url: str,
    quarantine_url: str,
    clean_cfg: CleanConfig,
    languages: tuple[str, ...] = (),
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest and clean one input file into a docs partition; bad input into its quarantine file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = file["partition"]
    languages = tuple(languages)
    checks = _Checks(settings or {})
    meta_cols = [f"meta_{m}" for m in file.get("metadata_fields", [])]
    columns: dict[str, list] = {c: [] for c in (*DOC_COLUMNS, "contaminated", *meta_cols)}
    quarantine: list[str] = []
    reasons: dict[str, int] = {}
    bad: dict[str, int] = {}
    langs: dict[str, int] = {}
    row = ingested = in_bytes = kept_bytes = tagged = 0
    for batch in read_file(
        file["path"],
        file["source"],
        file["base"],
        file["kind"],
        file["text_field"],
        file["id_field"],
        tuple(file.get("metadata_fields", [])),
    ):
        for i in range(len(batch["id"])):
            reason = batch["reason"][i]
            if reason:
                bad[reason] = bad.get(reason, 0) + 1
                quarantine.append(
                    json.dumps(
                        {
                            "reason": reason,
                            "source": file["source"],
                            "location": batch["loc"][i],
                            "snippet": batch["text"][i],
                        },
                        ensure_ascii=False,
                    )
                )
                continue
            raw = batch["text"][i]
            nbytes = len(raw.encode("utf-8", "surrogatepass"))
            ingested += 1
            in_bytes += nbytes
            doc_row = row
            row += 1
            r = clean.clean_document(raw, clean_cfg, languages)
            text, why, lang, contaminated = r.text, r.reason, r.lang or "und", False
            if not why:
                why, contaminated = checks.reason(text, {c[5:]: batch[c][i] for c in meta_cols})
            if why:
                reasons[why] = reasons.get(why, 0) + 1
                continue
            langs[lang] = langs.get(lang, 0) + 1
            tagged += contaminated
            columns["contaminated"].append(contaminated)
            kept_bytes += len(text.encode("utf-8", "surrogatepass"))
            for c, v in (
                ("doc_id", doc_row),
                ("id", batch["id"][i]),
                ("text", text),
                ("loc", batch["loc"][i]),
                ("lang", lang),
                ("nbytes", nbytes),
            ):
                columns[c].append(v)
            for c in meta_cols:
                columns[c].append(batch[c][i])
    ids = make_doc_ids(key, np.asarray(columns["doc_id"], dtype=np.uint64))
    metadata = _metadata_summary(columns, meta_cols)
    table = pa.table(
        {
            "doc_id": pa.array(ids, pa.uint64()),
            "id": pa.array(columns["id"], pa.string()),
            "text": pa.array(columns["text"], pa.string()),
            "loc": pa.array(columns["loc"], pa.string()),
            "lang": pa.array(columns["lang"], pa.string()),
            "nbytes": pa.array(columns["nbytes"], pa.int64()),
            "contaminated": pa.array(columns["contaminated"], pa.bool_()),
            **{c: pa.array(columns[c], pa.string()) for c in meta_cols},
        }
    )
    with storage.staged_file(out_url, ".parquet") as local:
        pq.write_table(table, local, compression="zstd", row_group_size=4096)
    if quarantine:
        storage.write_bytes(quarantine_url, ("\n".join(quarantine) + "\n").encode("utf-8"))
    return {
        "documents": len(ids),
        "bytes": in_bytes,
        "ingested": ingested,
        "kept_bytes": kept_bytes,
        "quarantine": dict(sorted(bad.items())),
        "filtered": dict(sorted(reasons.items())),
        "languages": dict(sorted(langs.items())),
        "decontam_tagged": tagged,
        "metadata": metadata,
    }


TOP_DOMAINS = 20


def _metadata_summary(columns: dict[str, list], meta_cols: list[str]) -> dict[str, Any]:
    """Per metadata field of the kept documents: how many have it, and for URL fields the top domains."""
    from collections import Counter

    from data_pipeline.filters import split_url

    out: dict[str, Any] = {}
    for c in meta_cols:
        values = [v for v in columns[c] if v]
        entry: dict[str, Any] = {"present": len(values)}
        if values and all(v.startswith(("http://", "https://")) for v in values[:100]):
            hosts = Counter(split_url(v)[0] for v in values)
            entry["top_domains"] = dict(sorted(hosts.most_common(TOP_DOMAINS)))
        out[c[5:]] = entry
    return out


def read_docs(url: str, columns: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    with storage.open_file(url, "rb") as fh:
        table = pq.read_table(fh, columns=columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


# ------------------------------------------------------------------------------------------ split + removal
def _text_hashes(texts) -> np.ndarray:
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.uint64, count=len(texts)
    )


def held_out(texts, split: SplitConfig) -> np.ndarray:
    """bool per document: in the validation split (see :class:`~data_pipeline.config.SplitConfig`)."""
    h = _text_hashes(texts)
    val = h.astype(np.float64) / 2.0**64 < split.val_fraction
    k = min(split.min_val_docs_per_file, len(h))
    if k:
        val[np.argsort(h, kind="stable")[:k]] = True
    return val


def surviving(docs_url: str, removed_url: str | None, columns: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """The partition's documents minus the dedup removals (streamed filter, partition order kept)."""
    docs = read_docs(docs_url, ["doc_id", *columns])
    if not removed_url:
        return docs, 0
    from data_pipeline.dedup import removal_mask

    drop = removal_mask(docs["doc_id"], storage.load_array(removed_url))
    return {c: v[~drop] for c, v in docs.items()}, int(drop.sum())


# ------------------------------------------------------------------------------------------ tokenizer
def sample_task(
    docs_url: str, removed_url: str | None, out_url: str, fraction: float, split: SplitConfig
) -> dict[str, Any]:
    """Texts for tokenizer training: training-split documents with xxh64(text, seed 7) / 2^64 < fraction
    (a uniform sample over the corpus, not a prefix of its first files)."""
    docs, _ = surviving(docs_url, removed_url, ["text"])
    texts = docs["text"]
    val = held_out(texts, split)
    h = np.fromiter(
        (xxhash.xxh64_intdigest(t.encode("utf-8", "surrogatepass"), seed=7) for t in texts),
        dtype=np.uint64,
        count=len(texts),
    )
    pick = (~val) & (h.astype(np.float64) / 2.0**64 < fraction)
    chosen = [t for t, p in zip(texts, pick) if p]
    storage.write_bytes(out_url, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in chosen).encode())
    nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in chosen)
    return {"documents": len(chosen), "bytes": nbytes}


def train_tokenizer_task(sample_urls: list[str], out_url: str, cfg: TokenizerConfig) -> dict[str, Any]:
    from data_pipeline import tokenizer as tokenizer_mod

    def texts():
        for u in sample_urls:
            with storage.open_file(u, "rb") as f:
                for line in f:
                    yield json.loads(line)

    tok = tokenizer_mod.train_bpe(texts(), cfg)
    storage.write_bytes(out_url, tok.to_str().encode())
    return {"vocab": tok.get_vocab_size()}


# ------------------------------------------------------------------------------------------ tokenize
@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def tokens_task(
    docs_url: str, removed_url: str | None, tokenizer_url: str, out_url: str, split: SplitConfig
) -> dict[str, Any]:
    """Filter the partition's duplicates, split off the held-out documents, tokenize both."""
    docs, n_removed = surviving(docs_url, removed_url, ["text", "lang", "nbytes"])
    tok = _tokenizer(storage.read_bytes(tokenizer_url).decode())
    val = held_out(docs["text"], split)
    out: dict[str, np.ndarray] = {}
    summary: dict[str, Any] = {
        "documents": int(len(val)),
        "bytes": int(docs["nbytes"].sum()),
        "removed": n_removed,
        "languages": {},
    }
    for name, sel in (("train", ~val), ("val", val)):
        texts = [str(t) for t in docs["text"][sel]]
        enc = tok.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        lens = np.fromiter((len(e.ids) for e in enc), dtype=np.int32, count=len(enc))
        flat = np.fromiter((i for e in enc for i in e.ids), dtype=np.int32, count=int(lens.sum()))
        out[f"{name}_tokens"], out[f"{name}_lens"] = flat, lens
        out[f"{name}_langs"] = np.asarray(docs["lang"][sel], dtype=str) if len(lens) else np.zeros(0, "<U3")
        summary[f"{name}_documents"] = int(len(lens))
        summary[f"{name}_tokens"] = int(lens.sum())
        summary[f"{name}_bytes"] = int(docs["nbytes"][sel].sum())
    for lang, n in zip(*np.unique(out["train_langs"], return_counts=True)):
        summary["languages"][str(lang)] = [int(n), int(out["train_lens"][out["train_langs"] == lang].sum())]
    buf = io.BytesIO()
    np.savez(buf, **out)
    storage.write_bytes(out_url, buf.getvalue())
    return summary


# ------------------------------------------------------------------------------------------ pack
def pack_task(
    token_urls: list[str], split_name: str, out_url: str, cfg: PackConfig, eos: int, bos: int
) -> dict[str, Any]:
    """Pack the ``split_name`` documents of consecutive partitions into one MDS part directory."""
    from data_pipeline.pack import MDS_COLUMNS, pack_tokens
    from data_pipeline.streaming_compat import import_streaming

    streaming = import_streaming()
    docs: list[np.ndarray] = []
    for u in token_urls:
        with np.load(io.BytesIO(storage.read_bytes(u))) as z:
            flat, lens = z[f"{split_name}_tokens"], z[f"{split_name}_lens"]
        docs += np.split(flat, np.cumsum(lens)[:-1]) if len(lens) else []
    samples, starts, dropped = pack_tokens(docs, cfg.seq_len + 1, eos, bos if cfg.add_bos else None)
    n_tokens = int(sum(len(d) for d in docs)) + len(docs) * (1 + int(cfg.add_bos))
    shard_bytes = 0
    if samples.shape[0]:
        with storage.staged_dir(out_url) as local:
            with streaming.MDSWriter(
                out=local,
                columns=MDS_COLUMNS,
                compression=cfg.compression or None,
                hashes=["xxh64"],
                size_limit=cfg.shard_size_limit,
                exist_ok=True,
            ) as w:
                for row, st in zip(samples, starts):
                    w.write({"tokens": row, "doc_starts": st})
            shard_bytes = sum(f.stat().st_size for f in Path(local).iterdir() if f.name != "index.json")
    return {
        "documents": len(docs),
        "samples": int(samples.shape[0]),
        "tokens": n_tokens,
        "dropped_tokens": int(dropped),
        "bytes": shard_bytes,
    }
