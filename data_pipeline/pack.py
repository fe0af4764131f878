"""Pack: tokenize, separate documents with EOS, pack into fixed-length samples, write MDS shards.

Each Ray task takes a block of ``docs_per_block`` documents of one source and:

1. encodes them (``add_special_tokens=False``), optionally prepends BOS, appends EOS to each document;
2. concatenates the block into one stream and cuts it into samples of L = seq_len + 1 tokens; the tail
   shorter than L is dropped (counted as ``dropped_tokens``: at most L - 1 per block);
3. records, per sample, the offsets where documents start (``doc_starts``, always beginning with 0: a sample
   that starts inside a document gives that continuation document index 0);
4. writes the samples with ``MDSWriter`` (columns ``tokens: ndarray:int32``, ``doc_starts: ndarray:int32``,
   zstd, xxh64 hashes) into its own part directory ``<source>/part-<hash>/``.

The driver then merges the part indexes in block order into ``<source>/index.json`` (streaming's
``merge_index``), so each source is one MDS dataset that ``StreamingDataset`` or our loader can read.
On a cluster the output directory must be shared storage (NFS/Lustre); the tasks write in parallel.

Per sample, the loader rebuilds doc_ids[t] = #{s in doc_starts : s <= t} - 1 (non-decreasing from 0).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.config import PackConfig
from data_pipeline.streaming_compat import import_streaming

MDS_COLUMNS = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def pack_tokens(docs: list[np.ndarray], sample_len: int, eos: int, bos: int | None = None
                ) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Pack token arrays into [n, sample_len] samples. Returns (samples, doc_starts per sample, dropped)."""
    pieces, starts, pos = [], [], 0
    for d in docs:
        if bos is not None:
            pieces.append(np.array([bos], dtype=np.int32))
        pieces.append(np.asarray(d, dtype=np.int32))
        pieces.append(np.array([eos], dtype=np.int32))
        starts.append(pos)
        pos += len(d) + 1 + (bos is not None)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n = len(stream) // sample_len
    samples = stream[:n * sample_len].reshape(n, sample_len)
    starts_arr = np.asarray(starts, dtype=np.int64)
    per_sample: list[np.ndarray] = []
    if n:
        sample_of = starts_arr // sample_len
        offsets = (starts_arr % sample_len).astype(np.int32)
        bounds = np.searchsorted(sample_of, np.arange(n + 1))
        for s in range(n):
            off = offsets[bounds[s]:bounds[s + 1]]
            if len(off) == 0 or off[0] != 0:
                off = np.concatenate([np.zeros(1, dtype=np.int32), off])
            per_sample.append(off)
    return samples, per_sample, len(stream) - n * sample_len


def doc_ids_from_starts(doc_starts: np.ndarray, length: int) -> np.ndarray:
    """doc_ids[t] = #{s in doc_starts : s <= t} - 1, as int32 [length]."""
    marks = np.zeros(length, dtype=np.int32)
    marks[np.asarray(doc_starts, dtype=np.int64)] = 1
    return (np.cumsum(marks) - 1).astype(np.int32)


def pack_block(batch: dict[str, np.ndarray], tokenizer_json: str, out_dir: str, source: str,
               cfg: PackConfig, eos: int, bos: int) -> dict[str, Any]:
    """Ray UDF: tokenize + pack + write one MDS part; returns one metadata row."""
    streaming = import_streaming()
    tok = _tokenizer(tokenizer_json)
    texts = [str(t) for t in batch["text"]]
    encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
    docs = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
    samples, starts, dropped = pack_tokens(docs, cfg.seq_len + 1, eos, bos if cfg.add_bos else None)
    ids = batch["id"]
    name = "part-" + hashlib.sha1(f"{ids[0]}|{ids[-1]}|{len(ids)}".encode()).hexdigest()[:16]
    part_dir = Path(out_dir) / source / name
    if samples.shape[0]:
        with streaming.MDSWriter(out=str(part_dir), columns=MDS_COLUMNS, compression=cfg.compression or None,
                                 hashes=["xxh64"], size_limit=cfg.shard_size_limit, exist_ok=True) as w:
            for row, st in zip(samples, starts):
                w.write({"tokens": row, "doc_starts": st})
    n_tokens = int(sum(len(d) for d in docs)) + len(docs) * (1 + int(cfg.add_bos))
    return {"source": np.array([source]), "part": np.array([name if samples.shape[0] else ""]), "first_id": np.array([str(ids[0])]),
            "docs": np.array([len(docs)]), "samples": np.array([samples.shape[0]]),
            "tokens": np.array([n_tokens]), "dropped_tokens": np.array([dropped]),
            "bytes": np.array([sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)])}


def merge_parts(source_dir: Path, parts: list[str]) -> None:
    """Write ``source_dir/index.json`` listing the parts' shards in the given order."""
    streaming = import_streaming()
    from streaming.base.util import merge_index

    index_files = [str(source_dir / p / "index.json") for p in parts if p]
    if not index_files:
        raise ValueError(f"{source_dir}: no samples were packed; the source has fewer tokens than one sample")
    del streaming
    merge_index(index_files, str(source_dir), keep_local=True, download_timeout=60)


def shard_files(source_dir: Path) -> list[dict[str, Any]]:
    """The shard files named by ``source_dir/index.json``, with sizes and sha256 checksums."""
    import json

    index = json.loads((source_dir / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        info = shard.get("zip_data") or shard["raw_data"]
        path = source_dir / info["basename"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append({"file": os.path.relpath(path, source_dir.parent), "bytes": path.stat().st_size,
                    "sha256": h.hexdigest(), "samples": shard["samples"]})
    return out
