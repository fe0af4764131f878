"""A node-local disk cache of remote shard files, bounded in size, shared safely by the ranks of a node.

``ShardCache(cache_dir, limit_bytes)`` keeps a copy of each remote object it is asked for at
``<cache_dir>/<scheme>/<bucket>/<key>`` (the URL's path, so several datasets and sources share one cache).

- Downloads are atomic (``storage.download_file``: temporary file + rename), so a reader never sees half a
  shard, and a killed download leaves only a ``.*.tmp-*`` file that the next eviction pass removes.
- Several processes (the ranks of a node) may share the directory: a download holds an exclusive ``flock`` on
  one of ``LOCK_STRIPES`` lock files chosen by the URL's hash, so a shard is fetched once per node and the
  other ranks wait for it, then read the finished file.
- Size limit: after each download, if the files under the cache exceed ``limit_bytes``, whole files are
  evicted in least-recently-used order (a hit refreshes the file's mtime) until the total fits. A file being
  read holds a shared lock on its stripe and is skipped by eviction (non-blocking try), so no rank loses a
  file it is reading; the file just fetched is kept even when it alone exceeds the limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import zlib
from pathlib import Path

from data_pipeline import storage

log = logging.getLogger(__name__)

LOCK_STRIPES = 64
STALE_TMP_S = 3600  # a temporary download file older than this is a killed download's leftover


class ShardCache:
    def __init__(self, cache_dir: str | Path, limit_bytes: int | None = None):
        self.root = Path(cache_dir).expanduser().resolve()
        self.limit = int(limit_bytes) if limit_bytes else None
        self.locks = self.root / ".locks"
        try:
            self.locks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage.StorageError(
                f"{self.root}: cannot create the shard cache ({e}); set data.cache_dir to a writable local directory"
            ) from e
        self.downloaded = 0  # bytes this process downloaded (benchmarks, logs)
        self.hits = 0

    # ------------------------------------------------------------------------------------------ paths/locks
    def local_path(self, url: str) -> Path:
        scheme, _, rest = storage.redact(url).partition("://")
        parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
        return self.root.joinpath(scheme or "file", *parts)

    def _lock_file(self, url: str) -> Path:
        return self.locks / f"{zlib.crc32(storage.redact(url).encode()) % LOCK_STRIPES:02d}.lock"

    @contextlib.contextmanager
    def _stripe(self, url: str, mode: int):
        with open(self._lock_file(url), "a") as f:
            fcntl.flock(f, mode)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------ API
    def ensure(self, url: str, expected_bytes: int | None = None) -> Path:
        """The local copy of ``url``, downloaded first if missing (or of the wrong size)."""
        path = self.local_path(url)
        if self._usable(path, expected_bytes):
            self._touch(path)
            self.hits += 1
            return path
        with self._stripe(url, fcntl.LOCK_EX):
            if not self._usable(path, expected_bytes):  # another rank may have fetched it meanwhile
                t0 = time.monotonic()
                n = storage.download_file(url, path)
                self.downloaded += n
                log.debug("cache: fetched %s (%d bytes, %.2f s)", storage.redact(url), n, time.monotonic() - t0)
        self._evict(keep=path)
        return path

    def read(self, url: str, expected_bytes: int | None = None) -> bytes:
        """The bytes of ``url`` from the cache (downloading them first if needed)."""
        for _ in range(3):
            path = self.ensure(url, expected_bytes)
            with self._stripe(url, fcntl.LOCK_SH):
                try:
                    return path.read_bytes()
                except FileNotFoundError:  # evicted between ensure and read by another rank: fetch again
                    continue
        raise storage.StorageError(
            f"{self.root}: {storage.redact(url)} keeps being evicted from the cache right "
            "after download; raise data.cache_limit_gb"
        )

    def invalidate(self, url: str) -> None:
        """Drop the cached copy of ``url`` (e.g. it failed verification)."""
        with self._stripe(url, fcntl.LOCK_EX):
            self.local_path(url).unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    # ------------------------------------------------------------------------------------------ internals
    @staticmethod
    def _usable(path: Path, expected: int | None) -> bool:
        try:
            return expected is None or path.stat().st_size == expected
        except FileNotFoundError:
            return False

    @staticmethod
    def _touch(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        now = time.time()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if name.startswith("."):
                    if ".tmp-" in name and now - st.st_mtime > STALE_TMP_S:
                        p.unlink(missing_ok=True)
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def _url_of(self, path: Path) -> str:
        rel = path.relative_to(self.root).parts
        return f"{rel[0]}://" + "/".join(rel[1:])

    def _evict(self, keep: Path) -> None:
        if self.limit is None:
            return
        files = self._files()
        total = sum(size for _, size, _ in files)
        if total <= self.limit:
            return
        for _mtime, nbytes, path in sorted(files):
            if total <= self.limit:
                break
            if path == keep:
                continue
            with open(self._lock_file(self._url_of(path)), "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being read or fetched by someone: keep it
                try:
                    path.unlink(missing_ok=True)
                    total -= nbytes
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        if total > self.limit:
            log.warning(
                "shard cache %s holds %.1f MB > limit %.1f MB (files in use); raise data.cache_limit_gb",
                self.root,
                total / 1e6,
                self.limit / 1e6,
            )
