"""Run a function on N ranks (gloo, spawned processes) and return each rank's result to the test.

``run_ranks(fn, world_size, *args, timeout=120)``: spawns ``world_size`` processes with a fresh free port,
initialises the default gloo process group in each, calls ``fn(rank, world_size, *args)``, tears the group
down, and returns the list of return values ordered by rank. An exception on any rank is re-raised in the
test with that rank's traceback. On timeout, or once any rank failed, all ranks and their children are
killed by PID (never left behind). ``fn`` must be a module-level function (spawn pickles it by name).

``run_command(cmd, timeout, env=None)``: a command line (``python -m pretrain``, torchrun, the export CLI) with captured
output; afterwards its whole process tree is killed (``process_tree`` / ``kill_process_tree``): torchrun's
workers (own sessions) and dist_checkpointing's Manager processes would otherwise outlive it and hold its pipes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import psutil

from parallel.process_groups import free_port


class RankFailure(RuntimeError):
    pass


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, q: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(
        dict(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        q.put((rank, "ok", result))
    except BaseException:  # report everything, including SystemExit from a library
        q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from parallel.process_groups import teardown

            teardown()
        except Exception:
            pass


REPO = Path(__file__).resolve().parents[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_process_tree(procs: list[psutil.Process]) -> None:
    """SIGKILL ``process_tree(pid)``'s processes; waits for the descendants (the root is the caller's child:
    the caller reaps it, to see its exit status)."""
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            q.kill()
    psutil.wait_procs(procs[1:], timeout=10)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def run_command(cmd: list[str], timeout: float = 400, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository with captured text output; its process tree is killed afterwards.
    ``env``: variables set on top of :func:`subprocess_env`."""
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**subprocess_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_process_tree(process_tree(p.pid))
        p.wait()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _kill_tree(procs: list[mp.Process]) -> None:
    for p in procs:
        if p.pid is not None:
            kill_process_tree(process_tree(p.pid))
    for p in procs:
        p.join(timeout=10)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0, env: dict[str, str] | None = None
) -> list[Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, q, child_env), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailure(
                    f"timeout after {timeout:.0f}s: ranks {sorted(set(range(world_size)) - set(results) - set(errors))} "
                    f"did not finish; errors so far: {errors}"
                )
            try:
                rank, status, payload = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    i
                    for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in results and i not in errors
                ]
                if dead:
                    time.sleep(0.5)  # let a last message arrive
                    try:
                        while True:
                            rank, status, payload = q.get_nowait()
                            (results if status == "ok" else errors)[rank] = payload
                    except queue.Empty:
                        pass
                    for i in dead:
                        if i not in results and i not in errors:
                            errors[i] = f"rank {i} died with exit code {procs[i].exitcode}"
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                break
        if errors:
            rank = min(errors)
            raise RankFailure(f"rank {rank} failed:\n{errors[rank]}")
        for p in procs:
            p.join(timeout=30)
        return [results[r] for r in range(world_size)]
    finally:
        _kill_tree([p for p in procs if p.is_alive()])
        q.close()
