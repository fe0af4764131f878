"""Real local Slurm and Ray clusters on one machine, for the cluster tests.

``SlurmCluster``: Debian's slurm-wlm + munge (installed on first use with apt-get when missing), with our own
munged, slurmctld and slurmd running in the foreground as children of the test process, on free ports, with
the whole state (config, munge key and socket, spool, logs) in one temp dir. Requeue is made quick with
``cred_expire=10`` and ``sched_interval=2``. Stopped by PID (reverse order, SIGTERM then SIGKILL).

``RayCluster``: a head and N worker "nodes" on this host, each a ``ray start --block`` child process with its
own temp dir, explicit free ports, a bounded object store and Ray's token authentication as the launch files set
it up (``RAY_AUTH_MODE=token``, a fresh random token in a 0600 file named by ``RAY_AUTH_TOKEN_PATH``; never
``~/.ray/auth_token``). Never ``ray stop`` (it is machine-wide and would kill other Ray sessions on the host); we
kill our own processes instead.

Every process we start carries ``V4_CLUSTER_TAG=<unique id>`` in its environment. Daemons and job processes
inherit it (Slurm jobs get the submitter's environment, Ray's daemons and workers get the starter's), also
when they re-parent to PID 1 or call ``setsid``; ``tagged_pids`` finds them through ``/proc/<pid>/environ``
and ``kill_tagged`` removes whatever is left, so nothing survives a test, even a failed one.

Every Slurm/Ray client call runs under ``timeout`` (clients retry for minutes when a daemon is unreachable).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("cluster_fixtures")

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests (the project's .venv)
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TAG_VAR = "V4_CLUSTER_TAG"
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class HeadFailed(RuntimeError):
    """The Ray head node exited during start-up."""


class ClusterUnavailable(RuntimeError):
    """The machine cannot host the local cluster (not root, no apt-get, ...); tests skip with this reason."""


# ---------------------------------------------------------------------------------------------- processes
def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free right now (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int, lo: int = 20000, hi: int = 60000) -> tuple[int, int]:
    """A run of ``width`` consecutive ports that are all free now (Ray's worker port range)."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        start = rng.randrange(lo, hi - width)
        ok = True
        for p in range(start, start + width):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + width - 1
    raise RuntimeError(f"no {width} consecutive free ports in [{lo}, {hi})")


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes (not zombies) whose environment holds ``V4_CLUSTER_TAG=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            stat = (d / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state not in ("Z", "X"):
            out.append(int(d.name))
    return sorted(out)


def describe(pids: Iterable[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd[:200]}")
    return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return st not in ("Z", "X")
    except OSError:
        return False


def kill_pids(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL whatever is still alive."""
    pids = [p for p in pids if _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if _alive(p):
            log.warning("pid %d ignored SIGTERM for %.0f s; SIGKILL", p, grace)
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_tagged(tag: str, grace: float = 5.0) -> list[int]:
    """Kill every process carrying ``tag``; returns the PIDs that were still alive (for the leak check)."""
    left = tagged_pids(tag)
    if left:
        log.warning("killing leftover processes of %s:\n%s", tag, describe(left))
        kill_pids(left, grace)
        deadline = time.monotonic() + 10
        while tagged_pids(tag) and time.monotonic() < deadline:
            kill_pids(tagged_pids(tag), 1.0)
    return left


def stop_process(proc: subprocess.Popen, name: str, grace: float = 10.0) -> None:
    """Stop a foreground daemon we started, by PID; reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; SIGKILL", name, proc.pid)
            proc.kill()
            proc.wait(10)


def client(
    argv: list[str], env: dict[str, str], timeout: float = 20, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a cluster client command under ``timeout`` (and a Python-side timeout as a second guard)."""
    full = ["timeout", "-k", "5", str(int(timeout))] + argv
    r = subprocess.run(full, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout + 15, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> rc {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def poll(pred: Callable[[], object], timeout: float, interval: float = 0.5, what: str = "condition") -> object:
    """Call ``pred`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- Slurm
SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SLURM_BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun", "munged"]


def _which(b: str) -> str | None:
    return shutil.which(b, path=SBIN_PATH + ":" + os.environ.get("PATH", ""))


def ensure_slurm_installed() -> None:
    """Install Debian's Slurm and munge when missing (about 10-20 s); a no-op when already installed."""
    if all(_which(b) for b in SLURM_BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and the tests are not running as root (apt-get needs root)")
    if not _which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SBIN_PATH)
    t0 = time.monotonic()
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *lock, *SLURM_PACKAGES],
    ):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    missing = [b for b in SLURM_BINARIES if not _which(b)]
    if missing:
        raise RuntimeError(f"installed {SLURM_PACKAGES} but still missing {missing}")
    log.info("installed %s in %.1f s", " ".join(SLURM_PACKAGES), time.monotonic() - t0)


SLURM_CONF = """\
# Generated by tests/cluster_fixtures.py: one-node Slurm for the cluster tests
ClusterName=v4ci
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10 (default 120) makes a requeued job eligible again after ~10 s instead of ~150 s
AuthInfo=socket={base}/munge/sock,cred_expire=10
MailProg=/bin/true
StateSaveLocation={base}/state/ctld
SlurmdSpoolDir={base}/state/d
SlurmctldPidFile={base}/state/slurmctld.pid
SlurmdPidFile={base}/state/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
# pgid: portable (no cgroup setup); linuxproc leaks processes that re-parent to PID 1
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={base}/log/jobcomp.txt
ReturnToService=2
MinJobAge=600
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _mem_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    """One-node Slurm: ``start()``, ``sbatch()``, ``job()``, ``wait_done()``, ``requeue()``, ``stop()``."""

    def __init__(self, base: Path):
        self.base = base
        self.tag = f"slurm-{uuid.uuid4().hex[:12]}"
        self.host = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        ctld_port, d_port = free_ports(2)
        self.ports = {"ctld": ctld_port, "d": d_port}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=f"{VENV_BIN}:{SBIN_PATH}", **{TAG_VAR: self.tag})
        for k in list(self.env):  # a Slurm job running these tests must not leak its job into ours
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    # -- lifecycle
    def start(self, ready_timeout: float = 60) -> SlurmCluster:
        ensure_slurm_installed()
        b = self.base
        for d in ("munge", "state/ctld", "state/d", "log"):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b / "munge", 0o700)
        key = b / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                base=b,
                ctld_port=self.ports["ctld"],
                d_port=self.ports["d"],
                cpus=os.cpu_count() or 1,
                mem=max(512, _mem_available_mb() // 2),
            )
        )
        t0 = time.monotonic()
        self._spawn(
            "munged",
            [
                _which("munged"),
                "-F",
                "--force",
                f"--socket={b}/munge/sock",
                f"--key-file={key}",
                f"--pid-file={b}/munge/munged.pid",
                f"--log-file={b}/log/munged.log",
                f"--seed-file={b}/munge/seed",
            ],
        )
        poll(lambda: (b / "munge" / "sock").exists(), 20, 0.1, "the munge socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])

        def idle() -> bool:
            self._check_daemons()
            r = client(["sinfo", "-h", "-n", self.host, "-o", "%T"], self.env, timeout=5, check=False)
            return r.stdout.strip() == "idle"

        poll(idle, ready_timeout, 0.2, "the Slurm node to become idle")
        log.info("Slurm up in %.1f s (%s, ports %s)", time.monotonic() - t0, b, self.ports)
        return self

    def _spawn(self, name: str, argv: list) -> None:
        with open(self.base / "log" / f"{name}.stderr", "ab") as f:  # the child keeps its own descriptor
            p = subprocess.Popen(
                [str(a) for a in argv], env=self.env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs.append((name, p))

    def _check_daemons(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; log:\n{self.daemon_logs()}")

    def daemon_logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> list[int]:
        """Cancel jobs, stop the daemons by PID (slurmd, slurmctld, munged), then kill leftover job
        processes. Returns the PIDs that were found left over (the test asserts this is empty)."""
        t0 = time.monotonic()
        if self.procs and all(p.poll() is None for _, p in self.procs):
            client(["scancel", "--full", "-u", "root"], self.env, timeout=10, check=False)
            # give cancelled jobs a moment to end through Slurm (SIGTERM to their steps)
            try:
                poll(lambda: not client(["squeue", "-h"], self.env, 5, check=False).stdout.strip(), 40, 0.5)
            except TimeoutError:
                log.warning("jobs still in squeue at shutdown")
        for name, p in reversed(self.procs):
            stop_process(p, name)
        self.procs.clear()
        left = kill_tagged(self.tag)
        log.info("Slurm down in %.1f s", time.monotonic() - t0)
        return left

    # -- jobs
    def sbatch(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> int:
        r = client(["sbatch", "--parsable", *argv], dict(self.env, **(env or {})), timeout=20, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job(self, jid: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, RunTime, ...)."""
        r = client(["scontrol", "show", "job", "-o", str(jid)], self.env, timeout=10)
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait_done(self, jid: int, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a terminal state; returns its record."""

        def done():
            self._check_daemons()
            j = self.job(jid)
            return j if j.get("JobState") in TERMINAL_STATES else None

        return poll(done, timeout, 0.5, f"Slurm job {jid} to finish")  # type: ignore[return-value]

    def wait_state(self, jid: int, states: set[str], timeout: float) -> dict[str, str]:
        def hit():
            self._check_daemons()
            j = self.job(jid)
            return j if j.get("JobState") in states else None

        return poll(hit, timeout, 0.3, f"Slurm job {jid} to reach {states}")  # type: ignore[return-value]

    def requeue(self, jid: int) -> None:
        client(["scontrol", "requeue", str(jid)], self.env, timeout=10)


# ---------------------------------------------------------------------------------------------- Ray
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "V4_RAY_AUTH")


def without_ray_auth(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """``env`` without any Ray auth setting (a client that brings no token)."""
    return {k: v for k, v in env.items() if k not in RAY_AUTH_VARS}


def write_token_file(path: Path) -> Path:
    """A fresh random token (as Ray's generator makes: 32 random bytes, hex) in ``path`` (0600, directory 0700)."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def files_containing(needle: str, roots: Iterable[Path], skip: Iterable[Path] = ()) -> list[Path]:
    """Every regular file under ``roots`` whose bytes contain ``needle`` (except the ``skip`` files)."""
    skipped = {Path(p).resolve() for p in skip}
    data = needle.encode()
    hits = []
    for root in roots:
        for f in [root] if root.is_file() else sorted(root.rglob("*")):
            try:
                if f.is_file() and not f.is_symlink() and f.resolve() not in skipped and data in f.read_bytes():
                    hits.append(f)
            except OSError:
                continue
    return hits


UNAUTHENTICATED_JOB = "touch /tmp/v4-unauthenticated-job-ran"  # what a refused submission would have run


def submit_job_http(dashboard: str, headers: dict[str, str]) -> tuple[int | None, str]:
    """POST a job to a Ray job server's REST API (``/api/jobs/``, what `ray job submit` does) with ``headers``;
    (HTTP status, body), or (None, reason) when nothing answers on that port."""
    import urllib.error
    import urllib.request

    body = json.dumps({"entrypoint": UNAUTHENTICATED_JOB}).encode()
    req = urllib.request.Request(
        f"{dashboard}/api/jobs/", data=body, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return None, str(e)


class RayCluster:
    """A head plus ``workers`` worker nodes on this host, each a ``ray start --block`` child process."""

    def __init__(self, base: Path, workers: int = 1, cpus_per_node: int = 1, object_store_bytes: int = 300_000_000):
        self.base = base
        self.workers = workers
        self.cpus = cpus_per_node
        self.store = object_store_bytes
        self.tag = f"ray-{uuid.uuid4().hex[:12]}"
        self.nodes: list[tuple[str, subprocess.Popen, Path]] = []
        self.token_file = write_token_file(base / "auth" / "token")
        self.env = dict(
            without_ray_auth(os.environ),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            **{TAG_VAR: self.tag},
        )
        self.env.pop("RAY_ADDRESS", None)
        self._pick_ports()

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def _pick_ports(self) -> None:
        # the GCS must not be reused by anything else on the host: every port explicit and free
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self) -> list[str]:
        nm, om, metrics, agent_http, agent_grpc, renv = free_ports(6)
        lo, hi = free_port_range(40)
        return [
            f"--num-cpus={self.cpus}",
            f"--object-store-memory={self.store}",
            "--disable-usage-stats",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={renv}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
        ]

    def _start_node(self, name: str, argv: list[str]) -> None:
        tmp = self.base / name
        tmp.mkdir(parents=True, exist_ok=True)
        with open(self.base / f"{name}.log", "ab") as f:
            p = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", f"--temp-dir={tmp}", *argv, *self._node_args()],
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.nodes.append((name, p, tmp))

    def start(self, timeout: float = 120, attempts: int = 3) -> RayCluster:
        """Start the nodes; a head that fails to start (a port taken between our probe and Ray's bind by another
        process on this busy host) is retried on fresh ports."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(timeout)
            except HeadFailed as e:
                log.warning("Ray head failed to start (attempt %d/%d): %s", attempt, attempts, str(e)[-500:])
                self.stop()
                if attempt == attempts:
                    raise
                self._pick_ports()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> RayCluster:
        t0 = time.monotonic()
        self._start_node(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
            ],
        )
        poll(lambda: self._check() and self.alive_nodes() >= 1, timeout, 1.0, "the Ray head")
        for i in range(self.workers):
            self._start_node(f"worker{i}", [f"--address={self.address}"])
        poll(
            lambda: self._check() and self.alive_nodes() == 1 + self.workers,
            timeout,
            1.0,
            f"{1 + self.workers} live Ray nodes",
        )
        poll(self._jobs_api_up, timeout, 1.0, "the Ray job server")
        log.info(
            "Ray up in %.1f s (%s, gcs %s, dashboard %s)",
            time.monotonic() - t0,
            self.base,
            self.address,
            self.dashboard,
        )
        return self

    def _check(self) -> bool:
        for name, p, _ in self.nodes:
            if p.poll() is not None and name == "head":
                raise HeadFailed(
                    f"ray head exited with {p.returncode}:\n"
                    f"{(self.base / 'head.log').read_text(errors='replace')[-3000:]}"
                )
        return True

    def nodes_info(self) -> list[dict]:
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive']} for n in ray.nodes()]))"
        )
        r = client([sys.executable, "-c", code], self.env, timeout=60, check=False)
        if r.returncode != 0:
            return []
        return json.loads(r.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> int:
        return sum(n["alive"] for n in self.nodes_info())

    def _jobs_api_up(self) -> bool:
        r = client([str(VENV_BIN / "ray"), "job", "list", "--address", self.dashboard], self.env, 30, check=False)
        return r.returncode == 0

    def raylet_pid(self, node: str) -> int:
        """PID of the raylet of node ``node`` (``head``, ``worker0``, ...): a descendant of its ``ray start``."""
        import psutil

        tmp = next(t for n, _, t in self.nodes if n == node)
        _, p, _ = next(x for x in self.nodes if x[0] == node)
        for c in psutil.Process(p.pid).children(recursive=True):
            try:
                if Path(c.exe()).name == "raylet" or (c.cmdline() and c.cmdline()[0].endswith("/raylet")):
                    return c.pid
            except psutil.Error:
                continue
        raise RuntimeError(f"no raylet found under ray start pid {p.pid} ({tmp})")

    def job_status(self, job_id: str) -> str:
        r = client(
            [str(VENV_BIN / "ray"), "job", "status", "--address", self.dashboard, job_id], self.env, 30, check=False
        )
        m = re.search(r"Job '[^']+' (succeeded|failed|stopped|is running|is pending)", r.stdout)
        if m:
            return {
                "succeeded": "SUCCEEDED",
                "failed": "FAILED",
                "stopped": "STOPPED",
                "is running": "RUNNING",
                "is pending": "PENDING",
            }[m.group(1)]
        m = re.search(r"Status for job '[^']+': (\w+)", r.stdout)
        return m.group(1) if m else "UNKNOWN"

    def job_logs(self, job_id: str) -> str:
        r = client(
            [str(VENV_BIN / "ray"), "job", "logs", "--address", self.dashboard, job_id], self.env, 60, check=False
        )
        return r.stdout + r.stderr

    def stop(self) -> list[int]:
        """Stop every node by PID (SIGTERM to ``ray start --block``, which drains the node and stops its daemons;
        workers and actors exit once their raylet is gone), give stragglers a moment, then kill whatever still
        carries our tag. Returns the PIDs that had to be killed that way (logged; the caller checks that none
        is alive afterwards)."""
        t0 = time.monotonic()
        for name, p, _ in reversed(self.nodes):
            stop_process(p, f"ray {name}", grace=45)
        self.nodes.clear()
        try:
            poll(lambda: not tagged_pids(self.tag), 20, 0.5, "Ray's workers to exit")
        except TimeoutError:
            pass
        left = kill_tagged(self.tag)
        log.info("Ray down in %.1f s", time.monotonic() - t0)
        return left


def write_small_mixture(path: Path, source: str = "python_docs") -> Path:
    """The repository's default mixture reduced to one small embedded source (the Python language reference,
    79 documents), so that the pipeline runs in seconds; everything else (clean, dedup, tokenizer, pack settings)
    stays as the data pipeline defines it."""
    import yaml

    mix = yaml.safe_load((REPO / "data_pipeline/configs/default_mixture.yaml").read_text())
    mix["name"] = "cluster-test"
    mix["sources"] = [dict(s, weight=1.0) for s in mix["sources"] if s["name"] == source]
    if not mix["sources"]:
        raise RuntimeError(f"the default mixture has no source named {source!r}")
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    return path


def leak_report(tag: str) -> str:
    pids = tagged_pids(tag)
    return describe(pids) if pids else ""


__all__ = [
    "REPO",
    "TAG_VAR",
    "VENV_BIN",
    "ClusterUnavailable",
    "RayCluster",
    "SlurmCluster",
    "client",
    "free_ports",
    "files_containing",
    "kill_tagged",
    "poll",
    "submit_job_http",
    "tagged_pids",
    "without_ray_auth",
    "write_token_file",
]
