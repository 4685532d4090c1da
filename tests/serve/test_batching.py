"""Dynamic batching on a real local Ray Serve, over real HTTP (issue 4).

What a user relies on: items of one BatchKey share pipeline calls whatever request they came in,
items of different keys never do, an image does not depend on what it was batched with, the batch
settings of a deploy take effect, one bad prompt fails only its own request, and a stream of
distinct keys leaves nothing behind in the replica.

Batch formation is made deterministic with a "blocker": a long call of another shape that is
running while the burst arrives, so the whole burst reaches the replica while the pipeline is busy
and waits at the generator's BatchGate (serve_app/replica/gate.py) for the next wave.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app import errors
from tests.serve.apps import AUTH
from tests.serve.helpers import calls, generator_state, wait_finished

pytestmark = pytest.mark.serve

DEFAULT_USER_CONFIG = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0}
BLOCKER = {"prompt": "blocker", "width": 512, "height": 512, "sample_steps": 60}  # about 1 s


@pytest.fixture(scope="module")
def url(app_url):
    """The shared app's `flux`, at its default batch settings (tests/serve/apps.py)."""
    assert generator_state().batching.settings.model_dump(include=set(DEFAULT_USER_CONFIG)) == DEFAULT_USER_CONFIG
    return app_url


def occupy(url: str, headers: dict | None = None) -> str:
    """Start a long call of another shape and return once the pipeline runs it."""
    job = httpx.post(f"{url}/v1/inference", json={"model": "flux", "prompts": [BLOCKER]}, headers=headers,
                     timeout=30).json()
    deadline = time.time() + 30
    while generator_state().batching.running_batches == 0:
        assert time.time() < deadline, "the blocker never started"
        time.sleep(0.01)
    return job["request_id"]


def request(prompts: list[dict], loras: list[dict] | None = None) -> dict:
    return {"model": "flux", "output_format": "png", "prompts": prompts, "loras": loras or []}


