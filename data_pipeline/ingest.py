"""Ingest: documents from local files into a Ray Dataset of ``{id, text, source, loc, reason}`` rows.

The driver only lists files; each file is read by a Ray task (``map_batches`` over a dataset of file paths),
which yields rows in bounded batches, so no process ever holds a corpus. Supported inputs
(see :class:`~data_pipeline.config.SourceInput`): JSONL (plain, ``.gz``, ``.zst``), Parquet, ``datasets``
directories written by ``save_to_disk`` and local data files read with ``datasets.load_dataset``.

Bad input never stops the job: each problem becomes a row with a non-empty ``reason`` and the location
``file:line`` (or the file alone), which the pipeline writes to ``quarantine.jsonl``. Reasons:
``malformed_json``, ``invalid_utf8``, ``missing_text_field``, ``not_an_object``, ``empty_file``,
``truncated_gzip``, ``truncated_zstd``, ``unreadable_file``.

Document id: the ``id_field`` value when present (stringified), else ``source/relative_file:line``; both are
stable across runs.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from data_pipeline.config import SourceConfig

log = logging.getLogger(__name__)

ROW_COLUMNS = ("id", "text", "source", "loc", "reason")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".gz", ".zst")
BATCH_ROWS = 512
_STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)


class IngestError(ValueError):
    pass


def list_files(path: str, kind: str) -> list[str]:
    """Files of one source: a file, a directory (recursively) or a glob, sorted for a stable order."""
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    elif os.path.isfile(path):
        files = [path]
    else:
        raise IngestError(f"{path}: input not found; give an existing file, directory or glob")
    if kind == "jsonl":
        files = [f for f in files if f.endswith(JSONL_SUFFIXES)]
    elif kind == "parquet":
        files = [f for f in files if f.endswith(".parquet")]
    elif kind == "hf_files":
        files = [f for f in files if _hf_builder(f) is not None]
    if not files:
        raise IngestError(f"{path}: no {kind} files found (JSONL suffixes: {', '.join(JSONL_SUFFIXES)})")
    return files


def _hf_builder(path: str) -> str | None:
    for suffixes, builder in (((".jsonl", ".json", ".jsonl.gz", ".json.gz"), "json"),
                              ((".csv", ".csv.gz"), "csv"), ((".parquet",), "parquet"), ((".txt",), "text")):
        if path.endswith(suffixes):
            return builder
    return None


def _hf_disk_files(path: str) -> list[str]:
    """Arrow files of a ``save_to_disk`` directory (a Dataset or every split of a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:
        raise IngestError(f"{path}: datasets.load_from_disk failed ({e}); give a directory written by "
                          "Dataset.save_to_disk") from e
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    return sorted(f["filename"] for d in parts for f in d.cache_files)


class _Rows:
    """Accumulates output rows and hands them out as column batches of at most BATCH_ROWS."""

    def __init__(self, source: str, base: str):
        self.source, self.base = source, base
        self.cols: dict[str, list[str]] = {c: [] for c in ROW_COLUMNS}

    def add(self, doc_id: str, text: str, loc: str, reason: str = "") -> None:
        for c, v in zip(ROW_COLUMNS, (doc_id, text, self.source, loc, reason)):
            self.cols[c].append(v)

    def bad(self, loc: str, reason: str, snippet: str = "") -> None:
        self.add("", snippet[:200], loc, reason)

    def full(self) -> bool:
        return len(self.cols["id"]) >= BATCH_ROWS

    def take(self) -> dict[str, np.ndarray]:
        out = {c: np.array(v, dtype=object) for c, v in self.cols.items()}
        self.cols = {c: [] for c in ROW_COLUMNS}
        return out

    def rel(self, path: str) -> str:
        try:
            return os.path.relpath(path, self.base)
        except ValueError:
            return path


def _doc_id(rows: _Rows, record: dict, id_field: str, rel: str, line: int) -> str:
    value = record.get(id_field) if id_field else None
    if value is None or value == "":
        return f"{rows.source}/{rel}:{line}"
    return str(value)


class TruncatedStream(EOFError):
    pass


def _zstd_lines(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file; raises TruncatedStream when the file ends inside a frame
    (zstandard's stream_reader returns a silent EOF there)."""
    with open(path, "rb") as fh:
        dobj, fed, pending = zstandard.ZstdDecompressor().decompressobj(), False, b""
        while data := fh.read(chunk):
            while data:
                out = dobj.decompress(data)
                fed, data = True, b""
                if dobj.eof:
                    data = dobj.unused_data
                    dobj, fed = zstandard.ZstdDecompressor().decompressobj(), False
                pending += out
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line + b"\n"
        if pending:
            yield pending
        if fed and not dobj.eof:
            raise TruncatedStream("zstd stream ended inside a frame")


def _open_lines(path: str) -> tuple[Any, str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb"), "truncated_gzip"
    if path.endswith((".zst", ".zstd")):
        return contextlib.closing(_zstd_lines(path)), "truncated_zstd"
    return open(path, "rb"), "unreadable_file"


def _read_jsonl(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    rel = rows.rel(path)
    if os.path.getsize(path) == 0:
        rows.bad(rel, "empty_file")
        return
    fh, stream_error = _open_lines(path)
    line_no, any_line = 0, False
    try:
        with fh as stream:
            for raw in stream:
                line_no += 1
                any_line = True
                loc = f"{rel}:{line_no}"
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.bad(loc, "invalid_utf8", f"{e}: " + raw.decode("utf-8", "replace"))
                else:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        rows.bad(loc, "malformed_json", f"{e.msg} at column {e.colno}: {line}")
                    else:
                        if not isinstance(record, dict):
                            rows.bad(loc, "not_an_object", line)
                        elif not isinstance(record.get(text_field), str):
                            rows.bad(loc, "missing_text_field", f"no string field '{text_field}': {line}")
                        else:
                            rows.add(_doc_id(rows, record, id_field, rel, line_no), record[text_field], loc)
                if rows.full():
                    yield rows.take()
    except _STREAM_ERRORS as e:
        rows.bad(f"{rel}:{line_no + 1}", stream_error, f"{type(e).__name__}: {e}")
    if not any_line:
        rows.bad(rel, "empty_file")


def _read_table_batches(batches: Iterator[Any], rel: str, rows: _Rows, text_field: str, id_field: str,
                        names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    if text_field not in names:
        rows.bad(rel, "missing_text_field", f"no column '{text_field}'; columns: {names}")
        return
    n = 0
    for batch in batches:
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field in names else [None] * len(texts)
        for t, i in zip(texts, ids):
            n += 1
            loc = f"{rel}:{n}"
            if not isinstance(t, str):
                rows.bad(loc, "missing_text_field", f"'{text_field}' is {type(t).__name__}")
            else:
                rows.add(str(i) if i not in (None, "") else f"{rows.source}/{rel}:{n}", t, loc)
            if rows.full():
                yield rows.take()
    if n == 0:
        rows.bad(rel, "empty_file")


def _read_parquet(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    rel = rows.rel(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001
        rows.bad(rel, "unreadable_file", f"{type(e).__name__}: {e}")
        return
    names = pf.schema_arrow.names
    cols = [c for c in (text_field, id_field) if c in names]
    yield from _read_table_batches(pf.iter_batches(batch_size=BATCH_ROWS, columns=cols or None), rel, rows,
                                   text_field, id_field, names)


def _read_hf_disk(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    import datasets

    rel = rows.rel(path)
    ds = datasets.Dataset.from_file(path)
    table = ds.data.table
    yield from _read_table_batches(iter(table.to_batches(BATCH_ROWS)), rel, rows, text_field, id_field,
                                   table.column_names)


def _read_hf_files(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    import tempfile

    import datasets

    rel = rows.rel(path)
    with tempfile.TemporaryDirectory(prefix="dp-hf-") as cache:
        try:
            ds = datasets.load_dataset(_hf_builder(path), data_files=[path], split="train", cache_dir=cache)
        except Exception as e:  # noqa: BLE001
            rows.bad(rel, "unreadable_file", f"datasets.load_dataset: {type(e).__name__}: {e}")
            return
        table = ds.data.table
        yield from _read_table_batches(iter(table.to_batches(BATCH_ROWS)), rel, rows, text_field, id_field,
                                       table.column_names)


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf_disk": _read_hf_disk,
            "hf_files": _read_hf_files, "embedded": _read_jsonl}


def read_files_batch(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Ray UDF: read every file named in the batch (columns path, source, base, kind, text_field, id_field)."""
    for i in range(len(batch["path"])):
        rows = _Rows(str(batch["source"][i]), str(batch["base"][i]))
        reader = _READERS[str(batch["kind"][i])]
        yield from reader(str(batch["path"][i]), rows, str(batch["text_field"][i]), str(batch["id_field"][i]))
        if rows.cols["id"]:
            yield rows.take()


def file_table(sources: list[SourceConfig], embedded_dir: Path | None = None) -> list[dict[str, str]]:
    """One row per input file (driver side: listing only, no reading)."""
    from data_pipeline.embedded_corpus import write_embedded

    out = []
    for src in sources:
        inp = src.input
        if inp.kind == "embedded":
            if embedded_dir is None:
                raise IngestError("embedded sources need a directory to materialise into")
            path = str(write_embedded(inp.path, embedded_dir))
            files = list_files(path, "jsonl")
        elif inp.kind == "hf_disk":
            path = inp.path
            files = _hf_disk_files(path)
        else:
            path = inp.path
            files = list_files(path, inp.kind)
        base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(files[0]))
        for f in files:
            out.append({"path": f, "source": src.name, "base": base, "kind": inp.kind,
                        "text_field": inp.text_field, "id_field": inp.id_field})
    return out


def read_sources(sources: list[SourceConfig], embedded_dir: Path | None = None):
    """A lazy Ray Dataset of document rows and quarantine rows (``reason`` != "")."""
    import ray.data

    files = file_table(sources, embedded_dir)
    log.info("ingest: %d files from %d sources", len(files), len(sources))
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        read_files_batch, batch_size=1, batch_format="numpy")
