"""Preview models over real HTTP (docs/models.md): ai-toolkit's own previews, reproduced by the server.

The goldens (tests/golden/preview) are outputs of ai-toolkit itself; they are compared as decoded
PNG pixels, within the residual measured on this machine's CPU kernels (tests/unit/engine/preview/test_model.py
says why and holds the bounds; 0 where the kernels match the machine that drew them).
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.preview_goldens import Residual, png_pixels
from serve_app import errors
from tests.serve.helpers import wait_finished
from tests.unit.preview_goldens import (
    GOLDEN_DIR,
    GOLDENS,
    assert_within_residual,
    golden_id,
    load_golden,
    lora_mode_ran,
    needs_goldens,
)

pytestmark = pytest.mark.serve

DEMO = "demo/demo_lora.safetensors"
SMALL = {"width": 64, "height": 64, "sample_steps": 2}


@pytest.fixture(scope="module")
def url(app_url, lora_root):
    """The shared app's `flux-preview` (quantized) and `flux-preview-bf16` (tests/serve/apps.py)."""
    from serve_app.tiny import write_aitoolkit_lora

    if not (lora_root / DEMO).exists():
        write_aitoolkit_lora(lora_root / DEMO)  # the demo LoRA, as `make serve` writes it
    return app_url


def generate(url: str, body: dict) -> dict:
    answer = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


@needs_goldens
@pytest.mark.parametrize("name", GOLDENS, ids=golden_id)
def test_the_server_draws_ai_toolkits_preview(url, name):
    golden = load_golden(name)
    image = generate(url, golden["request"])["images"][0]
    ours = png_pixels(base64.b64decode(image["data"]))
    assert_within_residual(name, Residual.between(ours, png_pixels(GOLDEN_DIR / golden["expected_png"])))
    ran, effective = golden["what_ai_toolkit_ran"], image["effective"]
    shared = [key for key in ("prompt", "width", "height", "steps", "guidance", "seed", "multiplier") if key in ran]
    assert {key: effective[key] for key in shared} == {key: ran[key] for key in shared}
    assert image["lora_mode"] == lora_mode_ran(golden)


@needs_goldens
def test_a_merged_call_at_another_multiplier_leaves_the_base_weights_as_they_were(url):
    merged = [load_golden(name) for name in GOLDENS if lora_mode_ran(load_golden(name)) == "merged"]
    if not merged:
        pytest.skip("no golden of a merged LoRA")
    request = merged[0]["request"]
    first = generate(url, request)["images"][0]["data"]
    other = {**request, "loras": [{"path": DEMO, "network_multiplier": 0.4}]}
    assert generate(url, other)["images"][0]["lora_mode"] == "merged"
    again = generate(url, request)["images"][0]["data"]
    assert np.array_equal(png_pixels(base64.b64decode(first)), png_pixels(base64.b64decode(again)))


def test_prompt_flags_name_and_trigger_and_sizes(url):
    body = {"model": "flux-preview", "trigger_word": "sks", "job_name": "run7", "output_format": "png",
            "prompts": [{"prompt": "[name] by [trigger] --w 100 --h 72 --s 2 --seed 9 --cfg 2.5 --m 0.5", **SMALL}],
            "loras": [{"path": DEMO}]}
    image = generate(url, body)["images"][0]
    assert image["effective"] == {"prompt": "run7 by sks", "width": 96, "height": 64, "steps": 2,
                                  "guidance": 2.5, "seed": 9, "multiplier": 0.5}
    assert (image["width"], image["height"], image["seed"]) == (96, 64, 9)
    assert png_pixels(base64.b64decode(image["data"])).shape[:2] == (64, 96)


@pytest.mark.parametrize("flag,field", [("--w 8", "width"), ("--s 0", "sample_steps"), ("--cfg nan", "guidance_scale"),
                                        ("--m 3", "network_multiplier"), ("--seed x", "seed")])
def test_a_bad_flag_value_is_a_422_naming_the_field_it_overrides(url, flag, field):
    body = {"model": "flux-preview", "prompts": [{"prompt": f"a cat {flag}", **SMALL}]}
    answer = httpx.post(f"{url}/v1/inference", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == errors.VALIDATION_ERROR
    assert error["details"]["errors"][0]["loc"] == ["body", "prompts", "0", field]


def test_a_preview_takes_one_lora(url):
    body = {"model": "flux-preview", "prompts": [{"prompt": "a", **SMALL}],
            "loras": [{"path": DEMO}, {"path": "aitk/style.safetensors"}]}
    answer = httpx.post(f"{url}/v1/generate", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == errors.SINGLE_LORA_ONLY


def previews(url: str, sample: dict, model: str = "flux-preview-bf16") -> list[dict]:
    body = {"model": model, "lora": DEMO, "trigger_word": "sks", "job_name": "grid", "output_format": "png",
            "sample": {"width": 64, "height": 64, "sample_steps": 2, **sample}}
    job = httpx.post(f"{url}/v1/previews", json=body)
    assert job.status_code == 200, job.text
    assert wait_finished(url, job.json()["request_id"], timeout_s=120)["status"] == "succeeded"
    return httpx.get(f"{url}/v1/requests/{job.json()['request_id']}/result").json()["outputs"]["images"]


def test_a_sample_grid_is_seeded_as_the_trainer_seeds_it(url):
    walked = previews(url, {"prompts": ["[trigger] one", "[name] two", "three"], "seed": 5, "walk_seed": True})
    assert [image["seed"] for image in walked] == [5, 6, 7]
    assert [image["effective"]["prompt"] for image in walked] == ["sks one", "grid two", "three"]
    assert {image["lora_mode"] for image in walked} == {"merged"}  # bf16 and one multiplier: merged
    fixed = previews(url, {"prompts": ["a", "b"], "seed": 5})
    assert [image["seed"] for image in fixed] == [5, 5]
    own = previews(url, {"samples": [{"prompt": "c", "seed": 11, "network_multiplier": 0.5}, {"prompt": "d"}],
                         "seed": 3, "walk_seed": True, "network_multiplier": 1.0})
    assert [(image["seed"], image["effective"]["multiplier"]) for image in own] == [(11, 0.5), (4, 1.0)]
    assert {image["lora_mode"] for image in own} == {"hook"}  # two multipliers: the trainer hooks it


def test_previews_take_a_preview_model(url):
    body = {"model": "flux", "sample": {"prompts": ["a"]}}
    answer = httpx.post(f"{url}/v1/previews", json=body)
    assert answer.status_code == 422 and answer.json()["error"]["details"]["errors"][0]["loc"] == ["body", "model"]


def test_the_client_reproduces_a_job_configs_previews(url, tmp_path):
    from serve_app import client

    config = tmp_path / "job.yaml"
    config.write_text("""\
job: extension
config:
  name: my_first_lora
  process:
    - type: sd_trainer
      trigger_word: sks
      model: {name_or_path: black-forest-labs/FLUX.1-dev, is_flux: true, quantize: true}
      sample:
        sampler: flowmatch
        sample_every: 250
        width: 64
        height: 64
        prompts: ["[trigger] a photo of a person", "[name] at the beach --seed 3"]
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 2
""")
    client.main(["preview", "--config", str(config), "--lora", DEMO, "--url", url, "--format", "png",
                 "--out", str(tmp_path / "out")])
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == ["my_first_lora_00.png", "my_first_lora_01.png"]
    with Image.open(written[0]) as image:
        assert image.size == (64, 64)
