"""Helpers of the serve tests: the test args, deploying the app, waiting on it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from serve_app.config import AppArgs

APP_NAME = "flux"
FINISHED = ("succeeded", "failed", "canceled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(lora_root: Path, **overrides) -> AppArgs:
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


def wait_status(url: str, request_id: str, wanted=FINISHED, timeout_s: float = 60,
                headers: dict | None = None) -> dict:
    """Poll a job's status until it is one of `wanted` (by default: ended); return that status."""
    deadline = time.time() + timeout_s
    status = None
    while time.time() < deadline:
        status = httpx.get(f"{url}/v1/requests/{request_id}/status", headers=headers).json()
        if status["status"] in wanted:
            return status
        time.sleep(0.05)
    raise TimeoutError(f"{request_id} never reached {wanted}: {status}")


def wait_finished(url: str, request_id: str, timeout_s: float = 60, headers: dict | None = None) -> dict:
    """Poll a job's status until it has ended; return that status."""
    return wait_status(url, request_id, FINISHED, timeout_s, headers)


def generator_stats() -> dict:
    """A generator replica's internals (they wait for its pipeline lock: a running call ends first)."""
    from ray import serve

    return serve.get_deployment_handle("FluxGenerator", APP_NAME).stats.remote().result(timeout_s=60)
