"""A real multi-node Ray cluster on this machine, for the multi-node and fault tests.

Each node is a `ray start --block` process (the head first, then `ray start --address ...`) with
its own CPUs, custom resource (`node_a`, `node_b`, ...), object store, temp dir and ports; the head's
dashboard (the job API) listens on 127.0.0.1. The cluster stays apart from any other Ray on the
machine (the test session's in-process `ray.init`, other people's):

- its own `--temp-dir` (a short path under /tmp: Ray's unix sockets live there), so its
  `ray_current_cluster` file is not the one a plain `ray.init()` looks for;
- every port given explicitly (free ports), so nothing collides with a default-port Ray;
- drivers reach it only by its explicit address: the job API (`run_job`) sets RAY_ADDRESS for jobs;
- no token authentication (RAY_AUTH_MODE=disabled on its nodes), whatever ~/.ray/auth_token holds;
- stopping it signals the process groups of its `ray start`s, then SIGKILLs whatever still descends
  from them (Ray workers run in process groups of their own): never a global `ray stop`; and a
  `ray start` gets SIGTERM when the test process dies (CI timeout).

Processes are found through /proc (psutil is not a dependency): `processes()` lists this cluster's
processes with their titles (`ray::RayTrainWorker`, `ray::MapBatches(...)`, ...), so that a test can
kill exactly one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's `ray` CLI, next to its python
ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- /proc --------------------------------------------------------------------------------------


@dataclass
class Proc:
    pid: int
    ppid: int
    started: int  # clock ticks after boot: with the pid, identifies the process (pids are reused)
    title: str  # the command line as shown by ps (Ray workers rename themselves `ray::...`)


def _all_processes() -> dict[int, Proc]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        # stat: "pid (comm) state ppid ... starttime(22nd) ..."; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):  # dead, not yet reaped by its parent: gone for every purpose here
            continue
        title = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        out[int(entry)] = Proc(int(entry), int(fields[1]), int(fields[19]), title)
    return out


def descendants(roots: list[int]) -> list[Proc]:
    """Every live process below the given pids (not the roots themselves)."""
    procs = _all_processes()
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(procs[child])
            todo.append(child)
    return out


def _alive(procs: list[Proc]) -> list[Proc]:
    """Those of `procs` still running (the same processes, not new ones with a reused pid)."""
    live = _all_processes()
    return [p for p in procs if p.pid in live and live[p.pid].started == p.started]


def _stop_with_parent() -> None:
    """In a node's `ray start`, before it runs: SIGTERM it when the test process dies, so that a
    killed test session (CI timeout) does not leave its cluster running (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the cluster --------------------------------------------------------------------------------


@dataclass
class Node:
    name: str  # also its custom resource: a task can ask for {"node_a": 0.01}
    num_cpus: int
    object_store_mb: int
    popen: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class LocalCluster:
    """`with LocalCluster(["node_a", "node_b"]) as cluster:` - a head (the first) and workers."""

    names: list[str] = field(default_factory=lambda: ["node_a", "node_b"])
    num_cpus: int = 1
    object_store_mb: int = 250
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every node (and its jobs)
    start_timeout_s: float = 120.0

    def __post_init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths < 108 bytes
        self.nodes = [Node(n, self.num_cpus, self.object_store_mb) for n in self.names]
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    # The environment of every node: this venv first on PATH, no outside RAY_ADDRESS, quiet.
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # No token authentication (Ray 2.60 turns it on when ~/.ray/auth_token exists): a throwaway
        # cluster on loopback, and every client of it (job API, drivers) then needs no token.
        env["RAY_AUTH_MODE"] = "disabled"
        env.update(self.env)
        return env

    def _start_node(self, node: Node, head: bool) -> None:
        ports = _free_ports(6)
        args = [RAY, "start", "--block", "--disable-usage-stats",
                "--temp-dir", self.temp_dir,
                "--num-cpus", str(node.num_cpus), "--num-gpus", "0",
                *(self._node_args(node, head) or ["--resources", json.dumps({node.name: 1})]),
                "--object-store-memory", str(node.object_store_mb * 1024 * 1024),
                "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5])]
        if head:
            args += ["--head", "--port", str(self.gcs_port),
                     "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(self.client_port)]
        else:
            args += ["--address", self.address]
        node.log = Path(self.temp_dir) / f"{node.name}.log"
        with open(node.log, "wb") as log:
            node.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self._env(), cwd=str(ROOT), start_new_session=True,
                                          preexec_fn=_stop_with_parent)

    def start(self) -> "LocalCluster":
        try:
            for i, node in enumerate(self.nodes):
                self._start_with_retries(node, head=i == 0)
        except BaseException:
            self.cleanup()  # the error carries the log's tail
            raise
        return self

    def _start_with_retries(self, node: Node, head: bool, attempts: int = 3) -> None:
        """On a loaded machine a raylet can miss Ray's fixed 30 s registration window and its
        `ray start` gives up: kill what it left and start the node again."""
        for attempt in range(attempts):
            self._start_node(node, head)
            try:
                if head:
                    self._wait(self._dashboard_up, "the head's dashboard")
                n = self.nodes.index(node) + 1
                self._wait(lambda: len(self.alive_nodes()) >= n, f"{n} alive nodes")
                return
            except RuntimeError:  # its `ray start` exited
                if attempt == attempts - 1:
                    raise
                _signal_group(node.popen.pid, signal.SIGKILL)
                node.popen.wait(10)

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + self.start_timeout_s
        while time.time() < deadline:
            for node in self.nodes:
                if node.popen is not None and node.popen.poll() is not None:
                    raise RuntimeError(f"`ray start` of {node.name} exited ({node.popen.returncode}):\n"
                                       + node.log.read_text()[-3000:])
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Ray cluster in {self.temp_dir} did not get {what} in {self.start_timeout_s} s")

    def _node_args(self, node: Node, head: bool) -> list[str]:
        """Extra `ray start` arguments of a node (replacing its custom resource when not empty)."""
        return []

    def _dashboard_up(self) -> bool:
        with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as r:
            return r.status == 200

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes as the dashboard lists them (resources_total included)."""
        with urllib.request.urlopen(f"{self.dashboard_url}/nodes?view=summary", timeout=10) as r:
            data = json.load(r)
        return [n for n in data["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]

    def processes(self) -> list[Proc]:
        """This cluster's processes (raylets, GCS, workers, job drivers...), never another Ray's."""
        return descendants([n.popen.pid for n in self.nodes if n.popen is not None])

    def node_processes(self, name: str) -> list[Proc]:
        """The processes of one node (its `ray start` and everything below it)."""
        node = next(n for n in self.nodes if n.name == name)
        return descendants([node.popen.pid]) if node.popen is not None else []

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node at once, as when its machine is taken away: its `ray start`
        group, then whatever of it left the group (Ray workers run in groups of their own)."""
        node = next(n for n in self.nodes if n.name == name)
        procs = self.node_processes(name)
        _signal_group(node.popen.pid, signal.SIGKILL)
        for proc in _alive(procs):
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        node.popen.wait(10)

    def workers(self, title_contains: str) -> list[Proc]:
        return [p for p in self.processes() if p.title.startswith("ray::") and title_contains in p.title]

    def stop(self) -> None:
        """SIGTERM each node's process group (`ray start --block` shuts its node down), a few seconds'
        grace, then SIGKILL whatever of this cluster is left: only processes started here (the nodes'
        groups and their descendants), never another Ray on the machine."""
        roots = [n.popen.pid for n in self.nodes if n.popen is not None]
        ours = descendants(roots)  # before any exits: an orphan is no longer below its `ray start`
        for pid in reversed(roots):  # workers first, the head last
            _signal_group(pid, signal.SIGTERM)
        deadline = time.time() + 5
        while time.time() < deadline and _alive(ours):
            time.sleep(0.2)
        for pid in roots:
            _signal_group(pid, signal.SIGKILL)
        for proc in _alive(ours + descendants(roots)):  # anything that left the groups
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for node in self.nodes:
            if node.popen is not None:
                try:
                    node.popen.wait(10)
                except subprocess.TimeoutExpired:
                    pass

    def keep_logs(self, dest: Path) -> None:
        """Copy the cluster's Ray logs (autoscaler, GCS, raylets, job drivers) to `dest` before
        cleanup() deletes them: what a failed test's reader needs."""
        for session in Path(self.temp_dir).glob("session_2*"):
            shutil.copytree(session / "logs", Path(dest) / session.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "events", "export_events"))

    def cleanup(self) -> None:
        self.stop()
        deadline = time.time() + 15  # a process still dying may write a last log file into it
        while Path(self.temp_dir).exists() and time.time() < deadline:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            time.sleep(0.2)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


# -- jobs -----------------------------------------------------------------------------------------


def entrypoint(*args: str) -> str:
    """A job entrypoint running this venv's python on the project (`-m boneage.cli ...` or a
    workflow script by its absolute path): the job API runs it in a shell on the head node."""
    import shlex

    return shlex.join([sys.executable, *args])


def run_job(cluster: LocalCluster, command: str, timeout_s: float = 600.0, on_poll=None,
            poll_s: float = 0.1) -> tuple[str, str]:
    """Submit `command` through the Ray job API and wait for it to end; returns (status, logs).
    `on_poll()` is called every `poll_s` while the job runs (a test kills processes from there).
    The timeout only keeps a broken run from hanging the test session: the job is then stopped."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    job = client.submit_job(entrypoint=command)
    deadline = time.time() + timeout_s
    while True:
        status = client.get_job_status(job)
        if status.is_terminal():
            return str(status.value), client.get_job_logs(job)
        if time.time() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"job {command!r} still {status} after {timeout_s} s:\n"
                               + client.get_job_logs(job)[-5000:])
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)


# -- a local twin of cluster.yaml: the same node types, autoscaled by Ray's fake multi-node provider ---

# What the twin's nodes get of each instance type (Ray detects it on EC2; a fake node must declare it):
# one CPU each on this machine, the GPU count of the type as logical GPUs (no CUDA behind them).
TWIN_INSTANCE_GPUS = {"g5.2xlarge": 1, "g5.12xlarge": 4, "g6.2xlarge": 1, "p4d.24xlarge": 8}


def local_twin(cluster_yaml: str | Path = ROOT / "cluster.yaml", cpus_per_node: int = 1,
               idle_timeout_minutes: float | None = None) -> dict:
    """cluster.yaml's autoscaling config with the fake multi-node provider: the same node types, custom
    resources, min/max workers, upscaling speed and (unless given) idle timeout; every node
    `cpus_per_node` CPUs and its instance type's GPUs as logical ones. The head type is renamed to the
    fake provider's `ray.head.default`. Launch, setup and file sync fields are the provider's no-ops."""
    import yaml

    real = yaml.safe_load(Path(cluster_yaml).read_text())
    types = {}
    for name, spec in real["available_node_types"].items():
        declared = spec.get("resources") or {}
        resources = {k: v for k, v in declared.items() if k not in ("CPU", "GPU")}
        resources["CPU"] = min(declared.get("CPU", cpus_per_node), cpus_per_node)  # the head declares 0
        gpus = TWIN_INSTANCE_GPUS.get(spec["node_config"].get("InstanceType"), 0)
        if gpus:
            resources["GPU"] = gpus
        twin = {"resources": resources, "node_config": {}}
        if name == real["head_node_type"]:
            name, twin["max_workers"] = "ray.head.default", 0
        else:
            twin.update(min_workers=spec.get("min_workers", 0), max_workers=spec.get("max_workers", 1))
        types[name] = twin
    return {
        "cluster_name": real["cluster_name"] + "-local", "max_workers": real["max_workers"],
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": real["idle_timeout_minutes"] if idle_timeout_minutes is None else idle_timeout_minutes,
        # No node updaters (nothing to set up: the "nodes" are local raylets; the fake provider's tags
        # are read-only, so an updater's first step would fail every launch) and no launch-config hash.
        # Every fake node has this machine's IP: the autoscaler must key its load metrics by node id,
        # or it sees one node flickering between the nodes' resources and never finds one idle.
        "provider": {"type": "fake_multinode", "disable_node_updaters": True, "disable_launch_config_check": True,
                     "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types, "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class AutoscalingLocalCluster(LocalCluster):
    """A head whose autoscaler (Ray's fake multi-node provider, RAY_FAKE_CLUSTER=1) starts and stops
    worker "nodes" (raylets on this machine) of the twin's node types as tasks ask for them. The head's
    resources are the twin's head type's; the workers are processes below the head's monitor, so
    stop() reaches them too."""

    twin: dict = field(default_factory=local_twin)

    def __post_init__(self):
        super().__post_init__()
        self.names = ["head"]
        head = self.twin["available_node_types"]["ray.head.default"]["resources"]
        self.nodes = [Node("head", int(head.get("CPU", 0)), self.object_store_mb)]
        self.twin["provider"]["gcs_address"] = self.address
        self.config_file = Path(self.temp_dir) / "cluster-local.json"
        self.config_file.write_text(json.dumps(self.twin))
        self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.head_resources = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}

    def _node_args(self, node: Node, head: bool) -> list[str]:
        return ["--autoscaling-config", str(self.config_file),
                "--resources", json.dumps(self.head_resources)] if head else []

    def worker_nodes(self) -> list[dict]:
        """Alive nodes other than the head, with their resources (dashboard's view)."""
        return [n for n in self.alive_nodes() if not n["raylet"].get("isHeadNode")]
