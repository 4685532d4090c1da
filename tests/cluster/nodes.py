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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.serve.helpers import free_port

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
        """The node is lost: SIGKILL to its whole process group, nothing is told to shut down."""
        self._signal_group(signal.SIGKILL)
        self._wait(10)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the node: SIGTERM to its group (`ray start --block` then stops its processes), SIGKILL after."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        if not self._wait(timeout_s):
            self._signal_group(signal.SIGKILL)
            self._wait(10)

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


@dataclass
class LocalCluster:
    """A head (no GPU: the ingress, FluxJobs, Serve's controller and proxy) and GPU-less workers that
    claim one logical GPU each (CPU torch ignores it; Ray schedules `num_gpus: 1` replicas on them)."""

    directory: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
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
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",  # 0: each worker takes a port the OS gives
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--node-ip-address", "127.0.0.1",
            "--disable-usage-stats",
        ]

    def start_head(self, num_cpus: int = 2) -> RayNode:
        temp_dir = self.directory / "ray"  # AF_UNIX socket paths must stay short: keep the name short
        temp_dir.mkdir(parents=True, exist_ok=True)
        args = ["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
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

    def stop(self) -> None:
        for node in self.workers.values():
            node.stop()
        if self.head is not None:
            self.head.stop()

    # ---- what Ray reports --------------------------------------------------------------------

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> node name (`head` or the worker's name) of every node Ray counts alive."""
        nodes = self._get("/nodes?view=summary")["data"]["summary"]
        named = {}
        for node in nodes:
            raylet = node["raylet"]
            if raylet.get("state") != "ALIVE":
                continue
            resources = raylet.get("resourcesTotal", {})
            name = "head" if raylet.get("isHeadNode") else next((n for n in self.workers if n in resources), "?")
            named[raylet["nodeId"]] = name
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
            except (httpx.HTTPError, KeyError, ValueError) as exc:
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
        application = self.serve_details().get("applications", {}).get(app)
        if not application:
            return []
        return application["deployments"].get(deployment, {}).get("replicas", [])

    def _get(self, path: str) -> Any:
        answer = httpx.get(self.dashboard + path, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def command(self, *argv: str, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A `ray` or `serve` command line of the venv against this cluster, its output captured."""
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd or self.directory, env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)
