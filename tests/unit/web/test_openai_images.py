"""The OpenAI Images API (`POST /v1/images/generations`, docs/api.md#openai-images-api) without Ray, driven by
the official `openai` SDK as a user would, over the real routes and IngressService on the fake clients
(tests/support/fake_service.py): the SDK's `http_client` is starlette's TestClient, itself an httpx.Client.

Real generation through Serve (pixels equal to /v1/generate's, a LoRA drawn) is tests/serve/test_openai.py.
"""

from __future__ import annotations

import base64
import io
import time

import openai
import pytest
from PIL import Image
from starlette.testclient import TestClient

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.workitems import WorkItem
from tests.support.fake_service import FakeApp, args_with, fake_app

KEY = "test-key-0123456789"
MAX_PROMPTS = 4
MAX_PIXELS = 1024 * 1024  # the default size fits; 1024x1040 does not
SMALL = "64x64"
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@pytest.fixture(scope="module")
def app(lora_dir) -> FakeApp:
    app = fake_app(args_with(lora_dir, limits={"max_prompts_per_request": MAX_PROMPTS,
                                                          "max_pixels_per_image": MAX_PIXELS}))
    app.generators.fail("[[fail]]", ApiError(errors.GENERATION_FAILED, "the pipeline failed on this image"))
    return app


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app.api, follow_redirects=False) as http:
        yield http


def sdk(http: TestClient, api_key: str = "unused") -> openai.OpenAI:
    """The official client, as a user builds it, over the test app. No retries: each error is seen once."""
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key=api_key, http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return sdk(http)


def last_items(app: FakeApp, count: int) -> list[WorkItem]:
    """The work items of the last request (the module's tests run one at a time), in image order."""
    return sorted(app.generators.items[-count:], key=lambda item: item.index)


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_defaults_one_png_at_the_models_size_seeded_42(app, client):
    before = int(time.time())
    answer = client.images.generate(model="flux", prompt="a photo of a cat")
    assert before <= answer.created <= time.time()
    assert answer.data is not None and len(answer.data) == 1
    image = answer.data[0]
    assert image.url is None and image.revised_prompt is None  # no trigger word: the prompt is not revised
    drawn = decode(image.b64_json)
    assert (drawn.format, drawn.size) == ("PNG", (1024, 1024))
    [item] = last_items(app, 1)
    model = app.args.models[0]
    assert (item.prompt, item.seed, item.key.steps, item.key.guidance, item.key.loras, item.output_format) == (
        "a photo of a cat", 42, model.default_steps, model.default_guidance_scale, (), "png")


def test_n_images_draw_seed_plus_i(app, client):
    answer = client.images.generate(model="flux", prompt="a photo", n=2, size=SMALL)
    assert [item.seed for item in last_items(app, 2)] == [42, 43]
    first, second = (decode(image.b64_json) for image in answer.data or [])
    assert first.tobytes() != second.tobytes()  # the fake draws a colour from the seed

    client.images.generate(model="flux", prompt="a photo", n=3, size=SMALL, extra_body={"seed": 7})
    assert [item.seed for item in last_items(app, 3)] == [7, 8, 9]

    client.images.generate(model="flux", prompt="a photo", n=2, size=SMALL, extra_body={"seed": -1})
    assert all(item.seed >= 0 for item in last_items(app, 2))  # -1: each image draws its own


def test_the_same_request_through_v1_generate_gives_the_same_file(client, http):
    answer = client.images.generate(model="flux", prompt="a photo", n=2, size="96x80", output_format="jpeg")
    generate = http.post("/v1/generate", json={"model": "flux", "output_format": "jpeg", "prompts": [
        {"prompt": "a photo", "width": 96, "height": 80, "seed": 42 + i} for i in range(2)]}).json()
    assert [image.b64_json for image in answer.data or []] == [image["data"] for image in generate["images"]]


@pytest.mark.parametrize(("size", "drawn"), [("100x80", (96, 80)), ("64x4096", (64, 4096)), ("79x95", (64, 80)), ("auto", (1024, 1024))])
def test_size_is_floored_to_16(app, client, size, drawn):
    answer = client.images.generate(model="flux", prompt="a photo", size=size)
    assert decode((answer.data or [])[0].b64_json).size == drawn
    [item] = last_items(app, 1)
    assert (item.key.width, item.key.height) == drawn


