"""Crash-safe checkpoints with megatron-core distributed checkpointing (torch_dist format).

Layout under ``<run.dir>/checkpoints``::

    step_00000100/          one complete checkpoint (megatron's .metadata, __<rank>_<i>.distcp,
                            metadata.json, integrity.json with a SHA-256 per file) + meta.json (ours)
    step_00000200/
    latest                  text file: the name of the newest complete checkpoint directory

Save protocol (every ``checkpoint.interval`` steps; asynchronous on GPU when ``checkpoint.async_save``):
``step_N.tmp/`` is created empty, every rank writes its shards, megatron writes its metadata and the
integrity manifest, every rank fsyncs its files, rank 0 writes ``meta.json``, fsyncs and renames the
directory to ``step_N`` and replaces ``latest`` atomically (write ``latest.tmp``, fsync, rename, fsync the
directory). A crash at any point leaves either the old or the new checkpoint complete, never a half one
under a final name. Retention: the last ``checkpoint.keep_last`` plus every ``checkpoint.keep_every``-th
step; the one ``latest`` names is never deleted.

Load: rank 0 checks the candidates newest first (``latest``'s target, then the other ``step_*`` dirs):
``meta.json`` parses and every file in ``integrity.json`` has its recorded SHA-256. A checkpoint that fails
is skipped with a warning naming the file and the reason; the choice is broadcast to all ranks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.process_groups import global_rank

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
INTEGRITY = "integrity.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Check one checkpoint directory; returns its meta.json or raises CheckpointError with the reason."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    meta_p = path / META
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_p}: missing or unreadable ({e})") from e
    for name in ("metadata.json", INTEGRITY):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing (incomplete checkpoint)")
    try:
        manifest = json.loads((path / INTEGRITY).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / INTEGRITY}: unreadable manifest ({e})") from e
    for name, digest in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {INTEGRITY} but missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: SHA-256 mismatch with {INTEGRITY} (file corrupt or truncated)")
    return meta


def start_write_results_queue() -> None:
    """Start dist_checkpointing's results-queue Manager process with SIGTERM/SIGUSR1/SIGINT blocked.

    megatron creates that Manager lazily at the first save, as a child of the rank. torchrun (and Slurm's
    signal to a step) deliver SIGTERM to the rank's whole process group, which would kill the Manager and turn
    the preemption checkpoint into a ``BrokenPipeError``. A blocked signal stays blocked across fork/exec, so
    the Manager never sees them; in the rank they are only held (pending) for the fraction of a second the
    start takes and delivered to our handler right after.
    """
    import signal as _signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", None) is not None:
        return
    # multiprocessing's resource tracker, started lazily by the Manager, *unblocks* SIGINT/SIGTERM in the
    # parent after spawning itself: start it first so that it cannot undo our mask.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    sigs = {_signal.SIGTERM, _signal.SIGUSR1, _signal.SIGINT}
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    try:
        fa.get_write_results_queue()
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old)


class CheckpointManager:
    """Saves and finds checkpoints of one run. All methods are collective (call on every rank)."""

    def __init__(self, root: Path | str, keep_last: int = 2, keep_every: int = 0, async_save: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.keep_every = keep_every
        self.async_save = bool(async_save and torch.cuda.is_available())
        self._queue = None
        self.last_saved_step: int | None = None
        if global_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()

    # ------------------------------------------------------------------------------------------ save
    def save(
        self, step: int, sharded_sd: dict[str, Any], meta: dict[str, Any], on_done: Callable[[Path], None] | None = None
    ) -> None:
        from megatron.core import dist_checkpointing

        self.wait()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if global_rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        t0 = time.monotonic()
        meta = dict(meta, step=step, saved_unix=time.time())

        def finalize() -> None:
            self._finalize(tmp, final, meta, t0)
            self.last_saved_step = step
            if on_done is not None:
                on_done(final)

        start_write_results_queue()
        req = dist_checkpointing.save(
            sharded_sd, str(tmp), async_sharded_save=self.async_save, verify_integrity=True, async_strategy="mcore"
        )
        if req is None:
            finalize()
            return
        from megatron.core.dist_checkpointing.strategies.async_utils import (
            AsyncCallsQueue,
        )

        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        req.add_finalize_fn(finalize)
        self._queue.schedule_async_request(req)
        log.info("checkpoint step %d: asynchronous save started", step)

    def poll(self) -> None:
        """Finalize an asynchronous save that has finished (non-blocking; call every step)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def _finalize(self, tmp: Path, final: Path, meta: dict[str, Any], t0: float) -> None:
        rank = global_rank()
        for f in tmp.iterdir():  # each rank syncs the shard files it wrote
            if f.is_file() and (f.name.startswith(f"__{rank}_") or (rank == 0 and not f.name.startswith("__"))):
                fsync_path(f)
        _barrier()
        if rank == 0:
            meta_p = tmp / META
            with open(meta_p, "w") as fh:
                json.dump(meta, fh, indent=1, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._write_latest(final.name)
            self._apply_retention()
            log.info("checkpoint saved: %s (%.1f s)", final, time.monotonic() - t0)
        _barrier()

    def _write_latest(self, name: str) -> None:
        tmp = self.root / "latest.tmp"
        with open(tmp, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / "latest")
        fsync_path(self.root)

    def steps_on_disk(self) -> list[int]:
        out = []
        for p in self.root.iterdir() if self.root.is_dir() else []:
            m = STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def _apply_retention(self) -> None:
        steps = self.steps_on_disk()
        keep = set(steps[-self.keep_last :])
        if self.keep_every > 0:
            keep |= {s for s in steps if s % self.keep_every == 0}
        latest = self.read_latest()
        for s in steps:
            if s not in keep and step_dir_name(s) != latest:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)
                log.info("checkpoint retention: removed %s", step_dir_name(s))

    # ------------------------------------------------------------------------------------------ find
    def read_latest(self) -> str | None:
        p = self.root / "latest"
        try:
            name = p.read_text().strip()
        except OSError:
            return None
        return name if STEP_RE.match(name) else None

    def find_latest_valid(self) -> Path | None:
        """Newest checkpoint that passes verification (rank 0 decides, all ranks get the answer)."""
        choice: str | None = None
        if global_rank() == 0:
            choice = self._pick()
        choice = _broadcast(choice)
        return self.root / choice if choice else None

    def _pick(self) -> str | None:
        names = [step_dir_name(s) for s in reversed(self.steps_on_disk())]
        latest = self.read_latest()
        if latest is None and (self.root / "latest").exists():
            log.warning("%s: unreadable 'latest' pointer; scanning the step directories instead", self.root / "latest")
        if latest in names:
            names.remove(latest)
            names.insert(0, latest)
        elif latest is not None:
            log.warning(
                "%s names %s, which does not exist; scanning the step directories instead", self.root / "latest", latest
            )
        failed = []
        for name in names:
            try:
                verify_checkpoint_dir(self.root / name)
            except CheckpointError as e:
                failed.append(name)
                log.warning("checkpoint %s is not usable: %s; falling back to an older checkpoint", name, e)
                continue
            if failed:
                log.warning("resuming from %s instead of %s (failed verification)", name, failed[0])
            return name
        if failed:
            log.warning(
                "no valid checkpoint in %s (all of %s failed verification); starting from scratch", self.root, failed
            )
        return None

    # ------------------------------------------------------------------------------------------ load
    @staticmethod
    def load_common(path: Path) -> dict[str, Any]:
        from megatron.core import dist_checkpointing

        return dist_checkpointing.load_common_state_dict(str(path))

    @staticmethod
    def load(
        path: Path, sharded_sd: dict[str, Any], strict: bool = True, validate_access: bool = True
    ) -> dict[str, Any]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.validation import StrictHandling

        try:
            return dist_checkpointing.load(
                sharded_sd,
                str(path),
                validate_access_integrity=validate_access,
                strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_UNEXPECTED,
            )
        except Exception as e:
            raise CheckpointError(
                f"{path}: loading failed ({type(e).__name__}: {e}); the checkpoint does "
                f"not match this model/optimizer. Point checkpoint.load at a compatible "
                f"checkpoint or use a new run.dir"
            ) from e
