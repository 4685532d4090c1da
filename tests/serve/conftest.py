"""One real local Ray Serve for the whole test session, on 127.0.0.1 and a free port (never 8000).

Each test module deploys the application with the args it needs (`deploy_app`); Serve redeploys
only what changed. Tests talk to it over real HTTP.
"""

from __future__ import annotations

import pytest

from tests.serve.helpers import free_port


@pytest.fixture(scope="session")
def serve_url(flux_cache, tiny_dir) -> str:
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        address="local",
        num_cpus=4,  # logical: the ingress and jobs reserve 0, each generator 1
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"FLUX_SERVE_CACHE": str(flux_cache), "HF_HUB_OFFLINE": "1"}},
        _metrics_export_port=free_port(),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
