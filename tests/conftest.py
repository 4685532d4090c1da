"""Shared fixtures: the built-in small model and LoRA files, built once per test session.

Everything is made here, offline: no weights are committed and nothing is downloaded.
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
