"""Fixtures shared by the test modules (pytest loads this file before them).

* ``one_rank``: a one-rank gloo process group plus megatron-core's parallel state (tp = pp = ep = 1), for a
  whole test module; the model's modules need the parallel state to be built.
* ``one_rank_per_test``: the same for one test only, for modules where other tests need a process without
  ``torch.distributed``.
* ``s3_server`` / ``s3_prefix``: the local S3 server (tests/s3_server.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from s3_server import s3_prefix, s3_server  # noqa: F401  (the local S3 server: tests/s3_server.py)


def _one_rank() -> Iterator[None]:
    from parallel.process_groups import init_distributed, teardown
    from pretrain.config import ParallelConfig

    init_distributed(ParallelConfig())
    try:
        yield
    finally:
        teardown()


one_rank = pytest.fixture(scope="module", name="one_rank")(_one_rank)
one_rank_per_test = pytest.fixture(name="one_rank_per_test")(_one_rank)
