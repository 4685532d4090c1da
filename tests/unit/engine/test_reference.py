"""The engine against a plain diffusers FluxPipeline called the reference's way (docs/models.md).

Parity is exact (0 levels, PNG, fp32 CPU) for one item per call; a batch of one BatchKey gives
each item's own image within 1 level of 8 bits.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils.peft_utils import set_weights_and_activate_adapters
from PIL import Image

from serve_app.config import AppArgs, LoraArgs
from serve_app.engine.images import encode_image
from serve_app.engine.protocol import AdapterWeight, GenerationInterrupted
from serve_app.engine.reference import FluxEngine
from serve_app.errors import ApiError
from serve_app.intake.request_rules import build_work_items
from serve_app.loras.adapters import AdapterCache
from serve_app.loras.sources import LoraSources
from serve_app.schemas import InferenceRequest
from serve_app.workitems import LoraUse
from tests.unit.loras.test_sources import read

STEPS = 3


@pytest.fixture(scope="module")
def engine(tiny_dir) -> FluxEngine:
    return FluxEngine.load(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def reference_pipe(tiny_dir) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapters(engine, lora_root) -> AdapterCache:
    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(lora_root / ".cache")))
    return AdapterCache(engine, lambda use: read(sources, use.source))


def pixels(image: Image.Image) -> np.ndarray:
    """Through PNG, as a client would see it."""
    return np.asarray(Image.open(io.BytesIO(encode_image(image, "png")))).astype(np.int16)


def items_for(body: dict):
    return build_work_items(InferenceRequest.model_validate(body), AppArgs(), "req")


def reference_image(pipe: FluxPipeline, lora_dir, lora_file, scale, prompt, width, height, seed) -> Image.Image:
    """What the reference server does (docs/models.md): one adapter named "lora",
    its scale set directly when not 1.0, one CPU generator, the call with these arguments only."""
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=lora_file, adapter_name="lora", local_files_only=True)
        if scale != 1.0:
            set_weights_and_activate_adapters(pipe.transformer, ["lora"], [scale])
    try:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return pipe(prompt=prompt, height=height, width=width, num_inference_steps=STEPS,
                    guidance_scale=4.0, generator=generator, negative_prompt="").images[0]
    finally:
        if lora_file is not None:
            pipe.unload_lora_weights()


CASES = [
    # (prompt fields, trigger word, lora multiplier or None)
    ({"prompt": "[trigger] a photo of a person", "width": 128, "height": 96, "seed": 42}, "sks", None),
    ({"prompt": "a red house", "width": 100, "height": 90, "seed": 7}, None, None),  # not multiples of 16
    ({"prompt": "[trigger] portrait", "width": 64, "height": 128, "seed": -1}, "ohwx", 1.0),
    ({"prompt": "a cat, [trigger] style", "width": 96, "height": 96, "seed": 3}, "sks", 0.5),
    ({"prompt": "a dog", "width": 80, "height": 70, "seed": 11}, None, 0.0),
]


@pytest.mark.parametrize("prompt,trigger,multiplier", CASES)
def test_engine_matches_the_reference_call_exactly(engine, adapters, reference_pipe, lora_root, prompt, trigger, multiplier):
    body = {"model": "flux", "trigger_word": trigger, "prompts": [{**prompt, "sample_steps": STEPS}]}
    if multiplier is not None:
        body["loras"] = [{"path": "aitk/style.safetensors", "network_multiplier": multiplier}]
    item = items_for(body)[0]
    lora_set = adapters.acquire(item.key.loras) if item.key.loras else None
    ours = engine.generate([item], adapters.weights(item.key.loras))[0]
    if lora_set is not None:
        lora_set.release()

    theirs = reference_image(
        reference_pipe, lora_root / "aitk", "style.safetensors" if multiplier is not None else None,
        multiplier, item.prompt, item.key.width, item.key.height, item.seed,
    )
    assert ours.size == (item.key.width, item.key.height)
    assert np.abs(pixels(ours) - pixels(theirs)).max() == 0


def test_multiplier_zero_is_exactly_the_base_image_and_one_is_not(engine, adapters):
    base = items_for({"model": "flux", "prompts": [{"prompt": "a tree", "width": 64, "height": 64, "sample_steps": STEPS}]})[0]
    with_lora = {"model": "flux", "prompts": [{"prompt": "a tree", "width": 64, "height": 64, "sample_steps": STEPS}]}
    zero = items_for({**with_lora, "loras": [{"path": "aitk/style.safetensors", "network_multiplier": 0}]})[0]
    one = items_for({**with_lora, "loras": [{"path": "aitk/style.safetensors", "network_multiplier": 1}]})[0]
    lora_set = adapters.acquire(zero.key.loras)
    try:
        base_img = pixels(engine.generate([base])[0])
        zero_img = pixels(engine.generate([zero], adapters.weights(zero.key.loras))[0])
        one_img = pixels(engine.generate([one], adapters.weights(one.key.loras))[0])
    finally:
        lora_set.release()
    assert np.abs(zero_img - base_img).max() == 0
    assert np.abs(one_img - base_img).mean() > 1.0


def test_a_batch_gives_each_item_its_own_image(engine):
    prompts = [{"prompt": f"picture number {i}", "seed": 100 + i} for i in range(8)]
    body = {"model": "flux", "prompts": [{**p, "width": 64, "height": 64, "sample_steps": STEPS} for p in prompts]}
    items = items_for(body)
    batched = engine.generate(items)
    for item, image in zip(items, batched):
        alone = engine.generate([item])[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).mean() > 1.0


def test_items_of_different_keys_never_share_a_call(engine):
    items = items_for({"model": "flux", "prompts": [{"prompt": "a", "width": 64}, {"prompt": "b", "width": 128}]})
    with pytest.raises(ValueError):
        engine.generate(items)


def test_a_stop_request_interrupts_the_call_at_a_step(engine):
    item = items_for({"model": "flux", "prompts": [{"prompt": "a", "width": 64, "height": 64, "sample_steps": 20}]})[0]
    steps: list[tuple[int, int]] = []
    with pytest.raises(GenerationInterrupted):
        engine.generate([item], should_stop=lambda: len(steps) >= 2, on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 20), (2, 20)]


def test_a_file_matching_no_module_is_refused(engine, tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(4, 8),
               "transformer.no_such_block.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "wrong.safetensors"))
    lora = read(LoraSources(LoraArgs(root=str(tmp_path), cache_dir=str(tmp_path / ".c"))), "wrong.safetensors")
    with pytest.raises(ApiError) as info:
        engine.load_adapter("wrong", lora)
    assert info.value.code == "LORA_INCOMPATIBLE" and "wrong.safetensors" in info.value.message
    assert "does not fit this model" in info.value.message
    assert str(tmp_path) not in info.value.message
    assert "wrong" not in engine.adapter_names()


def test_a_file_carrying_diffusers_own_lora_config_loads_as_it_does_from_its_path(engine, reference_pipe, tmp_path):
    """Tensors handed over in memory lose nothing: a file that diffusers saved with its LoRA config
    (here alpha = 2 x rank) gives the same pixels as diffusers loading that file from disk."""
    import json

    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from serve_app import tiny

    tensors = load_file(str(tiny.write_peft_lora(tmp_path / "plain.safetensors", with_alpha=False)))
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k})
    config = LoraConfig(r=4, lora_alpha=8, target_modules=modules).to_dict()
    config = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    save_file(tensors, str(tmp_path / "meta.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    item = items_for({"model": "flux", "prompts": [{"prompt": "a boat", "width": 64, "height": 64, "seed": 5,
                                                     "sample_steps": STEPS}]})[0]
    lora = read(LoraSources(LoraArgs(root=str(tmp_path), cache_dir=str(tmp_path / ".c"))), "meta.safetensors")
    images = {}
    for name, handed_over in (("meta", lora), ("no_config", replace(lora, metadata={}))):
        engine.load_adapter(name, handed_over)
        try:
            images[name] = pixels(engine.generate([item], [AdapterWeight(name, 1.0)])[0])
        finally:
            engine.delete_adapter(name)
    theirs = pixels(reference_image(reference_pipe, tmp_path, "meta.safetensors", 1.0, item.prompt, 64, 64, item.seed))
    assert np.abs(images["meta"] - theirs).max() == 0
    assert np.abs(images["no_config"] - theirs).mean() > 0.5  # the config matters: without it alpha would be wrong


def test_adapters_are_shared_between_sets_and_freed_with_the_last(engine, adapters):
    style, other = LoraUse("aitk/style.safetensors", 1.0), LoraUse("aitk/other.safetensors", 0.5)
    a = adapters.acquire([style, other])
    b = adapters.acquire([style])
    assert len(engine.adapter_names()) == 2
    a.release()
    a.release()  # Serve's eviction and the garbage collector may both call it
    assert adapters.loaded_keys() == ["aitk/style.safetensors"]
    assert len(engine.adapter_names()) == 1
    b.release()
    assert engine.adapter_names() == set()


def test_images_encode_in_each_format(engine):
    item = items_for({"model": "flux", "prompts": [{"prompt": "a", "width": 64, "height": 64, "sample_steps": 1}]})[0]
    image = engine.generate([item])[0]
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")):
        assert encode_image(image, fmt).startswith(magic)
