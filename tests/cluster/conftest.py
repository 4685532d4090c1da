"""A real Ray cluster of three nodes on this machine, once per module, with deploy/cluster-local.yaml on it.

`cluster`: a head (2 CPUs, no GPU) and workers `w1` and `w2` (2 CPUs and one logical GPU each), every node
a `ray start --block` process in a session of its own, on ports of its own, stopped by PID at the end
(tests/cluster/nodes.py). `deployed`: deploy/cluster-local.yaml as shipped but for its HTTP port, deployed
the way docs/cluster.md says (`serve run --address <head> --non-blocking`, from the directory every node
started in), and healthy with one generator replica on each worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.cluster.nodes import FAST_FAILURE_DETECTION, ROOT, LocalCluster, node_env, node_port

CONFIG = ROOT / "deploy/cluster-local.yaml"
GENERATOR = "FluxGenerator-flux"
WORKERS = ("w1", "w2")
SOCKET_PATH_MAX = 107 - len("/ray/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, flux_cache, tiny_dir):
    """Head and two workers; every node runs the checkout (PYTHONPATH) and finds the small model in the
    session's cache. The test's clock starts here: the module's wall time is printed at the end."""
    started = time.monotonic()
    directory = tmp_path_factory.mktemp("cl")
    assert len(str(directory)) < SOCKET_PATH_MAX, f"{directory}: Ray's socket paths would be too long"
    env = node_env({**FAST_FAILURE_DETECTION, "PYTHONPATH": str(ROOT), "FLUX_SERVE_CACHE": str(flux_cache),
                    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    nodes = LocalCluster(directory, env)
    try:
        nodes.start_head()
        nodes.wait_nodes({"head"})
        for joined, name in enumerate(WORKERS, start=1):
            # One at a time: nodes of one machine share the session directory, and two raylets starting at
            # once may pick the same object store socket name there (the second then fails to bind).
            nodes.add_worker(name)
            nodes.wait_nodes({"head", *WORKERS[:joined]})
        print(f"\ncluster: 3 nodes alive after {time.monotonic() - started:.1f} s")
        yield nodes
    finally:
        stopping = time.monotonic()
        nodes.stop()
        print(f"\ncluster: stopped in {time.monotonic() - stopping:.1f} s; module wall time "
              f"{time.monotonic() - started:.1f} s")


@dataclass
class Deployed:
    cluster: LocalCluster
    url: str
    directory: Path  # where `serve run` ran, as every node: .flux-serve/cluster/ is under it

    @property
    def job_records(self) -> Path:
        return self.directory / ".flux-serve/cluster/jobs/records"


@pytest.fixture(scope="module")
def deployed(cluster) -> Deployed:
    config = yaml.safe_load(CONFIG.read_text())
    port = node_port()
    config["http_options"]["port"] = port  # never 8000: a developer's `make serve` may have it
    (cluster.directory / "cluster-local.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    done = cluster.command("serve", "run", "--address", cluster.address, "--non-blocking", "cluster-local.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    wait_serving(cluster, url, {"w1", "w2"})
    print(f"\ncluster: cluster-local.yaml deployed and healthy with 2 generator replicas after "
          f"{time.monotonic() - started:.1f} s")
    return Deployed(cluster, url, cluster.directory)


def generator_nodes(cluster: LocalCluster) -> dict[str, str]:
    """Replica id -> node name of every RUNNING generator replica, as Serve reports it."""
    names = cluster.alive_nodes()
    return {r["replica_id"]: names.get(r.get("node_id", ""), "?") for r in cluster.replicas(GENERATOR)
            if r["state"] == "RUNNING"}


def wait_serving(cluster: LocalCluster, url: str, nodes: set[str], timeout_s: float = 150) -> None:
    """Wait until /health is 200 and the generator replicas RUNNING are on exactly these nodes."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            placed = generator_nodes(cluster)
            last = (health.status_code, health.text[:300], placed)
            if health.status_code == 200 and sorted(placed.values()) == sorted(nodes):
                return
        except Exception as exc:  # the proxy or the dashboard is still starting
            last = exc
        time.sleep(1)
    raise AssertionError(f"not serving on {nodes} after {timeout_s} s: {last}\n{cluster.head.log.read_text()[-2000:]}")
