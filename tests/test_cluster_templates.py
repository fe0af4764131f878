"""Cluster launch files without a cluster: the Makefile targets print what they would submit (DRY=1), reject bad
input with a clear message, and the Ray cluster config / RayJob manifest are valid. Fast (no services)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*REPO.glob("clusters/**/*.sh"), *REPO.glob("clusters/**/*.sbatch"), REPO / "clusters/slurm/nccl.env"])


def make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``make TARGET VAR=...`` in the repository root; the cluster targets come from clusters/clusters.mk, which
    the top-level Makefile includes (added explicitly while it does not)."""
    files = (
        []
        if "clusters/clusters.mk" in (REPO / "Makefile").read_text()
        else ["-f", "Makefile", "-f", "clusters/clusters.mk"]
    )
    e = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "NODES", "GPUS", "MAKEFLAGS", "MFLAGS")}
    e.update(env or {})
    return subprocess.run(
        ["make", "--no-print-directory", *files, *args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def printed_commands(out: str, tag: str) -> list[list[str]]:
    """The argv of every command line ``[tag] env ... sbatch ...`` / ``[tag] .../ray ...`` (shell-quoted)."""
    cmds = [shlex.split(line[len(tag) + 3 :]) for line in out.splitlines() if line.startswith(f"[{tag}] ")]
    return [c for c in cmds if c[0] == "env" or c[0].endswith("ray")]


def opts(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_parse_and_are_strict(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    if text.startswith("#!"):  # executables (lib.sh and nccl.env are sourced)
        assert "set -euo pipefail" in text, f"{script} must run with set -euo pipefail"
        assert os.access(script, os.X_OK), f"{script} must be executable"


def test_slurm_pretrain_flash_32x8_dry_run_prints_the_sbatch_command() -> None:
    r = make(
        "slurm-pretrain",
        "CONFIG=flash",
        "NODES=32",
        "GPUS=8",
        "TIME=24:00:00",
        "DRY=1",
        "ARGS=data.shards_dir=/lustre/v4/shards",
    )
    assert r.returncode == 0, r.stderr
    cmds = printed_commands(r.stdout, "slurm-pretrain")
    assert len(cmds) == 1, r.stdout
    argv = cmds[0]
    assert argv[0] == "env"
    env = dict(a.split("=", 1) for a in argv[1 : argv.index("sbatch")])
    assert env["V4_DEVICE"] == "gpu" and env["V4_NPROC_PER_NODE"] == "8"
    assert env["V4_RUN_DIR"] == str(REPO / "runs/flash")
    o = opts(argv)
    assert o["nodes"] == "32" and o["gpus-per-node"] == "8" and o["ntasks-per-node"] == "1"
    assert o["time"] == "24:00:00"
    assert o["signal"] == "USR1@600"  # srun steps get it (not B:): the trainer runs under srun
    assert "--exclusive" in argv
    assert o["output"] == str(REPO / "runs/flash/logs/slurm-%j.out")
    i = next(i for i, a in enumerate(argv) if a.endswith("clusters/slurm/pretrain.sbatch"))
    assert argv[i + 1 :] == ["flash", "data.shards_dir=/lustre/v4/shards"]


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
        assert "gpus-per-node" not in opts(argv) and "--exclusive" not in argv  # CPU mode: no GPU request
        assert "--no-requeue" in argv
        assert "V4_DEVICE=cpu" in argv and "V4_NPROC_PER_NODE=3" in argv and "V4_SELF_REQUEUE=0" in argv


@pytest.mark.parametrize(
    "args, message",
    [
        (["NODES=4"], "CONFIG is required"),  # the Makefile's tiny default is not taken
        (["CONFIG=nope", "NODES=4"], "unknown CONFIG 'nope'"),
        (["CONFIG=flash", "NODES=abc"], "NODES must be a positive integer, got 'abc'"),
        (["CONFIG=flash", "NODES=0"], "NODES must be a positive integer"),
        (["CONFIG=flash", "GPUS=eight"], "GPUS must be a positive integer"),
        (["CONFIG=flash", "DEVICE=tpu"], "DEVICE must be gpu or cpu"),
        (["CONFIG=flash", "ARGS=train.steps"], "overrides must look like section.key=value"),
    ],
)
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
    rest = argv[i + 1 :]
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
    entry = argv[argv.index("--") + 1 :]
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
    validate_config(full)  # Ray's own JSON schema for `ray up`
    assert full["provider"]["type"] == "local"
    assert len(cfg["provider"]["worker_ips"]) == cfg["max_workers"]
    assert "make setup" in " ".join(cfg["setup_commands"])
    # every node reads this cluster's auth settings (the file mount of cluster.sh's token directory) before
    # `ray start`, and no token from the login environment; the job server listens on the head's loopback
    assert cfg["file_mounts"]["~/.v4-ray"] == f"runs/ray-auth/{cfg['cluster_name']}"
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert start.index(". ~/.v4-ray/auth.env") < start.index("ray start") and "unset RAY_AUTH_TOKEN;" in start
        assert "RAY_AUTH_MODE" not in start  # only from auth.env
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head


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
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    ]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1  # driver, head and workers run the same code
    # token auth by the operator: a random token in a Secret, RAY_AUTH_MODE / RAY_AUTH_TOKEN on every container
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    for p in pods:
        env = {e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]}
        assert env["PYTHONPATH"] == "/app"
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)  # the operator's to set
    assert f"rayproject/ray:{pinned}" in (REPO / "clusters/ray/Dockerfile").read_text()


def test_dry_run_target_runs_the_layout_planner() -> None:
    r = make("dry-run", "CONFIG=flash", "NODES=32", "GPUS=8", "DRY=1")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("[dry-run] "))
    argv = shlex.split(line[len("[dry-run] ") :])
    assert argv[1:] == ["-m", "pretrain.dry_run", "--config", "flash", "--world", "256"]
    assert "CONFIG is required" in make("dry-run", "NODES=32", "DRY=1").stderr
    assert "NODES must be a positive integer" in make("dry-run", "CONFIG=flash", "NODES=x", "DRY=1").stderr
    # the real planner, on a config small enough to be quick: the memory table for 2 ranks
    r = make("dry-run", "CONFIG=tiny", "NODES=1", "GPUS=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny on 2 GPUs" in r.stdout and "| pp rank |" in r.stdout


# ------------------------------------------------------------------------------------------------- Ray auth
LAUNCH_FILES = sorted(
    [
        *REPO.glob("clusters/**/*.sh"),
        *REPO.glob("clusters/**/*.sbatch"),
        *REPO.glob("clusters/**/*.yaml"),
        REPO / "clusters/clusters.mk",
    ]
)


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_launch_file_defaults_to_auth_disabled_or_an_open_dashboard(path: Path) -> None:
    text = path.read_text()
    for pattern in (
        r"RAY_AUTH_MODE:-disabled",
        r"RAY_AUTH_MODE,\s*value:\s*disabled",
        r"RAY_AUTH_MODE=disabled[ \t]+\S",
    ):
        assert not re.search(pattern, text), f"{path}: {pattern}"
    # the only `RAY_AUTH_MODE=disabled` lines are the V4_RAY_AUTH=disabled branches
    for i, line in enumerate(text.splitlines()):
        if "RAY_AUTH_MODE=disabled" in line:
            before = "\n".join(text.splitlines()[max(0, i - 8) : i])
            assert "$auth == disabled" in before or "$auth == token" in before, (
                f"{path}:{i + 1}: RAY_AUTH_MODE=disabled outside the V4_RAY_AUTH=disabled branch"
            )
    if path.name != "rayjob.yaml":  # in a pod, 0.0.0.0 is its loopback and pod address
        assert "dashboard-host=0.0.0.0" not in text and 'dashboard-host: "0.0.0.0"' not in text, path


def lib(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``snippet`` in bash after sourcing clusters/lib.sh, with exactly ``env`` (plus PATH)."""
    return subprocess.run(
        ["bash", "-c", f"source {REPO}/clusters/lib.sh; {snippet}"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "token"),
        ({"RAY_AUTH_MODE": "disabled"}, "token"),  # a stale Ray setting is no opt-out
        ({"V4_RAY_AUTH": ""}, "token"),  # what the Makefile passes when unset
        ({"V4_RAY_AUTH": "token"}, "token"),
        ({"V4_RAY_AUTH": "disabled"}, "disabled"),  # the one explicit opt-out
    ],
)
def test_auth_mode_is_token_unless_explicitly_disabled(env: dict[str, str], expected: str) -> None:
    r = lib("ray_auth_mode", env)
    assert r.returncode == 0 and r.stdout.strip() == expected, r.stderr


def test_bad_auth_mode_is_rejected() -> None:
    r = lib("ray_auth_mode", {"V4_RAY_AUTH": "off"})
    assert r.returncode != 0 and "V4_RAY_AUTH must be token or disabled, got 'off'" in r.stderr


def test_new_ray_token_is_fresh_private_and_silent(tmp_path: Path) -> None:
    tokens = []
    for i in range(2):
        f = tmp_path / f"job{i}" / "ray-auth" / "token"
        r = lib(f"new_ray_token {f}", {})
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r  # prints nothing
        assert oct(f.stat().st_mode & 0o777) == "0o600" and oct(f.parent.stat().st_mode & 0o777) == "0o700"
        tokens.append(f.read_text())
        assert re.fullmatch(r"[0-9a-f]{64}", tokens[-1]), "256 random bits in hex, as Ray's generator makes"
    assert tokens[0] != tokens[1]


def fake_ray(tmp_path: Path) -> Path:
    """A stand-in `ray` CLI that records its arguments and Ray's auth variables (never runs anything)."""
    fake = tmp_path / "ray"
    fake.write_text(
        '#!/bin/bash\n{ echo "ARGS $*"; echo "MODE=${RAY_AUTH_MODE:-}"; '
        'echo "TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-}"; echo "PWD=$PWD"; } >> "$FAKE_RAY_LOG"\n'
    )
    fake.chmod(0o755)
    return fake


def test_ray_up_writes_one_private_token_per_cluster_and_down_removes_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # a copy of clusters/ (cluster.sh writes under V4_REPO/runs)
    shutil.copytree(REPO / "clusters", repo / "clusters")
    fake, log = fake_ray(tmp_path), tmp_path / "ray.log"
    env = {"V4_REPO": str(repo), "RAY_BIN": str(fake), "FAKE_RAY_LOG": str(log)}
    auth_dir = repo / "runs/ray-auth/v4-data"
    r = lib_script(repo, ["clusters/ray/cluster.sh", "up"], env)
    assert r.returncode == 0, r.stderr
    token = (auth_dir / "auth_token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert oct((auth_dir / "auth_token").stat().st_mode & 0o777) == "0o600"
    assert oct(auth_dir.stat().st_mode & 0o777) == "0o700"
    assert (auth_dir / "auth.env").read_text() == "RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN_PATH=$HOME/.v4-ray/auth_token\n"
    assert f"PWD={repo}" in log.read_text()  # relative file mounts resolve from the repository root
    assert token not in r.stdout + r.stderr + log.read_text()
    # a second `up` of the same cluster keeps its token (nodes that are not restarted keep working)
    assert lib_script(repo, ["clusters/ray/cluster.sh", "up"], env).returncode == 0
    assert (auth_dir / "auth_token").read_text() == token
    # `make ray-data` finds it through RAY_CLUSTER
    r = lib_script(
        repo,
        ["clusters/ray/submit_data.sh", "--seq-len", "32", "--vocab-size", "64"],
        dict(env, OUTPUT="/shared/out", MIXTURE=str(REPO / "data_pipeline/configs/default_mixture.yaml")),
    )
    assert r.returncode == 0, r.stderr
    assert f"MODE=token\nTOKEN_PATH={auth_dir / 'auth_token'}" in log.read_text()
    assert token not in r.stdout + r.stderr
    # down removes it; the next up makes a new one
    assert lib_script(repo, ["clusters/ray/cluster.sh", "down"], env).returncode == 0
    assert not auth_dir.exists()
    assert lib_script(repo, ["clusters/ray/cluster.sh", "up"], env).returncode == 0
    assert (auth_dir / "auth_token").read_text() != token
    # the explicit opt-out: no token on the nodes, a warning
    r = lib_script(repo, ["clusters/ray/cluster.sh", "up"], dict(env, V4_RAY_AUTH="disabled"))
    assert r.returncode == 0 and "Ray token authentication is DISABLED" in r.stderr
    assert not (auth_dir / "auth_token").exists() and (auth_dir / "auth.env").read_text() == "RAY_AUTH_MODE=disabled\n"


def test_ray_up_rejects_a_cluster_yaml_without_its_token_mount(tmp_path: Path) -> None:
    cfg = (REPO / "clusters/ray/cluster.yaml").read_text().replace("cluster_name: v4-data", "cluster_name: other")
    (tmp_path / "c.yaml").write_text(cfg)
    r = lib_script(REPO, ["clusters/ray/cluster.sh", "up", str(tmp_path / "c.yaml")], {"DRY": "1"})
    assert r.returncode != 0 and '"~/.v4-ray": "runs/ray-auth/other"' in r.stderr, r.stderr


def test_ray_data_without_a_token_stops_naming_the_variables(tmp_path: Path) -> None:
    fake, log = fake_ray(tmp_path), tmp_path / "ray.log"
    r = lib_script(
        REPO,
        ["clusters/ray/submit_data.sh"],
        {
            "RAY_BIN": str(fake),
            "FAKE_RAY_LOG": str(log),
            "OUTPUT": "/shared/out",
            "CONFIG": "tiny",
            "RAY_CLUSTER": str(tmp_path / "none.yaml"),
            "V4_PYTHON": sys.executable,
        },
    )
    assert r.returncode != 0 and "no Ray token" in r.stderr and "RAY_AUTH_TOKEN_PATH" in r.stderr, r.stderr
    assert not log.exists()  # nothing was submitted
    r = lib_script(
        REPO,
        ["clusters/ray/submit_data.sh"],
        {
            "RAY_BIN": str(fake),
            "FAKE_RAY_LOG": str(log),
            "OUTPUT": "/shared/out",
            "CONFIG": "tiny",
            "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing"),
            "V4_PYTHON": sys.executable,
        },
    )
    assert r.returncode != 0 and "is not a readable, non-empty token file" in r.stderr, r.stderr


def lib_script(repo: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """A launch script of ``repo`` with only ``env`` (no Ray auth variables from this process's environment)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "V4_", "MAKE"))}
    return subprocess.run(
        [str(repo / argv[0]), *argv[1:]],
        cwd=repo,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_launch_commands_never_show_object_store_credentials() -> None:
    """The printed (and, without DRY, submitted) commands carry no AWS_* value; no launch file handles them."""
    secret = {
        "AWS_ACCESS_KEY_ID": f"AKIA{os.urandom(8).hex().upper()}",
        "AWS_SECRET_ACCESS_KEY": os.urandom(20).hex(),
        "AWS_SESSION_TOKEN": os.urandom(20).hex(),
    }
    outs = [
        make("slurm-data", "NODES=2", "OUTPUT=/lustre/v4/shards", "DRY=1", env=secret),
        make("ray-data", "RAY_ADDRESS=http://head:8265", "OUTPUT=/shared/v4/shards", "DRY=1", env=secret),
        make("slurm-pretrain", "CONFIG=tiny", "NODES=2", "DRY=1", env=secret),
        make("ray-up", "DRY=1", env=secret),
    ]
    for r in outs:
        assert r.returncode == 0, r.stderr
        for v in secret.values():
            assert v not in r.stdout + r.stderr
    for path in LAUNCH_FILES:
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in code if re.search(r"\$\{?AWS_", ln)], f"{path} handles AWS_* values"
