"""Dedup without moving text: exact (content hash) and MinHash-LSH near duplicates over integer document ids.

Input: the partitions of the corpus, ``(key, url)`` = one Parquet file with columns ``doc_id`` (uint64,
ascending, unique, ``doc_id >> 28 == key``, see :mod:`data_pipeline.doc_ids`) and ``text``. Only the two
tasks that hash documents (``hash`` and ``sign``) read the text; every later step moves fixed-size integer
records. Each sub-step is one :meth:`Runner.run` under its own directory of ``stage_url``, so a rerun skips
every task that finished (completion records) and rewrites only what is missing.

Sub-steps (P partitions, R exact ranges, B bands of r rows with Q ranges each, C node buckets, G collect
groups of ``partitions_per_collect`` consecutive partitions):

1. ``hash`` (P tasks): content key ``xxh3_64(text bytes)`` per document; records (key, doc) sorted, split
   by key range ``(key >> 32) * R >> 32`` into ``hash/<range>/<partition>.npy``.
2. ``exact`` (R tasks): merge a range's files; in each group of equal keys every member except the smallest
   doc id gets the edge (member, group minimum). Writes the edges by member partition group
   (``exact/groups/<g>/<range>.npy``) and both directions by node bucket for the components
   (``exact/cc/<c>/<range>.npy``).
3. ``exact_collect`` (G tasks): per partition the sorted exact-removed ids (``exact_collect/<partition>.npy``).
4. ``sign`` (P tasks): the documents that are not exact duplicates are shingled and MinHashed
   (:meth:`MinHasher.signatures`, vectorised over the partition), b band keys each; records (band key, doc)
   split by band and key range ``(key >> 32) * Q >> 32``, sorted: ``sign/<band>-<range>/<partition>.npy``.
5. ``bands`` (B * Q tasks): merge one (band, range)'s files; every key shared by k > 1 documents gives the
   k - 1 star edges (member, least member); both directions by node bucket: ``bands/cc/<c>/<band>-<range>.npy``.
   A pair of near-identical documents meets in up to b bands: the components drop the repeated pairs.
6. ``cc`` (:mod:`data_pipeline.components`): one task (numpy union-find) up to ``cc_single_task_edges``
   candidate edges, else distributed large-star / small-star rounds of C tasks each. Result: (doc, component
   minimum) for every non-minimal node, by partition group.
7. ``collect`` (G tasks): ``removed/<partition:010d>.npy`` for every partition (empty when none): structured
   ``[('doc', '<u8'), ('kept', '<u8')]`` sorted by doc.

Survivor rule: the survivor of a duplicate cluster (a connected component of the exact and near-duplicate
edges) is its minimum doc id, i.e. its first document in input order (source, file, row); every other member
is removed with ``kept`` = that survivor. It does not depend on the number of tasks, ranges or buckets, on
the order in which tasks ran, or on Ray. Documents whose simplified text has no word are not MinHashed (only
exact dedup applies to them).

Filtering is the caller's streamed pass over each partition, in its own order: ``removal_mask(doc_ids,
removed)`` (binary search in the sorted removal list).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import numpy as np
import xxhash

from data_pipeline import storage
from data_pipeline.components import (
    EMPTY_PAIRS,
    both_directions,
    components_stage,
    load_pairs,
    write_buckets,
    write_by_range,
)
from data_pipeline.config import DedupConfig
from data_pipeline.doc_ids import ROW_BITS
from data_pipeline.minhash import MinHasher
from data_pipeline.runner import Runner, Task

log = logging.getLogger(__name__)

REMOVED_DTYPE = np.dtype([("doc", "<u8"), ("kept", "<u8")])
_SIGN_BATCH = 2048  # documents shingled and MinHashed together


class DedupInputError(ValueError):
    """A partition file that does not satisfy the input contract; the message names the file and the fix."""


def removal_mask(doc_ids: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """bool per ``doc_ids`` entry, in their order: True = remove (the id is in the sorted ``removed`` list,
    a ``removed/<partition>.npy`` array or a plain sorted uint64 array)."""
    ids = np.asarray(doc_ids, dtype=np.uint64)
    docs = removed["doc"] if removed.dtype.names else np.asarray(removed, dtype=np.uint64)
    if len(docs) == 0:
        return np.zeros(len(ids), dtype=bool)
    idx = np.minimum(np.searchsorted(docs, ids), len(docs) - 1)
    return docs[idx] == ids


def removed_url(stage_url: str, key: int) -> str:
    return storage.join(stage_url, "removed", f"{key:010d}.npy")


# ------------------------------------------------------------------------------------------------ reading


def _read_partition(url: str, key: int):
    """(doc_id uint64 array, text column as a pyarrow ChunkedArray) of one partition, validated."""
    import pyarrow.parquet as pq

    try:
        with storage.open_file(url) as f:
            table = pq.read_table(f, columns=["doc_id", "text"])
    except (KeyError, ValueError) as e:
        raise DedupInputError(f"{url}: needs columns doc_id (uint64) and text (string): {e}") from e
    doc = table.column("doc_id").to_numpy().astype(np.uint64, copy=False)
    if len(doc) and (np.any(doc[1:] <= doc[:-1])):
        raise DedupInputError(
            f"{url}: doc_id is not strictly ascending; write each partition sorted by doc_id "
            "with unique ids (data_pipeline.doc_ids.make_doc_ids)"
        )
    if len(doc) and (int(doc[0]) >> ROW_BITS != key or int(doc[-1]) >> ROW_BITS != key):
        raise DedupInputError(
            f"{url}: doc_id >> {ROW_BITS} must equal the partition key {key}; ids "
            "come from data_pipeline.doc_ids.make_doc_ids(key, rows)"
        )
    return doc, table.column("text")


def _utf8_views(text) -> tuple[list[memoryview], int]:
    """The UTF-8 bytes of every value of an Arrow string column, as zero-copy views (null = empty)."""
    import pyarrow as pa

    views: list[memoryview] = []
    nbytes = 0
    for chunk in text.chunks:
        if pa.types.is_string_view(chunk.type) or not (
            pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)
        ):
            chunk = chunk.cast(pa.large_string())
        bufs = chunk.buffers()
        off_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(bufs[1], dtype=off_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
        o = offsets.tolist()
        views.extend(data[o[i] : o[i + 1]] for i in range(len(chunk)))
        nbytes += o[-1] - o[0]
    return views, nbytes


def _text_bytes(text) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.binary_length(text)).as_py() or 0) if len(text) else 0


def _range_of(keys: np.ndarray, ranges: int) -> np.ndarray:
    """Range of each 64-bit key: ``(key >> 32) * ranges >> 32`` (monotone in the key)."""
    return ((keys >> np.uint64(32)) * np.uint64(ranges)) >> np.uint64(32)


def _save_ranges(rec: np.ndarray, ranges: int, name_of) -> None:
    """``rec`` (key, doc) sorted by key: one file per key range (every range written, maybe empty)."""
    cuts = np.searchsorted(_range_of(rec[:, 0], ranges), np.arange(ranges + 1, dtype=np.uint64))
    for q in range(ranges):
        storage.save_array(name_of(q), rec[cuts[q] : cuts[q + 1]])


def _star_edges(rec: np.ndarray) -> np.ndarray:
    """(key, doc) records -> (member, least member of its key) for every key shared by > 1 documents."""
    if len(rec) == 0:
        return EMPTY_PAIRS
    rec = rec[np.argsort(rec[:, 0], kind="stable")]
    key, doc = rec[:, 0], rec[:, 1]
    start = np.ones(len(rec), dtype=bool)
    start[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(start)
    least = np.minimum.reduceat(doc, starts)[np.cumsum(start) - 1]
    member = doc != least
    return np.stack([doc[member], least[member]], axis=1)


def _load_records(urls: list[str]) -> np.ndarray:
    return load_pairs(urls)


# ------------------------------------------------------------------------------------------------- tasks


def hash_task(url: str, key: int, out_dir: str, ranges: int) -> dict:
    doc, text = _read_partition(url, key)
    views, nbytes = _utf8_views(text)
    keys = np.fromiter((xxhash.xxh3_64_intdigest(v) for v in views), dtype=np.uint64, count=len(views))
    order = np.argsort(keys, kind="stable")  # docs stay ascending within a key
    rec = np.stack([keys[order], doc[order]], axis=1)
    _save_ranges(rec, ranges, lambda q: storage.join(out_dir, f"{q:04d}", f"{key:010d}.npy"))
    return {"documents": int(len(doc)), "bytes": int(nbytes)}


def exact_task(in_dir: str, rng: int, keys: list[int], out_dir: str, buckets: int, bounds: list[int]) -> dict:
    rec = _load_records([storage.join(in_dir, f"{rng:04d}", f"{k:010d}.npy") for k in keys])
    edges = _star_edges(rec)
    write_by_range(edges, bounds, storage.join(out_dir, "groups"), f"{rng:04d}")
    write_buckets(both_directions(edges), storage.join(out_dir, "cc"), f"{rng:04d}", buckets)
    return {"exact_removed": int(len(edges)), "records": int(len(rec))}


def collect_task(inputs: list[str], keys: list[int], out_dir: str) -> dict:
    """(doc, kept) records of a group of partitions -> one sorted removal list per partition."""
    rec = _load_records(inputs)
    rec = rec[np.argsort(rec[:, 0], kind="stable")] if len(rec) else rec
    if len(rec) > 1 and np.any(rec[1:, 0] == rec[:-1, 0]):
        raise RuntimeError(
            f"dedup collect: a document was assigned twice in {inputs[:3]}...; rerun the dedup "
            "after deleting its stage directory"
        )
    lo = np.searchsorted(rec[:, 0], np.asarray(keys, dtype=np.uint64) << np.uint64(ROW_BITS))
    hi = np.searchsorted(rec[:, 0], (np.asarray(keys, dtype=np.uint64) + np.uint64(1)) << np.uint64(ROW_BITS))
    for k, a, b in zip(keys, lo.tolist(), hi.tolist()):
        out = np.empty(b - a, dtype=REMOVED_DTYPE)
        out["doc"], out["kept"] = rec[a:b, 0], rec[a:b, 1]
        storage.save_array(storage.join(out_dir, f"{k:010d}.npy"), out)
    return {"removed": int(len(rec))}


@functools.lru_cache(maxsize=4)
def _hasher(ngram: int, bands: int, rows: int, seed: int, char_ngram: int) -> MinHasher:
    return MinHasher(ngram, bands, rows, seed, char_ngram=char_ngram)


def sign_task(
    url: str,
    key: int,
    skip_url: str,
    out_dir: str,
    ngram: int,
    bands: int,
    rows: int,
    seed: int,
    ranges: int,
    char_ngram: int = 5,
) -> dict:
    doc, text = _read_partition(url, key)
    todo = np.arange(len(doc))
    if skip_url:
        todo = todo[~removal_mask(doc, storage.load_array(skip_url))]
    texts = text.take(todo) if len(todo) < len(doc) else text  # Arrow; Python strings one batch at a time
    nbytes = _text_bytes(text)
    hasher = _hasher(ngram, bands, rows, seed, char_ngram)
    keys_parts, docs_parts = [], []
    t_sh = t_sig = 0.0
    for s in range(0, len(texts), _SIGN_BATCH):
        t0 = time.perf_counter()
        sh = [hasher.shingles(t or "") for t in texts.slice(s, _SIGN_BATCH).to_pylist()]
        t1 = time.perf_counter()
        has = np.fromiter((len(x) > 0 for x in sh), dtype=bool, count=len(sh))
        sigs = hasher.signatures([x for x, h in zip(sh, has) if h])
        keys_parts.append(hasher.band_keys_batch(sigs))
        docs_parts.append(doc[todo[s : s + _SIGN_BATCH]][has])
        t_sig += time.perf_counter() - t1
        t_sh += t1 - t0
    keys = np.concatenate(keys_parts) if keys_parts else np.zeros((0, bands), dtype=np.uint64)
    docs = np.concatenate(docs_parts) if docs_parts else np.zeros(0, dtype=np.uint64)
    for t in range(bands):
        order = np.argsort(keys[:, t], kind="stable")
        rec = np.stack([keys[order, t], docs[order]], axis=1)
        _save_ranges(rec, ranges, lambda q, t=t: storage.join(out_dir, f"{t:03d}-{q:03d}", f"{key:010d}.npy"))
    return {
        "documents": int(len(doc)),
        "bytes": int(nbytes),
        "signed": int(len(docs)),
        "_shingle_s": round(t_sh, 3),
        "_signature_s": round(t_sig, 3),
    }


def band_task(in_dir: str, band: int, rng: int, keys: list[int], out_dir: str, buckets: int) -> dict:
    rec = _load_records([storage.join(in_dir, f"{band:03d}-{rng:03d}", f"{k:010d}.npy") for k in keys])
    edges = _star_edges(rec)
    write_buckets(both_directions(edges), storage.join(out_dir, "cc"), f"{band:03d}-{rng:03d}", buckets)
    return {"edges": int(len(edges)), "records": int(len(rec))}


def count_task(url: str) -> dict:
    import pyarrow.parquet as pq

    with storage.open_file(url) as f:
        return {"documents": int(pq.ParquetFile(f).metadata.num_rows)}


# ------------------------------------------------------------------------------------------------ driver


def dedup_stage(
    runner: Runner, partitions: list[tuple[int, str]], stage_url: str, cfg: DedupConfig, cc_mode: str = ""
) -> dict:
    """Exact + MinHash dedup of ``partitions`` under ``stage_url``; writes ``removed/<key:010d>.npy`` for every
    partition key and returns the summary {documents, removed, exact, near, edges, largest_cluster, cc_mode,
    cc_rounds, tasks: {step: {tasks, skipped, seconds}}}. ``cc_mode`` = "single" / "distributed" forces the
    components' path (tests); empty = by the candidate edge count."""
    t0 = time.time()
    parts = sorted((int(k), str(u)) for k, u in partitions)
    keys = [k for k, _ in parts]
    if len(set(keys)) != len(keys):
        raise DedupInputError("dedup: partition keys are not unique; one key per input file")
    q_band = max(1, cfg.band_ranges)
    n_exact = cfg.exact_ranges or cfg.bands * q_band
    buckets = cfg.cc_partitions or cfg.bands * q_band
    per = max(1, cfg.partitions_per_collect)
    groups = [keys[i : i + per] for i in range(0, len(keys), per)] or [[]]
    bounds = [g[0] << ROW_BITS for g in groups[1:]]
    steps: dict[str, dict] = {}

    def run(step: str, fn, tasks: list[Task]) -> list[dict]:
        out = runner.run(f"dedup-{step}", storage.join(stage_url, step), fn, tasks)
        r = runner.runs[-1]
        steps[step] = {"tasks": r.tasks, "skipped": r.skipped, "seconds": round(r.seconds, 3)}
        return out

    documents = exact_removed = candidate = 0
    cc_inputs: list[list[str]] = [[] for _ in range(buckets)]
    skip_dir = ""
    if cfg.exact:
        d = storage.join(stage_url, "hash")
        sums = run(
            "hash",
            hash_task,
            [Task(f"{k:010d}", {"url": u, "key": k, "out_dir": d, "ranges": n_exact}) for k, u in parts],
        )
        documents = sum(s["documents"] for s in sums)
        d_ex = storage.join(stage_url, "exact")
        sums = run(
            "exact",
            exact_task,
            [
                Task(
                    f"{r:04d}",
                    {"in_dir": d, "rng": r, "keys": keys, "out_dir": d_ex, "buckets": buckets, "bounds": bounds},
                )
                for r in range(n_exact)
            ],
        )
        exact_removed = candidate = sum(s["exact_removed"] for s in sums)
        for c in range(buckets):
            cc_inputs[c] += [storage.join(d_ex, "cc", f"{c:05d}", f"{r:04d}.npy") for r in range(n_exact)]
        skip_dir = storage.join(stage_url, "exact_collect")
        run(
            "exact_collect",
            collect_task,
            [
                Task(
                    f"{g:05d}",
                    {
                        "inputs": [storage.join(d_ex, "groups", f"{g:05d}", f"{r:04d}.npy") for r in range(n_exact)],
                        "keys": ks,
                        "out_dir": skip_dir,
                    },
                )
                for g, ks in enumerate(groups)
            ],
        )
    if cfg.minhash:
        d = storage.join(stage_url, "sign")
        sums = run(
            "sign",
            sign_task,
            [
                Task(
                    f"{k:010d}",
                    {
                        "url": u,
                        "key": k,
                        "out_dir": d,
                        "ranges": q_band,
                        "ngram": cfg.ngram,
                        "bands": cfg.bands,
                        "rows": cfg.rows,
                        "seed": cfg.seed,
                        "char_ngram": cfg.char_ngram,
                        "skip_url": storage.join(skip_dir, f"{k:010d}.npy") if skip_dir else "",
                    },
                )
                for k, u in parts
            ],
        )
        documents = documents or sum(s["documents"] for s in sums)
        steps["sign"].update(
            shingle_s=round(sum(s.get("_shingle_s", 0.0) for s in sums), 3),
            signature_s=round(sum(s.get("_signature_s", 0.0) for s in sums), 3),
            signed=sum(s["signed"] for s in sums),
        )
        d_b = storage.join(stage_url, "bands")
        sums = run(
            "bands",
            band_task,
            [
                Task(
                    f"{t:03d}-{q:03d}",
                    {"in_dir": d, "band": t, "rng": q, "keys": keys, "out_dir": d_b, "buckets": buckets},
                )
                for t in range(cfg.bands)
                for q in range(q_band)
            ],
        )
        candidate += sum(s["edges"] for s in sums)
        for c in range(buckets):
            cc_inputs[c] += [
                storage.join(d_b, "cc", f"{c:05d}", f"{t:03d}-{q:03d}.npy")
                for t in range(cfg.bands)
                for q in range(q_band)
            ]
    if not (cfg.exact or cfg.minhash):
        documents = sum(
            s["documents"] for s in run("count", count_task, [Task(f"{k:010d}", {"url": u}) for k, u in parts])
        )
    cc = components_stage(
        runner,
        storage.join(stage_url, "cc"),
        cc_inputs,
        candidate,
        bounds,
        cfg.cc_single_task_edges,
        cfg.max_cc_rounds,
        force=cc_mode,
    )
    steps.update(cc.runs)
    run(
        "collect",
        collect_task,
        [
            Task(f"{g:05d}", {"inputs": cc.assign_files[g], "keys": ks, "out_dir": storage.join(stage_url, "removed")})
            for g, ks in enumerate(groups)
        ],
    )
    summary = {
        "documents": documents,
        "removed": cc.removed,
        "exact": exact_removed,
        "near": cc.removed - exact_removed,
        "edges": cc.edges,
        "candidate_edges": candidate,
        "largest_cluster": cc.largest_cluster,
        "cc_mode": cc.mode,
        "cc_rounds": cc.rounds,
        "seconds": round(time.time() - t0, 3),
        "tasks": steps,
        "config": dataclasses.asdict(cfg),
    }
    log.info(
        "dedup: %d of %d documents removed (%d exact, %d near), %d edges, largest cluster %d, %.1f s",
        cc.removed,
        documents,
        exact_removed,
        cc.removed - exact_removed,
        cc.edges,
        cc.largest_cluster,
        summary["seconds"],
    )
    return summary
