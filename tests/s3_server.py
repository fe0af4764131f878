"""A real S3-compatible server for the tests: moto's standalone ``moto_server`` on 127.0.0.1, spoken to over
HTTP by the code under test (nothing is patched in-process).

``local_s3_server()`` (a context manager, also used by benchmarks/bench_loader.py) and the ``s3_server`` session
fixture: start ``moto_server`` (installed by ``make setup`` from requirements.txt) on a
free port as a subprocess, waits until it answers, sets ``AWS_ENDPOINT_URL`` and dummy credentials in
``os.environ`` (so the test process and every subprocess it starts use the server), creates a bucket, and at
the end restores the environment and kills the server by its PID. ``s3_prefix``: a fresh ``s3://bucket/<id>``
prefix per test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from parallel.process_groups import free_port

AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
START_TIMEOUT_S = 60


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    pid: int
    secret: str  # the dummy secret key in use (tests check it never shows up in logs or errors)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"


class S3ServerError(RuntimeError):
    pass


def _moto_server() -> str:
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise S3ServerError(f"{exe} not found: moto[server] is pinned in requirements.txt; run `make setup`")
    return str(exe)


@contextlib.contextmanager
def local_s3_server(enforce_auth: bool = False) -> Iterator[S3Server]:
    """The server; ``enforce_auth``: moto checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT=0``), so the dummy
    ones are refused with AccessDenied/InvalidAccessKeyId (no bucket is created then)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_file = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if enforce_auth else {})}
    proc = subprocess.Popen(
        [_moto_server(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise S3ServerError(
                    f"moto_server exited with {proc.returncode}: {Path(log_file.name).read_text()[-2000:]}"
                )
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise S3ServerError(f"moto_server did not answer on {endpoint} within {START_TIMEOUT_S} s") from e
                time.sleep(0.2)
        for k in AWS_VARS:
            os.environ.pop(k, None)
        secret = "test-secret-" + uuid.uuid4().hex
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="AKIATESTKEY" + uuid.uuid4().hex[:8].upper(),
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_DEFAULT_REGION="us-east-1",
        )
        bucket = "test-" + uuid.uuid4().hex[:12]
        from data_pipeline import storage

        if not enforce_auth:
            fs, _ = storage.filesystem(f"s3://{bucket}")
            fs.mkdir(bucket)
        yield S3Server(endpoint, bucket, proc.pid, secret)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()
        proc.wait(timeout=30)
        log_file.close()
        os.unlink(log_file.name)


@pytest.fixture(scope="session")
def s3_server():
    with local_s3_server() as server:
        yield server


@pytest.fixture
def s3_prefix(s3_server) -> str:
    return f"{s3_server.url}/{uuid.uuid4().hex[:10]}"
