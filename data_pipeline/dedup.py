"""Dedup: exact (content hash) and near-duplicate (MinHash LSH) removal as Ray Data operations.

1. ``bucket_batch`` (map): per document, one row (kind=0, bucket=content hash) for exact dedup and b rows
   (kind=1, bucket=band key) for MinHash LSH (see :mod:`data_pipeline.minhash`).
2. Group by bucket (a distributed sort); each bucket with k > 1 distinct ids gives k - 1 edges (id, min id): a star that
   connects the bucket's members.
3. :func:`~data_pipeline.components.connected_components` over all edges (exact and MinHash together),
   distributed: every component maps to its minimum id.
4. The survivor of each cluster is its minimum id (deterministic, independent of block order); every other
   member is removed with ``kept_id`` = the survivor, so no cluster loses all its members.
5. Anti-join by id (a distributed sort by id) drops the removed documents and tags them with their survivor;
   the kept documents come out in (id, source, loc) order, whatever the block layout.

Documents need unique ids; two documents that share an id are one node of the graph (counted as
``duplicate_ids`` in the stats).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from data_pipeline.components import connected_components, group_reduce
from data_pipeline.config import DedupConfig
from data_pipeline.minhash import MinHasher, content_key
from data_pipeline.ray_session import cluster_cpus

log = logging.getLogger(__name__)

DOC_COLUMNS = ("id", "text", "source", "nbytes", "loc")


@functools.lru_cache(maxsize=4)
def _hasher(ngram: int, bands: int, rows: int, seed: int, char_ngram: int) -> MinHasher:
    return MinHasher(ngram, bands, rows, seed, char_ngram=char_ngram)


def bucket_batch(batch: dict[str, np.ndarray], cfg: DedupConfig) -> dict[str, np.ndarray]:
    """Ray UDF: bucket rows {id, bucket, kind} of a batch of documents."""
    hasher = _hasher(cfg.ngram, cfg.bands, cfg.rows, cfg.seed, cfg.char_ngram)
    ids, buckets, kinds = [], [], []
    for doc_id, text in zip(batch["id"], batch["text"]):
        if cfg.exact:
            ids.append(doc_id)
            buckets.append(content_key(text))
            kinds.append(0)
        if cfg.minhash:
            sh = hasher.shingles(text)
            if len(sh):
                keys = hasher.band_keys(hasher.signature(sh))
                ids.extend([doc_id] * len(keys))
                buckets.extend(keys.tolist())
                kinds.extend([1] * len(keys))
    return {"id": np.array(ids, dtype=object), "bucket": np.array(buckets, dtype=np.int64),
            "kind": np.array(kinds, dtype=np.int8)}


def _bucket_edges(part: pd.DataFrame) -> pd.DataFrame:
    """Star edges (id, min id of its bucket) for every bucket with more than one distinct id."""
    part = part.drop_duplicates(["kind", "bucket", "id"])
    mins = part.groupby(["kind", "bucket"])["id"].transform("min")
    keep = part["id"].to_numpy() != mins.to_numpy()
    return pd.DataFrame({"u": part["id"].to_numpy()[keep], "v": mins.to_numpy()[keep],
                         "exact": (part["kind"].to_numpy()[keep] == 0).astype(np.int64)})


def _anti_join(part: pd.DataFrame) -> pd.DataFrame:
    """Rows of one id-partition: documents (kept_id == "") and removal markers (kept_id != "").
    Returns the documents in (id, source, loc) order, with kept_id set on the removed ones, and ``dup_id``
    counting repeated ids. The sort by id alone leaves documents that share an id in whatever order the
    shuffle merged them; (source, loc) is unique per ingested row, so this order is a function of the data."""
    marks = part[part["kept_id"] != ""].drop_duplicates("id").set_index("id")["kept_id"]
    docs = part[part["kept_id"] == ""].sort_values(["id", "source", "loc"], kind="stable")
    docs["kept_id"] = marks.reindex(docs["id"]).fillna("").to_numpy()
    docs["dup_id"] = docs.duplicated("id").astype(np.int64).to_numpy()
    return docs


@dataclass
class DedupResult:
    kept: Any            # Ray Dataset of documents (DOC_COLUMNS)
    removed: Any         # Ray Dataset {id, kept_id, source}
    stats: dict[str, int]


def dedup_documents(docs, cfg: DedupConfig) -> DedupResult:
    """``docs``: Ray Dataset with DOC_COLUMNS. Returns kept and removed documents (both materialised)."""
    import ray.data

    docs = docs.select_columns(list(DOC_COLUMNS)).materialize()
    min_blocks = cfg.min_blocks or cluster_cpus()
    if docs.num_blocks() < min_blocks:
        docs = docs.repartition(min_blocks).materialize()
    n_docs = docs.count()
    if n_docs == 0 or not (cfg.exact or cfg.minhash):
        empty = ray.data.from_pandas(pd.DataFrame({"id": [], "kept_id": [], "source": []}, dtype=object))
        return DedupResult(docs, empty, {"documents": n_docs, "removed": 0, "exact": 0, "near": 0,
                                         "edges": 0, "duplicate_ids": 0})
    buckets = docs.map_batches(bucket_batch, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=256)
    edges = group_reduce(buckets, "bucket", _bucket_edges).materialize()
    n_edges = edges.count()
    exact_edges = int(edges.sum("exact") or 0) if n_edges else 0
    assignment = connected_components(edges.select_columns(["u", "v"]), cfg.max_cc_rounds)

    def as_docs(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(kept_id="")

    def as_marks(batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"id": batch["id"], "text": "", "source": "", "nbytes": np.int64(0), "loc": "",
                             "kept_id": batch["kept_id"]})

    joined = group_reduce(docs.map_batches(as_docs, batch_format="pandas")
                          .union(assignment.map_batches(as_marks, batch_format="pandas")),
                          "id", _anti_join).materialize()
    kept = joined.map_batches(lambda b: b.loc[b["kept_id"] == "", list(DOC_COLUMNS)],
                              batch_format="pandas").materialize()
    removed = joined.map_batches(lambda b: b.loc[b["kept_id"] != "", ["id", "kept_id", "source"]],
                                 batch_format="pandas").materialize()
    n_removed = removed.count()
    dup_ids = int(joined.sum("dup_id") or 0)
    stats = {"documents": n_docs, "removed": n_removed, "exact": min(exact_edges, n_removed),
             "near": n_removed - min(exact_edges, n_removed), "edges": n_edges, "duplicate_ids": dup_ids}
    if dup_ids:
        log.warning("dedup: %d documents share an id with another document; ids must be unique", dup_ids)
    return DedupResult(kept, removed, stats)
