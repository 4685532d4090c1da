"""PreviewEngine against ai-toolkit's own preview images (tests/golden/preview) and its LoRA rules.

The goldens are drawn as a generator replica draws them (bench/preview_goldens.py: the request through
build_work_items, then PreviewModel), and compared within this CPU's residual (preview_goldens.py says why).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.preview_goldens import Residual, demo_lora, draw, is_quantized, png_pixels
from serve_app import errors, tiny
from serve_app.engine.preview.lora import choose_lora_mode
from serve_app.engine.preview.model import PreviewModel
from serve_app.engine.preview.sampling import GenerationInterrupted, PreviewEngine
from serve_app.errors import ApiError
from tests.unit.preview_goldens import (
    GOLDEN_DIR,
    GOLDENS,
    assert_within_residual,
    golden_id,
    load_golden,
    needs_goldens,
)

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 4.0}  # a fast call where pixels are not the point


@pytest.fixture(scope="module")
def quantized(tiny_dir) -> PreviewEngine:
    return PreviewEngine.load(tiny_dir, device="cpu", quantized=True)


@pytest.fixture(scope="module")
def bf16(tiny_dir) -> PreviewEngine:
    return PreviewEngine.load(tiny_dir, device="cpu", quantized=False)


@pytest.fixture(scope="module")
def demo_lora_tensors(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The demo LoRA the goldens were drawn with (`python -m serve_app.tiny --lora`)."""
    return load_file(str(tiny.write_aitoolkit_lora(tmp_path_factory.mktemp("lora") / "demo.safetensors")))


def weight_bits(engine: PreviewEngine) -> dict[str, torch.Tensor]:
    """Every plain tensor of the transformer as raw bits (torch.equal would call -0.0 and 0.0 equal)."""
    return {
        name: tensor.detach().clone().view(torch.int16)
        for name, tensor in engine.pipe.transformer.state_dict().items()
        if tensor.dtype == torch.bfloat16
    }


@pytest.fixture(scope="module")
def demo_lora_file(tmp_path_factory):
    return demo_lora(tmp_path_factory.mktemp("demo"))


@needs_goldens
@pytest.mark.parametrize("name", GOLDENS, ids=golden_id)
def test_golden(name, quantized, bf16, demo_lora_file):
    golden = load_golden(name)
    model = PreviewModel(quantized if is_quantized(golden) else bf16)
    ours = png_pixels(draw(model, demo_lora_file, golden))
    assert_within_residual(name, Residual.between(ours, png_pixels(GOLDEN_DIR / golden["expected_png"])))


@needs_goldens
def test_golden_is_unchanged_by_a_merged_call_in_between(bf16, demo_lora_tensors, demo_lora_file):
    unquantized = [load_golden(name) for name in GOLDENS if not is_quantized(load_golden(name))]
    if not unquantized:
        pytest.skip("no golden of an unquantized run")
    first = png_pixels(draw(PreviewModel(bf16), demo_lora_file, unquantized[0]))
    lora = bf16.load_lora(demo_lora_tensors)
    bf16.generate("a red car", seed=3, lora=lora, multiplier=0.5, lora_mode="merged", **SMALL)
    assert np.array_equal(png_pixels(draw(PreviewModel(bf16), demo_lora_file, unquantized[0])), first)


def test_a_merged_call_restores_the_weights_bit_for_bit(bf16, demo_lora_tensors):
    before = weight_bits(bf16)
    bf16.generate("a cat", seed=1, lora=bf16.load_lora(demo_lora_tensors), multiplier=0.7, lora_mode="merged", **SMALL)
    after = weight_bits(bf16)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_an_interrupted_merged_call_restores_the_weights(bf16, demo_lora_tensors):
    before = weight_bits(bf16)
    with pytest.raises(GenerationInterrupted):
        bf16.generate(
            "a cat",
            seed=1,
            lora=bf16.load_lora(demo_lora_tensors),
            lora_mode="merged",
            should_stop=lambda: True,
            **SMALL,
        )
    after = weight_bits(bf16)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_progress_is_reported_and_a_stop_ends_the_call(quantized):
    steps_seen = []
    with pytest.raises(GenerationInterrupted):
        quantized.generate(
            "a cat",
            seed=1,
            width=64,
            height=64,
            steps=4,
            guidance=4.0,
            on_step=lambda done, total: steps_seen.append((done, total)),
            should_stop=lambda: len(steps_seen) == 2,
        )
    assert steps_seen == [(1, 4), (2, 4)]


def test_the_hook_is_gone_after_the_call(quantized, demo_lora_tensors):
    base = png_pixels(quantized.generate("a cat", seed=5, **SMALL))
    with_lora = png_pixels(quantized.generate("a cat", seed=5, lora=quantized.load_lora(demo_lora_tensors), **SMALL))
    assert not np.array_equal(with_lora, base)
    assert np.array_equal(png_pixels(quantized.generate("a cat", seed=5, **SMALL)), base)


def test_a_zero_multiplier_gives_the_base_image(quantized, demo_lora_tensors):
    base = png_pixels(quantized.generate("a dog", seed=2, **SMALL))
    lora = quantized.load_lora(demo_lora_tensors)
    assert np.array_equal(png_pixels(quantized.generate("a dog", seed=2, lora=lora, multiplier=0.0, **SMALL)), base)


def test_merging_is_refused_on_a_quantized_model(quantized, demo_lora_tensors):
    with pytest.raises(ValueError, match="quantized"):
        quantized.generate("a cat", seed=1, lora=quantized.load_lora(demo_lora_tensors), lora_mode="merged", **SMALL)


def test_merge_only_when_unquantized_and_one_multiplier():
    assert choose_lora_mode(quantized=False, multipliers=[0.8, 0.8]) == "merged"
    assert choose_lora_mode(quantized=False, multipliers=[0.8, 1.0]) == "hook"
    assert choose_lora_mode(quantized=True, multipliers=[1.0]) == "hook"


def test_an_ai_toolkit_file_maps_onto_every_block_linear(quantized, demo_lora_tensors):
    lora = quantized.load_lora(demo_lora_tensors)
    assert lora.matched_modules == len(demo_lora_tensors) // 2 == 20
    assert lora.ignored_keys == ()
    assert all(p.down.dtype == p.up.dtype == torch.float32 for p in lora.pairs.values())


def test_other_formats_are_converted_first(bf16, lora_root):
    peft = bf16.load_lora(load_file(str(lora_root / "peft.safetensors")))
    assert peft.matched_modules == 7  # to_q, to_k, to_v (+ to_out.0 in the double block); alphas unused
    kohya = bf16.load_lora(load_file(str(lora_root / "kohya.safetensors")))
    assert kohya.matched_modules > 0


def test_a_file_that_fits_no_block_linear_is_incompatible(bf16, demo_lora_tensors):
    outside = {"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64), "text_encoder.foo": torch.zeros(2)}
    with pytest.raises(ApiError) as caught:
        bf16.load_lora(outside)
    assert caught.value.code == errors.LORA_INCOMPATIBLE
    assert caught.value.details["matched_modules"] == 0


def test_a_pair_that_does_not_fit_its_linear_is_incompatible(bf16, demo_lora_tensors):
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    with pytest.raises(ApiError) as caught:
        bf16.load_lora({**demo_lora_tensors, key: torch.zeros(4, 7)})
    assert caught.value.code == errors.LORA_INCOMPATIBLE
    lone_up = {key.replace("lora_A", "lora_B"): demo_lora_tensors[key.replace("lora_A", "lora_B")]}
    with pytest.raises(ApiError, match="no lora_A"):
        bf16.load_lora(lone_up)
