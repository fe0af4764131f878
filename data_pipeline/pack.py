"""Packing: documents separated by EOS, cut into fixed-length samples, written as MDS shards.

Each pack task (:func:`data_pipeline.stages.pack_task`) takes the tokenized documents of consecutive input
files of one source (about ``pack.part_tokens`` tokens) and:

1. optionally prepends BOS and appends EOS to each document;
2. concatenates them into one stream and cuts it into samples of L = seq_len + 1 tokens; the tail shorter
   than L is dropped (counted as ``dropped_tokens``: at most L - 1 per part);
3. records, per sample, the offsets where documents start (``doc_starts``, always beginning with 0: a sample
   that starts inside a document gives that continuation document index 0);
4. writes the samples with ``MDSWriter`` (columns ``tokens: ndarray:int32``, ``doc_starts: ndarray:int32``,
   zstd, xxh64 hashes) into its own part directory ``<source>/part-NNNNNN/`` (an MDS dataset of its own,
   readable by ``StreamingDataset`` too); ``<source>/parts.json`` lists the parts in order.

Per sample, the loader rebuilds doc_ids[t] = #{s in doc_starts : s <= t} - 1 (non-decreasing from 0).
"""

from __future__ import annotations

import numpy as np

MDS_COLUMNS = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}


def pack_tokens(
    docs: list[np.ndarray], sample_len: int, eos: int, bos: int | None = None
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
    samples = stream[: n * sample_len].reshape(n, sample_len)
    starts_arr = np.asarray(starts, dtype=np.int64)
    per_sample: list[np.ndarray] = []
    if n:
        sample_of = starts_arr // sample_len
        offsets = (starts_arr % sample_len).astype(np.int32)
        bounds = np.searchsorted(sample_of, np.arange(n + 1))
        for s in range(n):
            off = offsets[bounds[s] : bounds[s + 1]]
            if len(off) == 0 or off[0] != 0:
                off = np.concatenate([np.zeros(1, dtype=np.int32), off])
            per_sample.append(off)
    return samples, per_sample, len(stream) - n * sample_len


def doc_ids_from_starts(doc_starts: np.ndarray, length: int) -> np.ndarray:
    """doc_ids[t] = #{s in doc_starts : s <= t} - 1, as int32 [length]."""
    marks = np.zeros(length, dtype=np.int32)
    marks[np.asarray(doc_starts, dtype=np.int64)] = 1
    return (np.cumsum(marks) - 1).astype(np.int32)
