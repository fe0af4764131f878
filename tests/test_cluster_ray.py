"""The Ray launch files on a real two-node Ray cluster on this host (tests/cluster_fixtures.py).

A head and one worker (`ray start --block`, Ray token authentication with a fresh token file as the launch files
set it up, bounded object stores, every port explicit, the dashboard / job server on loopback).
1. Clients without the token are refused: an HTTP job submission to /api/jobs/ (401 without a token, 403 with a
   wrong one, and no job is created), a plain `ray.init(address=...)` without a token, and the pipeline's
   `ray_session` with a wrong token file, which fails with a message naming RAY_AUTH_TOKEN_PATH.
2. The data pipeline is submitted with the real clusters/ray/submit_data.sh (`ray job submit`, the token from
   RAY_AUTH_TOKEN_PATH) twice: once undisturbed, once with the worker node's raylet killed (kill -9) while one of
   the job's tasks runs on it. The job still succeeds on the head alone and its output equals the undisturbed
   run's.
3. The token appears in none of the files the tests collect: node logs, Ray's session logs, job logs, the
   submitter's output, the pipeline's output (manifest included).
Nothing is left running afterwards (the cluster is stopped by PID, never with the machine-wide `ray stop`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cluster_fixtures import (
    REPO,
    UNAUTHENTICATED_JOB,
    VENV_BIN,
    RayCluster,
    client,
    describe,
    files_containing,
    poll,
    submit_job_http,
    tagged_pids,
    without_ray_auth,
    write_small_mixture,
    write_token_file,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    # a short base path: Ray's unix socket paths (inside the session dir) must stay under 108 bytes
    base = Path(tempfile.mkdtemp(prefix="v4ray-", dir="/tmp"))
    cluster = RayCluster(base, workers=1, cpus_per_node=1, object_store_bytes=300_000_000)
    try:
        cluster.start()
        yield cluster
    finally:
        killed = cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    if killed:
        print(f"{len(killed)} Ray process(es) outlived the orderly stop and were killed (logged above)")
    assert not tagged_pids(cluster.tag), f"Ray processes still running:\n{describe(tagged_pids(cluster.tag))}"


def submit(cluster: RayCluster, mixture: Path, output: Path, **settings: str) -> subprocess.CompletedProcess:
    """clusters/ray/submit_data.sh against the test cluster (what `make ray-data` runs)."""
    env = dict(
        cluster.env,
        RAY_ADDRESS=cluster.dashboard,
        RAY_BIN=str(VENV_BIN / "ray"),
        MIXTURE=str(mixture),
        OUTPUT=str(output),
        **settings,
    )
    r = subprocess.run(
        ["timeout", "1200", str(REPO / "clusters/ray/submit_data.sh"), "--seq-len", "32", "--vocab-size", "4096"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1260,
        check=False,
    )
    with open(cluster.base / "client.log", "a") as f:  # collected for the token check
        f.write(r.stdout + r.stderr)
    assert "[ray-data] " in r.stdout and " job submit " in r.stdout, r.stdout  # it prints what it submits
    return r


def output_digest(d: Path) -> dict[str, str]:
    """sha256 of every output file, plus the manifest without its timestamps and timings."""
    out = {}
    for f in sorted(d.rglob("*")):
        rel = str(f.relative_to(d))
        if not f.is_file() or rel.startswith("embedded/") or rel in ("report.md", "report.png", "manifest.json"):
            continue
        out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    manifest = json.loads((d / "manifest.json").read_text())
    for k in ("created", "stages", "seconds"):
        manifest.pop(k, None)
    out["manifest.json (without created/stages/seconds)"] = json.dumps(manifest, sort_keys=True)
    return out


# processes titled ray::* that are not tasks of a job: idle workers, the job driver's supervisor, the node agents
NOT_JOB_TASKS = {"ray::IDLE", "ray::JobSupervisor", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def running_task_on(cluster: RayCluster, node: str) -> str:
    """The name of a task executing on ``node`` now (a worker process titled ``ray::<task>``), or ''."""
    raylet = psutil.Process(cluster.raylet_pid(node))
    for p in raylet.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        name = title.split()[0] if title else ""
        if name.startswith("ray::") and name not in NOT_JOB_TASKS:
            return name
    return ""


CONNECT = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('CONNECTED', len(ray.nodes()))"
RAY_SESSION = (
    "import ray; from data_pipeline.ray_session import ray_session\n"
    "with ray_session():\n    print('CONNECTED', len(ray.nodes()))"
)


def test_ray_cluster_refuses_clients_without_the_token(ray_cluster: RayCluster) -> None:
    # 1. the job server: no token -> 401, a wrong token -> 403, and no job was created either way
    status, text = submit_job_http(ray_cluster.dashboard, {})
    assert status == 401 and "Missing authentication token" in text, (status, text)
    status, text = submit_job_http(ray_cluster.dashboard, {"Authorization": f"Bearer {uuid.uuid4().hex}"})
    assert status == 403 and "Invalid authentication token" in text, (status, text)
    jobs = client([str(VENV_BIN / "ray"), "job", "list", "--address", ray_cluster.dashboard], ray_cluster.env, 60)
    assert UNAUTHENTICATED_JOB not in jobs.stdout, jobs.stdout

    # 2. GCS clients, in parallel (each refusal takes Ray's ~20 s of connection retries): a plain ray.init without
    # any token, and the pipeline's ray_session with a wrong token file (RAY_AUTH_MODE implied by the file)
    wrong = write_token_file(ray_cluster.base / "wrong-auth" / "token")
    no_token_env = dict(without_ray_auth(ray_cluster.env), HOME=str(ray_cluster.base))  # no ~/.ray/auth_token
    wrong_env = dict(no_token_env, RAY_ADDRESS=ray_cluster.address, RAY_AUTH_TOKEN_PATH=str(wrong))
    right_env = dict(wrong_env, RAY_AUTH_TOKEN_PATH=str(ray_cluster.token_file))
    wait_nodes = [
        sys.executable,
        str(REPO / "clusters/ray/wait_nodes.py"),
        "--address",
        ray_cluster.address,
        "--nodes",
        "2",
        "--timeout",
        "120",
    ]
    submit_env = dict(
        wrong_env,
        RAY_ADDRESS=ray_cluster.dashboard,
        RAY_BIN=str(VENV_BIN / "ray"),
        MIXTURE=str(REPO / "data_pipeline/configs/default_mixture.yaml"),
        OUTPUT=str(ray_cluster.base),
    )
    submit_data = [str(REPO / "clusters/ray/submit_data.sh"), "--seq-len", "32", "--vocab-size", "64"]
    runs = {
        name: subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, argv, env in [
            ("no token", [sys.executable, "-c", CONNECT, ray_cluster.address], no_token_env),
            ("wrong token", [sys.executable, "-c", RAY_SESSION], wrong_env),
            ("right token", [sys.executable, "-c", RAY_SESSION], right_env),
            ("wait_nodes, wrong token", wait_nodes, wrong_env),
            ("ray job submit, wrong token", submit_data, submit_env),
        ]
    }
    out = {}
    for name, p in runs.items():
        try:
            out[name] = (p.wait(180), p.stdout.read())
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    with open(ray_cluster.base / "client.log", "a") as f:
        f.write("".join(o for _, o in out.values()))
    rc, text = out["no token"]
    assert rc != 0 and "CONNECTED" not in text and "InvalidAuthToken" in text, text[-3000:]
    rc, text = out["wrong token"]
    assert rc != 0 and "CONNECTED" not in text, text[-3000:]
    assert "RayAuthError" in text and f"RAY_AUTH_TOKEN_PATH={wrong}" in text, text[-3000:]
    assert "Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the cluster's token file" in text, text[-3000:]
    rc, text = out["right token"]  # the control: the same client with the cluster's token
    assert rc == 0 and "CONNECTED 2" in text, text[-3000:]
    rc, text = out["wait_nodes, wrong token"]  # data.sbatch's wait: stops at once, naming the variable
    assert rc == 2 and "refused this process's authentication token" in text and "RAY_AUTH_TOKEN_PATH" in text, text
    rc, text = out["ray job submit, wrong token"]  # `make ray-data`: the job server says 403, nothing runs
    assert rc != 0 and "Invalid authentication token" in text, text[-3000:]
    assert (
        f"this client used RAY_AUTH_TOKEN_PATH={wrong}; set RAY_AUTH_TOKEN_PATH to the cluster's token file" in text
    ), text[-3000:]
    jobs = client([str(VENV_BIN / "ray"), "job", "list", "--address", ray_cluster.dashboard], ray_cluster.env, 60)
    assert "-m data_pipeline run" not in jobs.stdout, jobs.stdout


def test_ray_data_job_survives_killing_the_worker_raylet(ray_cluster: RayCluster) -> None:
    # inside the cluster's own temp dir (removed at the end), not pytest's (a concurrent session may prune it)
    tmp_path = ray_cluster.base / "runs"
    tmp_path.mkdir()
    mixture = write_small_mixture(tmp_path / "mixture.yaml")

    # 1. undisturbed run, following the job's logs (exit status = the job's)
    t0 = time.monotonic()
    r = submit(ray_cluster, mixture, tmp_path / "ref")
    assert r.returncode == 0, f"{r.stdout[-5000:]}\n{r.stderr[-3000:]}"
    t_ref = time.monotonic() - t0
    ref = output_digest(tmp_path / "ref")
    assert any(k.startswith("shards/") for k in ref)

    # 2. the same job, submitted without waiting; kill -9 the worker's raylet while a task of it runs there
    job_id = f"v4-fault-{uuid.uuid4().hex[:8]}"
    r = submit(ray_cluster, mixture, tmp_path / "fault", NO_WAIT="1", SUBMISSION_ID=job_id)
    assert r.returncode == 0, r.stdout + r.stderr
    task, deadline, next_status = "", time.monotonic() + 600, 0.0
    while not task:  # cheap process-table polls; the job status rarely
        task = running_task_on(ray_cluster, "worker0")
        if not task and time.monotonic() > next_status:
            status = ray_cluster.job_status(job_id)
            assert status in ("PENDING", "RUNNING"), f"the job ended ({status}) before a task ran on the worker"
            next_status = time.monotonic() + 10
        assert time.monotonic() < deadline, "no task of the job ran on the worker node within 600 s"
        time.sleep(0.1)
    raylet = ray_cluster.raylet_pid("worker0")
    t_kill = time.monotonic()
    os.kill(raylet, signal.SIGKILL)
    print(f"killed the worker raylet (pid {raylet}) while it ran {task}")

    status = poll(
        lambda: (s := ray_cluster.job_status(job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
        900,
        2.0,
        f"job {job_id} to end",
    )
    logs = ray_cluster.job_logs(job_id)
    assert status == "SUCCEEDED", logs[-5000:]
    # the worker node is dead and the head finished the job; the GCS marks a node dead only after its health
    # checks time out, which can come after this (now short) job ended
    poll(lambda: ray_cluster.alive_nodes() == 1, 120, 2.0, "the GCS to mark the killed worker node dead")
    assert output_digest(tmp_path / "fault") == ref  # same output as without the fault
    print(
        f"undisturbed run {t_ref:.0f} s; with the fault: killed at a task of {task}, "
        f"job finished {time.monotonic() - t_kill:.0f} s later"
    )


def test_the_token_appears_in_no_collected_log(ray_cluster: RayCluster) -> None:
    """Last in this module: every file the runs above left in the cluster's directory (node logs, Ray's session
    logs with the job drivers' output, the submitters' output, the pipeline's output and manifest)."""
    roots = [ray_cluster.base]
    n_files = sum(1 for r in roots for f in r.rglob("*") if f.is_file())
    assert n_files > 50, n_files  # the logs are there to be searched
    assert (ray_cluster.base / "client.log").read_text().count("CONNECTED") >= 1
    assert files_containing(ray_cluster.token, [ray_cluster.token_file]) == [ray_cluster.token_file]  # it finds
    hits = files_containing(ray_cluster.token, roots, skip=[ray_cluster.token_file])
    assert not hits, f"the cluster's token was written to {hits}"
    assert oct(ray_cluster.token_file.stat().st_mode & 0o777) == "0o600"
