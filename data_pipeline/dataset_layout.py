"""The on-disk (or in-bucket) layout of a packed dataset, and the writer of its parts.

::

    <dataset>/manifest.json                 "sources": {name: {"dir": "shards/<name>", "samples": N, "parts": P,
                                            "weight": w, ...}}; optionally "validation": {name: {"dir": "val/<name>",
                                            "samples": n, ...}}  (no per-shard list)
    <dataset>/shards/<name>/parts.json      {"version": 1, "samples": N,
                                             "parts": [{"name": "part-000000", "samples": 123, "bytes": 4567}, ...]}
                                            (parts in sample order: part p holds samples [sum_{q<p} n_q, ... + n_p))
    <dataset>/shards/<name>/part-000000/    one MDS dataset per pack task: index.json + shard.00000.mds.zstd ...
                                            (streaming's MDSWriter output, xxh64 hashes in the index)

``<dataset>`` is a local directory or an object-store URL (``s3://bucket/prefix``); everything here goes through
:mod:`data_pipeline.storage`. A part is written locally by ``MDSWriter`` and, for a URL, uploaded file by file
with its ``index.json`` last, so a part whose index is visible is complete. ``parts.json`` is written after
all its parts (by the driver), and ``manifest.json`` after every source: the manifest marks a finished
dataset. The reader is :class:`data_pipeline.mds_reader.SourceShards`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data_pipeline import storage
from data_pipeline.streaming_compat import import_streaming

PARTS_FILE = "parts.json"
PARTS_VERSION = 1
PART_INDEX = "index.json"
MDS_COLUMNS = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}


def part_name(i: int) -> str:
    """The name of the i-th part of a source (``part-000000``, ...): parts sort in sample order."""
    return f"part-{i:06d}"


def write_part(
    part_url: str | Path,
    samples: Iterable[tuple[np.ndarray, np.ndarray]],
    compression: str | None = "zstd",
    size_limit: int | str | None = 1 << 26,
    name: str | None = None,
) -> dict[str, Any]:
    """Write one part (an MDS dataset of ``(tokens, doc_starts)`` rows) at ``part_url``, local or remote.

    Returns its ``parts.json`` entry ``{"name", "samples", "bytes"}`` (bytes: sum of its shard files). For a
    URL the part is written into a local temporary directory, then uploaded (shards first, index.json last)."""
    streaming = import_streaming()
    name = name or storage.basename(part_url)
    remote = storage.is_remote(part_url)
    tmp = tempfile.mkdtemp(prefix="part-") if remote else None
    out = os.path.join(tmp, name) if remote else str(part_url)
    n = 0
    try:
        with streaming.MDSWriter(
            out=out,
            columns=MDS_COLUMNS,
            compression=compression or None,
            hashes=["xxh64"],
            size_limit=size_limit,
            exist_ok=True,
        ) as w:
            for tokens, starts in samples:
                w.write({"tokens": np.asarray(tokens, dtype=np.int32), "doc_starts": np.asarray(starts, np.int32)})
                n += 1
        index = storage.read_json(os.path.join(out, PART_INDEX))
        nbytes = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
        if remote:
            for s in index["shards"]:
                base = (s.get("zip_data") or s["raw_data"])["basename"]
                storage.upload_file(os.path.join(out, base), storage.join(part_url, base))
            storage.upload_file(os.path.join(out, PART_INDEX), storage.join(part_url, PART_INDEX))
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {"name": name, "samples": n, "bytes": int(nbytes)}


def write_parts_json(source_url: str | Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``<source>/parts.json`` for ``parts`` (entries of :func:`write_part`, in sample order; parts with no
    samples are left out). Returns the document written."""
    kept = [{"name": p["name"], "samples": int(p["samples"]), "bytes": int(p["bytes"])} for p in parts if p["samples"]]
    doc = {"version": PARTS_VERSION, "samples": sum(p["samples"] for p in kept), "parts": kept}
    storage.write_json(storage.join(source_url, PARTS_FILE), doc, indent=1)
    return doc


def write_source(
    source_url: str | Path,
    rows: list[tuple[np.ndarray, np.ndarray]],
    samples_per_part: int,
    compression: str | None = "zstd",
    size_limit: int | str | None = 1 << 26,
) -> dict[str, Any]:
    """All of one source: ``rows`` cut into parts of ``samples_per_part`` rows, then ``parts.json``."""
    if samples_per_part < 1:
        raise ValueError(f"samples_per_part={samples_per_part} must be >= 1")
    parts = [
        write_part(storage.join(source_url, part_name(i)), rows[a : a + samples_per_part], compression, size_limit)
        for i, a in enumerate(range(0, len(rows), samples_per_part))
    ]
    return write_parts_json(source_url, parts)
