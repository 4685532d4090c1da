"""One real local Ray Serve for the whole test session, on 127.0.0.1 and a free port (never 8000).

Each test module deploys the application with the args it needs (`deploy_app`); Serve redeploys
only what changed. Tests talk to it over real HTTP.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from serve_app.config import AppArgs

APP_NAME = "flux"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_args(lora_root: Path, **overrides) -> AppArgs:
    """Args for tests: the small model on CPU, the test LoRA root, local URLs allowed."""
    base = {
        "model": {"id": "flux", "source": "tiny"},
        "device": "cpu",
        "torch_threads": 1,
        "loras": {"root": str(lora_root), "cache_dir": str(lora_root / ".url-cache"), "allowed_hosts": ["127.0.0.1"],
                  "max_adapters_per_replica": 4},
        "fault_injection": True,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return AppArgs.model_validate(base)


def deploy_app(serve_url: str, args: AppArgs, **options) -> str:
    """Deploy (or redeploy) the app with these args and options, and wait until /health is 200."""
    from ray import serve

    from serve_app.app import assemble

    serve.run(assemble(args, **options), name=APP_NAME, route_prefix="/")
    wait_healthy(serve_url)
    return serve_url


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")
