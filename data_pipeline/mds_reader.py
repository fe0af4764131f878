"""Random access to the samples of one source: ``<source>/parts.json`` + one MDS dataset per part.

Layout (:mod:`data_pipeline.dataset_layout`): ``parts.json`` lists the parts in sample order with their sample
counts; ``<part>/index.json`` lists the part's MDS shards (sizes, xxh64). ``<source>`` is a local directory or
an object-store URL (``s3://...``, through :mod:`data_pipeline.storage`).

Lazy and bounded. Construction reads only ``parts.json`` and keeps O(#parts) integers (the cumulative sample
counts; part names only when they are not the canonical ``part-%06d``). A part's ``index.json`` is read when a
sample in it is first read (or fetched ahead), and a shard file when a sample in it is first read, so a
trainer rank opens only the parts and shards its samples live in. Sample i lives in part
p = max{p : cum[p] <= i} (cum[p] = samples of parts before p), and within it in the shard found the same way
from the part's index.

Remote sources. With ``cache_dir`` shards are downloaded into that local directory (:class:`ShardCache`:
atomic files, a size limit with LRU eviction of whole shard files, safe with several ranks sharing it);
without, each shard is read into memory with fsspec. Either way no shared memory is used, so the ``/dev/shm``
leftovers of killed runs cannot affect it.

A source directory written before ``parts.json`` existed (one merged ``index.json``) is read as a single part.

Checks. Each shard is checked when first loaded: a missing file, a size or xxh64 mismatch against the part's
``index.json``, a failed decompression, or a header sample count that disagrees with the index raises
:class:`ShardError` naming the shard (a cached copy that fails is dropped and fetched once more first). A
missing or corrupt ``parts.json`` / ``index.json``, or counts that disagree between them, raise it too.
Decompressed shards are kept in a small in-memory LRU (``cache_shards`` per source).

Raw MDS shard layout: uint32 n, uint32 offsets[n + 1] (from the file start), then the samples; a sample is
decoded with streaming's own ``MDSReader.decode_sample``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data_pipeline import storage
from data_pipeline.dataset_layout import PART_INDEX, PARTS_FILE, PARTS_VERSION, part_name
from data_pipeline.shard_cache import ShardCache
from data_pipeline.streaming_compat import import_streaming

log = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT_BYTES = 64 << 30
REBUILD = "rebuild the dataset (python -m data_pipeline run) or re-upload it"


class ShardError(RuntimeError):
    """A missing or corrupt MDS shard, part index or parts list; the message names the file and the fix."""


@dataclass
class _Part:
    url: str
    shards: list[dict[str, Any]]
    readers: list[Any]
    cum: np.ndarray  # int64 [n_shards + 1]


class SourceShards:
    def __init__(
        self,
        source_dir: str | Path,
        cache_shards: int = 16,
        cache_dir: str | Path | None = None,
        cache_limit_bytes: int | None = DEFAULT_CACHE_LIMIT_BYTES,
    ):
        import_streaming()
        self.dir = str(source_dir)
        self.remote = storage.is_remote(self.dir)
        self.parts_url = storage.join(self.dir, PARTS_FILE)
        try:
            doc = storage.read_json(self.parts_url)
        except storage.ObjectNotFound:
            doc = self._single_index_parts()
        except storage.StorageError as e:
            raise ShardError(f"{e} (parts list)") from e
        try:
            if doc.get("version") != PARTS_VERSION:
                raise ShardError(
                    f"{storage.redact(self.parts_url)}: parts list version {doc.get('version')} != "
                    f"{PARTS_VERSION}; {REBUILD}"
                )
            parts = doc["parts"]
            counts = np.fromiter((int(p["samples"]) for p in parts), dtype=np.int64, count=len(parts))
            names = [str(p["name"]) for p in parts]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ShardError(f"{storage.redact(self.parts_url)}: malformed parts list ({e!r}); {REBUILD}") from e
        if (counts <= 0).any() or int(counts.sum()) != int(doc.get("samples", -1)):
            raise ShardError(
                f"{storage.redact(self.parts_url)}: part sample counts sum to {int(counts.sum())}, "
                f"the list says {doc.get('samples')} (or a part is empty); {REBUILD}"
            )
        canonical = all(n == part_name(i) for i, n in enumerate(names))
        self._names = None if canonical else names
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._parts: dict[int, _Part] = {}
        self._decoded: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.cache_shards = max(1, cache_shards)
        self.cache = ShardCache(cache_dir, cache_limit_bytes) if (self.remote and cache_dir) else None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ structure
    def __len__(self) -> int:
        return int(self.cum[-1])

    @property
    def num_parts(self) -> int:
        return len(self.cum) - 1

    def part_url(self, p: int) -> str:
        name = self._names[p] if self._names is not None else part_name(p)
        return storage.join(self.dir, name) if name else self.dir

    def _single_index_parts(self) -> dict[str, Any]:
        """A source written before parts.json (one merged ``<source>/index.json``): read as one part named ""."""
        index_url = storage.join(self.dir, PART_INDEX)
        if not storage.exists(index_url):
            raise ShardError(
                f"{storage.redact(self.parts_url)}: parts list missing (and no {PART_INDEX} beside it); {REBUILD}"
            )
        index = self._read_json(index_url, "MDS index")
        try:
            n = sum(int(s["samples"]) for s in index["shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{storage.redact(index_url)}: corrupt MDS index ({e!r}); {REBUILD}") from e
        return {"version": PARTS_VERSION, "samples": n, "parts": [{"name": "", "samples": n}]}

    def _read_json(self, url: str, what: str) -> Any:
        try:
            return storage.read_json(url)
        except storage.ObjectNotFound as e:
            raise ShardError(f"{storage.redact(url)}: {what} missing; {REBUILD}") from e
        except storage.StorageError as e:
            raise ShardError(f"{e} ({what})") from e

    def _part(self, p: int) -> _Part:
        part = self._parts.get(p)
        if part is not None:
            return part
        with self._lock:
            if p in self._parts:
                return self._parts[p]
            from streaming.base.format.mds.reader import MDSReader

            url = self.part_url(p)
            index_url = storage.join(url, PART_INDEX)
            index = self._read_json(index_url, "MDS index")
            try:
                shards = index["shards"]
                readers = [MDSReader.from_json(url, None, s) for s in shards]
                cum = np.concatenate([[0], np.cumsum([int(s["samples"]) for s in shards])]).astype(np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise ShardError(f"{storage.redact(index_url)}: corrupt MDS index ({e!r}); {REBUILD}") from e
            want = int(self.cum[p + 1] - self.cum[p])
            if int(cum[-1]) != want:
                raise ShardError(
                    f"{storage.redact(index_url)}: MDS index has {int(cum[-1])} samples, "
                    f"{storage.redact(self.parts_url)} says {want}; {REBUILD}"
                )
            part = self._parts[p] = _Part(url, shards, readers, cum)
            return part

    def locate(self, idx: int) -> tuple[int, int, int]:
        """Sample ``idx`` -> (part, shard within the part, sample within the shard)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.dir}: sample {idx} out of range [0, {len(self)})")
        p = int(np.searchsorted(self.cum, idx, side="right") - 1)
        part = self._part(p)
        j = idx - int(self.cum[p])
        s = int(np.searchsorted(part.cum, j, side="right") - 1)
        return p, s, j - int(part.cum[s])

    @staticmethod
    def _info(shard: dict[str, Any]) -> dict[str, Any]:
        return shard.get("zip_data") or shard["raw_data"]

    def shard_url(self, p: int, s: int) -> str:
        return storage.join(self._part(p).url, self._info(self._part(p).shards[s])["basename"])

    # ------------------------------------------------------------------------------------------ shards
    def _fetch(self, url: str, nbytes: int) -> bytes:
        try:
            if self.cache is not None:
                return self.cache.read(url, nbytes)
            return storage.read_bytes(url)
        except storage.ObjectNotFound as e:
            index = storage.join(storage.dirname(url), PART_INDEX)
            raise ShardError(
                f"{storage.redact(url)}: MDS shard missing (listed in {storage.redact(index)}); {REBUILD}"
            ) from e
        except storage.StorageError as e:
            raise ShardError(f"{storage.redact(url)}: MDS shard unreadable ({e})") from e

    def _check(self, url: str, shard: dict[str, Any], data: bytes) -> bytes:
        from streaming.base.compression import decompress
        from streaming.base.hashing import get_hash

        info = self._info(shard)
        where = storage.redact(url)
        if len(data) != info["bytes"]:
            raise ShardError(f"{where}: corrupt MDS shard: {len(data)} bytes, index says {info['bytes']}; {REBUILD}")
        for algo, expected in (info.get("hashes") or {}).items():
            if get_hash(algo, data) != expected:
                raise ShardError(f"{where}: corrupt MDS shard: {algo} checksum mismatch; {REBUILD}")
        if shard.get("zip_data"):
            try:
                data = decompress(shard["compression"], data)
            except Exception as e:
                raise ShardError(f"{where}: corrupt MDS shard: cannot decompress ({e}); {REBUILD}") from e
        n = int(np.frombuffer(data[:4], np.uint32)[0]) if len(data) >= 4 else -1
        if n != shard["samples"]:
            raise ShardError(
                f"{where}: corrupt MDS shard: header says {n} samples, index {shard['samples']}; {REBUILD}"
            )
        return data

    def _load(self, p: int, s: int) -> bytes:
        """The checked, decompressed bytes of shard s of part p (not memoised)."""
        part = self._part(p)
        shard = part.shards[s]
        if not self.remote:
            path = Path(storage.join(part.url, self._info(shard)["basename"]))
            if not path.is_file():
                raise ShardError(f"{path}: MDS shard missing (listed in {Path(part.url) / PART_INDEX}); {REBUILD}")
        url = self.shard_url(p, s)
        data = self._fetch(url, self._info(shard)["bytes"])
        try:
            return self._check(url, shard, data)
        except ShardError:
            if self.cache is None:
                raise
            log.warning("%s: cached copy failed its check; fetching it again", storage.redact(url))
            self.cache.invalidate(url)
            return self._check(url, shard, self._fetch(url, self._info(shard)["bytes"]))

    def _shard(self, p: int, s: int) -> bytes:
        key = (p, s)
        with self._lock:
            if key in self._decoded:
                self._decoded.move_to_end(key)
                return self._decoded[key]
        data = self._load(p, s)
        with self._lock:
            self._decoded[key] = data
            while len(self._decoded) > self.cache_shards:
                self._decoded.popitem(last=False)
        return data

    def __getitem__(self, idx: int) -> dict[str, Any]:
        p, s, i = self.locate(int(idx))
        data = self._shard(p, s)
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=4 * (1 + i))
        return self._part(p).readers[s].decode_sample(data[begin:end])

    def fetch_ahead(self, indices: Iterable[int]) -> int:
        """Download the shard files holding ``indices`` into the cache (remote sources with a cache_dir; a no-op
        otherwise). Returns the number of shard files ensured."""
        if self.cache is None:
            return 0
        seen: set[tuple[int, int]] = set()
        for idx in indices:
            p, s, _ = self.locate(int(idx))
            if (p, s) in seen or (p, s) in self._decoded:
                continue
            seen.add((p, s))
            url = self.shard_url(p, s)
            try:
                self.cache.ensure(url, self._info(self._part(p).shards[s])["bytes"])
            except storage.StorageError:
                pass  # the read itself raises the error naming the shard, at the sample that needs it
        return len(seen)

    def verify(self) -> None:
        """Open every part index and every shard once (size, checksum, decompression, header)."""
        for p in range(self.num_parts):
            for s in range(len(self._part(p).shards)):
                self._load(p, s)