@pytest.mark.parametrize(("size", "message"), [
    ("63x64", "size: Input should be greater than or equal to 64"),
    ("64x4097", "size: Input should be less than or equal to 4096"),
    ("big", "size: Value error, must be WIDTHxHEIGHT (e.g. 1024x768) or auto"),
    ("64", "must be WIDTHxHEIGHT"),
    ("64x64x64", "must be WIDTHxHEIGHT"),
    ("-64x64", "must be WIDTHxHEIGHT"),
    ("1024 x 1024", "must be WIDTHxHEIGHT"),
])
def test_a_bad_size_is_refused_with_our_message(app, client, size, message):
    runs = len(app.generators.items)
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.generate(model="flux", prompt="a photo", size=size)
    error = raised.value
    assert isinstance(error, openai.UnprocessableEntityError) and error.status_code == 422
    assert error.code == errors.VALIDATION_ERROR
    assert message in error.message  # the SDK's message holds our envelope's
    assert isinstance(error.body, dict) and message in error.body["message"]
    assert error.body["details"]["errors"][0]["loc"] == ["body", "size"]
    assert len(app.generators.items) == runs  # nothing ran


def test_a_size_over_the_pixel_limit_is_the_limit_error_of_v1_generate(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="flux", prompt="a photo", size="1024x1040")
    assert raised.value.code == errors.LIMIT_EXCEEDED
    assert "max_pixels_per_image" in raised.value.message


def test_an_unknown_model_is_model_not_found(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="dall-e-3", prompt="a photo")
    error = raised.value
    assert (error.status_code, error.code) == (400, errors.MODEL_NOT_FOUND)
    assert isinstance(error.body, dict) and error.body["details"] == {"model": "dall-e-3", "available": ["flux"]}
    assert "model 'dall-e-3' is not served here" in error.message


def test_n_is_bounded_by_the_prompts_limit(app, client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="flux", prompt="a photo", n=MAX_PROMPTS + 1, size=SMALL)
    assert raised.value.code == errors.LIMIT_EXCEEDED
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["details"] == {"limit": "max_prompts_per_request", "max": MAX_PROMPTS,
                                            "value": MAX_PROMPTS + 1, "field": "n"}
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(model="flux", prompt="a photo", n=0, size=SMALL)
    client.images.generate(model="flux", prompt="a photo", n=MAX_PROMPTS, size=SMALL)
    assert len(last_items(app, MAX_PROMPTS)) == MAX_PROMPTS


def test_images_api_fields_we_do_not_support_are_ignored(app, client):
    answer = client.images.generate(
        model="flux", prompt="a photo", size=SMALL, quality="hd", style="vivid", background="opaque",
        moderation="low", output_compression=50, user="someone", partial_images=0, stream=False,
        extra_body={"not_an_images_field": {"any": "thing"}},  # unknown fields are ignored, as on every route
    )
    assert decode((answer.data or [])[0].b64_json).format == "PNG"  # output_compression changed nothing
    [item] = last_items(app, 1)
    assert (item.prompt, item.seed, item.key.width) == ("a photo", 42, 64)


def test_null_fields_mean_their_defaults(app, http):
    answer = http.post("/v1/images/generations", json={
        "model": "flux", "prompt": "a photo", "size": None, "n": None, "response_format": None,
        "output_format": None, "seed": None, "loras": None, "quality": None})
    assert answer.status_code == 200, answer.text
    assert list(answer.json()["data"][0]) == ["b64_json"]  # nulls are left out of the answer
    [item] = last_items(app, 1)
    assert (item.seed, item.key.width, item.output_format) == (42, 1024, "png")


def test_our_fields_in_extra_body_reach_the_work_items(app, client):
    answer = client.images.generate(
        model="flux", prompt="[trigger] a photo", n=2, size=SMALL,
        extra_body={"seed": 1234, "num_inference_steps": 3, "guidance_scale": 2.5, "trigger_word": "sks",
                    "loras": [{"path": "aitk/style.safetensors", "network_multiplier": 0.8}]},
    )
    items = last_items(app, 2)
    assert [(item.prompt, item.seed, item.key.steps, item.key.guidance) for item in items] == [
        ("sks a photo", 1234, 3, 2.5), ("sks a photo", 1235, 3, 2.5)]
    assert [(use.source.endswith("aitk/style.safetensors"), use.multiplier) for use in items[0].key.loras] == [(True, 0.8)]
    assert [image.revised_prompt for image in answer.data or []] == ["sks a photo"] * 2  # after the trigger word


