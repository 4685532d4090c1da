"""Guards at the door, without Ray (issue 6): the API key, limits, body size, the timeout header, backpressure
and the sync timeout, with their status codes, error envelopes and headers.

The real routes and IngressService over fake clients (tests/support/fake_service.py): a fake generator that
a test holds fills the in-flight bounds and runs past a timeout on demand. That a timeout or a cancel really
stops the pipeline is tested over Serve (tests/serve/test_guards.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.testclient import TestClient

from serve_app import errors
from tests.support.fake_service import FakeApp, args_with, fake_app

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"width": 64, "height": 64, "sample_steps": 2}
FINISHED = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def app(lora_dir, tmp_path_factory) -> FakeApp:
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    args = args_with(
        lora_dir,
        auth={"api_key_file": str(key_file)},
        limits={"max_prompts_per_request": 4, "max_body_bytes": 20_000, "max_pending_jobs": 6,
                "max_pending_items": 6, "max_sync_items_per_ingress": 4, "retry_after_s": 3},
    )
    return fake_app(args)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app.api, follow_redirects=False) as client:
        yield client


@pytest.fixture(autouse=True)
def released(app):
    """No test leaves the fake generator held."""
    yield
    app.generators.release()


def request(prompts=None, **extra) -> dict:
    return {"model": "flux", "prompts": prompts or [{"prompt": "a photo", **SMALL}], **extra}


def wait_finished(client, request_id: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get(f"/v1/requests/{request_id}/status", headers=AUTH).json()
        if status["status"] in FINISHED:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.01)


def assert_overloaded(answer: httpx.Response, limit: str) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "3"
    error = answer.json()["error"]
    assert error["code"] == errors.OVERLOADED
    assert error["details"]["limit"] == limit and error["details"]["retry_after_s"] == 3


# ---- auth ----------------------------------------------------------------------------------

KEYED_ROUTES = [("POST", "/v1/generate"), ("POST", "/v1/inference"), ("POST", "/v1/previews"), ("GET", "/v1/models"),
                ("GET", "/v1/requests/x/status"), ("GET", "/v1/requests/x/result"), ("GET", "/v1/requests/x/images/0"),
                ("GET", "/v1/requests/x/events"), ("DELETE", "/v1/requests/x"), ("GET", "/v1/loras")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"},
                                     {"Authorization": KEY}], ids=["missing", "wrong-bearer", "wrong-header", "no-scheme"])
def test_a_missing_or_wrong_key_is_401(app, client, headers):
    items, jobs = len(app.generators.items), len(app.jobs.manager.jobs)
    for method, path in KEYED_ROUTES:
        answer = client.request(method, path, json=request(), headers=headers)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.json()["error"]["code"] == errors.UNAUTHORIZED
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert (len(app.generators.items), len(app.jobs.manager.jobs)) == (items, jobs)  # nothing ran


@pytest.mark.parametrize("headers", [AUTH, {"X-API-Key": KEY}], ids=["bearer", "x-api-key"])
def test_the_right_key_is_served(client, headers):
    answer = client.post("/v1/generate", json=request(), headers=headers)
    assert answer.status_code == 200, answer.text


def test_health_stays_open(client):
    assert client.get("/health").status_code == 200


# ---- limits ----------------------------------------------------------------------------------


def test_prompt_count_just_under_and_just_over(client):
    four = client.post("/v1/generate", json=request([{"prompt": "a", **SMALL}] * 4), headers=AUTH)
    assert four.status_code == 200
    five = client.post("/v1/generate", json=request([{"prompt": "a", **SMALL}] * 5), headers=AUTH)
    assert five.status_code == 400
    assert five.json()["error"]["details"] == {"limit": "max_prompts_per_request", "max": 4, "value": 5, "field": "prompts"}


def body_of(size: int) -> bytes:
    """A valid request of exactly `size` bytes (unknown fields are ignored)."""
    base = request(prompts=[{"prompt": "", **SMALL}], pad="")
    base["pad"] = "x" * (size - len(json.dumps(base, separators=(",", ":")).encode()))
    data = json.dumps(base, separators=(",", ":")).encode()
    assert len(data) == size
    return data


def test_body_size_just_under_and_just_over(client):
    headers = {**AUTH, "content-type": "application/json"}
    under = client.post("/v1/generate", content=body_of(20_000), headers=headers)
    assert under.status_code == 200, under.text
    over = client.post("/v1/generate", content=body_of(20_001), headers=headers)
    assert over.status_code == 413
    assert over.json()["error"]["code"] == errors.BODY_TOO_LARGE
    assert over.json()["error"]["details"] == {"limit": "max_body_bytes", "max": 20_000, "value": 20_001}


def send_chunked(app: FakeApp, data: bytes, chunk: int = 4096) -> tuple[int, dict]:
    """POST /v1/generate straight to the ASGI app, without Content-Length, in chunks of `chunk` bytes, as a
    server passes a chunked body on (starlette's TestClient would pass it whole)."""
    messages = [{"type": "http.request", "body": data[i:i + chunk], "more_body": i + chunk < len(data)}
                for i in range(0, len(data), chunk)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/generate", "raw_path": b"/v1/generate", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked"), (b"authorization", f"Bearer {KEY}".encode())],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    asyncio.run(app.api(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_chunked_body_over_the_limit_is_413_and_under_it_is_served(app):
    """No Content-Length: the body arrives in chunks and is counted as it comes."""
    status, answer = send_chunked(app, body_of(60_000))
    assert status == 413, answer
    assert answer["error"]["code"] == errors.BODY_TOO_LARGE
    assert answer["error"]["details"]["value"] == 20_480  # refused at the first chunk past the limit
    status, answer = send_chunked(app, body_of(19_000))
    assert status == 200, answer


def test_timeout_header_must_be_a_positive_number(client):
    answer = client.post("/v1/generate", json=request(), headers={**AUTH, "X-Flux-Timeout": "soon"})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"]["errors"][0]["loc"] == ["header", "x-flux-timeout"]


# ---- backpressure ------------------------------------------------------------------------------


def burst(client, path: str, count: int, body: dict) -> list:
    """`count` requests at once, each from a thread of its own; their futures."""
    pool = ThreadPoolExecutor(count)
    futures = [pool.submit(client.post, path, json=body, headers=AUTH) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


def test_an_async_burst_gets_503s_past_the_pending_limits_and_loses_no_accepted_job(app, client):
    app.generators.hold()  # accepted jobs stay pending
    answers = [f.result(timeout=30) for f in burst(client, "/v1/inference", 16, request([{"prompt": "burst", **SMALL}]))]
    accepted = [a.json()["request_id"] for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(accepted) == 6  # max_pending_jobs and max_pending_items
    for answer in refused:
        assert_overloaded(answer, answer.json()["error"]["details"]["limit"])
        assert answer.json()["error"]["details"]["limit"] in ("max_pending_jobs", "max_pending_items")
    app.generators.release()
    for request_id in accepted:
        assert wait_finished(client, request_id)["status"] == "succeeded"


def test_a_sync_burst_gets_503s_past_the_in_flight_bound_and_the_rest_succeed(app, client):
    app.generators.hold()
    futures = burst(client, "/v1/generate", 8, request([{"prompt": "burst", **SMALL}]))
    app.generators.wait_in_flight(4)  # max_sync_items_per_ingress
    deadline = time.monotonic() + 10
    while sum(f.done() for f in futures) < 4:  # the four past the bound are answered at once
        assert time.monotonic() < deadline
        time.sleep(0.005)
    refused = [f for f in futures if f.done()]
    for future in refused:
        assert_overloaded(future.result(), "max_sync_items_per_ingress")
        assert future.result().json()["error"]["details"]["max"] == 4
    app.generators.release()
    served = [f.result(timeout=30) for f in futures if f not in refused]
    assert [a.status_code for a in served] == [200] * 4


# ---- timeouts ------------------------------------------------------------------------------------


def test_a_sync_timeout_is_504_and_gives_up_the_work(app, client):
    app.generators.hold()
    cancelled = app.generators.cancelled
    answer = client.post("/v1/generate", json=request(), headers={**AUTH, "X-Flux-Timeout": "0.3"})
    assert answer.status_code == 504, answer.text
    error = answer.json()["error"]
    assert error["code"] == errors.TIMEOUT and "0.3 s" in error["message"]
    assert app.generators.cancelled == cancelled + 1  # the generator call was cancelled, not left running
    assert app.generators.in_flight == 0
    app.generators.release()
    assert client.post("/v1/generate", json=request(), headers=AUTH).status_code == 200  # its slot was freed