async def post_all(url: str, path: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
        return list(await asyncio.gather(*(client.post(path, json=b) for b in bodies)))


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(np.int16)



# Four keys; three of them share the geometry label 64x64x2, so only the engine's own count of
# BatchKeys per call (not the label) can show that guidance and LoRA sets are kept apart.
KEYS = {
    "base": {"prompt": {"width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 4.0}},
    "guidance": {"prompt": {"width": 64, "height": 64, "sample_steps": 2, "guidance_scale": 2.5}},
    "geometry": {"prompt": {"width": 80, "height": 64, "sample_steps": 1}},
    "lora": {"prompt": {"width": 64, "height": 64, "sample_steps": 2},
             "loras": [{"path": "aitk/style.safetensors", "network_multiplier": 0.8}]},
}


def test_mixed_load_batches_same_keys_only_and_images_match_alone(url, lora_root):
    bodies, key_of_body = [], []
    for round_ in range(3):
        for name, key in KEYS.items():
            prompts = [{"prompt": f"{name} {round_} {i}", "seed": 100 * round_ + i, **key["prompt"]} for i in range(2)]
            bodies.append(request(prompts, key.get("loras")))
            key_of_body.append(name)
    assert sum(len(b["prompts"]) for b in bodies) == 24

    occupy(url)
    answers = asyncio.run(post_all(url, "/v1/generate", bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies), [a.text for a in answers if a.status_code != 200]
    key_of_request = {a.json()["request_id"]: name for a, name in zip(answers, key_of_body)}

    made = calls(key_of_request)
    assert sum(c["images"] for c in made) == 24, made
    for call in made:
        assert call["ok"] and call["keys"] == 1, call
        assert len({key_of_request[r] for r in call["requests"]}) == 1, call  # no call mixes keys
    assert max(c["images"] for c in made) > 1, made
    assert any(len(c["requests"]) > 1 for c in made), made  # batches span requests
    assert all(c["images"] <= DEFAULT_USER_CONFIG["max_batch_size"] for c in made), made

    # Each image equals the same item generated alone (one request, one prompt, at low load).
    alone_ids = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for body, answer in zip(bodies, answers):
            for prompt, batched in zip(body["prompts"], answer.json()["images"]):
                alone = client.post("/v1/generate", json=request([prompt], body["loras"]))
                assert alone.status_code == 200, alone.text
                alone_ids.append(alone.json()["request_id"])
                diff = np.abs(decode(alone.json()["images"][0]["data"]) - decode(batched["data"]))
                assert diff.max() <= 1, (prompt, diff.max())
    assert [c["images"] for c in calls(alone_ids)] == [1] * len(alone_ids)


def test_a_stream_of_distinct_keys_leaves_no_state_behind(url, lora_root):
    async def stream(guidances: list[float]) -> list[int]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one(g: float) -> int:
                async with limit:
                    body = request([{"prompt": "k", "width": 64, "height": 64, "sample_steps": 1, "guidance_scale": g}])
                    return (await client.post("/v1/generate", json=body)).status_code

            return list(await asyncio.gather(*(one(g) for g in guidances)))

    assert set(asyncio.run(stream([1.0 + i / 100 for i in range(20)]))) == {200}
    warm = generator_state()
    assert set(asyncio.run(stream([3.0 + i / 100 for i in range(200)]))) == {200}
    after = generator_state()

    assert after.asyncio_tasks <= warm.asyncio_tasks + 2, (warm.asyncio_tasks, after.asyncio_tasks)
    state = after.batching
    assert (state.held_items, state.waiting_items, state.running_batches) == (0, 0, 0), state
    assert all(c["keys"] == 1 for c in calls())


FAIL_PROMPTS = [{"prompt": "fine" if i != 1 else "[[fail]] broken", "seed": i, "width": 64, "height": 64,
                 "sample_steps": 1} for i in range(2)]
GOOD_PROMPTS = [{"prompt": f"neighbour {i}", "seed": 10 + i, "width": 64, "height": 64, "sample_steps": 1}
                for i in range(2)]


def test_a_failing_item_fails_only_its_own_sync_request(url, lora_root):
    occupy(url)
    failing, good = asyncio.run(post_all(url, "/v1/generate", [request(FAIL_PROMPTS), request(GOOD_PROMPTS)]))
    assert good.status_code == 200, good.text
    assert len(good.json()["images"]) == 2
    assert failing.status_code == 500, failing.text
    assert failing.json()["error"]["code"] == errors.GENERATION_FAILED

    shared = calls([good.json()["request_id"]])
    assert any(not c["ok"] and c["images"] > 2 for c in shared), shared  # it did share the failed call


def test_a_failing_item_fails_only_its_own_async_job(url, lora_root):
    occupy(url)
    failing, good = asyncio.run(post_all(url, "/v1/inference", [request(FAIL_PROMPTS), request(GOOD_PROMPTS)]))
    failing_status = wait_finished(url, failing.json()["request_id"])
    good_status = wait_finished(url, good.json()["request_id"])
    assert good_status["status"] == "succeeded", good_status
    assert failing_status["status"] == "failed" and failing_status["error_code"] == errors.GENERATION_FAILED
    assert any(not c["ok"] and c["images"] > 2 for c in calls([good.json()["request_id"]]))


def test_max_batch_size_of_a_deploy_takes_effect(auth_app_url):
    """The app of its own (tests/serve/apps.py) deploys `flux` with a `user_config` of 2 items per batch, where
    the shared app's `flux` runs the default 4 (the `url` fixture checks that replica): the deploy takes effect."""
    url = auth_app_url
    assert generator_state().batching.settings.max_batch_size == 2

    occupy(url, AUTH)
    prompts = [{"prompt": f"live {i}", "seed": i, "width": 64, "height": 64, "sample_steps": 1} for i in range(10)]
    answers = asyncio.run(post_all(url, "/v1/generate", [request([p]) for p in prompts], AUTH))
    assert all(a.status_code == 200 for a in answers)
    sizes = [c["images"] for c in calls(a.json()["request_id"] for a in answers)]
    assert sum(sizes) == 10 and max(sizes) == 2, sizes


def test_batch_metrics_are_exported_by_shape(url):
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    tags = r'\{(?=[^}]*model="flux")(?=[^}]*shape="64x64x2")'
    wanted = [r"ray_flux_batch_size_bucket" + tags, r"ray_flux_images_generated_total" + tags]
    deadline = time.time() + 30  # metrics leave a replica every few seconds
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [pattern for pattern in wanted if not re.search(pattern, text)]
        if not missing:
            break
        assert time.time() < deadline, f"not exported: {missing}"
        time.sleep(1)
    assert "loras-" not in "\n".join(line for line in text.splitlines() if line.startswith("ray_flux_"))
