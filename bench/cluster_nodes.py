"""A Ray cluster of three nodes on this machine, started and deployed by docs/cluster.md's own commands.

The block of docs/cluster.md marked `<!-- tested: ... -->` (a head, workers `w1` and `w2`, then `serve run` of
deploy/cluster-local.yaml) runs as printed, from a directory laid out like the checkout's root: `.venv` links
to this environment's, and `deploy/cluster-local.yaml` is the shipped file with only its HTTP port changed
(never 8000: a developer's `make serve` may have it). The ports are the block's environment variables, set
to free ones here. tests/cluster/ and bench/cluster.py both start their cluster this way.

`ray start` leaves its node's processes running in the session of whoever ran it. The block runs in a session
of its own (and each node started again, in another), so every process of this cluster is found by its
session id and stopped by its pid; nothing is ever stopped by name. A node is lost the way a machine is lost,
by SIGKILL, at once, to its raylet and every process under it (the object store is in the raylet; its
agents and workers, the replicas among them, are the raylet's children). Worker nodes start no log monitor
of their own (one per machine, the head's, reads every node's logs), so that is all of a worker node.

The cluster is driven as an operator drives one, from outside: the `ray` and `serve` command lines, the
dashboard's REST API (Serve's application details, the state API) and each node's Prometheus endpoint.
This process never joins it as a driver (the serve tests' local Ray may be running in the same process).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC = ROOT / "docs/cluster.md"
CONFIG = ROOT / "deploy/cluster-local.yaml"
MARK = "<!-- tested: tests/cluster and bench/cluster.py start their cluster with this block -->"
_BLOCK = re.compile(re.escape(MARK) + r"\n```bash\n(.*?)\n```", re.DOTALL)

APP = "flux"
GENERATOR = "FluxGenerator-flux"
WORKERS = ("w1", "w2")
NODE_PORTS = 30  # the block's nodes take NODE_PORTS .. NODE_PORTS + 29 (head +0..6, w1 +11..16, w2 +21..26)
METRICS_PORT_OFFSET = {"head": 6, "w1": 16, "w2": 26}  # each node's --metrics-export-port, as the block sets it
SOCKET_PATH_MAX = 107 - len("/ray/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")

# Test-only Ray tuning, read by the head's GCS when it starts (its system config goes to every node): a raylet
# that stops answering is declared dead after 3 failed checks 1 s apart (Ray's defaults, 3 s × 5, take about
# 15 s), and each process's metrics reach its node's Prometheus endpoint every 3 s (by default every 10 s). Not
# less: Ray forgets a gauge not set again within two intervals, and the app sets its held gauges every 5 s
# (serve_app/serving/metrics.py). Serve's replicas and routers hand their metrics to Ray once a second instead
# of every 100 ms: that loop was a quarter of an idle replica's CPU, and the exports above are 3 s apart anyway.
METRICS_INTERVAL_S = 3.0
TEST_TUNING = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_metrics_report_interval_ms": str(int(METRICS_INTERVAL_S * 1000)),
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}
# The longest Ray takes under TEST_TUNING to declare a lost node dead: 3 failed checks, each 1 s apart and up to
# 1 s long.
NODE_DEATH_S = 3 * (1.0 + 1.0)


# ---- ports ------------------------------------------------------------------------------------------------

# Ports are taken below Linux's ephemeral range (32768-60999 by default), where no outgoing connection of the
# many this cluster makes can take one between its choice and the bind, and each is handed out once.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def node_port(count: int = 1) -> int:
    """The first of `count` consecutive ports free on every interface now, outside the ephemeral range, never
    handed out before."""
    for _ in range(1000):
        port = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        block = range(port, port + count)
        if _handed_out.isdisjoint(block) and all(_free(p) for p in block):
            _handed_out.update(block)
            return port
    raise RuntimeError(f"no {count} free ports in {PORT_RANGE}")


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of `ray`/`serve` commands: the Makefile's, less the switch that refuses multi-node Ray
    (the documented block unsets it too) and any address of another cluster."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(extra or {})}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set: `ray start --address` refuses to join
    env.pop("RAY_ADDRESS", None)
    return env


# ---- the documented block ---------------------------------------------------------------------------------


def documented_block(doc: Path = DOC) -> str:
    """The marked block of docs/cluster.md, exactly as printed."""
    [block] = _BLOCK.findall(doc.read_text())
    return block


def block_commands(block: str) -> list[str]:
    """The block's commands, each continued line joined to its command."""
    return [command.strip() for command in block.replace("\\\n", " ").splitlines() if command.strip()]


def worker_command(block: str, name: str) -> str:
    """The block's settings (every line before its first `ray start`), then the one that starts worker `name`."""
    commands = block_commands(block)
    first = next(i for i, command in enumerate(commands) if command.startswith(".venv/bin/ray start"))
    [start] = [c for c in commands[first:] if c.startswith(".venv/bin/ray start --address") and f'{{"{name}": 1}}' in c]
    return "\n".join([*commands[:first], start])