@pytest.mark.parametrize(("extra", "field", "message"), [
    ({"num_inference_steps": 0}, "num_inference_steps", "Input should be greater than or equal to 1"),
    ({"num_inference_steps": 151}, "num_inference_steps", "Input should be less than or equal to 150"),
    ({"guidance_scale": 21}, "guidance_scale", "Input should be less than or equal to 20"),
    ({"seed": -2}, "seed", "Input should be greater than or equal to -1"),
    ({"seed": 2**64 - 1}, "seed", "Input should be less than or equal to"),  # image 1's seed + 1 is out of range
])
def test_our_fields_keep_the_bounds_of_v1_generate(client, extra, field, message):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.images.generate(model="flux", prompt="a photo", n=2, size=SMALL, extra_body=extra)
    assert raised.value.code == errors.VALIDATION_ERROR
    assert f"{field}: {message}" in raised.value.message


def test_a_lora_error_is_the_same_as_on_v1_generate(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="flux", prompt="a photo", size=SMALL,
                               extra_body={"loras": [{"path": "aitk/missing.safetensors"}]})
    assert raised.value.code == errors.LORA_NOT_FOUND


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_a_failed_image_is_the_requests_error(client, response_format):
    with pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(model="flux", prompt="[[fail]] a photo", size=SMALL, response_format=response_format)
    assert raised.value.code == errors.GENERATION_FAILED
    assert "the pipeline failed on this image" in raised.value.message


def test_response_format_url_gives_urls_that_download_the_images(app, client, http):
    answer = client.images.generate(model="flux", prompt="a photo", n=2, size="96x80", response_format="url")
    images = answer.data or []
    assert [image.b64_json for image in images] == [None, None]
    drawn = []
    for index, image in enumerate(images):
        assert image.url is not None and image.url.startswith(f"{http.base_url}/v1/requests/")
        assert image.url.endswith(f"/images/{index}")
        download = http.get(image.url)
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        drawn.append(Image.open(io.BytesIO(download.content)))
    assert [picture.size for picture in drawn] == [(96, 80)] * 2
    assert drawn[0].tobytes() != drawn[1].tobytes()
    assert [item.seed for item in last_items(app, 2)] == [42, 43]
    # The images are a job's, kept in the job store like any /v1/inference result.
    request_id = images[0].url.split("/")[-3]
    result = http.get(f"/v1/requests/{request_id}/result").json()
    assert result["status"] == "succeeded"
    assert [image["seed"] for image in result["outputs"]["images"]] == [42, 43]


@pytest.mark.parametrize("output_format", ["jpeg", "webp", "png"])
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_output_format_gives_that_format(client, http, output_format, response_format):
    answer = client.images.generate(model="flux", prompt="a photo", size=SMALL, output_format=output_format,
                                    response_format=response_format)
    image = (answer.data or [])[0]
    data = base64.b64decode(image.b64_json) if image.b64_json is not None else http.get(image.url).content
    assert Image.open(io.BytesIO(data)).format == PIL_FORMATS[output_format]


def test_the_route_is_in_the_openapi_schema(http):
    schema = http.get("/openapi.json").json()
    route = schema["paths"]["/v1/images/generations"]["post"]
    assert route["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImagesRequest")
    fields = schema["components"]["schemas"]["ImagesRequest"]["properties"]
    assert {"model", "prompt", "n", "size", "response_format", "output_format", "seed", "num_inference_steps",
            "guidance_scale", "loras", "trigger_word"} <= set(fields)


# ---- with an API key ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_http(lora_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    with TestClient(fake_app(args_with(lora_dir, auth={"api_key_file": str(key_file)})).api) as http:
        yield http


def test_the_sdks_api_key_is_our_api_key(keyed_http):
    answer = sdk(keyed_http, api_key=KEY).images.generate(model="flux", prompt="a photo", size=SMALL,
                                                          response_format="url")
    url = (answer.data or [])[0].url
    assert url is not None
    assert keyed_http.get(url).status_code == 401  # the image is behind the key too
    assert keyed_http.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(keyed_http, api_key="wrong-key").images.generate(model="flux", prompt="a photo", size=SMALL)
    assert (raised.value.status_code, raised.value.code) == (401, errors.UNAUTHORIZED)
