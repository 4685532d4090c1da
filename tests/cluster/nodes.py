"""A Ray cluster of several nodes on this machine, each node a `ray start --block` process of the test's own.

Each node runs in its own session (`start_new_session=True`), so its PID and process group are the
test's: SIGKILL of the group is a node lost the way a machine is lost (raylet, object store, agents
and every worker process at once), SIGTERM of it a node stopped. Nothing is ever stopped by name.
Every node gets its own ports (none of 6379, 8000, 8265, nor Ray's fixed agent defaults, so a
developer's `make serve` beside the tests is untouched) and the head a temp dir under the test's.

The cluster is driven as an operator drives one, from outside: the `ray` and `serve` command lines
and the dashboard's REST API (Serve's application details, the state API). The test process never
joins it as a driver (the serve tests' local Ray may be running in the same pytest process).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 100 * 2**20

# Test-only Ray tuning, read by the head's GCS when it starts (its system config goes to every node):
# a raylet that stops answering is declared dead after 3 failed checks 1 s apart (Ray's defaults,
# 3 s × 5, take about 15 s), and each node's metrics reach its agent every second.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


# Ports are taken below Linux's ephemeral range (32768-60999 by default), where no outgoing connection of
# the many this cluster makes can take one between its choice and the bind, and each is handed out once.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def node_port() -> int:
    """A port free on every interface now, outside the ephemeral range, never handed out before."""
    for _ in range(1000):
        port = random.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of `ray`/`serve` commands: the Makefile's, less the switch that refuses multi-node Ray."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(extra or {})}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set: `ray start --address` refuses to join
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayNode:
    """One node: a `ray start --block` process, leader of its own process group."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> RayNode:
        self.starts += 1
        out = open(self.log, "ab")
        try:
            self.process = subprocess.Popen([str(BIN / "ray"), "start", "--block", *self.args], cwd=self.cwd,
                                            env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            out.close()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """The node is lost: SIGKILL, at once, to its process group and every process under it (Ray's
        workers, the replicas among them, run in process groups of their own), nothing told to shut down."""
        tree = self.tree()
        self._signal_group(signal.SIGKILL)
        _kill_all(tree)
        self._wait(10)

    def terminate(self) -> list[tuple[int, str]]:
        """Ask the node to stop (SIGTERM to its group: `ray start --block` then stops its processes); the
        processes under it as they were, for `finish`."""
        tree = self.tree()
        self._signal_group(signal.SIGTERM)
        return tree

    def finish(self, tree: list[tuple[int, str]], timeout_s: float = 10) -> None:
        """After `terminate`: wait for the node to stop, then SIGKILL whatever of it is left."""
        if self.process is not None and not self._wait(timeout_s):
            self._signal_group(signal.SIGKILL)
            self._wait(5)
        _kill_all(tree)

    def stop(self, timeout_s: float = 10) -> None:
        self.finish(self.terminate(), timeout_s)

    def tree(self) -> list[tuple[int, str]]:
        """(pid, start time) of every process under this node's `ray start`: its process group's and the
        workers' that the raylet put in groups of their own. The start time tells a reused pid apart."""
        if self.process is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if (stat := _stat(child)) is not None:
                    found.append((child, stat[1]))
                    todo.append(child)
        return found

    def _signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)  # our own process group: the session this node started
        except ProcessLookupError:
            pass

    def _wait(self, timeout_s: float) -> bool:
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        # Processes of the group may outlive its leader for a moment: wait until the group is empty.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def _kill_all(tree: list[tuple[int, str]]) -> None:
    """SIGKILL each process of `tree` that is still the one recorded (same pid and start time)."""
    for pid, started in tree:
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class LocalCluster:
    """A head (no GPU: the ingress, FluxJobs, Serve's controller and proxy) and GPU-less workers that
    claim one logical GPU each (CPU torch ignores it; Ray schedules `num_gpus: 1` replicas on them)."""

    directory: Path
    env: dict[str, str]
    port: int = field(default_factory=node_port)
    dashboard_port: int = field(default_factory=node_port)
    head: RayNode | None = None
    workers: dict[str, RayNode] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        return [
            "--node-manager-port", str(node_port()), "--object-manager-port", str(node_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",  # 0: each worker takes a port the OS gives
            "--dashboard-agent-listen-port", str(node_port()), "--dashboard-agent-grpc-port", str(node_port()),
            "--runtime-env-agent-port", str(node_port()), "--metrics-export-port", str(node_port()),
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--node-ip-address", "127.0.0.1",
            "--disable-usage-stats",
        ]

    def start_head(self, num_cpus: int = 2) -> RayNode:
        temp_dir = self.directory / "ray"  # AF_UNIX socket paths must stay short: keep the name short
        temp_dir.mkdir(parents=True, exist_ok=True)
        args = ["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(node_port()),
                "--temp-dir", str(temp_dir), *self._node_ports()]
        self.head = RayNode("head", args, self.env, self.directory / "head.log", self.directory).start()
        return self.head

    def add_worker(self, name: str, num_cpus: int = 2, num_gpus: int = 1) -> RayNode:
        """A worker node; `name` is also a custom resource of it (1), so tests can tell the nodes apart."""
        args = ["--address", self.address, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
                "--resources", json.dumps({name: 1}), *self._node_ports()]
        node = RayNode(name, args, self.env, self.directory / f"{name}.log", self.directory).start()
        self.workers[name] = node
        return node

    def restart(self, name: str) -> RayNode:
        """The same worker again (a machine back after a crash): same name, fresh ports."""
        old = self.workers[name]
        args = ["--address", self.address, *old.args[old.args.index("--num-cpus"):old.args.index("--node-manager-port")],
                *self._node_ports()]
        node = RayNode(name, args, self.env, old.log, self.directory, starts=old.starts).start()
        self.workers[name] = node
        return node

    def stop(self, grace_s: float = 10) -> None:
        """Stop every node at once (workers, then the head), each by its own process group."""
        nodes = [node for node in [*self.workers.values(), self.head] if node is not None and node.process]
        trees = [node.terminate() for node in nodes]
        deadline = time.monotonic() + grace_s  # one grace period for all, then SIGKILL to what is left
        for node, tree in zip(nodes, trees):
            node.finish(tree, max(0.1, deadline - time.monotonic()))

    # ---- what Ray reports --------------------------------------------------------------------

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> node name (`head` or the worker's name) of every node Ray's state API counts alive."""
        from ray.util.state import list_nodes

        named = {}
        for node in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], detail=True,
                               raise_on_missing_output=False):
            resources = node.resources_total or {}
            name = "head" if node.is_head_node else next((n for n in self.workers if n in resources), "?")
            named[node.node_id] = name
        return named

    def wait_nodes(self, names: set[str], timeout_s: float = 60) -> dict[str, str]:
        """Wait until exactly these nodes are alive (and their ids are known); node id -> name."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.alive_nodes()
                if set(last.values()) == names:
                    return last
            except Exception as exc:  # the dashboard is still starting
                last = exc
            for node in [self.head, *self.workers.values()]:
                if node is not None and node.starts and not node.alive and node.name in names:
                    raise AssertionError(f"node {node.name} exited: {node.log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"nodes {names} not alive after {timeout_s} s: {last}")

    def serve_details(self) -> dict:
        """Serve's application details (`GET /api/serve/applications/`): deployments, replicas, their nodes."""
        return self._get("/api/serve/applications/")

    def replicas(self, deployment: str, app: str = "flux") -> list[dict]:
        """Serve's replicas of a deployment (replica_id, state, node_id, log_file_path, ...)."""
        application = (self.serve_details().get("applications") or {}).get(app)
        if not application:
            return []
        return application["deployments"].get(deployment, {}).get("replicas", [])

    def replica_log(self, replica: dict, deployment: str = "", app: str = "flux") -> Path:
        """A replica's own log file, in the session's logs directory, which every node of this machine shares
        with the head: Serve's `log_file_path` (relative to it), or by its name while it starts."""
        [logs] = (self.directory / "ray").glob("session_2*/logs")
        if "log_file_path" in replica:
            return logs / replica["log_file_path"].lstrip("/")
        return logs / "serve" / f"replica_{app}_{deployment}_{replica['replica_id']}.log"

    def _get(self, path: str) -> Any:
        answer = httpx.get(self.dashboard + path, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def command(self, *argv: str, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A `ray` or `serve` command line of the venv against this cluster, its output captured."""
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd or self.directory, env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)
