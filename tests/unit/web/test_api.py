"""The HTTP API's rules without Ray (docs/api.md): answers, error envelopes, status codes and headers.

The real routes and IngressService over fake clients (tests/support/fake_service.py): a fake generator that
draws real small images, and the real JobManager on the in-memory store. What needs Serve (real generation,
several ingress replicas, one deployment per model, scale to zero) is in tests/serve/test_api.py.
"""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from serve_app import errors
from serve_app.errors import ApiError
from tests.support.fake_service import MATCHED_MODULES, FakeApp, args_with, fake_app

SMALL = {"width": 64, "height": 64, "sample_steps": 2}
FINISHED = ("succeeded", "failed", "canceled")
MODELS = [{"id": "flux"}, {"id": "flux-b", "description": "a second model", "default_steps": 3,
                           "default_guidance_scale": 2.5}, {"id": "flux-idle", "description": "scales to zero"}]
UNREACHABLE = "http://127.0.0.1:9/"  # allowed by the policy; its download fails in the (fake) generator
REPLICA = "replica-7"


@pytest.fixture(scope="module")
def app(lora_dir) -> FakeApp:
    app = fake_app(args_with(lora_dir, models=MODELS), replica=REPLICA)
    app.generators.fail(lambda item: any(use.source.startswith(UNREACHABLE) for use in item.key.loras),
                        ApiError(errors.LORA_DOWNLOAD_FAILED, f"LoRA {UNREACHABLE}x.safetensors: connection refused"))
    app.generators.fail("[[fail]]", ApiError(errors.GENERATION_FAILED, "the pipeline failed"))
    return app


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app.api, follow_redirects=False) as client:
        yield client


@pytest.fixture(autouse=True)
def jobs_up(app):
    yield
    app.jobs.down = False


def body(**overrides) -> dict:
    request = {"model": "flux", "trigger_word": "sks",
               "prompts": [{"prompt": "[trigger] a photo of a person", "seed": 42, **SMALL}]}
    request.update(overrides)
    return request


def wait_finished(client, request_id: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["status"] in FINISHED:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.01)


def test_async_flow_submit_poll_result_download(app, client):
    request = body(prompts=[{"prompt": "[trigger] one", **SMALL}, {"prompt": "two", "width": 100, "height": 80, "sample_steps": 2}],
                   loras=[{"path": "aitk/style.safetensors", "network_multiplier": 0.8}])
    submitted = client.post("/v1/inference", json=request)
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and job["created_at"].endswith("Z")
    assert job["status_url"] == f"/v1/requests/{job['request_id']}/status"
    assert job["result_url"] == f"/v1/requests/{job['request_id']}/result"

    status = wait_finished(client, job["request_id"])
    assert status["status"] == "succeeded", status
    assert status["error"] is None and status["error_code"] is None
    assert status["started_at"].endswith("Z") and status["finished_at"].endswith("Z")
    assert sorted(item.prompt for item in app.generators.items if item.request_id == job["request_id"]) == ["sks one", "two"]

    result = client.get(job["result_url"]).json()
    images = result["outputs"]["images"]
    assert [(i["index"], i["width"], i["height"], i["seed"], i["format"]) for i in images] == [
        (0, 64, 64, 42, "jpeg"), (1, 96, 80, 43, "jpeg")]
    assert result["metadata"]["loras"] == [{"path": "aitk/style.safetensors", "network_multiplier": 0.8,
                                            "matched_modules": MATCHED_MODULES}]
    for image in images:
        download = client.get(image["url"])
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(download.content)).size == (image["width"], image["height"])


def test_sync_generate_returns_base64_images(client):
    answer = client.post("/v1/generate", json=body(output_format="png"))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "succeeded"
    image = result["images"][0]
    assert (image["format"], image["seed"], image["width"]) == ("png", 42, 64)
    assert "url" not in image
    assert base64.b64decode(image["data"]).startswith(b"\x89PNG")
    assert result["metadata"]["model"] == "flux" and result["metadata"]["inference_time"] >= 0


