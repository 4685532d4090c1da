"""Guards over Serve (issue 6): the API key a replica reads at start, and timeouts and cancel that really stop
the pipeline's work.

The guards' HTTP rules (401 for every route, limits, body size, the timeout header, the 503s of backpressure
with Retry-After, the 504 shape) run without Ray in tests/unit/web/test_guards.py.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app import errors
from tests.serve import helpers
from tests.serve.apps import AUTH
from tests.serve.helpers import calls, generator_state, steps_run

pytestmark = [pytest.mark.serve, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "sample_steps": 2}
LONG = {"width": 1024, "height": 1024, "sample_steps": 150}  # many seconds on the small model


@pytest.fixture(scope="module")
def url(auth_app_url):
    """An app of its own, behind an API key read at a replica's start, with a batch window on `flux` so that
    two jobs submitted together share a pipeline call (tests/serve/apps.py)."""
    return auth_app_url


def request(prompts=None, **extra) -> dict:
    return {"model": "flux", "prompts": prompts or [{"prompt": "a photo", **SMALL}], **extra}


def wait_status(url, request_id, wanted, timeout_s=60) -> dict:
    return helpers.wait_status(url, request_id, wanted, timeout_s, headers=AUTH)


def wait_steps(url, request_id, steps: int, timeout_s: float = 60) -> dict:
    """Wait until the job's running image has done `steps` denoising steps (its status' progress)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = httpx.get(f"{url}/v1/requests/{request_id}/status", headers=AUTH).json()
        if status["progress"]["step"] >= steps:
            return status
        time.sleep(0.02)
    raise TimeoutError(f"{request_id} never reached step {steps}: {status}")


def wait_idle(settle_s: float = 0.5) -> int:
    """Wait until the generator runs no more steps; return its step count."""
    steps = steps_run()
    while True:
        time.sleep(settle_s)
        now = steps_run()
        if now == steps:
            return now
        steps = now


# ---- auth ----------------------------------------------------------------------------------


def test_the_key_from_the_file_is_required_and_served(url):
    missing = httpx.post(f"{url}/v1/generate", json=request(), timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == errors.UNAUTHORIZED
    assert httpx.post(f"{url}/v1/generate", json=request(), headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # no key


def test_the_openai_sdks_api_key_is_the_key(url):
    import openai

    from tests.serve.apps import KEY

    def draw(api_key: str) -> list:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)
        return client.images.generate(model="flux", prompt="a photo", size="64x64",
                                      extra_body={"num_inference_steps": 1}).data or []

    with pytest.raises(openai.AuthenticationError):
        draw("not-the-key")
    assert len(draw(KEY)) == 1


# ---- timeouts and cancel -------------------------------------------------------------------------


def test_a_timed_out_job_stops_its_pipeline_early(url):
    before = wait_idle()
    job = httpx.post(f"{url}/v1/inference", json=request([{"prompt": "slow", **LONG}]),
                     headers={**AUTH, "X-Flux-Timeout": "1.5"}).json()
    status = wait_status(url, job["request_id"], ("succeeded", "failed", "canceled"))
    assert status["status"] == "failed" and status["error_code"] == errors.TIMEOUT
    steps = wait_idle() - before
    assert 0 < steps < LONG["sample_steps"]
    print(f"timed out after 1.5 s: {steps} of {LONG['sample_steps']} steps ran")
    started = time.time()
    assert httpx.post(f"{url}/v1/generate", json=request(), headers=AUTH, timeout=60).status_code == 200
    assert time.time() - started < 10  # the replica is free right after


def test_a_sync_timeout_is_504_and_stops_the_work(url):
    before = wait_idle()
    answer = httpx.post(f"{url}/v1/generate", json=request([{"prompt": "slow", **LONG}]),
                        headers={**AUTH, "X-Flux-Timeout": "1"}, timeout=60)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == errors.TIMEOUT
    assert wait_idle() - before < LONG["sample_steps"]


def test_cancel_of_a_running_lone_job_stops_its_pipeline_early(url):
    before = wait_idle()
    job = httpx.post(f"{url}/v1/inference", json=request([{"prompt": "slow", **LONG}]), headers=AUTH).json()
    wait_steps(url, job["request_id"], 2)  # a few steps in (however slow the machine is)
    cancelled = httpx.delete(f"{url}/v1/requests/{job['request_id']}", headers=AUTH).json()
    assert cancelled["status"] == "canceled" and cancelled["error_code"] == errors.CANCELED
    steps = wait_idle() - before
    assert 2 <= steps < LONG["sample_steps"]
    print(f"cancelled a few steps in: {steps} of {LONG['sample_steps']} steps ran")
    # A late finisher never overwrites the cancel.
    assert httpx.get(f"{url}/v1/requests/{job['request_id']}/status", headers=AUTH).json()["status"] == "canceled"


def test_cancelling_one_job_leaves_the_other_job_in_its_call_intact(url):
    shape = {"width": 256, "height": 256, "sample_steps": 100}
    wait_idle()
    # A long blocker of another shape holds the pipeline, so both jobs wait at the gate; cancelling it then lets
    # them share the next call without waiting for the blocker's last step.
    blocker = httpx.post(f"{url}/v1/inference", json=request([{"prompt": "blocker", **LONG}]), headers=AUTH).json()
    wait_steps(url, blocker["request_id"], 1)  # its call runs: the batch window that took it has closed
    jobs = [httpx.post(f"{url}/v1/inference", json=request([{"prompt": p, "seed": s, **shape}], output_format="png"),
                       headers=AUTH).json() for p, s in (("keep me", 1), ("drop me", 2))]
    keep, drop = jobs
    deadline = time.time() + 60
    while generator_state().batching.waiting_items < 2:  # both wait at the gate behind the blocker
        assert time.time() < deadline, "the jobs never reached the gate"
        time.sleep(0.01)
    httpx.delete(f"{url}/v1/requests/{blocker['request_id']}", headers=AUTH)
    while generator_state().batching.waiting_items:  # the gate released both into one call
        assert time.time() < deadline, "the shared call never started"
        time.sleep(0.01)
    started = steps_run()
    while steps_run() < started + 5:  # the shared call a few steps in
        assert time.time() < deadline, "the shared call never ran"
        time.sleep(0.01)
    httpx.delete(f"{url}/v1/requests/{drop['request_id']}", headers=AUTH)
    assert wait_status(url, keep["request_id"], ("succeeded", "failed"))["status"] == "succeeded"
    assert httpx.get(f"{url}/v1/requests/{drop['request_id']}/status", headers=AUTH).json()["status"] == "canceled"
    shared = calls([keep["request_id"]])
    assert [(c["shape"], c["images"], c["requests"]) for c in shared] == [
        ("256x256x100", 2, sorted([keep["request_id"], drop["request_id"]]))]

    kept = httpx.get(f"{url}/v1/requests/{keep['request_id']}/images/0", headers=AUTH).content
    alone = httpx.post(f"{url}/v1/generate", json=request([{"prompt": "keep me", "seed": 1, **shape}], output_format="png"),
                       headers=AUTH, timeout=60).json()["images"][0]["data"]
    diff = np.abs(_pixels(kept) - _pixels(base64.b64decode(alone)))
    assert diff.max() <= 1


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)
