"""Stage tasks on Ray with completion records: how every data job is executed and resumed.

A *stage* is a list of independent tasks, each ``fn(**kwargs) -> summary`` where ``fn`` writes its outputs
itself, under names that depend only on the task (never on timing or worker), atomically (see
:mod:`data_pipeline.storage`), and returns a small JSON summary (counts, bytes, a few ids; keys starting with
``_`` for measurements such as seconds, which are not recorded). After the outputs, the task writes its
*completion record* ``<stage dir>/_done/<task id>.json`` = ``{"task", "summary"}``. So:

- a task whose record exists is finished: rerunning the same command skips it and reuses its summary
  (``StageRun.skipped`` counts them), wherever the previous run stopped (SIGKILL of the whole job included);
- a task killed half-way left no record; it runs again and overwrites whatever partial output it left;
- the driver only lists the records, launches tasks (at most ``max_in_flight`` at a time) and keeps the
  summaries: its memory grows with the number of tasks (files), never with the documents.

Progress: a tqdm bar with tasks, documents/s and MB/s on a terminal; elsewhere (a cluster job's log) a
log line every ``DATA_PIPELINE_LOG_EVERY`` seconds (default 30). Summaries with ``documents`` and
``bytes`` keys feed the rates.

Failures: Ray retries a task whose worker or node died (``max_retries``); an exception raised by the task
itself (bad configuration, unreadable input the readers cannot quarantine) stops the stage with
:class:`StageError` naming the task, after the tasks already running have finished and recorded themselves.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_pipeline import storage

log = logging.getLogger(__name__)

DONE = "_done"


class StageError(RuntimeError):
    """A task of a stage raised; the message names the stage, the task and the error."""


@dataclass
class Task:
    id: str  # unique within the stage; a file name (letters, digits, - _ .)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRun:
    """What one :meth:`Runner.run` did (for the manifest and the resume test)."""

    name: str
    tasks: int = 0
    skipped: int = 0
    seconds: float = 0.0
    documents: int = 0
    bytes: int = 0
    worker_peak_rss_mb: float = 0.0

    def row(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        return {
            "name": self.name,
            "seconds": round(self.seconds, 3),
            "tasks": self.tasks,
            "skipped": self.skipped,
            "documents": self.documents,
            "bytes": self.bytes,
            "docs_per_s": self.documents / s,
            "mb_per_s": self.bytes / 1e6 / s,
            "worker_peak_rss_mb": self.worker_peak_rss_mb,
        }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _execute(fn: Callable[..., dict], kwargs: dict[str, Any], record_url: str, task_id: str) -> dict:
    """Run one task and write its completion record. Summary keys starting with ``_`` are measurements of this
    run (seconds, memory): returned to the driver, not recorded, so that records are deterministic too."""
    summary = dict(fn(**kwargs) or {})
    storage.write_json(
        record_url, {"task": task_id, "summary": {k: v for k, v in summary.items() if not k.startswith("_")}}
    )
    # the worker process's peak memory so far (workers are reused), for the stage's row; not recorded
    return {"summary": summary, "peak_rss_mb": round(_peak_rss_mb(), 1)}


class _Progress:
    def __init__(self, name: str, total: int, initial: int):
        self.name, self.total, self.done = name, total, initial
        self.t0 = self.last = time.time()
        self.docs = self.bytes = 0
        self.rss: list[float] = []
        self.every = float(os.environ.get("DATA_PIPELINE_LOG_EVERY", "30"))
        self.bar = None
        if sys.stderr.isatty() and os.environ.get("DATA_PIPELINE_PROGRESS", "1") != "0":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit="task", leave=False)

    def update(self, summary: dict) -> None:
        self.done += 1
        self.docs += int(summary.get("documents", 0))
        self.bytes += int(summary.get("bytes", 0))
        dt = max(time.time() - self.t0, 1e-9)
        rate = f"{self.docs / dt:,.0f} docs/s, {self.bytes / 1e6 / dt:.2f} MB/s"
        if self.bar is not None:
            self.bar.set_postfix_str(rate, refresh=False)
            self.bar.update()
        elif time.time() - self.last >= self.every:
            self.last = time.time()
            log.info("%s: %d/%d tasks, %s", self.name, self.done, self.total, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Runner:
    """Runs stages as Ray tasks (``use_ray=True``; Ray must be initialised) or in this process (tests)."""

    def __init__(self, use_ray: bool = True, max_in_flight: int = 0, max_retries: int = 3):
        self.use_ray = use_ray
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.runs: list[StageRun] = []

    def _window(self) -> int:
        if self.max_in_flight:
            return self.max_in_flight
        if not self.use_ray:
            return 1
        import ray

        return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def run(
        self,
        name: str,
        stage_url: str,
        fn: Callable[..., dict],
        tasks: list[Task],
        num_cpus: float = 1.0,
        memory_mb: int = 0,
        output_urls: tuple[str, ...] = (),
    ) -> list[dict]:
        """Run ``tasks`` of stage ``name`` (records under ``stage_url/_done``); summaries in task order.
        ``output_urls``: where the tasks write, if not under ``stage_url`` (swept of a killed run's partial
        temporary files when the stage resumes)."""
        t0 = time.time()
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"stage {name}: task ids are not unique")
        done_dir = storage.join(stage_url, DONE)
        recorded = {
            u.rsplit("/", 1)[-1].removesuffix(".json") for u in storage.list_files(done_dir) if u.endswith(".json")
        }
        results: list[dict | None] = [None] * len(tasks)
        todo = []
        for i, t in enumerate(tasks):
            if t.id in recorded:
                results[i] = storage.read_json(storage.join(done_dir, f"{t.id}.json"))["summary"]
            else:
                todo.append(i)
        run = StageRun(name, tasks=len(tasks), skipped=len(tasks) - len(todo))
        if todo and recorded:  # resuming a stage a killed run left unfinished
            for u in (stage_url, *output_urls):
                storage.sweep_partial(u)
        if run.skipped:
            log.info(
                "%s: %d of %d tasks already done (completion records in %s); running %d",
                name,
                run.skipped,
                len(tasks),
                done_dir,
                len(todo),
            )
        progress = _Progress(name, len(tasks), run.skipped)
        try:
            if self.use_ray:
                self._run_ray(name, fn, tasks, todo, done_dir, results, progress, num_cpus, memory_mb)
            else:
                for i in todo:
                    results[i] = self._call(name, fn, tasks[i], done_dir)
                    progress.update(results[i])
        finally:
            progress.close()
        for r in results:
            run.documents += int(r.get("documents", 0))
            run.bytes += int(r.get("bytes", 0))
        run.worker_peak_rss_mb = max([run.worker_peak_rss_mb, *progress.rss])
        run.seconds = time.time() - t0
        self.runs.append(run)
        row = run.row()
        log.info(
            "stage %-10s %7.1f s  %5d tasks (%d skipped)  %9d docs  %9.2f MB  %8.0f docs/s  %6.2f MB/s",
            name,
            run.seconds,
            run.tasks,
            run.skipped,
            run.documents,
            run.bytes / 1e6,
            row["docs_per_s"],
            row["mb_per_s"],
        )
        return results  # type: ignore[return-value]

    def _call(self, name: str, fn: Callable[..., dict], task: Task, done_dir: str) -> dict:
        try:
            return _execute(fn, task.kwargs, storage.join(done_dir, f"{task.id}.json"), task.id)["summary"]
        except Exception as e:
            raise StageError(f"stage {name}, task {task.id}: {type(e).__name__}: {e}") from e

    def _run_ray(self, name, fn, tasks, todo, done_dir, results, progress, num_cpus, memory_mb) -> None:
        import ray

        opts: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": self.max_retries}
        if memory_mb:
            opts["memory"] = memory_mb * 1024 * 1024
        remote = ray.remote(**opts)(_execute)
        fn_ref = ray.put(fn)
        window = self._window()
        pending: dict[Any, int] = {}
        queue = list(todo)
        error: StageError | None = None
        while queue or pending:
            while queue and len(pending) < window and error is None:
                i = queue.pop(0)
                t = tasks[i]
                pending[remote.remote(fn_ref, t.kwargs, storage.join(done_dir, f"{t.id}.json"), t.id)] = i
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
                results[i] = out["summary"]
                progress.rss.append(out["peak_rss_mb"])
                progress.update(results[i])
            except Exception as e:  # noqa: BLE001 - re-raised below with the task named
                cause = getattr(e, "cause", None) or e
                if error is None:
                    error = StageError(f"stage {name}, task {tasks[i].id}: {type(cause).__name__}: {cause}")
                queue.clear()
        if error is not None:
            raise error
