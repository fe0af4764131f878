"""Write small datasets in the packed layout (data_pipeline.dataset_layout) for the loader tests: random
documents packed like data_pipeline.pack, cut into parts written with streaming's MDSWriter, parts.json per
source, and a manifest; locally or at an s3:// URL."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline import dataset_layout, pack, storage
from data_pipeline.manifest import MANIFEST_VERSION, write_manifest


def random_rows(rng: np.random.Generator, n_docs: int, token_range: tuple[int, int], seq_len: int):
    """(tokens, doc_starts) rows of ``n_docs`` random documents (3..40 tokens, ids in ``token_range``, EOS = 2)."""
    docs = [rng.integers(*token_range, size=int(rng.integers(3, 40))) for _ in range(n_docs)]
    samples, starts, dropped = pack.pack_tokens(docs, seq_len + 1, eos=2)
    return list(zip(samples, starts)), docs, dropped


def make_dataset(
    root: str | Path,
    sizes: dict[str, int],
    seed: int,
    seq_len: int = 16,
    samples_per_part: int = 37,
    size_limit: int = 1 << 12,
    vocab_size: int = 1000,
    fingerprint: str | None = None,
) -> Path | str:
    """A dataset with one source per entry of ``sizes`` (documents); source i uses token ids [100 i + 3, 100 i + 100)
    (``vocab_size`` > 1000: ids spread over the vocabulary instead). Returns the manifest path / URL."""
    rng = np.random.default_rng(seed)
    sources = {}
    for i, (name, n_docs) in enumerate(sizes.items()):
        lo, hi = (100 * i + 3, 100 * i + 100) if vocab_size <= 1000 else (3, vocab_size)
        rows, docs, dropped = random_rows(rng, n_docs, (lo, hi), seq_len)
        rel = f"shards/{name}"
        doc = dataset_layout.write_source(storage.join(root, rel), rows, samples_per_part, "zstd", size_limit)
        sources[name] = {
            "dir": rel,
            "weight": 1.0,
            "documents": n_docs,
            "tokens": int(sum(len(d) + 1 for d in docs)),
            "samples": doc["samples"],
            "parts": len(doc["parts"]),
            "dropped_tokens": dropped,
            "bytes": sum(p["bytes"] for p in doc["parts"]),
        }
    manifest = {
        "version": MANIFEST_VERSION,
        "name": "t",
        "fingerprint": fingerprint or f"fp{seed}",
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "vocab_size": vocab_size,
        "tokenizer": "tokenizer.json",
        "special_tokens": {"pad": 0, "bos": 1, "eos": 2},
        "sources": sources,
        "counts": {},
        "stages": [],
        "mixture": {"loader": {}},
    }
    return write_manifest(root, manifest)
