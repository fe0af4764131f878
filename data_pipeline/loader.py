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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.config import LoaderConfig, load_mixture
from data_pipeline.manifest import read_manifest
from data_pipeline.mds_reader import SourceShards
from data_pipeline.mixture import Interleave, source_order
from data_pipeline.pack import doc_ids_from_starts

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
        lcfg = LoaderConfig(**{k: v for k, v in manifest["mixture"].get("loader", {}).items() if k in known})
    missing = [n for n in weights if n not in manifest["sources"]]
    if missing:
        raise ValueError(f"mixture sources {missing} are not in the dataset (it has {list(manifest['sources'])}); "
                         "rebuild the dataset for this mixture")
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items() if w > 0}, lcfg


class Loader:
    """Iterator over this rank's micro-batches (infinite: sources repeat in fresh epochs)."""

    def __init__(self, manifest_or_dir: str | Path, mixture: str | dict | None, seq_len: int, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                 loader_cfg: LoaderConfig | None = None):
        self.manifest_path, m = read_manifest(manifest_or_dir)
        if seq_len != m["seq_len"]:
            raise ValueError(f"{self.manifest_path}: packed for seq_len {m['seq_len']}, asked for {seq_len}; "
                             "build a dataset for this seq_len (ensure_dataset)")
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by dp_size {dp_size}")
        if (global_batch // dp_size) % micro_batch:
            raise ValueError(f"global_batch/dp_size = {global_batch // dp_size} is not divisible by micro_batch "
                             f"{micro_batch}")
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
        root = self.manifest_path.parent
        self.sources = [SourceShards(root / m["sources"][n]["dir"], self.cfg.cache_shards) for n in self.names]
        for n, s in zip(self.names, self.sources):
            if len(s) == 0:
                raise ValueError(f"{root / m['sources'][n]['dir']}: source '{n}' has no samples")
        self.interleave = Interleave(self.weights, self.cfg.period)
        self.consumed = 0        # global samples consumed by completed optimizer steps
        self.micro = 0           # micro-batches of the current step already yielded by this rank

    @property
    def micro_steps(self) -> int:
        return self.global_batch // self.dp_size // self.micro_batch

    def _mixture_id(self) -> str:
        blob = json.dumps({"names": self.names, "weights": [round(w, 12) for w in self.weights],
                           "period": self.cfg.period, "block": self.cfg.shuffle_block})
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

    def __next__(self) -> dict[str, np.ndarray]:
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank + self.micro * self.micro_batch
        batch = self.samples(np.arange(start, start + self.micro_batch))
        self.micro += 1
        if self.micro == self.micro_steps:
            self.consumed += self.global_batch
            self.micro = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "consumed_samples": int(self.consumed), "micro_step": int(self.micro),
                "global_batch": self.global_batch, "micro_batch": self.micro_batch, "dp_size": self.dp_size,
                "seed": self.seed, "mixture": self._mixture_id(), "dataset": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("mixture", self._mixture_id()), ("dataset", self.fingerprint)):
            if state[key] != mine:
                raise LoaderStateError(f"loader state has {key}={state[key]!r}, this loader {mine!r}: resuming would "
                                       "change the sample order; use the same seed, mixture and dataset")
        if state["micro_step"] and (state["dp_size"], state["global_batch"], state["micro_batch"]) != (
                self.dp_size, self.global_batch, self.micro_batch):
            raise LoaderStateError(
                "loader state was saved in the middle of an optimizer step (micro_step "
                f"{state['micro_step']}); resume it with the same dp_size/global_batch/micro_batch "
                f"({state['dp_size']}/{state['global_batch']}/{state['micro_batch']}) or from a step boundary")
        self.consumed = int(state["consumed_samples"])
        self.micro = int(state["micro_step"])


def streaming_dataset(manifest_or_dir: str | Path, mixture: str | dict | None, seed: int, epoch_size: int,
                      batch_size: int, shuffle: bool = True, cache_dir: str | None = None):
    """The mixture as mosaicml-streaming's ``StreamingDataset`` of ``Stream(local=<source>, proportion=w)``.

    For runs that want streaming's remote/cache features instead of the exact loader. Samples come back as
    ``{"tokens", "doc_starts"}``; use :func:`~data_pipeline.pack.doc_ids_from_starts`. Stale shared memory
    from killed runs is cleaned first (call this on every rank, before ``init_process_group``: the cleanup
    has a barrier when torch.distributed is initialised, stack-notes §9).
    """
    from data_pipeline.streaming_compat import import_streaming

    streaming = import_streaming()
    from streaming.base.util import clean_stale_shared_memory

    path, m = read_manifest(manifest_or_dir)
    weights, _ = mixture_weights(mixture, m)
    clean_stale_shared_memory()
    streams = [streaming.Stream(local=str(path.parent / m["sources"][n]["dir"]), proportion=w)
               for n, w in weights.items()]
    return streaming.StreamingDataset(streams=streams, epoch_size=epoch_size, shuffle=shuffle, shuffle_seed=seed,
                                      batch_size=batch_size, num_canonical_nodes=1, allow_unsafe_types=False)
