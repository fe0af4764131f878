"""Shared Ray fixture for the data-pipeline tests: one local Ray per test module.

Import it into a test module with ``from tests.fixtures_ray import ray_local  # noqa: F401``. Ray is started
with 2 CPUs and a 300 MB object store, Ray's token authentication on (``start_local_ray``: a fresh token for
this process) and usage stats off, and shut down at the end of the module. If Ray is already running in this
process it is reused and left running.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["DATA_PIPELINE_PROGRESS"] = "0"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from data_pipeline.ray_session import configure_data_context, start_local_ray

    started = False
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_mb=300)
        started = True
    configure_data_context()
    yield ray
    if started:
        ray.shutdown()
