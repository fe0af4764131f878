"""Ingest: read one input file (local or object storage) into batches of documents and quarantine rows.

Each input file is one task of the pipeline's first stage (:mod:`data_pipeline.stages`); the driver only
lists the files. Supported inputs (see :class:`~data_pipeline.config.SourceInput`): JSONL (plain, ``.gz``,
``.zst``), Parquet, ``datasets`` directories written by ``save_to_disk`` and local data files read with
``datasets.load_dataset``; JSONL and Parquet may live on object storage (``s3://bucket/prefix/``, a glob, or
one object), read through :mod:`data_pipeline.storage`.

A batch is a dict of columns: ``id`` (the ``id_field`` value, else ``source/relative_file:line``), ``text``,
``loc`` (``file:line``), ``reason`` ("" for a document) and one column per ``metadata_fields`` entry (the
field's value as a string, "" when absent). Bad input never stops the job: each problem becomes a row with
a non-empty ``reason`` and its location, which the stage writes to the quarantine. Reasons:
``malformed_json``, ``invalid_utf8``, ``missing_text_field``, ``not_an_object``, ``empty_file``,
``truncated_gzip``, ``truncated_zstd``, ``unreadable_file``.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from data_pipeline import storage
from data_pipeline.config import SourceConfig

try:
    import orjson

    _loads, _JSONError = orjson.loads, orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is pinned
    import json

    _loads, _JSONError = json.loads, json.JSONDecodeError

log = logging.getLogger(__name__)

ROW_COLUMNS = ("id", "text", "loc", "reason")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".gz", ".zst")
BATCH_ROWS = 512
_STREAM_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)


class IngestError(ValueError):
    pass


def list_files(path: str, kind: str) -> list[str]:
    """Files of one source: a file, a directory / prefix (recursively) or a glob, local or on object
    storage, sorted for a stable order."""
    files = storage.list_files(path)
    if not files and not storage.exists(path):
        raise IngestError(
            f"{path}: input not found; give an existing file, directory, glob or s3:// prefix "
            "(object storage is configured by the AWS_* variables, AWS_ENDPOINT_URL for non-AWS)"
        )
    if kind == "jsonl":
        files = [f for f in files if f.endswith(JSONL_SUFFIXES)]
    elif kind == "parquet":
        files = [f for f in files if f.endswith(".parquet")]
    elif kind == "hf_files":
        if any(storage.is_remote(f) for f in files):
            raise IngestError(
                f"{path}: kind hf_files reads local files only; use kind jsonl or parquet for object storage"
            )
        files = [f for f in files if _hf_builder(f) is not None]
    if not files:
        raise IngestError(f"{path}: no {kind} files found (JSONL suffixes: {', '.join(JSONL_SUFFIXES)})")
    return files


def _hf_builder(path: str) -> str | None:
    for suffixes, builder in (
        ((".jsonl", ".json", ".jsonl.gz", ".json.gz"), "json"),
        ((".csv", ".csv.gz"), "csv"),
        ((".parquet",), "parquet"),
        ((".txt",), "text"),
    ):
        if path.endswith(suffixes):
            return builder
    return None


def _hf_disk_files(path: str) -> list[str]:
    """Arrow files of a ``save_to_disk`` directory (a Dataset or every split of a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:
        raise IngestError(
            f"{path}: datasets.load_from_disk failed ({e}); give a directory written by Dataset.save_to_disk"
        ) from e
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    return sorted(f["filename"] for d in parts for f in d.cache_files)


class _Rows:
    """Accumulates output rows and hands them out as column batches of at most BATCH_ROWS."""

    def __init__(self, source: str, base: str, metadata_fields: tuple[str, ...] = ()):
        self.source, self.base, self.meta = source, base, tuple(metadata_fields)
        self.columns = ROW_COLUMNS + tuple(f"meta_{m}" for m in self.meta)
        self.cols: dict[str, list[str]] = {c: [] for c in self.columns}

    def add(self, doc_id: str, text: str, loc: str, reason: str = "", record: dict | None = None) -> None:
        for c, v in zip(ROW_COLUMNS, (doc_id, text, loc, reason)):
            self.cols[c].append(v)
        for m in self.meta:
            v = record.get(m) if record else None
            self.cols[f"meta_{m}"].append("" if v is None else str(v))

    def bad(self, loc: str, reason: str, snippet: str = "") -> None:
        self.add("", snippet[:200], loc, reason)

    def full(self) -> bool:
        return len(self.cols["id"]) >= BATCH_ROWS

    def take(self) -> dict[str, np.ndarray]:
        out = {c: np.array(v, dtype=object) for c, v in self.cols.items()}
        self.cols = {c: [] for c in self.columns}
        return out

    def rel(self, path: str) -> str:
        if storage.is_remote(path) or storage.is_remote(self.base):
            return path[len(self.base) :].lstrip("/") if path.startswith(self.base) else path
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
    with storage.open_file(path, "rb") as fh:
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
        return gzip.GzipFile(fileobj=storage.open_file(path, "rb"), mode="rb"), "truncated_gzip"
    if path.endswith((".zst", ".zstd")):
        return contextlib.closing(_zstd_lines(path)), "truncated_zstd"
    return storage.open_file(path, "rb"), "unreadable_file"


def _read_jsonl(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    rel = rows.rel(path)
    if storage.size(path) == 0:
        rows.bad(rel, "empty_file")
        return
    fh, stream_error = _open_lines(path)
    line_no, any_line = 0, False
    try:
        with fh as stream:
            for raw in stream:
                line_no += 1
                any_line = True
                if not raw.strip():
                    continue
                try:
                    record = _loads(raw)
                except _JSONError as e:
                    loc = f"{rel}:{line_no}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as ue:
                        rows.bad(loc, "invalid_utf8", f"{ue}: " + raw.decode("utf-8", "replace"))
                    else:
                        rows.bad(loc, "malformed_json", f"{e}: {line}")
                else:
                    if not isinstance(record, dict):
                        rows.bad(f"{rel}:{line_no}", "not_an_object", raw.decode("utf-8", "replace"))
                    elif not isinstance(record.get(text_field), str):
                        rows.bad(
                            f"{rel}:{line_no}",
                            "missing_text_field",
                            f"no string field '{text_field}': " + raw.decode("utf-8", "replace"),
                        )
                    else:
                        rows.add(
                            _doc_id(rows, record, id_field, rel, line_no),
                            record[text_field],
                            f"{rel}:{line_no}",
                            "",
                            record,
                        )
                if rows.full():
                    yield rows.take()
    except _STREAM_ERRORS as e:
        rows.bad(f"{rel}:{line_no + 1}", stream_error, f"{type(e).__name__}: {e}")
    if not any_line:
        rows.bad(rel, "empty_file")


def _read_table_batches(
    batches: Iterator[Any], rel: str, rows: _Rows, text_field: str, id_field: str, names: list[str]
) -> Iterator[dict[str, np.ndarray]]:
    if text_field not in names:
        rows.bad(rel, "missing_text_field", f"no column '{text_field}'; columns: {names}")
        return
    n = 0
    meta = [m for m in rows.meta if m in names]
    for batch in batches:
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field in names else [None] * len(texts)
        metas = {m: batch.column(m).to_pylist() for m in meta}
        for k, (t, i) in enumerate(zip(texts, ids)):
            n += 1
            loc = f"{rel}:{n}"
            if not isinstance(t, str):
                rows.bad(loc, "missing_text_field", f"'{text_field}' is {type(t).__name__}")
            else:
                rows.add(
                    str(i) if i not in (None, "") else f"{rows.source}/{rel}:{n}",
                    t,
                    loc,
                    "",
                    {m: metas[m][k] for m in meta},
                )
            if rows.full():
                yield rows.take()
    if n == 0:
        rows.bad(rel, "empty_file")


def _read_parquet(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    rel = rows.rel(path)
    try:
        fh = storage.open_file(path, "rb")
        pf = pq.ParquetFile(fh)
    except Exception as e:  # noqa: BLE001
        rows.bad(rel, "unreadable_file", f"{type(e).__name__}: {e}")
        return
    with fh:
        names = pf.schema_arrow.names
        cols = [c for c in (text_field, id_field, *rows.meta) if c in names]
        yield from _read_table_batches(
            pf.iter_batches(batch_size=BATCH_ROWS, columns=cols or None), rel, rows, text_field, id_field, names
        )


def _read_hf_disk(path: str, rows: _Rows, text_field: str, id_field: str) -> Iterator[dict[str, np.ndarray]]:
    import datasets

    rel = rows.rel(path)
    ds = datasets.Dataset.from_file(path)
    table = ds.data.table
    yield from _read_table_batches(
        iter(table.to_batches(BATCH_ROWS)), rel, rows, text_field, id_field, table.column_names
    )


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
        yield from _read_table_batches(
            iter(table.to_batches(BATCH_ROWS)), rel, rows, text_field, id_field, table.column_names
        )


_READERS = {
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "hf_disk": _read_hf_disk,
    "hf_files": _read_hf_files,
    "embedded": _read_jsonl,
}


def read_file(
    path: str,
    source: str,
    base: str,
    kind: str,
    text_field: str = "text",
    id_field: str = "id",
    metadata_fields: tuple[str, ...] = (),
) -> Iterator[dict[str, np.ndarray]]:
    """Column batches (``ROW_COLUMNS`` + ``meta_<field>``) of one input file, in file order."""
    rows = _Rows(source, base, tuple(metadata_fields))
    yield from _READERS[kind](path, rows, text_field, id_field)
    if rows.cols["id"]:
        yield rows.take()


def file_table(sources: list[SourceConfig], embedded_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per input file (driver side: listing only, no reading), in source then file order."""
    from data_pipeline.embedded_corpus import write_embedded

    out = []
    for s_idx, src in enumerate(sources):
        inp = src.input
        if inp.kind == "embedded":
            if embedded_dir is None:
                raise IngestError("embedded sources need a directory to materialise into")
            path = str(write_embedded(inp.path, Path(embedded_dir)))
            files = list_files(path, "jsonl")
        elif inp.kind == "hf_disk":
            path = inp.path
            files = _hf_disk_files(path)
        else:
            path = inp.path
            files = list_files(path, inp.kind)
        if storage.is_remote(path):
            base = path if storage.isdir(path) or path.endswith("/") else path.rsplit("/", 1)[0]
            base = base.split("*", 1)[0].rsplit("/", 1)[0] if "*" in base else base
        else:
            base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(files[0]))
        for f_idx, f in enumerate(files):
            out.append(
                {
                    "path": f,
                    "source": src.name,
                    "source_index": s_idx,
                    "file_index": f_idx,
                    "base": base,
                    "kind": inp.kind,
                    "text_field": inp.text_field,
                    "id_field": inp.id_field,
                    "metadata_fields": list(getattr(inp, "metadata_fields", []) or []),
                }
            )
    return out
