"""Start or join Ray for a pipeline run.

- Ray already initialised in this process: use it and leave it running.
- ``RAY_ADDRESS`` set (``auto``, ``host:6379`` or ``ray://host:10001``): join that cluster, disconnect afterwards.
  The cluster's token comes from Ray's own variables (``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``, with
  ``RAY_AUTH_MODE=token``), which the launch files in clusters/ set; a missing or wrong token fails with
  :class:`RayAuthError`, which names them.
- Otherwise: start a local Ray with the machine's CPUs and a bounded object store, shut it down afterwards. Its
  GCS listens on the machine's address, not only on loopback, so it runs with Ray's token authentication: a fresh
  random token per process, in a 0600 file in a private temp dir (removed at exit), never logged.
  ``V4_RAY_AUTH=disabled`` is the explicit opt-out (docs/CLUSTER_SECURITY.md).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

AUTH_OPT_OUT_VAR = "V4_RAY_AUTH"  # "token" (default) or "disabled"
_local_token_path: str | None = None  # this process's token for the Ray it starts (created once)


class RayAuthError(RuntimeError):
    """A Ray cluster refused this process's authentication token (missing or wrong)."""


def _auth_choice() -> str:
    mode = os.environ.get(AUTH_OPT_OUT_VAR, "token") or "token"
    if mode not in ("token", "disabled"):
        raise ValueError(f"{AUTH_OPT_OUT_VAR} must be 'token' or 'disabled', got {mode!r}")
    return mode


def _refresh_ray_auth_config() -> None:
    """Make an already imported Ray see the auth variables just set (its config and token are cached per process;
    Ray's own token set-up refreshes them the same way)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _remove_local_token(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def local_ray_auth() -> None:
    """Auth settings for a Ray this process starts: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` naming a
    fresh 256-bit token (as Ray's generator makes) in a 0700 temp dir, reused for later starts in this process;
    or, with ``V4_RAY_AUTH=disabled``, ``RAY_AUTH_MODE=disabled`` and a warning. A token from the environment
    (``RAY_AUTH_TOKEN``) or ``~/.ray/auth_token`` is never used: the Ray this process starts gets its own."""
    global _local_token_path
    if _auth_choice() == "disabled":
        log.warning(
            "Ray token authentication is disabled (%s=disabled): anyone who can reach this machine's Ray "
            "ports can run code as this user",
            AUTH_OPT_OUT_VAR,
        )
        os.environ["RAY_AUTH_MODE"] = "disabled"
        _refresh_ray_auth_config()
        return
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        log.info(
            "RAY_AUTH_MODE=%s in the environment is not used for the local Ray (token auth; the opt-out is "
            "%s=disabled)",
            os.environ["RAY_AUTH_MODE"],
            AUTH_OPT_OUT_VAR,
        )
    if _local_token_path is None or not os.path.isfile(_local_token_path):
        directory = tempfile.mkdtemp(prefix="v4-ray-auth-")  # 0700
        path = os.path.join(directory, "token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        atexit.register(_remove_local_token, directory)
        _local_token_path = path
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = _local_token_path
    _refresh_ray_auth_config()


def _is_auth_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is Ray refusing the token."""
    from ray.exceptions import AuthenticationError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, AuthenticationError) or "InvalidAuthToken" in str(e) or "AuthenticationError" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def auth_failure_message(address: str) -> str:
    """What to do when the cluster at ``address`` refuses this process: names the variables and what they hold
    now (the path, never a token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        have = "RAY_AUTH_TOKEN is set (and takes precedence over RAY_AUTH_TOKEN_PATH)"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        have = f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        have = "neither RAY_AUTH_TOKEN_PATH nor RAY_AUTH_TOKEN is set"
    return (
        f"the Ray cluster at {address} refused this process's authentication token ({have}; "
        f"RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', '(unset)')}). Set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN_PATH to the cluster's token file: a Slurm data job's is "
        "LOG_DIR/slurm-<jobid>/ray-auth/token, a `make ray-up` cluster's runs/ray-auth/<cluster_name>/auth_token "
        "(see docs/CLUSTER_SECURITY.md)"
    )


def join_ray_cluster(address: str, **init_kwargs) -> None:
    """``ray.init(address=...)`` with the token from Ray's variables (``RAY_AUTH_MODE=token`` is implied when a
    token variable is set); :class:`RayAuthError` naming the variables when the cluster refuses it."""
    import ray

    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    _refresh_ray_auth_config()
    try:
        ray.init(address=address, **init_kwargs)
    except Exception as e:
        if _is_auth_failure(e):
            raise RayAuthError(auth_failure_message(address)) from None
        raise


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
    local_ray_auth()
    log.info(
        "starting a local Ray: %d CPUs, %d MB object store, token authentication %s",
        num_cpus,
        object_store_mb,
        "on" if os.environ["RAY_AUTH_MODE"] == "token" else "OFF",
    )
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
            )
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
            join_ray_cluster(address, log_to_driver=False)
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