def test_a_job_streams_its_events_until_the_end(client):
    job = client.post("/v1/inference", json=body()).json()
    wait_finished(client, job["request_id"])
    with client.stream("GET", f"/v1/requests/{job['request_id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        text = "".join(stream.iter_text())
    assert "event: end" in text and '"status":"succeeded"' in text.replace(" ", "")


ERROR_CASES = [
    ("schema", "post", "/v1/generate", {"model": "flux", "prompts": [{"prompt": "a", "width": 10}]}, 422, errors.VALIDATION_ERROR),
    ("broken json", "post", "/v1/inference", b"{not json", 422, errors.VALIDATION_ERROR),
    ("model", "post", "/v1/inference", body(model="sdxl"), 400, errors.MODEL_NOT_FOUND),
    ("missing lora", "post", "/v1/generate", body(loras=[{"path": "nope/x.safetensors"}]), 400, errors.LORA_NOT_FOUND),
    ("absolute lora", "post", "/v1/generate", body(loras=[{"path": "/etc/passwd"}]), 400, errors.LORA_SOURCE_FORBIDDEN),
    ("traversal", "post", "/v1/inference", body(loras=[{"path": "../x.safetensors"}]), 400, errors.LORA_SOURCE_FORBIDDEN),
    ("host", "post", "/v1/generate", body(loras=[{"path": "https://evil.example/x.safetensors"}]), 400, errors.LORA_SOURCE_FORBIDDEN),
    ("download", "post", "/v1/generate", body(loras=[{"path": f"{UNREACHABLE}x.safetensors"}]), 400, errors.LORA_DOWNLOAD_FAILED),
    ("limit", "post", "/v1/generate", body(prompts=[{"prompt": "a", **SMALL}] * 17), 400, errors.LIMIT_EXCEEDED),
    ("webhook on generate", "post", "/v1/generate", body(webhook_url="https://example.com/hook"), 422, errors.VALIDATION_ERROR),
    ("generation", "post", "/v1/generate", body(prompts=[{"prompt": "[[fail]] boom", **SMALL}]), 500, errors.GENERATION_FAILED),
    ("unknown request", "get", "/v1/requests/nope/status", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown result", "get", "/v1/requests/nope/result", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown image", "get", "/v1/requests/nope/images/0", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown events", "get", "/v1/requests/nope/events", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown cancel", "delete", "/v1/requests/nope", None, 404, errors.REQUEST_NOT_FOUND),
    ("no route", "get", "/v1/nothing", None, 404, errors.NOT_FOUND),
    ("wrong method", "put", "/v1/models", None, 405, errors.METHOD_NOT_ALLOWED),
    ("body too large", "post", "/v1/generate", b"{" + b" " * 2_000_000 + b"}", 413, errors.BODY_TOO_LARGE),
]


@pytest.mark.parametrize("what,method,path,payload,status,code", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_reach_the_client_in_the_envelope(client, what, method, path, payload, status, code):
    kwargs: dict = {}
    if isinstance(payload, bytes):
        kwargs = {"content": payload, "headers": {"content-type": "application/json"}}
    elif payload is not None:
        kwargs = {"json": payload}
    answer = client.request(method.upper(), path, **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert set(answer.json()) == {"error"}
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert isinstance(error["details"], dict)


def test_every_answer_names_its_replica(client):
    for answer in (client.get("/v1/models"), client.get("/health"), client.get("/v1/requests/nope/status"),
                   client.get("/v1/nothing"), client.post("/v1/generate", json=body())):
        assert answer.headers["x-flux-replica"] == REPLICA, answer.request.url


def test_an_hf_token_is_never_echoed_or_kept_with_the_job(app, client):
    secret = "hf_" + "s3cr3t" * 6
    bad = client.post("/v1/generate", json=body(hf_token=secret + " with spaces"))
    assert bad.status_code == 422 and bad.json()["error"]["details"]["errors"][0]["loc"] == ["body", "hf_token"]
    assert "s3cr3t" not in bad.text
    job = client.post("/v1/inference", json=body(hf_token=secret, loras=[{"path": "aitk/style.safetensors"}]))
    assert job.status_code == 200 and "s3cr3t" not in job.text
    request_id = job.json()["request_id"]
    assert wait_finished(client, request_id)["status"] == "succeeded"
    for path in ("status", "result"):
        assert "s3cr3t" not in client.get(f"/v1/requests/{request_id}/{path}").text
    # Never in a work item, nor in the job's stored record.
    assert [item for item in app.generators.items if item.request_id == request_id]
    assert not [item for item in app.generators.items if "s3cr3t" in repr(item)]
    assert all("s3cr3t" not in record.model_dump_json() for record in app.jobs.manager.store.load_records())


def test_validation_error_lists_each_field(client):
    answer = client.post("/v1/generate", json={"model": "flux", "prompts": [{"prompt": "a", "width": 10, "sample_steps": 0}]})
    fields = {".".join(e["loc"]) for e in answer.json()["error"]["details"]["errors"]}
    assert {"body.prompts.0.width", "body.prompts.0.sample_steps"} <= fields


def test_generation_failure_is_reported_as_a_job_failure(client):
    job = client.post("/v1/inference", json=body(prompts=[{"prompt": "[[fail]] boom", **SMALL}])).json()
    status = wait_finished(client, job["request_id"])
    assert status["status"] == "failed" and status["error_code"] == errors.GENERATION_FAILED


def test_an_unknown_model_names_the_served_ones(client):
    unknown = client.post("/v1/generate", json=body(model="sdxl")).json()["error"]
    assert unknown["code"] == errors.MODEL_NOT_FOUND
    assert unknown["details"]["available"] == ["flux", "flux-b", "flux-idle"]


def test_models_and_openapi(client):
    models = client.get("/v1/models").json()["models"]
    assert [(m["id"], m["kind"], m["description"], m["default_steps"], m["default_guidance_scale"]) for m in models] == [
        ("flux", "reference", "FLUX.1-dev as the reference server runs it", 25, 4.0),
        ("flux-b", "reference", "a second model", 3, 2.5),
        ("flux-idle", "reference", "scales to zero", 25, 4.0)]
    assert all(m["base_model"] == "black-forest-labs/FLUX.1-dev" and m["resolution_divisor"] == 16 for m in models)
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/inference", "/v1/generate", "/v1/requests/{request_id}/status", "/v1/requests/{request_id}/result",
                 "/v1/requests/{request_id}/images/{index}", "/v1/requests/{request_id}", "/v1/models", "/health"):
        assert path in spec["paths"], path


def test_a_jobs_service_that_does_not_answer_is_503_with_retry_after(app, client):
    app.jobs.down = True
    for answer in (client.post("/v1/inference", json=body()), client.get("/v1/requests/nope/status")):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == errors.JOBS_UNAVAILABLE
        assert answer.headers["Retry-After"] == str(app.args.limits.retry_after_s)
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["unavailable"] == ["jobs"]
    assert client.post("/v1/generate", json=body()).status_code == 200  # sync requests need no jobs service


def test_strict_reference_takes_exactly_one_lora(lora_dir):
    """strict_reference answers what the reference server answers; moved here from the serve tests, where it
    needed a deploy of its own (it is an intake rule, app-wide)."""
    strict = fake_app(args_with(lora_dir, strict_reference=True))
    one = {"path": "aitk/style.safetensors"}
    with TestClient(strict.api) as client:
        two = client.post("/v1/generate", json=body(loras=[one, {"path": "aitk/other.safetensors"}]))
        assert (two.status_code, two.json()["error"]["code"]) == (400, errors.SINGLE_LORA_ONLY)
        none = client.post("/v1/generate", json=body())
        assert (none.status_code, none.json()["error"]["code"]) == (400, errors.LORA_FILE_REQUIRED)
        assert client.post("/v1/generate", json=body(loras=[one])).status_code == 200
