"""The error codes the ingress counts for its metrics (web/middleware.ErrorCodes), without Ray.

The ingress adds the middleware to the real routes as here (serving/ingress.py); `ray_flux_request_errors_total`
counts what it is told.
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from serve_app import errors
from serve_app.errors import ApiError, ErrorCode
from serve_app.web.middleware import ErrorCodes
from tests.support.fake_service import args_with, fake_app

SMALL = {"width": 64, "height": 64, "sample_steps": 2}


def request(**overrides) -> dict:
    return {"model": "flux", "prompts": [{"prompt": "a photo", **SMALL}], **overrides}


@pytest.fixture(scope="module")
def counted(lora_dir):
    codes: list[ErrorCode] = []
    app = fake_app(args_with(lora_dir))
    app.generators.fail("[[fail]]", ApiError(errors.GENERATION_FAILED, "the pipeline failed"))
    app.api.add_middleware(ErrorCodes, on_error=codes.append)
    with TestClient(app.api) as client:
        yield client, codes


@pytest.mark.parametrize("method,path,payload,code", [
    ("post", "/v1/generate", {"model": "flux", "prompts": [{"prompt": "a", "width": 10}]}, errors.VALIDATION_ERROR),
    ("post", "/v1/generate", request(model="sdxl"), errors.MODEL_NOT_FOUND),
    ("post", "/v1/generate", request(prompts=[{"prompt": "[[fail]] boom", **SMALL}]), errors.GENERATION_FAILED),
    ("get", "/v1/requests/nope/status", None, errors.REQUEST_NOT_FOUND),
    ("get", "/v1/nothing", None, errors.NOT_FOUND),
    ("post", "/v1/generate", b"{" + b" " * 2_000_000 + b"}", errors.BODY_TOO_LARGE),  # the size limit's own answer
])
def test_each_error_answer_is_counted_once_by_its_code(counted, method, path, payload, code):
    client, codes = counted
    codes.clear()
    content = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload}
    answer = client.request(method.upper(), path, **content)
    assert answer.json()["error"]["code"] == code
    assert codes == [code]


def test_answers_that_are_not_errors_are_not_counted_and_pass_unchanged(counted):
    client, codes = counted
    codes.clear()
    answer = client.post("/v1/generate", json=request())
    assert answer.status_code == 200 and answer.json()["images"][0]["data"]
    assert client.get("/v1/models").status_code == 200
    assert codes == []


def test_an_error_without_an_envelope_or_an_exception_counts_as_its_status():
    codes: list[ErrorCode] = []

    async def plain(scope, receive, send):
        status = 405 if scope["path"] == "/plain" else 500
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"no envelope", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    client = TestClient(ErrorCodes(plain, on_error=codes.append))  # no `with`: these apps have no lifespan
    assert client.get("/plain").text == "no envelope"
    client.get("/other")
    with pytest.raises(RuntimeError):
        TestClient(ErrorCodes(broken, on_error=codes.append)).get("/")  # Starlette answers 500 outside it
    assert codes == [errors.METHOD_NOT_ALLOWED, errors.HTTP_ERROR, errors.HTTP_ERROR]
