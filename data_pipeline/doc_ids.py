"""Compact integer document ids, assigned at ingest: (source, file, row) packed into one uint64.

    doc_id = source << 52 | file << 28 | row          (12 + 24 + 28 bits)

``source`` is the index of the source in the mixture, ``file`` the index of the input file in the source's
sorted file list, ``row`` the 0-based index of the document among the file's documents (bad lines are not
counted). A *partition* is one input file: ``partition = doc_id >> 28`` (source << 24 | file), so every
stage can find a document's partition from its id, and sorting ids sorts documents into input order
(source, file, row). Limits: 4,096 sources, 16.7 M files per source, 268 M documents per file.
"""

from __future__ import annotations

import numpy as np

SOURCE_BITS, FILE_BITS, ROW_BITS = 12, 24, 28
MAX_SOURCES, MAX_FILES, MAX_ROWS = 1 << SOURCE_BITS, 1 << FILE_BITS, 1 << ROW_BITS


class DocIdOverflow(ValueError):
    pass


def partition_key(source: int, file: int) -> int:
    """The partition (= input file) key ``source << 24 | file``."""
    if not 0 <= source < MAX_SOURCES:
        raise DocIdOverflow(f"source index {source} outside [0, {MAX_SOURCES}): at most {MAX_SOURCES} sources")
    if not 0 <= file < MAX_FILES:
        raise DocIdOverflow(f"file index {file} outside [0, {MAX_FILES}): split the source into several sources")
    return (source << FILE_BITS) | file


def make_doc_ids(partition: int, rows: np.ndarray) -> np.ndarray:
    """uint64 ids of ``rows`` (0-based document indexes) in ``partition``."""
    rows = np.asarray(rows, dtype=np.uint64)
    if len(rows) and int(rows.max()) >= MAX_ROWS:
        raise DocIdOverflow(f"partition {partition}: more than {MAX_ROWS} documents in one input file; split it")
    return (np.uint64(partition) << np.uint64(ROW_BITS)) | rows


def partition_of(doc_ids: np.ndarray) -> np.ndarray:
    return np.asarray(doc_ids, dtype=np.uint64) >> np.uint64(ROW_BITS)


def row_of(doc_ids: np.ndarray) -> np.ndarray:
    return np.asarray(doc_ids, dtype=np.uint64) & np.uint64(MAX_ROWS - 1)


def describe(doc_id: int) -> tuple[int, int, int]:
    """(source, file, row) of one id."""
    doc_id = int(doc_id)
    return doc_id >> (FILE_BITS + ROW_BITS), (doc_id >> ROW_BITS) & (MAX_FILES - 1), doc_id & (MAX_ROWS - 1)
