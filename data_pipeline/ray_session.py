"""Start or join Ray for a pipeline run.

- Ray already initialised in this process: use it and leave it running.
- ``RAY_ADDRESS`` set (``auto``, ``host:6379`` or ``ray://host:10001``): join that cluster, disconnect afterwards.
- Otherwise: start a local Ray with the machine's CPUs and a bounded object store, shut it down afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def configure_data_context() -> None:
    """Settings every stage relies on: deterministic block order and progress bars."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # bars on a terminal; elsewhere Ray would log a progress table every few seconds (DATA_PIPELINE_PROGRESS=1
    # forces it on, =0 off)
    ctx.enable_progress_bars = os.environ.get("DATA_PIPELINE_PROGRESS", "1" if sys.stderr.isatty() else "0") != "0"
    ctx.print_on_execution_start = False
    # sort-based shuffles for grouping (see components.group_reduce); push-based scales to large clusters
    ctx.shuffle_strategy = ShuffleStrategy(os.environ.get("DATA_PIPELINE_SHUFFLE", "sort_shuffle_push_based"))
    # Ray 2.60's datasource v2 reads Parquet footers through FooterReader actors that die with a lost node
    # (ActorDiedError) instead of being retried; the v1 read path retries its tasks, so a job survives a
    # worker-node failure (tests/test_cluster_ray.py kills a raylet mid-job).
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False


def start_local_ray(num_cpus: int, object_store_mb: int, attempts: int = 3) -> None:
    """``ray.init`` of a local instance, retried: on an overloaded machine the raylet can miss Ray's fixed
    30 s registration window ("The current node timed out during startup")."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("starting a local Ray: %d CPUs, %d MB object store", num_cpus, object_store_mb)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 1024 * 1024,
                     include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("Ray start timed out (attempt %d/%d); retrying", attempt, attempts)
            ray.shutdown()
            time.sleep(2)


@contextlib.contextmanager
def ray_session(num_cpus: int = 0, object_store_mb: int = 300) -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=False)
        else:
            start_local_ray(num_cpus or os.cpu_count() or 1, object_store_mb)
        started = True
    configure_data_context()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
