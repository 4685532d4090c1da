"""The OpenAI Images API end to end on a real local Ray Serve (docs/api.md#openai-images-api), through the
official `openai` SDK: real generation, the same pixels as /v1/generate, a LoRA from `extra_body`.

Its rules (sizes, bounds, errors, ignored fields, the API key) run without Ray in
tests/unit/web/test_openai_images.py.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.serve

SIZE = 64
STEPS = 2
PROMPT = "a photo of a cat"
STYLE = "aitk/style.safetensors"


@pytest.fixture(scope="module")
def url(app_url):
    return app_url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def openai_images(client: openai.OpenAI, **fields) -> list[openai.types.Image]:
    """Images drawn at the module's small size through the SDK; our own fields go in extra_body, as a user's."""
    extra = {"num_inference_steps": STEPS, **fields.pop("extra_body", {})}
    answer = client.images.generate(model="flux", prompt=PROMPT, size=f"{SIZE}x{SIZE}", output_format="png",
                                    extra_body=extra, **fields)
    return answer.data or []


def generate(url: str, seeds: list[int], loras: list[dict] | None = None) -> list[np.ndarray]:
    """The same prompt through /v1/generate, one image per seed, as PNG pixels."""
    body = {"model": "flux", "output_format": "png", "loras": loras or [], "prompts": [
        {"prompt": PROMPT, "width": SIZE, "height": SIZE, "sample_steps": STEPS, "seed": seed} for seed in seeds]}
    answer = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return [pixels(base64.b64decode(image["data"])) for image in answer.json()["images"]]


def test_the_images_api_and_v1_generate_draw_the_same_pixels(client, url):
    [image] = openai_images(client)
    assert image.b64_json is not None
    assert np.array_equal(pixels(base64.b64decode(image.b64_json)), generate(url, [42])[0])


def test_n_2_draws_seeds_42_and_43(client, url):
    ours = [pixels(base64.b64decode(image.b64_json or "")) for image in openai_images(client, n=2)]
    theirs = generate(url, [42, 43])
    assert len(ours) == 2 and np.abs(ours[0] - ours[1]).max() > 0  # two seeds, two images
    for drawn, expected in zip(ours, theirs):
        # Both requests' two items usually share one pipeline call; an image batched otherwise may differ by
        # one level (tests/serve/test_batching.py), never more.
        assert np.abs(drawn - expected).max() <= 1


def test_a_lora_from_extra_body_is_drawn(client, url):
    lora = {"path": STYLE, "network_multiplier": 1.0}
    [image] = openai_images(client, response_format="url", extra_body={"loras": [lora]})
    assert image.url is not None and "/v1/requests/" in image.url
    download = httpx.get(image.url)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    with_lora = pixels(download.content)

    assert np.abs(with_lora - generate(url, [42])[0]).max() > 0  # not the base model's image
    assert np.array_equal(with_lora, generate(url, [42], [lora])[0])
    # The images are a job's: its result says the file loaded and what it matched.
    request_id = image.url.split("/")[-3]
    metadata = httpx.get(f"{url}/v1/requests/{request_id}/result").json()["metadata"]
    assert [(report["path"], report["matched_modules"] > 0) for report in metadata["loras"]] == [(STYLE, True)]


def test_a_bad_size_raises_the_sdks_status_error_carrying_our_message(client):
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.generate(model="flux", prompt=PROMPT, size="12x99999")
    assert 400 <= raised.value.status_code < 500
    assert raised.value.body["code"] == "VALIDATION_ERROR" and "size" in raised.value.message
