"""Background read-ahead for the loader: a thread that builds the next micro-batches, and one that downloads
the shard files of the batches after those into the local shard cache.

Micro-batches are a pure function of the loader's cursor ``(consumed, micro)`` (``Loader.positions``), so
reading ahead cannot change what is yielded: the worker builds batch ``c``, ``c+1``, ... into a bounded queue
of ``depth`` batches, tagged with their cursor; the consumer takes them in order and checks the tag. The
loader's state (``state_dict``) advances only when the consumer takes a batch, so it counts what the model
consumed, never what was prefetched; after ``load_state_dict`` the worker is stopped and restarted at the new
cursor. An error while building batch ``c`` (a missing or corrupt shard) is handed over in place of that
batch, so it is raised at exactly the step that needs the sample, as without prefetch.

Download-ahead (remote sources with a cache dir): when the worker starts batch ``c`` it hands the shard files
of batch ``c + 2 depth`` to a pool of ``FETCH_THREADS`` downloader threads (object stores serve parallel GETs
much faster than one after the other), so a shard is usually on local disk before the worker needs it.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger(__name__)

Cursor = tuple[int, int]
FETCH_THREADS = 4


class Prefetcher:
    """Builds ``make(cursor)`` for cursor, next(cursor), ... in a daemon thread, ``depth`` batches ahead."""

    def __init__(
        self,
        start: Cursor,
        depth: int,
        make: Callable[[Cursor], Any],
        advance: Callable[[Cursor], Cursor],
        fetch_ahead: Callable[[Cursor], None] | None = None,
    ):
        self.depth = max(1, int(depth))
        self.make, self.advance, self.fetch_ahead = make, advance, fetch_ahead
        self.expected = start
        self.queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self.stop = threading.Event()
        self.fetcher = (
            ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="loader-fetch-ahead")
            if fetch_ahead is not None
            else None
        )
        self.thread = threading.Thread(target=self._loop, args=(start,), name="loader-prefetch", daemon=True)
        self.thread.start()

    def _ahead(self, cursor: Cursor, n: int) -> Cursor:
        for _ in range(n):
            cursor = self.advance(cursor)
        return cursor

    def _fetch(self, cursor: Cursor) -> None:
        if self.stop.is_set():
            return
        try:
            self.fetch_ahead(cursor)
        except Exception as e:  # the batch build reports the error where it matters
            log.debug("fetch-ahead of %s failed: %s", cursor, e)

    def _loop(self, cursor: Cursor) -> None:
        ahead = 2 * self.depth
        if self.fetcher is not None:
            c = cursor
            for _ in range(ahead):
                self.fetcher.submit(self._fetch, c)
                c = self.advance(c)
        while not self.stop.is_set():
            if self.fetcher is not None:
                self.fetcher.submit(self._fetch, self._ahead(cursor, ahead))
            try:
                item = (cursor, self.make(cursor), None)
            except ReferenceError:  # the loader is gone: nobody will ask for this batch
                return
            except BaseException as e:  # handed to the consumer at this batch
                item = (cursor, None, e)
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            try:
                cursor = self.advance(cursor)
            except ReferenceError:
                return

    def get(self, cursor: Cursor) -> Any:
        """The batch at ``cursor`` (must be the next one in order)."""
        if cursor != self.expected:
            raise RuntimeError(f"prefetcher asked for {cursor}, next is {self.expected}")
        while True:
            if not self.thread.is_alive() and self.queue.empty():
                raise RuntimeError("loader prefetch thread died without a batch")
            try:
                got, batch, err = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                continue
        if got != cursor:
            raise RuntimeError(f"prefetcher yielded {got}, expected {cursor}")
        if err is not None:
            self.close()
            raise err
        self.expected = self.advance(cursor)
        return batch

    def close(self) -> None:
        self.stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        if self.fetcher is not None:
            self.fetcher.shutdown(wait=False, cancel_futures=True)
