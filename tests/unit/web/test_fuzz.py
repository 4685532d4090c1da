"""Fuzzing the HTTP API (issue 7): generated bad requests never get a 5xx, and odd but legal ones succeed.

The real routes and IngressService over fake clients (tests/support/fake_service.py), no Ray: every fuzz
example sends one request through one starlette TestClient (redirects not followed, as httpx.Client's
default), and an exception in the app fails the example at once. The strategies build requests that fail
before any work is queued (schema, limits, content type, method or path); `max_work_per_request` also
caps what any request that validated by chance could cost. Hypothesis runs derandomized, without its
example database, so CI sees the same cases on every run. The last test checks that at least MIN_CASES
requests went out in all, that none of them reached a generator or the jobs service, and that the service
still generates the same image as before fuzzing. A fixed sample of odd requests also goes through Serve's
real proxy (tests/serve/test_api.py), with the real generation of the odd but legal requests.
"""

from __future__ import annotations

import base64
import io
import json
import time
from copy import deepcopy
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from serve_app.schemas import MAX_SEED
from tests.support.fake_service import FakeApp, args_with, fake_app
from tests.support.requests_corpus import ODD_ASYNC_JOB, ODD_PROMPTS, ODD_SIZES, odd_but_legal_request

MIN_CASES = 500
SENT: dict[str, int] = {}  # fuzz test -> requests sent
LEGAL: set[str] = set()  # the request ids of the odd but legal requests: the only ones that may reach work
MAX_WORK = 1024 * 1024  # pixel-steps per request: 4 images of 64x4096 at 1 step, or one 1024² step
VALID = {"model": "flux", "prompts": [{"prompt": "fuzz", "width": 64, "height": 64, "sample_steps": 1}]}
VALID_BYTES = json.dumps(VALID).encode()


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same cases on every run
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


@pytest.fixture(scope="module")
def app(lora_dir) -> FakeApp:
    return fake_app(args_with(lora_dir, limits={"max_work_per_request": MAX_WORK}))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app.api, follow_redirects=False) as client:
        yield client


class Before(tuple):
    def __repr__(self) -> str:  # keeps Hypothesis' reports of a failing case short
        return f"Before(items={self[0]!r})"


@pytest.fixture(scope="module")
def before(app, client):
    """The work items run so far and one reference image, taken before any fuzzing."""
    reference = generate_png(client)
    return Before((len(app.generators.items), reference))


def generate_png(client: httpx.Client) -> np.ndarray:
    body = {"model": "flux", "output_format": "png",
            "prompts": [{"prompt": "after the storm", "width": 64, "height": 64, "sample_steps": 2, "seed": 7}]}
    answer = client.post("/v1/generate", json=body)
    assert answer.status_code == 200, answer.text
    LEGAL.add(answer.json()["request_id"])
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]["data"])))).astype(np.int16)


def send(client: httpx.Client, test: str, method: str, path: str, content: bytes | None = None,
         headers: dict | None = None) -> httpx.Response:
    """Send one fuzz request; it must be answered, below 500, in the error envelope when it is an error."""
    SENT[test] = SENT.get(test, 0) + 1
    answer = client.request(method, f"{str(client.base_url).rstrip('/')}{path}", content=content, headers=headers)
    assert answer.status_code < 500, (method, path, (content or b"")[:300], headers, answer.status_code, answer.text[:500])
    if answer.status_code >= 400 and method != "HEAD":
        assert set(answer.json()) == {"error"}, answer.text[:500]
        assert {"code", "message", "details"} <= set(answer.json()["error"])
    return answer


def post_json(client, test, body, path="/v1/generate") -> httpx.Response:
    # ensure_ascii: lone surrogates travel as \ud800 escapes; allow_nan: NaN/Infinity tokens pass.
    data = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    return send(client, test, "POST", path, data, {"content-type": "application/json"})


# ---- strategies ----------------------------------------------------------------------------------

leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
junk = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
surrogate = st.integers(0xD800, 0xDFFF).map(chr)
with_surrogate = st.tuples(st.text(max_size=10), surrogate, st.text(max_size=10)).map("".join)  # not UTF-8 text
odd_text = st.text(st.characters(codec=None), max_size=40) | with_surrogate  # emoji, RTL, NUL, combining, ...
not_a_string = junk.filter(lambda v: v is not None and not isinstance(v, str))
not_a_number_text = st.text(alphabet="abcxyz-_ ,;", max_size=10).filter(lambda s: s.strip().lower() not in ("", "nan", "inf"))
non_numeric = not_a_number_text | st.lists(leaf, max_size=3) | st.dictionaries(st.text(max_size=5), leaf, max_size=3)
fractional = st.floats(min_value=-1e6, max_value=1e6).filter(lambda f: not f.is_integer())


def bad_int(low: int, high: int):
    """Never a valid integer in [low, high]: out of range, fractional, non-finite or not a number."""
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1), fractional,
                     st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300]), non_numeric)


def bad_float(low: float, high: float):
    return st.one_of(st.floats(max_value=low, exclude_max=True), st.floats(min_value=high, exclude_min=True),
                     st.sampled_from([float("nan"), float("inf"), -float("inf")]), non_numeric)


huge_text = st.integers(4001, 60_000).map(lambda n: "x" * n) | st.integers(4001, 20_000).map(lambda n: "🎨" * n)
bad_lora_path = st.one_of(
    st.just(""), not_a_string, odd_text.filter(bool).map(lambda s: f"nope/{s}.safetensors"),
    st.sampled_from(["/etc/passwd", "../outside.safetensors", "aitk/../../x.safetensors", "missing.safetensors",
                     "http://example.com/a.safetensors", "ftp://127.0.0.1/a", "file:///etc/passwd", "aitk", "aitk/"]),
)
PROMPT = ("prompts", 0)

# (field path, strategy of values that make the body invalid)
BAD_FIELDS = [
    (("model",), not_a_string | odd_text.filter(lambda s: s != "flux")),
    (("trigger_word",), not_a_string),
    (("prompts",), st.just([]) | not_a_string.filter(lambda v: not isinstance(v, list)) | st.lists(non_numeric, min_size=1, max_size=3)),
    (("prompts",), st.integers(17, 40).map(lambda n: [{"prompt": "many", "width": 64, "height": 64, "sample_steps": 1}] * n)),
    ((*PROMPT, "prompt"), not_a_string | huge_text | with_surrogate),
    ((*PROMPT, "trigger_word"), not_a_string | with_surrogate),
    ((*PROMPT, "neg"), not_a_string | with_surrogate),
    ((*PROMPT, "width"), bad_int(64, 4096)),
    ((*PROMPT, "height"), bad_int(64, 4096)),
    ((*PROMPT, "sample_steps"), bad_int(1, 150)),
    ((*PROMPT, "seed"), bad_int(-1, MAX_SEED)),
    ((*PROMPT, "guidance_scale"), bad_float(0, 20)),
    (("loras",), not_a_string.filter(lambda v: not isinstance(v, list)) | st.lists(non_numeric, min_size=1, max_size=3)),
    (("loras",), st.lists(bad_lora_path.map(lambda p: {"path": p}), min_size=1, max_size=3)),
    (("loras",), bad_float(-2, 2).map(lambda m: [{"path": "aitk/style.safetensors", "network_multiplier": m}])),
    (("loras",), st.just([{"path": "aitk/style.safetensors"}, {"path": "aitk/style.safetensors"}])),  # listed twice
    (("loras",), st.integers(5, 9).map(lambda n: [{"path": f"l{i}.safetensors"} for i in range(n)])),
    (("output_format",), not_a_string | st.text(max_size=10).filter(lambda s: s not in ("jpeg", "png", "webp"))),
]
MISSING = [("model",), ("prompts",), (*PROMPT, "prompt")]


def set_path(body: dict, path: tuple, value) -> dict:
    body = deepcopy(body)
    target = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return body


def drop_path(body: dict, path: tuple) -> dict:
    body = deepcopy(body)
    target = body
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return body


