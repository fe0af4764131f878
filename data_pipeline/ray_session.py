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
from typing import Iterator

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
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
            cpus = num_cpus or os.cpu_count() or 1
            log.info("starting a local Ray: %d CPUs, %d MB object store", cpus, object_store_mb)
            ray.init(num_cpus=cpus, object_store_memory=object_store_mb * 1024 * 1024,
                     include_dashboard=False, log_to_driver=False)
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
