"""The HTTP API end to end on a real local Ray Serve (docs/api.md): each route's happy path and one error
through Serve's proxy, real generation, several ingress replicas, one deployment per model, scale to zero.

The HTTP rules themselves (every error case, envelopes, headers, limits, the fuzz corpus) run without Ray
in tests/unit/web/ (test_api.py, test_guards.py, test_fuzz.py).
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app import errors
from tests.serve.helpers import APP_NAME, calls, generator_state, wait_finished
from tests.support.requests_corpus import ODD_ASYNC_JOB, ODD_SIZES, odd_but_legal_request

pytestmark = [pytest.mark.serve, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "sample_steps": 2}


@pytest.fixture(scope="module")
def url(app_url):
    """The shared app (tests/serve/apps.py): `flux`, `flux-b` with other defaults, `flux-idle` that scales to
    zero, and others, behind two ingress replicas (status and result must not depend on which answers)."""
    return app_url


def body(**overrides) -> dict:
    request = {"model": "flux", "trigger_word": "sks",
               "prompts": [{"prompt": "[trigger] a photo of a person", "seed": 42, **SMALL}]}
    request.update(overrides)
    return request



def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def test_async_flow_submit_poll_result_download(url):
    request = body(prompts=[{"prompt": "[trigger] one", **SMALL}, {"prompt": "two", "width": 100, "height": 80, "sample_steps": 2}],
                   loras=[{"path": "aitk/style.safetensors", "network_multiplier": 0.8}])
    submitted = httpx.post(f"{url}/v1/inference", json=request)
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and job["created_at"].endswith("Z")
    assert job["status_url"] == f"/v1/requests/{job['request_id']}/status"
    assert job["result_url"] == f"/v1/requests/{job['request_id']}/result"

    status = wait_finished(url, job["request_id"])
    assert status["status"] == "succeeded", status
    assert status["error"] is None and status["error_code"] is None
    assert status["started_at"].endswith("Z") and status["finished_at"].endswith("Z")

    result = httpx.get(f"{url}{job['result_url']}").json()
    images = result["outputs"]["images"]
    assert [(i["index"], i["width"], i["height"], i["seed"], i["format"]) for i in images] == [
        (0, 64, 64, 42, "jpeg"), (1, 96, 80, 43, "jpeg")]
    assert result["metadata"]["loras"][0]["matched_modules"] > 0
    for image in images:
        download = httpx.get(f"{url}{image['url']}")
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(download.content)).size == (image["width"], image["height"])


def test_sync_generate_returns_base64_images(url):
    answer = httpx.post(f"{url}/v1/generate", json=body(output_format="png"), timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == "succeeded"
    image = result["images"][0]
    assert (image["format"], image["seed"], image["width"]) == ("png", 42, 64)
    assert "url" not in image
    assert base64.b64decode(image["data"]).startswith(b"\x89PNG")


def test_server_image_equals_the_engine_image(url, tiny_dir, lora_root):
    from serve_app.config import AppArgs, LoraArgs
    from serve_app.engine.images import encode_image
    from serve_app.engine.reference import FluxEngine
    from serve_app.intake.request_rules import build_work_items
    from serve_app.loras.adapters import AdapterCache
    from serve_app.loras.sources import LoraSources
    from serve_app.schemas import InferenceRequest
    from tests.unit.loras.test_sources import read

    request = body(output_format="png", loras=[{"path": "aitk/style.safetensors", "network_multiplier": 0.7}])
    served = httpx.post(f"{url}/v1/generate", json=request, timeout=60).json()
    engine = FluxEngine.load(str(tiny_dir), device="cpu")
    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(lora_root / ".c")))
    adapters = AdapterCache(engine, lambda use: read(sources, use.source))
    item = build_work_items(InferenceRequest.model_validate(request), AppArgs(), "x")[0]
    held = adapters.acquire(item.key.loras)  # released when dropped
    local = encode_image(engine.generate([item], adapters.weights(item.key.loras))[0], "png")
    held.release()
    diff = np.abs(decode(base64.b64decode(served["images"][0]["data"])) - decode(local))
    assert diff.max() <= 1


def test_status_and_result_are_the_same_from_every_ingress_replica(url):
    job = httpx.post(f"{url}/v1/inference", json=body()).json()
    wait_finished(url, job["request_id"])
    replicas, answers = set(), []
    for _ in range(30):  # a new connection each, so the proxy spreads them
        answer = httpx.get(f"{url}/v1/requests/{job['request_id']}/result")
        replicas.add(answer.headers["x-flux-replica"])
        answers.append(answer.json())
    assert len(replicas) == 2
    assert all(a == answers[0] for a in answers)


def test_cancel_of_a_queued_job_means_it_never_runs(url):
    # A long job ahead keeps the generator busy; the one behind it is cancelled while queued.
    blocker = httpx.post(f"{url}/v1/inference", json=body(prompts=[{"prompt": "busy", "width": 256, "height": 256, "sample_steps": 40}])).json()
    queued = httpx.post(f"{url}/v1/inference", json=body(prompts=[{"prompt": "never", "width": 192, "height": 192, "sample_steps": 3}])).json()
    cancelled = httpx.delete(f"{url}/v1/requests/{queued['request_id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "canceled" and cancelled.json()["error_code"] == errors.CANCELED
    assert wait_finished(url, blocker["request_id"])["status"] == "succeeded"
    final = httpx.get(f"{url}/v1/requests/{queued['request_id']}/result").json()
    assert final["status"] == "canceled" and final["outputs"] is None
    assert "192x192x3" not in {call["shape"] for call in calls()}  # its shape never reached the pipeline


# One error per route through Serve: raised in the ingress, or in the generator replica or FluxJobs and carried
# back through their handles. Every case of the contract is in tests/unit/web/test_api.py.
ERROR_CASES = [
    ("model", "post", "/v1/inference", body(model="sdxl"), 400, errors.MODEL_NOT_FOUND),
    ("download", "post", "/v1/generate", body(loras=[{"path": "http://127.0.0.1:9/x.safetensors"}]), 400, errors.LORA_DOWNLOAD_FAILED),
    ("unknown request", "get", "/v1/requests/nope/status", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown result", "get", "/v1/requests/nope/result", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown image", "get", "/v1/requests/nope/images/0", None, 404, errors.REQUEST_NOT_FOUND),
    ("unknown cancel", "delete", "/v1/requests/nope", None, 404, errors.REQUEST_NOT_FOUND),
]


@pytest.mark.parametrize("what,method,path,payload,status,code", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_reach_the_client_in_the_envelope(url, what, method, path, payload, status, code):
    kwargs = {}
    if isinstance(payload, bytes):
        kwargs = {"content": payload, "headers": {"content-type": "application/json"}}
    elif payload is not None:
        kwargs = {"json": payload}
    answer = httpx.request(method.upper(), f"{url}{path}", timeout=60, **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert isinstance(error["details"], dict)


def test_generation_failure_is_reported_as_a_job_failure(url):
    job = httpx.post(f"{url}/v1/inference", json=body(prompts=[{"prompt": "[[fail]] boom", **SMALL}])).json()
    status = wait_finished(url, job["request_id"])
    assert status["status"] == "failed" and status["error_code"] == errors.GENERATION_FAILED


def test_models_and_openapi(url):
    from tests.serve.apps import shared_app

    configured = [model.id for model in shared_app(Path("loras"), Path("state")).models]
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["models"]] == configured  # in the config's order
    assert "/v1/generate" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_each_model_runs_on_its_own_generator_deployment(url):
    answers = {model: httpx.post(f"{url}/v1/generate", json=body(model=model, prompts=[{"prompt": "a cat", "seed": 3}]),
                                 timeout=60) for model in ("flux", "flux-b")}
    for model, answer in answers.items():
        assert answer.status_code == 200, answer.text
        assert answer.json()["metadata"]["model"] == model
    # Each model's own defaults: flux 1024² x 25 steps; flux-b 1024² x 3 steps, on its own replica.
    served = {answer.json()["request_id"]: model for model, answer in answers.items()}
    recorded = {tuple(c["requests"]): (c["model"], c["shape"]) for c in calls(served)}
    assert sorted(recorded.values()) == [("flux", "1024x1024x25"), ("flux-b", "1024x1024x3")]
    assert {served[r[0]]: model for r, (model, _) in recorded.items()} == {"flux": "flux", "flux-b": "flux-b"}

    unknown = httpx.post(f"{url}/v1/generate", json=body(model="sdxl")).json()["error"]
    assert unknown["code"] == errors.MODEL_NOT_FOUND
    assert {"flux", "flux-b", "flux-idle"} <= set(unknown["details"]["available"])


def test_health_lists_a_scaled_to_zero_model_without_waking_it(url):
    from ray import serve

    for _ in range(5):
        answer = httpx.get(f"{url}/health")
        assert answer.status_code == 200, answer.text
        time.sleep(0.2)
    health = answer.json()
    assert health["status"] == "healthy" and health["unavailable"] == []
    assert health["models"]["flux"]["state"] == "ready" and health["models"]["flux-b"]["state"] == "ready"
    assert health["models"]["flux-idle"] == {"state": "scaled_to_zero", "replicas": 0}
    idle = serve.status().applications[APP_NAME].deployments["FluxGenerator-flux-idle"]
    assert sum(idle.replica_states.values()) == 0  # the probes woke nothing

    # A request wakes it: the job waits for the cold start and succeeds.
    job = httpx.post(f"{url}/v1/inference", json=body(model="flux-idle")).json()
    assert wait_finished(url, job["request_id"], timeout_s=120)["status"] == "succeeded"
    assert httpx.get(f"{url}/health").json()["models"]["flux-idle"] == {"state": "ready", "replicas": 1}


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_command_line_client_writes_the_image(url, tmp_path, mode):
    from serve_app import client

    out = tmp_path / "person.png"
    client.main(["[trigger] a photo of a person", "--url", url, "--trigger", "sks", "--lora", "aitk/style.safetensors",
                 "--width", "96", "--height", "64", "--steps", "2", "--seed", "5", "--format", "png", "--out", str(out),
                 *mode])
    with Image.open(out) as image:
        assert image.size == (96, 64)


# ---- odd requests through Serve's proxy (the fuzz corpus runs without Ray: tests/unit/web/test_fuzz.py) --------

VALID = b'{"model": "flux", "prompts": [{"prompt": "fuzz", "width": 64, "height": 64, "sample_steps": 1}]}'
JSON = {"content-type": "application/json"}
ODD_REQUESTS = [
    ("POST", "/v1/generate", b"[" * 100_000 + b"]" * 100_000, JSON),
    ("POST", "/v1/inference", b'{"model":"flux","prompts":' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON),
    ("POST", "/v1/inference", b'{"model":"fl\xffux","prompts":[{"prompt":"a"}]}', JSON),
    ("POST", "/v1/generate", b'{"model":"\\ud800","prompts":NaN}', JSON),
    ("POST", "/v1/generate", VALID, {"content-type": "text/plain"}),
    ("POST", "/v1/generate", VALID, {}),
    ("POST", "/v1/generate", VALID, {**JSON, "X-Flux-Timeout": "nan"}),
    ("GET", "/v1/requests/%ff%fe/status", None, None),
    ("GET", "/v1/requests/..%2f..%2fetc%2fpasswd/result", None, None),
    ("GET", "/v1/requests/x/images/99999999999999999999999999", None, None),
    ("GET", "/v1/requests/" + "a" * 2000 + "/status", None, None),
    ("GET", "//v1//models", None, None),
    ("GET", "/v1/generate/", None, None),
    ("TRACE", "/v1/models", None, None),
    ("PURGE", "/health", None, None),
    ("OPTIONS", "/v1/generate", None, None),
    ("HEAD", "/v1/inference", None, None),
]


def test_odd_requests_through_the_proxy_get_no_5xx_and_crash_no_replica(url):
    actor = generator_state().actor_name
    with httpx.Client(base_url=url, timeout=60) as client:
        for method, path, content, headers in ODD_REQUESTS:
            answer = client.request(method, f"{url}{path}", content=content, headers=headers)
            assert answer.status_code < 500, (method, path[:80], answer.status_code, answer.text[:300])
            if answer.status_code >= 400 and method != "HEAD":
                assert set(answer.json()) == {"error"}, answer.text[:300]
    assert generator_state().actor_name == actor  # no replica crashed and was quietly replaced
    assert httpx.get(f"{url}/health").status_code == 200


def test_odd_but_legal_requests_generate_real_images(url):
    """The engine's side of the odd but legal requests: any text through its tokenizer, the extreme sizes."""
    request = odd_but_legal_request()
    answer = httpx.post(f"{url}/v1/generate", json=request, timeout=300)
    assert answer.status_code == 200, answer.text[:500]
    images = answer.json()["images"]
    assert [Image.open(io.BytesIO(base64.b64decode(i["data"]))).size for i in images] == ODD_SIZES


def test_an_odd_but_legal_async_job_succeeds(url):
    job = httpx.post(f"{url}/v1/inference", json=ODD_ASYNC_JOB).json()
    assert wait_finished(url, job["request_id"])["status"] == "succeeded"
    image = httpx.get(f"{url}/v1/requests/{job['request_id']}/images/0")
    assert image.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(image.content)).size == (4096, 64)
