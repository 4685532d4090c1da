"""docs/cluster.md's block for a cluster on one machine, as bench/cluster_nodes.py reads it (tests/cluster/ runs it)."""

from __future__ import annotations

import subprocess

from bench.cluster_nodes import METRICS_PORT_OFFSET, documented_block, worker_command


def test_the_block_is_bash_and_sets_every_port_by_a_variable_with_a_default():
    block = documented_block()
    assert subprocess.run(["bash", "-n", "-c", block]).returncode == 0
    for default in ("${RAY_PORT:-6390}", "${DASHBOARD_PORT:-8266}", "${NODE_PORTS:-20000}",
                    "${CLUSTER_TEMP_DIR:-/tmp/flux-cluster}"):
        assert default in block
    assert block.count(".venv/bin/ray start") == 3 and block.count(".venv/bin/serve run") == 1
    for node, offset in METRICS_PORT_OFFSET.items():  # where the harness scrapes each node's metrics
        assert f"--metrics-export-port $((NODE_PORTS + {offset}))" in block, node


def test_a_worker_is_started_again_by_its_own_command_after_the_settings():
    script = worker_command(documented_block(), "w1")
    assert script.startswith("unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    assert script.count(".venv/bin/ray start") == 1 and '{"w1": 1}' in script and "serve run" not in script
    assert "RAY_PORT=${RAY_PORT:-6390}" in script
