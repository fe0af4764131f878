"""Wait until a Ray cluster has a given number of live nodes (used by clusters/slurm/data.sbatch).

    python clusters/ray/wait_nodes.py --address HEAD_IP:PORT --nodes N [--timeout 300]

Exit status 0 once ``N`` nodes are alive, 1 on timeout (with the count seen), 2 at once when the cluster refuses
this process's token (Ray's token authentication: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``, which
clusters/slurm/data.sbatch sets). Connection attempts that fail while the head is still starting are retried until
the timeout.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

log = logging.getLogger("wait_nodes")


def gcs_listening(address: str) -> bool:
    """A quick TCP probe, so that ray.init is not left retrying against a head that is not up yet."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return True
    except OSError:
        return False


def live_nodes(address: str) -> int:
    """Number of live nodes, from a short-lived driver connection (disconnects afterwards)."""
    if not gcs_listening(address):
        raise ConnectionError(f"nothing listens on {address} yet")
    import ray
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return sum(1 for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()


def refused_token(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it came from is the GCS refusing the token (no retry helps then)."""
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            return False
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="GCS address HOST:PORT of the head node")
    p.add_argument("--nodes", type=int, required=True, help="live nodes to wait for")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[wait_nodes %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    deadline = time.monotonic() + a.timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            seen = live_nodes(a.address)
        except (OSError, TimeoutError, RuntimeError) as e:  # the head is not up (GCS not reachable yet)
            if refused_token(e):
                path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
                log.error("the Ray cluster at %s refused this process's authentication token (RAY_AUTH_MODE=%s, "
                          "RAY_AUTH_TOKEN_PATH=%s): set RAY_AUTH_TOKEN_PATH to the cluster's token file",
                          a.address, os.environ.get("RAY_AUTH_MODE", "(unset)"), path or "(unset)")
                return 2
            log.info("head not reachable yet (%s)", type(e).__name__)
        if seen >= a.nodes:
            log.info("%d/%d Ray nodes alive", seen, a.nodes)
            return 0
        time.sleep(2.0)
    log.error("timed out after %.0f s: %d/%d Ray nodes alive", a.timeout, seen, a.nodes)
    return 1


if __name__ == "__main__":
    sys.exit(main())
