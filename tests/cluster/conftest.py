"""A real Ray cluster of three nodes on this machine, once per module, with deploy/cluster-local.yaml on it.

`cluster`: docs/cluster.md's block for a cluster on one machine, run as printed (bench/cluster_nodes.py): a
head (2 CPUs, no GPU), workers `w1` and `w2` (2 CPUs and one logical GPU each), then `serve run` of
deploy/cluster-local.yaml as shipped but for its HTTP port; healthy with one generator replica on each worker.
Every process of it is stopped by its pid at the end.
"""

from __future__ import annotations

import time

import pytest

from bench.cluster_nodes import ROOT, TEST_TUNING, WORKERS, LocalCluster, node_env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, flux_cache, tiny_dir):
    """Every node runs the checkout (PYTHONPATH) and finds the small model in the session's cache. The
    module's clock starts here: its wall time is printed at the end (with -s)."""
    started = time.monotonic()
    env = node_env({**TEST_TUNING, "PYTHONPATH": str(ROOT), "FLUX_SERVE_CACHE": str(flux_cache),
                    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    nodes = LocalCluster(tmp_path_factory.mktemp("cl"), env)
    try:
        nodes.start()
        print(f"\ncluster: the documented block ran in {time.monotonic() - started:.1f} s")
        nodes.wait_nodes({"head", *WORKERS})
        nodes.wait_serving(set(WORKERS))
        print(f"cluster: 3 nodes, cluster-local.yaml healthy with 2 generator replicas after "
              f"{time.monotonic() - started:.1f} s")
        yield nodes
    finally:
        stopping = time.monotonic()
        nodes.stop()
        left = nodes.processes()
        print(f"\ncluster: stopped in {time.monotonic() - stopping:.1f} s; module wall time "
              f"{time.monotonic() - started:.1f} s")
        assert not left, f"processes of the cluster left: {left}"
