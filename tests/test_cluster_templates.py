"""Cluster launch files without a cluster: the Makefile targets print what they would submit (DRY=1), reject bad
input with a clear message, and the Ray cluster config / RayJob manifest are valid. Fast (no services)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*REPO.glob("clusters/**/*.sh"), *REPO.glob("clusters/**/*.sbatch"), REPO / "clusters/slurm/nccl.env"])


def make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``make TARGET VAR=...`` in the repository root; the cluster targets come from clusters/clusters.mk, which
    the top-level Makefile includes (added explicitly while it does not)."""
    files = [] if "clusters/clusters.mk" in (REPO / "Makefile").read_text() else ["-f", "Makefile", "-f",
                                                                                  "clusters/clusters.mk"]
    e = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "NODES", "GPUS", "MAKEFLAGS", "MFLAGS")}
    e.update(env or {})
    return subprocess.run(["make", "--no-print-directory", *files, *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=60, check=False)


def printed_commands(out: str, tag: str) -> list[list[str]]:
    """The argv of every command line ``[tag] env ... sbatch ...`` / ``[tag] .../ray ...`` (shell-quoted)."""
    cmds = [shlex.split(line[len(tag) + 3:]) for line in out.splitlines() if line.startswith(f"[{tag}] ")]
    return [c for c in cmds if c[0] == "env" or c[0].endswith("ray")]


def opts(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_parse_and_are_strict(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    if text.startswith("#!"):                    # executables (lib.sh and nccl.env are sourced)
        assert "set -euo pipefail" in text, f"{script} must run with set -euo pipefail"
        assert os.access(script, os.X_OK), f"{script} must be executable"


def test_slurm_pretrain_flash_32x8_dry_run_prints_the_sbatch_command() -> None:
    r = make("slurm-pretrain", "CONFIG=flash", "NODES=32", "GPUS=8", "TIME=24:00:00", "DRY=1",
             "ARGS=data.shards_dir=/lustre/v4/shards")
    assert r.returncode == 0, r.stderr
    cmds = printed_commands(r.stdout, "slurm-pretrain")
    assert len(cmds) == 1, r.stdout
    argv = cmds[0]
    assert argv[0] == "env"
    env = dict(a.split("=", 1) for a in argv[1:argv.index("sbatch")])
    assert env["V4_DEVICE"] == "gpu" and env["V4_NPROC_PER_NODE"] == "8"
    assert env["V4_RUN_DIR"] == str(REPO / "runs/flash")
    o = opts(argv)
    assert o["nodes"] == "32" and o["gpus-per-node"] == "8" and o["ntasks-per-node"] == "1"
    assert o["time"] == "24:00:00"
    assert o["signal"] == "USR1@600"                  # srun steps get it (not B:): the trainer runs under srun
    assert "--exclusive" in argv
    assert o["output"] == str(REPO / "runs/flash/logs/slurm-%j.out")
    i = next(i for i, a in enumerate(argv) if a.endswith("clusters/slurm/pretrain.sbatch"))
    assert argv[i + 1:] == ["flash", "data.shards_dir=/lustre/v4/shards"]


def test_dry_run_creates_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = make("slurm-pretrain", "CONFIG=tiny", "NODES=2", f"RUN_DIR={run_dir}", "DRY=1")
    assert r.returncode == 0, r.stderr
    assert not run_dir.exists()


def test_slurm_pretrain_chain_and_cpu_mode() -> None:
    r = make("slurm-pretrain", "CONFIG=tiny", "NODES=2", "GPUS=3", "DEVICE=cpu", "CHAIN=3", "REQUEUE=0", "DRY=1")
    assert r.returncode == 0, r.stderr
    cmds = printed_commands(r.stdout, "slurm-pretrain")
    assert len(cmds) == 3
    assert "dependency" not in opts(cmds[0])
    assert opts(cmds[1])["dependency"] == "afterany:JOBID1" and opts(cmds[2])["dependency"] == "afterany:JOBID2"
    for argv in cmds:
        assert "gpus-per-node" not in opts(argv) and "--exclusive" not in argv   # CPU mode: no GPU request
        assert "--no-requeue" in argv
        assert "V4_DEVICE=cpu" in argv and "V4_NPROC_PER_NODE=3" in argv and "V4_SELF_REQUEUE=0" in argv


@pytest.mark.parametrize("args, message", [
    (["NODES=4"], "CONFIG is required"),                             # the Makefile's tiny default is not taken
    (["CONFIG=nope", "NODES=4"], "unknown CONFIG 'nope'"),
    (["CONFIG=flash", "NODES=abc"], "NODES must be a positive integer, got 'abc'"),
    (["CONFIG=flash", "NODES=0"], "NODES must be a positive integer"),
    (["CONFIG=flash", "GPUS=eight"], "GPUS must be a positive integer"),
    (["CONFIG=flash", "DEVICE=tpu"], "DEVICE must be gpu or cpu"),
    (["CONFIG=flash", "ARGS=train.steps"], "overrides must look like section.key=value"),
])
def test_slurm_pretrain_rejects_bad_input(args: list[str], message: str) -> None:
    r = make("slurm-pretrain", *args, "DRY=1")
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "sbatch" not in r.stdout


def test_slurm_pretrain_known_configs_listed_on_error() -> None:
    r = make("slurm-pretrain", "CONFIG=flsh", "DRY=1")
    assert "known: " in r.stderr and "flash" in r.stderr


def test_slurm_data_dry_run() -> None:
    r = make("slurm-data", "NODES=4", "OUTPUT=/lustre/v4/shards", "DRY=1")
    assert r.returncode == 0, r.stderr
    (argv,) = printed_commands(r.stdout, "slurm-data")
    o = opts(argv)
    assert o["nodes"] == "4" and o["ntasks-per-node"] == "1"
    i = next(i for i, a in enumerate(argv) if a.endswith("clusters/slurm/data.sbatch"))
    rest = argv[i + 1:]
    assert rest[0] == "run" and rest[rest.index("--output") + 1] == "/lustre/v4/shards"
    assert Path(rest[rest.index("--mixture") + 1]).is_file()
    assert make("slurm-data", "NODES=x", "DRY=1").returncode != 0


def test_ray_targets_dry_run() -> None:
    r = make("ray-data", "RAY_ADDRESS=http://head:8265", "OUTPUT=/shared/v4/shards", "DRY=1")
    assert r.returncode == 0, r.stderr
    (argv,) = printed_commands(r.stdout, "ray-data")
    assert argv[1:3] == ["job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    import json
    renv = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert renv["working_dir"] == str(REPO) and ".venv" in renv["excludes"]
    entry = argv[argv.index("--") + 1:]
    assert entry[:4] == ["python", "-m", "data_pipeline", "run"]
    assert entry[entry.index("--output") + 1] == "/shared/v4/shards"
    assert (REPO / entry[entry.index("--mixture") + 1]).is_file()
    r = make("ray-data", "DRY=1")
    assert r.returncode != 0 and "OUTPUT is required" in r.stderr
    for target in ("ray-up", "ray-down"):
        r = make(target, "DRY=1")
        assert r.returncode == 0, r.stderr
        (argv,) = printed_commands(r.stdout, target)
        assert argv[1:3] == [target[4:], "--yes"] and argv[3].endswith("clusters/ray/cluster.yaml")


def test_ray_cluster_yaml_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((REPO / "clusters/ray/cluster.yaml").read_text())
    full = prepare_config(cfg)
    validate_config(full)                         # Ray's own JSON schema for `ray up`
    assert full["provider"]["type"] == "local"
    assert len(cfg["provider"]["worker_ips"]) == cfg["max_workers"]
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=") == 2     # explicit auth mode on every node
    assert "make setup" in " ".join(cfg["setup_commands"])


def test_kuberay_rayjob_manifest() -> None:
    doc = yaml.safe_load((REPO / "clusters/ray/rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    pinned = re.search(r"^ray\[[^\]]*\]==([\d.]+)", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert spec["rayClusterSpec"]["rayVersion"] == pinned
    assert spec["shutdownAfterJobFinishes"] is True
    entry = shlex.split(spec["entrypoint"])
    assert entry[entry.index("-m") + 1] == "data_pipeline" and "run" in entry
    assert (REPO / entry[entry.index("--mixture") + 1]).is_file()
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + \
           [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1                        # driver, head and workers run the same code
    for p in pods:
        env = {e["name"]: e["value"] for e in p["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == "disabled" and env["PYTHONPATH"] == "/app"
    assert f"rayproject/ray:{pinned}" in (REPO / "clusters/ray/Dockerfile").read_text()


def test_dry_run_target_runs_the_layout_planner() -> None:
    r = make("dry-run", "CONFIG=flash", "NODES=32", "GPUS=8", "DRY=1")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("[dry-run] "))
    argv = shlex.split(line[len("[dry-run] "):])
    assert argv[1:] == ["-m", "pretrain.dry_run", "--config", "flash", "--world", "256"]
    assert "CONFIG is required" in make("dry-run", "NODES=32", "DRY=1").stderr
    assert "NODES must be a positive integer" in make("dry-run", "CONFIG=flash", "NODES=x", "DRY=1").stderr
    # the real planner, on a config small enough to be quick: the memory table for 2 ranks
    r = make("dry-run", "CONFIG=tiny", "NODES=1", "GPUS=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny on 2 GPUs" in r.stdout and "| pp rank |" in r.stdout
