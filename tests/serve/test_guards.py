"""Guards: limits, auth, backpressure, and timeouts and cancel that really stop work (issue 6)."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app import errors
from tests.serve import helpers
from tests.serve.helpers import app_args, calls, deploy_app, generator_state, steps_run

pytestmark = pytest.mark.serve

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64, "sample_steps": 2}
LONG = {"width": 1024, "height": 1024, "sample_steps": 150}  # many seconds on the small model


@pytest.fixture(scope="module")
def url(serve_url, lora_root, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    args = app_args(
        lora_root,
        auth={"api_key_file": str(key_file)},
        limits={"max_prompts_per_request": 4, "max_body_bytes": 20_000, "max_pending_jobs": 6,
                "max_pending_items": 6, "max_sync_items_per_ingress": 4, "retry_after_s": 3},
    )
    # A batch window, so that two jobs submitted together share a pipeline call.
    options = {"user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3}}
    return deploy_app(serve_url, args, generator=options)


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


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"},
                                     {"Authorization": KEY}], ids=["missing", "wrong-bearer", "wrong-header", "no-scheme"])
def test_a_missing_or_wrong_key_is_401(url, headers):
    for method, path in (("POST", "/v1/generate"), ("POST", "/v1/inference"), ("GET", "/v1/models"),
                         ("GET", "/v1/requests/x/status")):
        answer = httpx.request(method, f"{url}{path}", json=request(), headers=headers, timeout=30)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.json()["error"]["code"] == errors.UNAUTHORIZED


@pytest.mark.parametrize("headers", [AUTH, {"X-API-Key": KEY}], ids=["bearer", "x-api-key"])
def test_the_right_key_is_served(url, headers):
    answer = httpx.post(f"{url}/v1/generate", json=request(), headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text


def test_health_stays_open(url):
    assert httpx.get(f"{url}/health").status_code == 200


# ---- limits ----------------------------------------------------------------------------------


def test_prompt_count_just_under_and_just_over(url):
    four = httpx.post(f"{url}/v1/generate", json=request([{"prompt": "a", **SMALL}] * 4), headers=AUTH, timeout=60)
    assert four.status_code == 200
    five = httpx.post(f"{url}/v1/generate", json=request([{"prompt": "a", **SMALL}] * 5), headers=AUTH)
    assert five.status_code == 400
    assert five.json()["error"]["details"] == {"limit": "max_prompts_per_request", "max": 4, "value": 5, "field": "prompts"}


def test_body_size_just_under_and_just_over(url):
    def body_of(size: int) -> bytes:
        base = request(prompts=[{"prompt": "", **SMALL}], pad="")  # unknown fields are ignored
        filler = size - len(httpx.Request("POST", url, json=base).content)
        base["pad"] = "x" * filler
        data = httpx.Request("POST", url, json=base).content
        assert len(data) == size
        return data

    headers = {**AUTH, "content-type": "application/json"}
    under = httpx.post(f"{url}/v1/generate", content=body_of(20_000), headers=headers, timeout=60)
    assert under.status_code == 200, under.text
    over = httpx.post(f"{url}/v1/generate", content=body_of(20_001), headers=headers)
    assert over.status_code == 413
    assert over.json()["error"]["code"] == errors.BODY_TOO_LARGE


def test_a_chunked_body_over_the_limit_is_413_and_under_it_is_served(url):
    """No Content-Length: the body arrives in chunks and is counted as it comes."""
    def chunked(size: int):
        body = request()
        data = httpx.Request("POST", url, json=body).content
        padded = data[:-1] + b', "pad": "' + b"x" * (size - len(data) - 11) + b'"}'
        assert len(padded) == size
        return (padded[i:i + 4096] for i in range(0, len(padded), 4096))

    headers = {**AUTH, "content-type": "application/json"}
    over = httpx.post(f"{url}/v1/generate", content=chunked(60_000), headers=headers, timeout=60)
    assert over.status_code == 413, over.text
    assert over.json()["error"]["code"] == errors.BODY_TOO_LARGE
    under = httpx.post(f"{url}/v1/generate", content=chunked(19_000), headers=headers, timeout=60)
    assert under.status_code == 200, under.text


def test_timeout_header_must_be_a_positive_number(url):
    answer = httpx.post(f"{url}/v1/generate", json=request(), headers={**AUTH, "X-Flux-Timeout": "soon"})
    assert answer.status_code == 422


# ---- backpressure ------------------------------------------------------------------------------


def test_an_async_burst_gets_some_503s_and_loses_no_accepted_job(url):
    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            body = request([{"prompt": "burst", "width": 128, "height": 128, "sample_steps": 20}])
            return await asyncio.gather(*(client.post(f"{url}/v1/inference", json=body) for _ in range(16)))

    answers = asyncio.run(burst())
    accepted = [a.json()["request_id"] for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 503]
    assert len(accepted) + len(refused) == 16
    assert refused and accepted
    print(f"async burst of 16: {len(accepted)} accepted, {len(refused)} refused with 503")
    for answer in refused:
        assert answer.headers["Retry-After"] == "3"
        assert answer.json()["error"]["code"] == errors.OVERLOADED
    for request_id in accepted:
        assert wait_status(url, request_id, ("succeeded", "failed", "canceled"))["status"] == "succeeded"


def test_a_sync_burst_gets_some_503s_and_the_rest_succeed(url):
    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            body = request([{"prompt": "burst", "width": 128, "height": 128, "sample_steps": 10}])
            return await asyncio.gather(*(client.post(f"{url}/v1/generate", json=body) for _ in range(8)))

    statuses = sorted(a.status_code for a in asyncio.run(burst()))
    assert set(statuses) == {200, 503}
    print(f"sync burst of 8: {statuses.count(200)} served, {statuses.count(503)} refused with 503")


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
