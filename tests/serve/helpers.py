"""Helpers of the serve tests: the test args, deploying the app, waiting on it, reading the replicas.

Test replicas run `tests.support.engines:RecordingEngine` (the real engine, plus `[[fail]]` fault
injection and call records); `calls()` and `steps_run()` read what it recorded.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from serve_app.config import AppArgs
from tests.support.engines import RECORDS_ENV
from tests.support.requests_corpus import merged_args

APP_NAME = "flux"
GENERATOR = "FluxGenerator-flux"
FINISHED = ("succeeded", "failed", "canceled")
TEST_ENGINE = "tests.support.engines:RecordingEngine"

_deployed: dict[str, str | None] = {"key": None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_args(model_id: str = "flux", **fields) -> dict:
    """A model of the test args: the small model on CPU, one torch thread, the recording engine."""
    return {"id": model_id, "source": "tiny", "device": "cpu", "torch_threads": 1, "engine": TEST_ENGINE, **fields}


def app_args(lora_root: Path, **overrides) -> AppArgs:
    """Args for tests: the model `flux`, the test LoRA root, local URLs allowed, jobs in memory (each
    deployment starts with none; tests/serve/test_jobs.py uses a directory store). An override of a
    section (loras, limits, jobs...) is merged into it; `models` replaces the list."""
    base: dict[str, Any] = {
        "models": [model_args()],
        "loras": {"root": str(lora_root), "cache_dir": str(lora_root / ".url-cache"), "allowed_hosts": ["127.0.0.1"],
                  "allow_private_addresses": True, "max_adapters_per_replica": 4},
        "jobs": {"store": "memory"},
    }
    return merged_args(base, overrides)


def deploy_app(serve_url: str, args: AppArgs, *, generator: dict | None = None, ingress: dict | None = None,
               deployments: dict[str, dict] | None = None) -> str:
    """Deploy the app with these args and deployment options, and wait until /health is 200.

    `generator` and `ingress` are the options of `FluxGenerator-flux` and `FluxIngress`. A deploy
    from Python restarts every replica (Serve gives it a new version), so an unchanged one is skipped.
    """
    from ray import serve

    from serve_app.app import INGRESS, JOBS, build_app_with

    options = dict(deployments or {})
    if generator:
        options[GENERATOR] = generator
    if ingress:
        options[INGRESS] = ingress
    # Idle replicas of the previous deploy stop at once instead of after Serve's 2 s wait loop: a
    # deploy from Python replaces every replica (tests/serve/apps.py: the suite deploys twice). And a
    # replica a test kills is noticed at Serve's next health check of it: within 1 s, not Serve's 10 s.
    for name in (INGRESS, JOBS, *(model.deployment_name for model in args.models)):
        options[name] = {"graceful_shutdown_wait_loop_s": 0.1, "health_check_period_s": 1, **options.get(name, {})}
    key = args.model_dump_json() + json.dumps(options, sort_keys=True)
    if _deployed["key"] != key:
        _deployed["key"] = None  # a failed deploy must not look current
        serve.run(build_app_with(args, options), name=APP_NAME, route_prefix="/")
        _deployed["key"] = key
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


def generator_state(loras: bool = False, deployment: str = GENERATOR):
    """A generator replica's GeneratorState (with `loras`, it waits for a running pipeline call)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, APP_NAME).state.remote(loras).result(timeout_s=60)


def _records() -> Path:
    return Path(os.environ[RECORDS_ENV])


def calls(request_ids=None) -> list[dict]:
    """The pipeline calls every test replica recorded, oldest first; only those serving `request_ids` if given."""
    records = []
    for path in _records().glob("calls-*.jsonl"):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    records.sort(key=lambda r: r["t"])
    if request_ids is None:
        return records
    wanted = set(request_ids)
    return [r for r in records if wanted & set(r["requests"])]


def steps_run() -> int:
    """Denoising steps run by every test replica so far."""
    return sum(path.stat().st_size for path in _records().glob("steps-*"))
