"""The command-line client's reading of an ai-toolkit job config (no server needed)."""

from __future__ import annotations

import pytest

from serve_app.client import preview_request


def test_the_clients_request_for_a_job_config():
    config = {"config": {"name": "run", "process": [{"trigger_word": "ohwx", "model": {"quantize": False},
                                                     "sample": {"prompts": ["x"]}}]}}
    assert preview_request(config, "a/b.safetensors", None, "jpeg") == {
        "model": "flux-preview-bf16", "sample": {"prompts": ["x"]}, "output_format": "jpeg",
        "lora": "a/b.safetensors", "trigger_word": "ohwx", "job_name": "run"}
    with pytest.raises(ValueError):
        preview_request({"config": {"process": [{}]}}, None, None, "jpeg")