bad_body = st.one_of(
    *[values.map(lambda v, p=path: set_path(VALID, p, v)) for path, values in BAD_FIELDS],
    st.sampled_from(MISSING).map(lambda p: drop_path(VALID, p)),
)
# Junk in unknown fields is ignored (as the reference does) and must not rescue or break a bad body.
bad_body_with_junk = st.tuples(bad_body, st.dictionaries(st.text(max_size=8).filter(lambda k: k not in VALID), junk,
                                                         max_size=3)).map(lambda t: {**t[1], **t[0]})
not_an_object = junk.filter(lambda v: not isinstance(v, dict))


def deep(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"model":"flux","prompts":' + b"[" * depth + b"]" * depth + b"}"


nested = st.tuples(st.integers(50, 150_000), st.sampled_from(["list", "object", "in-prompts"])).map(lambda t: deep(*t))
broken_json = st.one_of(
    st.integers(1, len(VALID_BYTES) - 1).map(lambda n: VALID_BYTES[:n]),  # truncated
    st.binary(max_size=200),
    st.sampled_from([
        b"", b"{", b"}", b"nul", b"{'model': 'flux'}", b'{"model":"flux",}', b'{"model":"flux"} trailing',
        b'{"model":"fl\xffux","prompts":[{"prompt":"a"}]}',  # invalid UTF-8 inside a string
        b'{"model":"flux","prompts":[{"prompt":"a","width":' + b"9" * 5000 + b"}]}",  # past Python's int digits limit
        b'{"model":"flux","prompts":[{"prompt":"a","width":1e999}]}', b'{"model":"flux","prompts":NaN}',
        b'{"model":"flux" /* comment */,"prompts":[]}', b"\x00" * 64, b'"\\ud800"', b'{"model":"\\ud800"}',
    ]),
)


def url_path(text: str) -> str:
    """Percent-encode as a client would (lone surrogates as the invalid UTF-8 bytes they stand for)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="/%:@!$&'()*+,;=~")


odd_paths = st.one_of(
    st.sampled_from(["/v1/inference", "/v1/generate", "/v1/models", "/health", "/openapi.json", "/",
                     "/v1", "/v1/requests", "/v1/requests/", "/v2/generate", "/v1/generate/", "//v1//models",
                     "/v1/requests/x/images/-1", "/v1/requests/x/images/99999999999999999999999999",
                     "/v1/requests/x/images/1.5", "/v1/requests/x/images/%00", "/v1/requests/%ff%fe/status",
                     "/v1/requests/%/status", "/v1/requests/..%2f..%2fetc%2fpasswd/result"]),
    st.tuples(odd_text, st.sampled_from(["/status", "/result", "/images/0", "", "/images/x"])).map(
        lambda t: "/v1/requests/" + url_path(t[0]) + t[1]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="?#"), max_size=100).map(
        lambda s: "/" + url_path(s)),
    st.integers(1000, 2000).map(lambda n: "/v1/requests/" + "a" * n + "/status"),
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PURGE"]
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/xml", "application/octet-stream", "image/png", "application/jsonx", "json",
                 "application/", "*/*", ";;;", "text/json"]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)  # as sent
bad_timeouts = st.one_of(st.sampled_from(["0", "-1", "-0.5", "nan", "-inf", "1e-400", "", "soon", "0x10", "1,5"]),
                         st.integers(max_value=0).map(str), not_a_number_text)


# ---- fuzz tests ----------------------------------------------------------------------------------


@fuzz_settings(examples=200)
@given(body=bad_body_with_junk, path=st.sampled_from(["/v1/generate", "/v1/inference"]))
def test_invalid_bodies_are_refused_without_a_5xx(client, before, body, path):
    answer = post_json(client, "bodies", body, path)
    assert 400 <= answer.status_code < 500, (body, answer.text[:300])


@fuzz_settings(examples=60)
@given(value=not_an_object | nested | huge_text.map(lambda s: {"model": "flux", "prompts": [{"prompt": s}]}),
       path=st.sampled_from(["/v1/generate", "/v1/inference"]))
def test_non_objects_deep_nesting_and_huge_strings_are_refused(client, before, value, path):
    data = value if isinstance(value, bytes) else json.dumps(value, allow_nan=True).encode()
    answer = send(client, "shapes", "POST", path, data, {"content-type": "application/json"})
    assert 400 <= answer.status_code < 500


@fuzz_settings(examples=90)
@given(data=broken_json, path=st.sampled_from(["/v1/generate", "/v1/inference"]))
def test_broken_json_is_refused(client, before, data, path):
    answer = send(client, "broken", "POST", path, data, {"content-type": "application/json"})
    assert 400 <= answer.status_code < 500


def test_a_body_over_the_limit_is_413(client, before):
    answer = send(client, "shapes", "POST", "/v1/generate", b'{"model":"flux","pad":"' + b"x" * 1_100_000 + b'"}',
                  {"content-type": "application/json"})
    assert answer.status_code == 413


@fuzz_settings(examples=50)
@given(content_type=st.sampled_from(CONTENT_TYPES) | header_text.filter(lambda s: "json" not in s.lower()),
       path=st.sampled_from(["/v1/generate", "/v1/inference"]))
def test_a_valid_body_with_a_wrong_content_type_is_refused(client, before, content_type, path):
    answer = send(client, "content-types", "POST", path, VALID_BYTES, {"content-type": content_type})
    assert 400 <= answer.status_code < 500


def test_a_valid_body_without_a_content_type_is_refused(client, before):
    answer = send(client, "content-types", "POST", "/v1/generate", VALID_BYTES, {})
    assert answer.status_code == 422


@fuzz_settings(examples=110)
@given(method=st.sampled_from(METHODS), path=odd_paths, body=st.none() | st.binary(max_size=50))
def test_odd_methods_and_paths_get_no_5xx(client, before, method, path, body):
    if method == "POST" and path.rstrip("/") in ("/v1/generate", "/v1/inference"):
        body = body or b"{}"  # never a valid body: these tests generate nothing
    send(client, "paths", method, path, body, {"content-type": "application/json"} if body else None)


@fuzz_settings(examples=40)
@given(timeout=bad_timeouts, path=st.sampled_from(["/v1/generate", "/v1/inference"]))
def test_a_bad_timeout_header_is_422(client, before, timeout, path):
    answer = send(client, "headers", "POST", path, VALID_BYTES,
                  {"content-type": "application/json", "X-Flux-Timeout": timeout})
    assert answer.status_code == 422, answer.text


# ---- odd but legal requests ------------------------------------------------------------------------

def test_odd_but_legal_requests_succeed(client, before):
    body = odd_but_legal_request()
    answer = client.post("/v1/generate", json=body)
    assert answer.status_code == 200, answer.text[:500]
    LEGAL.add(answer.json()["request_id"])
    images = answer.json()["images"]
    assert len(images) == len(body["prompts"])
    for image, size in zip(images, ODD_SIZES):
        assert (image["width"], image["height"]) == size
        assert Image.open(io.BytesIO(base64.b64decode(image["data"]))).size == size
    assert images[len(ODD_PROMPTS) + 1]["seed"] == MAX_SEED
    assert 0 <= images[len(ODD_PROMPTS) + 2]["seed"] < 2**31 - 1


def test_an_odd_but_legal_async_job_succeeds(client, before):
    job = client.post("/v1/inference", json=ODD_ASYNC_JOB).json()
    LEGAL.add(job["request_id"])
    for _ in range(600):
        status = client.get(f"/v1/requests/{job['request_id']}/status").json()
        if status["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.1)
    assert status["status"] == "succeeded", status
    image = client.get(f"/v1/requests/{job['request_id']}/images/0")
    assert image.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(image.content)).size == (4096, 64)


# ---- afterwards --------------------------------------------------------------------------------------


def test_after_fuzzing_no_fuzz_request_reached_work_and_the_service_still_generates(app, client, before):
    items_before, reference = before
    total = sum(SENT.values())
    print(f"\nFUZZ requests sent: {total} {SENT}")
    if {"bodies", "shapes", "broken", "content-types", "paths", "headers"} <= set(SENT):  # the whole module ran
        assert total >= MIN_CASES, SENT
    reached = {item.request_id for item in app.generators.items[items_before:]} | set(app.jobs.manager.jobs)
    assert reached <= LEGAL, reached - LEGAL  # every fuzz request was refused before any work was queued
    assert np.abs(generate_png(client) - reference).max() <= 1
    assert client.get("/health").status_code == 200