# ---- processes --------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, str, str] | None:
    """(parent pid, session id, start time, state) of a process, from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[3]), fields[19], fields[0]


def _processes() -> dict[int, tuple[int, int, str, str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _signal_all(tree: list[tuple[int, str]], sig: int) -> None:
    """Signal each process of `tree` that is still the one recorded (same pid and start time)."""
    for pid, started in tree:
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[3] != "Z":
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_gone(tree: list[tuple[int, str]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any((stat := _stat(pid)) is not None and stat[2] == started and stat[3] != "Z" for pid, started in tree):
            return True
        time.sleep(0.1)
    return False


# ---- the cluster ------------------------------------------------------------------------------------------


@dataclass
class LocalCluster:
    """A head (no GPU: the ingress, FluxJobs, Serve's controller and proxy) and workers `w1` and `w2` that claim
    one logical GPU each (CPU torch ignores it; Ray schedules `num_gpus: 1` replicas on them), as docs/cluster.md
    starts them; then deploy/cluster-local.yaml on it, on `http_port`."""

    directory: Path
    env: dict[str, str]
    port: int = field(default_factory=node_port)
    dashboard_port: int = field(default_factory=node_port)
    node_ports: int = field(default_factory=lambda: node_port(NODE_PORTS))
    http_port: int = field(default_factory=node_port)
    sessions: list[int] = field(default_factory=list)  # the sessions this cluster's processes run in
    block: str = field(default_factory=documented_block)

    def __post_init__(self) -> None:
        temp_dir = self.directory / "ray"  # AF_UNIX socket paths must stay short: keep the name short
        assert len(str(temp_dir)) < SOCKET_PATH_MAX, f"{temp_dir}: Ray's socket paths would be too long"
        self.env = {**self.env, "RAY_PORT": str(self.port), "DASHBOARD_PORT": str(self.dashboard_port),
                    "NODE_PORTS": str(self.node_ports), "CLUSTER_TEMP_DIR": str(temp_dir)}
        # A directory laid out like the checkout's root, for the block's relative paths; every node starts here,
        # so cluster-local.yaml's relative paths (.flux-serve/cluster/...) resolve under it.
        (self.directory / ".venv").symlink_to(BIN.parent, target_is_directory=True)
        config = yaml.safe_load(CONFIG.read_text())
        config["http_options"]["port"] = self.http_port
        self.write_config("deploy/cluster-local.yaml", config)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def job_records(self) -> Path:
        return self.directory / ".flux-serve/cluster/jobs/records"

    def write_config(self, name: str, config: dict) -> Path:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def config(self, name: str = "deploy/cluster-local.yaml") -> dict:
        return yaml.safe_load((self.directory / name).read_text())

    def metrics_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.node_ports + METRICS_PORT_OFFSET[node]}/metrics"

    # ---- starting and stopping -------------------------------------------------------------------------

    def _run(self, script: str, log: str, timeout_s: float = 240) -> None:
        """Run `script` with bash in a session of its own (its nodes' processes stay in it), from the directory."""
        with open(self.directory / log, "ab") as out:
            process = subprocess.Popen(["bash", "-e", "-c", script], cwd=self.directory, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(process.pid)
        try:
            returncode = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        if returncode != 0:
            raise RuntimeError(f"`{script[:200]}...` exited {returncode}: {(self.directory / log).read_text()[-4000:]}")

    def start(self) -> None:
        """The documented block, as printed: the three nodes one at a time, then `serve run --non-blocking`."""
        self._run(self.block, "cluster.log")

    def start_worker(self, name: str) -> None:
        """Worker `name` again (a machine back after a crash), by its command of the block: the same ports."""
        self._run(worker_command(self.block, name), f"{name}.log")

    def processes(self) -> list[tuple[int, str]]:
        """(pid, start time) of every live process of this cluster's sessions."""
        sessions = set(self.sessions)
        return [(pid, stat[2]) for pid, stat in _processes().items() if stat[1] in sessions and stat[3] != "Z"]

    def node_processes(self, name: str) -> list[tuple[int, str]]:
        """A worker node's raylet (found by the node id Ray reports for it) and every process under it."""
        [node_id] = [node_id for node_id, node in self.alive_nodes().items() if node == name]
        table = _processes()
        sessions = set(self.sessions)
        [raylet] = [pid for pid, stat in table.items() if stat[1] in sessions
                    and Path(_cmdline(pid)[0]).name == "raylet" and f"--node_id={node_id}" in _cmdline(pid)]
        children: dict[int, list[int]] = {}
        for pid, stat in table.items():
            children.setdefault(stat[0], []).append(pid)
        tree, todo = [(raylet, table[raylet][2])], [raylet]
        while todo:
            for child in children.get(todo.pop(), []):
                tree.append((child, table[child][2]))
                todo.append(child)
        return tree

    def kill(self, name: str) -> None:
        """Worker `name` is lost: SIGKILL, at once, to its raylet and every process under it, nothing told."""
        tree = self.node_processes(name)
        _signal_all(tree, signal.SIGKILL)
        assert _wait_gone(tree, 10), f"{name}: processes left after SIGKILL"

    def stop(self) -> None:
        """Stop every process of this cluster: SIGKILL, to all at once. Nothing of a test cluster is kept, and
        a SIGTERM gains nothing here: Ray's raylets and GCS wait for each other on it (for seconds)."""
        tree = self.processes()
        _signal_all(tree, signal.SIGKILL)
        _wait_gone(tree, 10)

    # ---- what Ray reports ------------------------------------------------------------------------------

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> node name (`head`, or the worker's, which the block gives each worker as a custom resource)
        of every node Ray's state API counts alive."""
        from ray.util.state import list_nodes

        named = {}
        for node in list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], detail=True,
                               raise_on_missing_output=False):
            resources = node.resources_total or {}
            named[node.node_id] = "head" if node.is_head_node else next((n for n in WORKERS if n in resources), "?")
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
            time.sleep(0.5)
        raise TimeoutError(f"nodes {names} not alive after {timeout_s} s: {last}")

    def actor_nodes(self, class_name: str) -> list[str]:
        """The node name of every ALIVE actor of this class (e.g. `ServeReplica:flux:FluxGenerator-flux`), from
        the state API."""
        from ray.util.state import list_actors

        names = self.alive_nodes()
        return sorted(names.get(actor.node_id or "", "?") for actor in list_actors(
            address=self.dashboard, filters=[("state", "=", "ALIVE"), ("class_name", "=", class_name)],
            raise_on_missing_output=False))

    def serve_details(self) -> dict:
        """Serve's application details (`GET /api/serve/applications/`): deployments, replicas, their nodes."""
        return self._get("/api/serve/applications/")

    def deployment(self, deployment: str, app: str = APP) -> dict:
        application = (self.serve_details().get("applications") or {}).get(app) or {}
        return (application.get("deployments") or {}).get(deployment, {})

    def replicas(self, deployment: str, app: str = APP) -> list[dict]:
        """Serve's replicas of a deployment (replica_id, state, node_id, pid, log_file_path, ...)."""
        return self.deployment(deployment, app).get("replicas", [])

    def replica_nodes(self, deployment: str = GENERATOR) -> dict[str, str]:
        """Replica id -> node name of every RUNNING replica of a deployment, as Serve reports it."""
        names = self.alive_nodes()
        return {r["replica_id"]: names.get(r.get("node_id", ""), "?") for r in self.replicas(deployment)
                if r["state"] == "RUNNING"}

    def replica_log(self, replica: dict, deployment: str = "", app: str = APP) -> Path:
        """A replica's own log file, in the session's logs directory, which every node of this machine shares
        with the head: Serve's `log_file_path` (relative to it), or by its name while it starts."""
        [logs] = (self.directory / "ray").glob("session_2*/logs")
        if "log_file_path" in replica:
            return logs / replica["log_file_path"].lstrip("/")
        return logs / "serve" / f"replica_{app}_{deployment}_{replica['replica_id']}.log"

    def metrics(self, node: str) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every sample a node's Prometheus endpoint exports now."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.metrics_url(node), timeout=10).text
        return [(sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(text) for sample in family.samples]

    def wait_serving(self, nodes: set[str], timeout_s: float = 150) -> None:
        """Wait until /health is 200 and the generator replicas RUNNING are on exactly these nodes."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{self.url}/health", timeout=5)
                placed = self.replica_nodes()
                last = (health.status_code, health.text[:300], placed)
                if health.status_code == 200 and sorted(placed.values()) == sorted(nodes):
                    return
            except Exception as exc:  # the proxy or the dashboard is still starting
                last = exc
            time.sleep(0.5)
        raise AssertionError(f"not serving on {nodes} after {timeout_s} s: {last}\n"
                             f"{(self.directory / 'cluster.log').read_text()[-2000:]}")

    def _get(self, path: str) -> Any:
        answer = httpx.get(self.dashboard + path, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def command(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """A `ray` or `serve` command line of the venv against this cluster, from its directory, output captured."""
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=self.directory, env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)

    def deploy(self, name: str, config: dict) -> float:
        """`serve deploy` of `config` (written as `name`) through the dashboard; seconds the command took."""
        self.write_config(name, config)
        started = time.monotonic()
        done = self.command("serve", "deploy", "--address", self.dashboard, name)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return time.monotonic() - started

