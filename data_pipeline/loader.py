"""The resumable, deterministic loader over the packed MDS shards of a manifest.

Global order. Sample k of the run (k = 0, 1, 2, ...) is a pure function of (manifest, weights, period,
shuffle_block, seed): :class:`~data_pipeline.mixture.Interleave` picks the source and its draw index,
:func:`~data_pipeline.mixture.source_order` the sample (fresh order per source epoch). Nothing depends on
the data-parallel layout.

Per rank. Optimizer step s consumes global samples [C_s, C_s + G) (C_s = samples consumed before it, G the
global batch). Rank r of D takes the contiguous slice [C_s + r G/D, C_s + (r+1) G/D) and yields it in
micro-batches of ``micro_batch`` rows: ``{"tokens": int64 [B, seq_len+1], "doc_ids": int32 [B, seq_len+1]}``.

State. ``state_dict()`` is ``{"consumed_samples": C, "micro_step": m, ...}`` (JSON). A loader resumed from it
yields exactly what the uninterrupted one would have yielded next.

World-size changes on resume. Because the global sequence does not depend on D, a checkpoint taken at an
optimizer-step boundary (micro_step 0, which is where the trainer saves) can be resumed with any D (and any
global batch G' with G' divisible by D): step s+1 consumes the same global samples [C, C + G') as an
uninterrupted run with that batch would, only sliced differently across ranks. Resuming a state saved in
the middle of a step (micro_step > 0) requires the same D, G and micro_batch, and raises otherwise. The
seed, mixture weights, period, shuffle block and manifest fingerprint must match (checked; a mismatch
raises rather than silently changing the data order).

Prefetch. With ``prefetch`` = k > 0 a background thread (:mod:`data_pipeline.prefetch`) builds the next k
micro-batches while the model computes, and for remote datasets with a ``cache_dir`` a second thread
downloads the shards of the k micro-batches after those into the cache. Batches are a pure function of the
cursor, so prefetch on or off yields identical batches, and the state counts only what was taken from the
loader (resume stays exact). A missing or corrupt shard raises at the micro-batch that needs it either way.

Remote datasets. ``manifest_or_dir`` may be an object-store URL (``s3://bucket/ds``); each rank then reads only
the parts and shards its samples live in (:class:`~data_pipeline.mds_reader.SourceShards`), through a local
``cache_dir`` (size-limited, shared by the ranks of a node) or straight into memory without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.config import LoaderConfig, load_mixture
from data_pipeline.manifest import dataset_root, read_manifest
from data_pipeline.mds_reader import DEFAULT_CACHE_LIMIT_BYTES, SourceShards
from data_pipeline.mixture import Interleave, source_order
from data_pipeline.pack import doc_ids_from_starts
from data_pipeline.prefetch import Prefetcher

STATE_VERSION = 1


class LoaderStateError(ValueError):
    pass


def mixture_weights(mixture: str | dict | None, manifest: dict[str, Any]) -> tuple[dict[str, float], LoaderConfig]:
    """Weights per source (normalised) from a mixture YAML path, a {source: weight} dict, or the manifest."""
    if isinstance(mixture, dict):
        weights, lcfg = {k: float(v) for k, v in mixture.items()}, LoaderConfig()
    elif mixture:
        cfg = load_mixture(mixture)
        weights, lcfg = {s.name: s.weight for s in cfg.sources}, cfg.loader
    else:
        weights = {n: s["weight"] for n, s in manifest["sources"].items()}
        known = {f.name for f in dataclasses.fields(LoaderConfig)}
        loader_section = (manifest.get("mixture") or {}).get("loader") or {}
        lcfg = LoaderConfig(**{k: v for k, v in loader_section.items() if k in known})
    missing = [n for n in weights if n not in manifest["sources"]]
    if missing:
        raise ValueError(
            f"mixture sources {missing} are not in the dataset (it has {list(manifest['sources'])}); "
            "rebuild the dataset for this mixture"
        )
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items() if w > 0}, lcfg


class Loader:
    """Iterator over this rank's micro-batches (infinite: sources repeat in fresh epochs)."""

    def __init__(
        self,
        manifest_or_dir: str | Path,
        mixture: str | dict | None,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        loader_cfg: LoaderConfig | None = None,
        prefetch: int = 0,
        cache_dir: str | Path | None = None,
        cache_limit_bytes: int | None = DEFAULT_CACHE_LIMIT_BYTES,
    ):
        self.manifest_path, m = read_manifest(manifest_or_dir)
        if seq_len != m["seq_len"]:
            raise ValueError(
                f"{self.manifest_path}: packed for seq_len {m['seq_len']}, asked for {seq_len}; "
                "build a dataset for this seq_len (ensure_dataset)"
            )
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by dp_size {dp_size}")
        if (global_batch // dp_size) % micro_batch:
            raise ValueError(
                f"global_batch/dp_size = {global_batch // dp_size} is not divisible by micro_batch {micro_batch}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        weights, lcfg = mixture_weights(mixture, m)
        self.cfg = loader_cfg or lcfg
        self.names = list(weights)
        self.weights = [weights[n] for n in self.names]
        self.seq_len, self.sample_len = seq_len, m["sample_len"]
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.fingerprint = m["fingerprint"]
        self.vocab_size = int(m.get("vocab_size", 0))
        root = dataset_root(self.manifest_path)
        dirs = [storage.join(root, m["sources"][n]["dir"]) for n in self.names]
        self.sources = [SourceShards(d, self.cfg.cache_shards, cache_dir, cache_limit_bytes) for d in dirs]
        for n, d, s in zip(self.names, dirs, self.sources):
            if len(s) == 0:
                raise ValueError(f"{storage.redact(d)}: source '{n}' has no samples")
        self.interleave = Interleave(self.weights, self.cfg.period)
        self.consumed = 0  # global samples consumed by completed optimizer steps
        self.micro = 0  # micro-batches of the current step already yielded by this rank
        self.prefetch = max(0, int(prefetch))
        self._prefetcher: Prefetcher | None = None

    @property
    def micro_steps(self) -> int:
        return self.global_batch // self.dp_size // self.micro_batch

    def _mixture_id(self) -> str:
        blob = json.dumps(
            {
                "names": self.names,
                "weights": [round(w, 12) for w in self.weights],
                "period": self.cfg.period,
                "block": self.cfg.shuffle_block,
            }
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (source index, sample index within the source)."""
        src, draw = self.interleave.locate(positions)
        idx = np.empty(len(src), dtype=np.int64)
        for s in np.unique(src):
            sel = src == s
            idx[sel] = source_order(draw[sel], len(self.sources[s]), self.cfg.shuffle_block, self.seed, int(s))
        return src, idx

    def samples(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The batch holding the global samples at ``positions`` (in order)."""
        src, idx = self.locate(np.asarray(positions, dtype=np.int64))
        tokens = np.empty((len(src), self.sample_len), dtype=np.int64)
        doc_ids = np.empty((len(src), self.sample_len), dtype=np.int32)
        for row, (s, i) in enumerate(zip(src, idx)):
            sample = self.sources[s][int(i)]
            tokens[row] = sample["tokens"]
            doc_ids[row] = doc_ids_from_starts(sample["doc_starts"], self.sample_len)
        return {"tokens": tokens, "doc_ids": doc_ids}

    def __iter__(self) -> Loader:
        return self

    def positions(self, cursor: tuple[int, int]) -> np.ndarray:
        """Global positions of this rank's micro-batch at cursor (consumed, micro)."""
        consumed, micro = cursor
        start = consumed + self.dp_rank * (self.global_batch // self.dp_size) + micro * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)

    def advance(self, cursor: tuple[int, int]) -> tuple[int, int]:
        """The cursor after taking the micro-batch at ``cursor``."""
        consumed, micro = cursor[0], cursor[1] + 1
        return (consumed + self.global_batch, 0) if micro == self.micro_steps else (consumed, micro)

    def fetch_ahead(self, cursor: tuple[int, int]) -> None:
        """Download (into the shard cache) the shards of the micro-batch at ``cursor``."""
        src, idx = self.locate(self.positions(cursor))
        for s in np.unique(src):
            self.sources[int(s)].fetch_ahead(idx[src == s])

    def __next__(self) -> dict[str, np.ndarray]:
        cursor = (self.consumed, self.micro)
        if self.prefetch:
            if self._prefetcher is None or self._prefetcher.stop.is_set():
                # the threads hold the loader weakly, so dropping the loader stops them (__del__ -> close)
                me = weakref.ref(self)
                remote = any(s.cache is not None for s in self.sources)
                self._prefetcher = Prefetcher(
                    cursor,
                    self.prefetch,
                    lambda c: _alive(me).samples(_alive(me).positions(c)),
                    lambda c: _alive(me).advance(c),
                    (lambda c: _alive(me).fetch_ahead(c)) if remote else None,
                )
            batch = self._prefetcher.get(cursor)
        else:
            batch = self.samples(self.positions(cursor))
        self.consumed, self.micro = self.advance(cursor)
        return batch

    def close(self) -> None:
        """Stop the prefetch threads (a later ``next`` starts them again)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "consumed_samples": int(self.consumed),
            "micro_step": int(self.micro),
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "mixture": self._mixture_id(),
            "dataset": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("mixture", self._mixture_id()), ("dataset", self.fingerprint)):
            if state[key] != mine:
                raise LoaderStateError(
                    f"loader state has {key}={state[key]!r}, this loader {mine!r}: resuming would "
                    "change the sample order; use the same seed, mixture and dataset"
                )
        if state["micro_step"] and (state["dp_size"], state["global_batch"], state["micro_batch"]) != (
            self.dp_size,
            self.global_batch,
            self.micro_batch,
        ):
            raise LoaderStateError(
                "loader state was saved in the middle of an optimizer step (micro_step "
                f"{state['micro_step']}); resume it with the same dp_size/global_batch/micro_batch "
                f"({state['dp_size']}/{state['global_batch']}/{state['micro_batch']}) or from a step boundary"
            )
        self.close()  # batches read ahead from the old position are dropped
        self.consumed = int(state["consumed_samples"])
        self.micro = int(state["micro_step"])


def _alive(ref: weakref.ref) -> Loader:
    """The loader behind a prefetch thread's weak reference; ReferenceError (which ends the thread quietly)
    once the loader is gone."""
    loader = ref()
    if loader is None:
        raise ReferenceError("the loader was dropped")
    return loader


def streaming_dataset(
    manifest_or_dir: str | Path,
    mixture: str | dict | None,
    seed: int,
    epoch_size: int,
    batch_size: int,
    shuffle: bool = True,
    cache_dir: str | None = None,
):
    """The mixture as mosaicml-streaming's ``StreamingDataset``: one ``Stream`` per part of every source, with
    ``proportion = w_source * samples_part / samples_source`` (so each source gets its weight).

    For runs that want streaming's own shuffling instead of the exact loader; local datasets only (streaming's
    remote download is configured by its own variables). Samples come back as ``{"tokens", "doc_starts"}``; use
    :func:`~data_pipeline.pack.doc_ids_from_starts`. Stale shared memory from killed runs is cleaned first (call
    this on every rank, before ``init_process_group``: the cleanup has a barrier when torch.distributed is
    initialised).
    """
    from data_pipeline.streaming_compat import import_streaming

    streaming = import_streaming()
    from streaming.base.util import clean_stale_shared_memory

    path, m = read_manifest(manifest_or_dir)
    if storage.is_remote(path):
        raise ValueError(
            f"{storage.redact(path)}: streaming_dataset reads local datasets; use the exact loader "
            "(build_loader) for object storage, or copy the dataset to local disk"
        )
    weights, _ = mixture_weights(mixture, m)
    clean_stale_shared_memory()
    streams = []
    for n, w in weights.items():
        src = SourceShards(storage.join(dataset_root(path), m["sources"][n]["dir"]))
        for p in range(src.num_parts):
            share = float(src.cum[p + 1] - src.cum[p]) / len(src)
            streams.append(streaming.Stream(local=src.part_url(p), proportion=w * share))
    return streaming.StreamingDataset(
        streams=streams,
        epoch_size=epoch_size,
        shuffle=shuffle,
        shuffle_seed=seed,
        batch_size=batch_size,
        num_canonical_nodes=1,
        allow_unsafe_types=False,
    )
