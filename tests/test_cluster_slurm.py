"""The Slurm launch files on a real one-node Slurm cluster (tests/cluster_fixtures.py).

In order, sharing one cluster (module scope):
1. the data job (clusters/slurm/data.sbatch via submit_data.sh) starts Ray inside the allocation with token
   authentication (a fresh token in the job's log directory, 0600, removed at the end, although the submitting
   shell carries a stale RAY_AUTH_TOKEN and RAY_AUTH_MODE=disabled), its job server refuses a submission without
   the token (401) or with a wrong one (403), it runs the real data pipeline on a small mixture, writes the shards
   the trainer then reads, leaves no Ray process behind, and the token appears in none of its logs or outputs;
2. the pretraining job (clusters/slurm/pretrain.sbatch via submit_pretrain.sh, CPU mode: torchrun with 2 ranks on
   gloo, the tiny config with tiny overrides) finishes with checkpoints, metrics and the per-job log layout;
3. `scontrol requeue` of a running job: it resumes from its checkpoint and its losses equal the uninterrupted run's;
4. the pre-deadline signal (--time=3 --signal=USR1@150): the trainer checkpoints before the time limit, the job
   requeues itself, and the restart resumes from that checkpoint.
Every client call runs under `timeout`; the daemons are stopped by PID and nothing tagged is left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixtures import (
    REPO,
    TERMINAL_STATES,
    ClusterUnavailable,
    SlurmCluster,
    describe,
    files_containing,
    free_port_range,
    free_ports,
    poll,
    submit_job_http,
    tagged_pids,
    write_small_mixture,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1800)]

STEPS = 12
# the tiny model with tiny overrides; 2 CPU ranks with expert parallelism (as `make pretrain`)
TINY = [
    "train.seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=2",
    "train.warmup_steps=3",
    "run.tensorboard=false",
    "run.progress=false",
    "run.plot=false",
    "parallel.ep=2",
]
RANKS = 2
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")  # the trainer's log line on resume


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    # Our own temp dir (not pytest's, which a concurrent pytest session on the same host may prune): it holds the
    # munge socket and Slurm's state as well as the runs, and is removed at the end.
    base = Path(tempfile.mkdtemp(prefix="v4slurm-", dir="/tmp"))
    cluster = SlurmCluster(base)
    try:
        try:
            cluster.start()
        except ClusterUnavailable as e:
            if os.environ.get("CI"):  # CI runs as root with apt-get: a missing Slurm there is a failure
                pytest.fail(f"local Slurm cluster unavailable on CI: {e}")
            pytest.skip(str(e))
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert not left, f"processes were left running by the Slurm jobs:\n{describe(left)}"


def workdir(cluster: SlurmCluster, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cluster.base))
    return d


def job_processes(cluster: SlurmCluster) -> list[int]:
    """Live processes started by jobs: tagged, minus the daemons, their helpers (slurmctld's slurmscriptd) and
    slurmd's step daemons (which exit on their own once the step has been cleaned up)."""
    daemons = {p.pid for _, p in cluster.procs}
    return [
        p for p in tagged_pids(cluster.tag) if p not in daemons and _ppid(p) not in daemons and _name(p) != "slurmstepd"
    ]


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def submit(script: str, cluster: SlurmCluster, settings: dict[str, str], args: list[str]) -> int:
    """Run a real submit script (clusters/slurm/submit_*.sh) against the test cluster; returns the job id."""
    env = dict(cluster.env, **settings)
    r = subprocess.run(
        ["timeout", "60", str(REPO / "clusters/slurm" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    assert re.search(r"^\[slurm-\w+\] env .* sbatch ", r.stdout, re.MULTILINE), r.stdout  # it prints what it submits
    return int(re.search(r"submitted job (\d+)", r.stdout).group(1))


def log_of(jid: int, log_dir: Path) -> str:
    f = log_dir / f"slurm-{jid}.out"
    return f.read_text(errors="replace") if f.exists() else "(no log)"


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged again after a resume keeps its last value."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[int(r["step"])] = float(r["loss"])
    return out


def latest_checkpoint(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    m = re.fullmatch(r"step_(\d+)", latest.read_text().strip())
    return int(m.group(1)) if m else None


def node_logs(run_dir: Path, jid: int) -> dict[int, str]:
    """restart number -> that restart's node-0 torchrun log."""
    out = {}
    for d in sorted((run_dir / "logs" / f"slurm-{jid}").glob("restart-*")):
        f = d / "node-0.out"
        out[int(d.name.split("-")[1])] = f.read_text(errors="replace") if f.exists() else ""
    return out


def pretrain_settings(cluster: SlurmCluster, run_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "CONFIG": "tiny",
        "NODES": "1",
        "GPUS": str(RANKS),
        "DEVICE": "cpu",
        "RUN_DIR": str(run_dir),
        "V4_RDZV_PORT": str(free_ports(1)[0]),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


# ------------------------------------------------------------------------------------------------- 1. data
@pytest.fixture(scope="module")
def data_job(slurm: SlurmCluster) -> Iterator[dict]:
    """The data pipeline as a Slurm job with its own Ray cluster; its shards feed the trainer tests."""
    base = workdir(slurm, "data")
    mixture = write_small_mixture(base / "mixture.yaml")
    out, logs = base / "shards", base / "logs"
    gcs, dash, client_port, nm, om, metrics, agent, agent_grpc, renv = free_ports(9)
    lo, hi = free_port_range(40)
    # every Ray port explicit: other Ray sessions may run on this host
    start_args = (
        f"--ray-client-server-port={client_port} --node-manager-port={nm} --object-manager-port={om} "
        f"--metrics-export-port={metrics} --dashboard-agent-listen-port={agent} "
        f"--dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={renv} "
        f"--min-worker-port={lo} --max-worker-port={hi}"
    )
    ray_tmp = Path(f"/tmp/v4ray-{slurm.tag[-8:]}")  # short: Ray's socket paths must stay under 108 bytes
    t0 = time.monotonic()
    stale_token = uuid.uuid4().hex  # a submitting shell's leftovers, which the job must not use
    jid = submit(
        "submit_data.sh",
        slurm,
        {
            "NODES": "1",
            "CPUS": str(os.cpu_count() or 1),
            "MIXTURE": str(mixture),
            "OUTPUT": str(out),
            "LOG_DIR": str(logs),
            "V4_RAY_PORT": str(gcs),
            "V4_RAY_DASHBOARD_PORT": str(dash),
            "V4_RAY_TMP": str(ray_tmp),
            "V4_RAY_OBJECT_STORE_BYTES": str(300_000_000),
            "V4_RAY_START_ARGS": start_args,
            "RAY_AUTH_TOKEN": stale_token,
            "RAY_AUTH_MODE": "disabled",
        },
        ["--seq-len", "32", "--vocab-size", "4096"],
    )
    # While the job runs: its token file, and what its job server answers to clients without the token. The job's
    # driver takes far longer to start than these probes (a few HTTP requests every 0.3 s).
    token_file = logs / f"slurm-{jid}" / "ray-auth" / "token"
    dashboard = f"http://127.0.0.1:{dash}"
    seen: dict = {}

    def probed() -> bool:
        if "token" not in seen and token_file.exists():
            seen["token"] = token_file.read_text().strip()
            seen["modes"] = (oct(token_file.stat().st_mode & 0o777), oct(token_file.parent.stat().st_mode & 0o777))
        if "token" in seen:
            status, text = submit_job_http(dashboard, {})
            if status is not None:
                seen["no token"] = (status, text)
                seen["wrong token"] = submit_job_http(dashboard, {"Authorization": f"Bearer {uuid.uuid4().hex}"})
                return True
        return slurm.job(jid).get("JobState") in TERMINAL_STATES  # ended before the probes: seen says so

    poll(probed, 900, 0.3, "the data job's token file and job server")
    job = slurm.wait_done(jid, timeout=900)
    seconds = time.monotonic() - t0
    # job processes (Ray daemons included) must be gone once the job has ended
    try:
        poll(lambda: not job_processes(slurm), 30, 0.5, "the data job's processes to exit")
        left = []
    except TimeoutError:
        left = job_processes(slurm)
    yield {
        "jid": jid,
        "job": job,
        "shards": out,
        "mixture": mixture,
        "logs": logs,
        "seconds": seconds,
        "left": describe(left),
        "ray_tmp": ray_tmp,
        "auth": seen,
        "token_file": token_file,
        "stale_token": stale_token,
    }
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_slurm_data_job_runs_the_pipeline_on_ray_inside_the_allocation(data_job: dict) -> None:
    jid, logs = data_job["jid"], data_job["logs"]
    text = log_of(jid, logs)
    assert data_job["job"]["JobState"] == "COMPLETED", text
    manifest = json.loads((data_job["shards"] / "manifest.json").read_text())
    assert manifest["seq_len"] == 32 and manifest["vocab_size"] == 4096
    assert manifest["sources"]["python_docs"]["samples"] > 100
    # the driver joined the job's Ray cluster (not a local one), and the cluster was torn down
    assert "Ray head on" in text and "data_pipeline exited with status 0" in text and "Ray cluster stopped" in text
    head_log = (logs / f"slurm-{jid}" / "ray-head.out").read_text(errors="replace")
    assert "Ray runtime started" in head_log, head_log[-2000:]
    assert not data_job["left"], f"processes (Ray's) left after the data job:\n{data_job['left']}"


def test_slurm_data_job_ray_refuses_clients_without_its_token(slurm: SlurmCluster, data_job: dict) -> None:
    jid, logs, auth = data_job["jid"], data_job["logs"], data_job["auth"]
    text = log_of(jid, logs)
    assert data_job["job"]["JobState"] == "COMPLETED", text  # the pipeline ran with the token
    assert "token" in auth, f"the job's token file {data_job['token_file']} never appeared:\n{text}"
    token = auth["token"]
    assert len(token) == 64 and token != data_job["stale_token"]
    assert auth["modes"] == ("0o600", "0o700")
    assert "no token" in auth, f"the job ended before its job server answered:\n{text}"
    assert auth["no token"][0] == 401 and "Missing authentication token" in auth["no token"][1], auth["no token"]
    assert auth["wrong token"][0] == 403, auth["wrong token"]
    assert "Ray token authentication on" in text and f"RAY_AUTH_TOKEN_PATH={data_job['token_file']}" in text
    assert not Path("/tmp/v4-unauthenticated-job-ran").exists()
    assert not data_job["token_file"].parent.exists()  # the token died with the cluster
    # the token is in none of the logs and outputs: the batch log, the Ray node logs, Ray's session logs (the
    # driver's included), the Slurm daemons' logs, the shards and their manifest
    roots = [logs, data_job["ray_tmp"], data_job["shards"], slurm.base / "log"]
    n_files = sum(1 for r in roots if r.exists() for f in r.rglob("*") if f.is_file())
    assert n_files > 20, n_files
    hits = files_containing(token, [r for r in roots if r.exists()])
    assert not hits, f"the job's Ray token was written to {hits}"


# ------------------------------------------------------------------------------------------------- 2. pretrain
@pytest.fixture(scope="module")
def data_args(data_job: dict) -> list[str]:
    if data_job["job"]["JobState"] != "COMPLETED":
        pytest.skip("the Slurm data job failed (see test_slurm_data_job...)")
    return [f"data.shards_dir={data_job['shards']}", f"data.mixture={data_job['mixture']}"]


@pytest.fixture(scope="module")
def reference_run(slurm: SlurmCluster, data_args: list[str]) -> dict:
    run_dir = workdir(slurm, "reference") / "run"
    jid = submit(
        "submit_pretrain.sh",
        slurm,
        pretrain_settings(slurm, run_dir),
        [*TINY, *data_args, f"train.steps={STEPS}", "checkpoint.interval=2"],
    )
    job = slurm.wait_done(jid, timeout=900)
    return {"jid": jid, "job": job, "run_dir": run_dir}


def test_slurm_pretrain_job_cpu_mode(reference_run: dict) -> None:
    jid, run_dir, job = reference_run["jid"], reference_run["run_dir"], reference_run["job"]
    text = log_of(jid, run_dir / "logs")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text + str(node_logs(run_dir, jid))
    # metrics: every step once, finite losses
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(0 < v < 20 for v in got.values())
    # checkpoints every 2 steps, the final one named by `latest`
    assert latest_checkpoint(run_dir) == STEPS
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").exists()
    # the per-job log layout: batch log, per-restart node log with rank-prefixed lines, per-rank torchrun logs
    assert f"job {jid} restart 0: 1 node(s)" in text and f"x {RANKS} rank(s), device cpu" in text
    node0 = node_logs(run_dir, jid)[0]
    assert "[default0]:" in node0 and f"steps        {STEPS}/{STEPS}" in node0  # rank 0 logs; the others warnings only
    rank_logs = list((run_dir / "logs" / f"slurm-{jid}" / "restart-0" / "torchrun").glob("*/attempt_0/*/stderr.log"))
    assert len(rank_logs) == RANKS
    assert job.get("Restarts") == "0"


# ------------------------------------------------------------------------------------------------- 3. requeue
def test_slurm_requeue_resumes_and_matches_the_uninterrupted_run(
    slurm: SlurmCluster, data_args: list[str], reference_run: dict
) -> None:
    ref = losses(reference_run["run_dir"])
    assert sorted(ref) == list(range(1, STEPS + 1)), "the reference run did not finish"
    run_dir = workdir(slurm, "requeue") / "run"
    jid = submit(
        "submit_pretrain.sh",
        slurm,
        pretrain_settings(slurm, run_dir),
        [*TINY, *data_args, f"train.steps={STEPS}", "checkpoint.interval=2"],
    )

    # requeue as soon as the first checkpoint exists (the run is then mid-way)
    def checkpoint_or_ended() -> bool:
        return latest_checkpoint(run_dir) is not None or slurm.job(jid)["JobState"] not in ("PENDING", "RUNNING")

    poll(checkpoint_or_ended, 600, 0.2, "the first checkpoint")
    first_ckpt = latest_checkpoint(run_dir)
    assert first_ckpt is not None and first_ckpt < STEPS, log_of(jid, run_dir / "logs")
    t_requeue = time.monotonic()
    slurm.requeue(jid)
    job = slurm.wait_done(jid, timeout=900)
    text = log_of(jid, run_dir / "logs")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text
    assert job["Restarts"] == "1", text
    assert f"job {jid} restart 1:" in text  # SLURM_RESTART_COUNT=1 on the second run
    logs = node_logs(run_dir, jid)
    assert set(logs) == {0, 1}
    resumed = [int(m) for m in RESUMED.findall(logs[1])]
    assert resumed and resumed[0] >= first_ckpt and resumed[0] < STEPS, logs[1][-3000:]
    # The finished run's losses equal the uninterrupted run's: bit for bit from the resumed step on (the checkpoint
    # restores model, optimizers, RNG and data position), and to float32 rounding before it. (Steps the first
    # attempt ran were seen to differ from another run's by one float32 ulp once, on a heavily loaded host.)
    got = losses(run_dir)
    assert sorted(got) == sorted(ref)
    assert {s: v for s, v in got.items() if s > resumed[0]} == {s: v for s, v in ref.items() if s > resumed[0]}
    assert got == pytest.approx(ref, rel=1e-6, abs=0)
    print(f"requeue -> finished in {time.monotonic() - t_requeue:.1f} s; resumed from step {resumed[0]}")


# ------------------------------------------------------------------------------------------------- 4. signal
def test_slurm_pre_deadline_signal_checkpoints_before_the_time_limit(slurm: SlurmCluster, data_args: list[str]) -> None:
    run_dir = workdir(slurm, "signal") / "run"
    # 3 min limit, SIGUSR1 150 s before: due 30 s after the start (Slurm's timer adds up to ~30 s), which leaves
    # time for the trainer's start on a loaded machine. No periodic checkpoints: the only checkpoint is the one
    # the signal asks for.
    jid = submit(
        "submit_pretrain.sh",
        slurm,
        pretrain_settings(slurm, run_dir, TIME="3", SIGNAL_LEAD="150"),
        [*TINY, *data_args, "train.steps=100000", "checkpoint.interval=0"],
    )
    slurm.wait_state(jid, {"RUNNING"}, 120)
    start = slurm.job(jid)["StartTime"]

    # the job requeues itself after the checkpoint
    def requeued_or_ended() -> dict | None:
        j = slurm.job(jid)
        return j if j.get("Restarts") == "1" or j["JobState"] in ("FAILED", "TIMEOUT", "COMPLETED") else None

    job = poll(requeued_or_ended, 240, 1.0, "the job to requeue itself")
    text = log_of(jid, run_dir / "logs")
    assert job["Restarts"] == "1", text + str(node_logs(run_dir, jid))
    pre = json.loads((run_dir / "preempted.json").read_text())
    assert pre["signal"] == 10 and pre["exit_code"] == 75  # SIGUSR1 -> checkpoint -> requeue status
    step = pre["step"]
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "meta.json").exists()
    # written before the time limit (StartTime + 180 s)
    import datetime as dt

    t_start = dt.datetime.fromisoformat(start).timestamp()
    assert (ckpt / "meta.json").stat().st_mtime < t_start + 180
    assert pre["time"] < t_start + 180
    assert (run_dir / "logs" / f"slurm-{jid}" / "restart-0" / "requeue-requested").exists()
    assert "pre-deadline signal received: requeueing job" in text
    assert "SIGUSR1 (time limit near)" in node_logs(run_dir, jid)[0]
    # the restart resumes from the signal's checkpoint
    poll(lambda: RESUMED.search(node_logs(run_dir, jid).get(1, "")), 240, 1.0, "the restart to resume")
    m = RESUMED.search(node_logs(run_dir, jid)[1])
    assert int(m.group(1)) == step
    subprocess.run(["timeout", "10", "scancel", str(jid)], env=slurm.env, check=True)
    slurm.wait_done(jid, 120)
