"""Random access to the samples of one source's MDS dataset (``<source>/index.json`` + shards).

Reads shards straight from the (local or shared) directory: no shared memory, no local cache copy, so the
``/dev/shm`` leftovers of killed runs (stack-notes §9) cannot affect it. Each shard is checked when first
opened: a missing file, a size or xxh64 mismatch against ``index.json``, or a failed decompression raises
:class:`ShardError` naming the shard. Decompressed shards are kept in a small LRU cache.

Raw MDS shard layout: uint32 n, uint32 offsets[n + 1] (from the file start), then the samples; a sample is
decoded with streaming's own ``MDSReader.decode_sample``.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.streaming_compat import import_streaming


class ShardError(RuntimeError):
    """A missing or corrupt MDS shard; the message names the shard file."""


class SourceShards:
    def __init__(self, source_dir: str | Path, cache_shards: int = 16):
        import_streaming()
        from streaming.base.format.mds.reader import MDSReader

        self.dir = Path(source_dir)
        index_path = self.dir / "index.json"
        if not index_path.is_file():
            raise ShardError(f"{index_path}: MDS index missing; rebuild the dataset (python -m data_pipeline run)")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{index_path}: corrupt MDS index ({e})") from e
        self.shards = index["shards"]
        self.readers = [MDSReader.from_json(str(self.dir), None, s) for s in self.shards]
        self.cum = np.concatenate([[0], np.cumsum([s["samples"] for s in self.shards])]).astype(np.int64)
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.cache_shards = max(1, cache_shards)

    def __len__(self) -> int:
        return int(self.cum[-1])

    def _load(self, s: int) -> bytes:
        from streaming.base.compression import decompress
        from streaming.base.hashing import get_hash

        shard = self.shards[s]
        info = shard.get("zip_data") or shard["raw_data"]
        path = self.dir / info["basename"]
        if not path.is_file():
            raise ShardError(f"{path}: MDS shard missing (listed in {self.dir / 'index.json'})")
        data = path.read_bytes()
        if len(data) != info["bytes"]:
            raise ShardError(f"{path}: corrupt MDS shard: {len(data)} bytes, index says {info['bytes']}")
        for algo, expected in (info.get("hashes") or {}).items():
            if get_hash(algo, data) != expected:
                raise ShardError(f"{path}: corrupt MDS shard: {algo} checksum mismatch")
        if shard.get("zip_data"):
            try:
                data = decompress(shard["compression"], data)
            except Exception as e:
                raise ShardError(f"{path}: corrupt MDS shard: cannot decompress ({e})") from e
        n = int(np.frombuffer(data[:4], np.uint32)[0]) if len(data) >= 4 else -1
        if n != shard["samples"]:
            raise ShardError(f"{path}: corrupt MDS shard: header says {n} samples, index {shard['samples']}")
        return data

    def _shard(self, s: int) -> bytes:
        if s in self.cache:
            self.cache.move_to_end(s)
            return self.cache[s]
        data = self._load(s)
        self.cache[s] = data
        if len(self.cache) > self.cache_shards:
            self.cache.popitem(last=False)
        return data

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.dir}: sample {idx} out of range [0, {len(self)})")
        s = int(np.searchsorted(self.cum, idx, side="right") - 1)
        data = self._shard(s)
        i = idx - int(self.cum[s])
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=4 * (1 + i))
        return self.readers[s].decode_sample(data[begin:end])

    def verify(self) -> None:
        """Open every shard once (size, checksum, decompression, header)."""
        for s in range(len(self.shards)):
            self._load(s)
