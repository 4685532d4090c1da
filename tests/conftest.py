"""Shared fixtures: the built-in small model, LoRA files, one local Ray Serve and the apps deployed on it,
made once per test session.

Everything is made here, offline: no weights are committed and nothing is downloaded. The Ray and app
fixtures live here, not under tests/serve/, because the serve and the browser tests share them: a
fixture imported into a second conftest is a second fixture, and would start Ray twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports Ray or huggingface_hub: no network, no usage stats, local Ray only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The small model's ops are too small for threads to pay, and on a busy 2-core machine two
    threads wait on each other (one call took 3.7 s with 2 threads and 0.26 s with 1). Replicas of
    the serve tests run with `torch_threads: 1` for the same reason."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def flux_cache(tmp_path_factory) -> Path:
    """A private cache for the built-in model, so tests never write to the home directory."""
    cache = tmp_path_factory.mktemp("flux-cache")
    os.environ["FLUX_SERVE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(flux_cache) -> Path:
    from serve_app.tiny import ensure_tiny_dir

    return ensure_tiny_dir(flux_cache)


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory) -> Path:
    """A LoRA root with one file of each format users bring."""
    from serve_app import tiny

    root = tmp_path_factory.mktemp("loras")
    tiny.write_aitoolkit_lora(root / "aitk" / "style.safetensors", seed=0)
    tiny.write_aitoolkit_lora(root / "aitk" / "other.safetensors", seed=10)
    tiny.write_peft_lora(root / "peft.safetensors")
    tiny.write_kohya_lora(root / "kohya.safetensors")
    if hasattr(tiny, "write_xlabs_lora"):
        tiny.write_xlabs_lora(root / "xlabs.safetensors")
    return root


# Serve's replicas and routers export their cached metrics every 100 ms by default: with a dozen replicas idle
# between tests, that loop was a quarter of their CPU. Once a second is enough for the tests' metrics checks.
QUIET_SERVE = {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


@pytest.fixture(scope="session")
def serve_url(flux_cache, tiny_dir, tmp_path_factory) -> str:
    """One real local Ray Serve for the whole session, on 127.0.0.1 and a free port (never 8000).

    The tests talk over real HTTP to the apps deployed on it (`app_url`, `auth_app_url`). Replicas import this checkout (PYTHONPATH), including the test
    engine (tests/support/engines.py), which writes its call records under a session directory.
    """
    import ray
    from ray import serve

    from tests.serve.helpers import free_port
    from tests.support.engines import RECORDS_ENV

    root = Path(__file__).resolve().parents[1]
    records = tmp_path_factory.mktemp("engine-records")
    os.environ[RECORDS_ENV] = str(records)
    port = free_port()
    ray.init(
        address="local",
        num_cpus=16,  # logical: the ingress and jobs reserve 0, each generator replica 1 (the shared app has 7-9)
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"FLUX_SERVE_CACHE": str(flux_cache), "HF_HUB_OFFLINE": "1",
                                  RECORDS_ENV: str(records), "PYTHONPATH": str(root), **QUIET_SERVE}},
        _metrics_export_port=free_port(),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


# The fixtures of the apps that replace the shared one, in the order their tests run: after every other test.
_OWN_DEPLOYS = ("auth_app_url",)


# The tests that share the session's local Ray Serve, one pytest-xdist group: under `--dist loadgroup` they run on
# one worker, in this order, while the other workers take the tests that start no Ray.
_SESSION_SERVE = ("tests/serve/", "tests/browser/")


@pytest.hookimpl(tryfirst=True)  # pytest-xdist reads the groups in its own hook, which would otherwise run first
def pytest_collection_modifyitems(items):
    """Tests that need no deployed app first (no Ray started yet: the cluster tests start their own), then the
    shared app's, then each app of its own (tests/serve/apps.py): a deploy replaces the app before it."""

    def rank(item) -> int:
        names = item.fixturenames
        own = [i for i, name in enumerate(_OWN_DEPLOYS) if name in names]
        return 2 + max(own) if own else 1 if "app_url" in names else 0

    items.sort(key=rank)  # stable: the collected order within each rank
    for item in items:
        if item.nodeid.startswith(_SESSION_SERVE):
            item.add_marker(pytest.mark.xdist_group("serve"))


@pytest.fixture(scope="session")
def app_state(tmp_path_factory) -> Path:
    """The shared app's job store and generated webhook secret."""
    return tmp_path_factory.mktemp("shared-app")


@pytest.fixture(scope="session")
def app_url(serve_url, lora_root, app_state) -> str:
    """The shared app, deployed once for the session (tests/serve/apps.py)."""
    from tests.serve.apps import DEPLOYMENTS, shared_app
    from tests.serve.helpers import deploy_app

    return deploy_app(serve_url, shared_app(lora_root, app_state), ingress={"num_replicas": 2},
                      deployments=DEPLOYMENTS)


@pytest.fixture(scope="session")
def auth_app_url(serve_url, lora_root, tmp_path_factory) -> str:
    """The app behind an API key (tests/serve/apps.py); it replaces the shared app, so its tests run last."""
    from tests.serve.apps import KEY, auth_app
    from tests.serve.helpers import deploy_app

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")  # a trailing newline, as editors write it: stripped when read
    args, deployments = auth_app(lora_root, key_file)
    return deploy_app(serve_url, args, deployments=deployments)
