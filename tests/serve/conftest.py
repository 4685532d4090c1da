"""One real local Ray Serve for the whole test session, on 127.0.0.1 and a free port (never 8000).

Each test module deploys the application with the args it needs (`deploy_app`). Tests talk to it
over real HTTP. Replicas import the test engine (tests/support/engines.py) from this checkout and
write its call records under a session directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.serve.helpers import free_port
from tests.support.engines import RECORDS_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_url(flux_cache, tiny_dir, tmp_path_factory) -> str:
    import ray
    from ray import serve

    records = tmp_path_factory.mktemp("engine-records")
    os.environ[RECORDS_ENV] = str(records)
    port = free_port()
    ray.init(
        address="local",
        num_cpus=4,  # logical: the ingress and jobs reserve 0, each generator 1
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"FLUX_SERVE_CACHE": str(flux_cache), "HF_HUB_OFFLINE": "1",
                                  RECORDS_ENV: str(records), "PYTHONPATH": str(ROOT)}},
        _metrics_export_port=free_port(),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
