"""The fixed held-out batches the trainer evaluates: the first n samples of each source's validation split.

The data pipeline sets aside a deterministic held-out split per source and records it in ``manifest.json``::

    "validation": {"<source>": {"dir": "<path relative to the manifest's directory>",
                                "samples": n, "documents": d, "tokens": t}}

Each ``dir`` is an MDS source directory in the training sources' format (``tokens`` int32 [seq_len + 1],
``doc_starts``), read with :class:`~data_pipeline.mds_reader.SourceShards`. :func:`validation_batches` returns
the first ``samples_per_source`` samples of each split, in order: the same rows at every evaluation and under
every layout (the trainer splits them over data-parallel ranks itself), so the validation curve compares like
with like. A split with fewer samples gives all it has (logged).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data_pipeline import storage
from data_pipeline.manifest import ManifestError, dataset_root, read_manifest
from data_pipeline.mds_reader import SourceShards
from data_pipeline.pack import doc_ids_from_starts

log = logging.getLogger(__name__)


class NoValidationSplit(ManifestError):
    """The dataset was built without a held-out split (an older pipeline); the message names the manifest."""


def validation_sources(manifest_or_dir: str | Path) -> dict[str, dict]:
    """``manifest["validation"]`` (source -> {dir, samples, documents, tokens}); raises
    :class:`NoValidationSplit` naming the manifest when the dataset has none."""
    path, m = read_manifest(manifest_or_dir)
    split = m.get("validation")
    if not split:
        raise NoValidationSplit(
            f"{path}: the dataset has no validation split (no 'validation' key in the manifest); it was built by "
            f"an older data pipeline: rebuild it (delete {dataset_root(path)} and rerun, or `python -m data_pipeline run`)"
        )
    return split


def validation_batches(
    manifest_or_dir: str | Path, seq_len: int, samples_per_source: int, cache_shards: int = 4
) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {"tokens": int64 [n, seq_len + 1], "doc_ids": int32 [n, seq_len + 1]}}``: the first
    n = min(``samples_per_source``, split size) samples of each source's held-out split, in order.

    doc_ids[t] = #{s in doc_starts : s <= t} - 1 per sample (as the training loader builds them)."""
    path, m = read_manifest(manifest_or_dir)
    if int(m["seq_len"]) != seq_len:
        raise ValueError(
            f"{path}: packed for seq_len {m['seq_len']}, asked for {seq_len}; use the dataset "
            f"built for this sequence length"
        )
    if samples_per_source <= 0:
        raise ValueError(f"samples_per_source must be positive, got {samples_per_source}")
    sample_len = int(m["sample_len"])
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, entry in validation_sources(path).items():
        src_dir = storage.join(dataset_root(path), entry["dir"])
        shards = SourceShards(src_dir, cache_shards)
        n = min(samples_per_source, len(shards))
        if n == 0:
            raise NoValidationSplit(
                f"{path}: validation split of source '{name}' ({src_dir}) has no samples; "
                f"rebuild the dataset with a larger held-out fraction"
            )
        if n < samples_per_source:
            log.warning(
                "%s: validation split of '%s' has %d samples (< %d asked): evaluating all of them",
                path,
                name,
                n,
                samples_per_source,
            )
        tokens = np.empty((n, sample_len), dtype=np.int64)
        doc_ids = np.empty((n, sample_len), dtype=np.int32)
        for i in range(n):
            sample = shards[i]
            if len(sample["tokens"]) != sample_len:
                raise ManifestError(
                    f"{src_dir}: validation sample {i} has {len(sample['tokens'])} tokens, the "
                    f"manifest says {sample_len}; rebuild the dataset"
                )
            tokens[i] = sample["tokens"]
            doc_ids[i] = doc_ids_from_starts(sample["doc_starts"], sample_len)
        out[name] = {"tokens": tokens, "doc_ids": doc_ids}
    return out
