"""Fixtures of the HTTP tests without Ray: a LoRA root for the ingress's policy (tests/support/fake_service.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fake_service import write_lora_root


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return write_lora_root(tmp_path_factory.mktemp("loras"))
