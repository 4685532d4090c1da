"""The LoRA slot against separate PEFT adapters, on the small model in fp32.

The slot's promise: writing a LoRA set into one adapter (A rows stacked, multiplier * alpha/rank
folded into B) computes what diffusers computes with one PEFT adapter per file. Checked on the
transformer's output, for files in each format users bring (ai-toolkit, PEFT with alphas, kohya,
XLabs), two-LoRA stacks, the multipliers 1, 0.5, 0 and -1, and the base model.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from serve_app import tiny
from serve_app.engine.compiled.fast import install_slot
from serve_app.engine.compiled.slot import LoraSlot, SlotUnfit, SlotWeightCache, convert_lora, slot_targets

FILES = {
    "style": "aitk/style.safetensors",
    "other": "aitk/other.safetensors",
    "kohya": "kohya.safetensors",
    "peft": "peft.safetensors",  # alpha = 2 * rank: scale 2
    "xlabs": "xlabs.safetensors",
}
SLOT_RANK = 16
TOLERANCE = 1e-5  # max abs difference of the transformer's output, fp32


@pytest.fixture(scope="module")
def files(lora_root) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(lora_root / rel)) for name, rel in FILES.items()}


@pytest.fixture(scope="module")
def reference(tiny_dir, lora_root) -> FluxPipeline:
    """The reference's way: one PEFT adapter per file, loaded by diffusers from the file."""
    pipe = FluxPipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    for name, rel in FILES.items():
        path = lora_root / rel
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, local_files_only=True)
    return pipe


@pytest.fixture(scope="module")
def transformer(tiny_dir) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(str(tiny_dir), subfolder="transformer").eval()


@pytest.fixture(scope="module")
def slot(transformer) -> LoraSlot:
    return install_slot(transformer, slot_targets(transformer), SLOT_RANK, torch.float32)


@pytest.fixture(scope="module")
def inputs() -> dict:
    """One transformer call at a 64x64 image (4x4 packed latents) with 8 text tokens, fixed seed."""
    gen = torch.Generator().manual_seed(0)
    config = tiny.TRANSFORMER_CONFIG
    return {
        "hidden_states": torch.randn(1, 16, config["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, config["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


@pytest.fixture(scope="module")
def base_output(reference, inputs) -> torch.Tensor:
    return reference_output(reference, inputs, [])


def converted(files, slot, name):
    return convert_lora(files[name], slot.targets)


@torch.no_grad()
def reference_output(reference: FluxPipeline, inputs: dict, uses: list[tuple[str, float]]) -> torch.Tensor:
    """The transformer's output with `uses` as separate PEFT adapters (none: LoRA disabled)."""
    if uses:
        reference.enable_lora()
        reference.set_adapters([n for n, _ in uses], adapter_weights=[w for _, w in uses])
    else:
        reference.disable_lora()
    return reference.transformer(**inputs)[0]


@torch.no_grad()
def slot_output(transformer, slot, files, inputs: dict, uses: list[tuple[str, float]]) -> torch.Tensor:
    slot.write([(converted(files, slot, name), weight) for name, weight in uses])
    return transformer(**inputs)[0]


@pytest.mark.parametrize("name", FILES)
def test_each_format_converts_to_the_modules_diffusers_adapts(reference, slot, files, name):
    wrapped = {n for n, m in reference.transformer.named_modules() if name in getattr(m, "lora_A", {})}
    assert set(converted(files, slot, name).factors) == wrapped


@pytest.mark.parametrize("stack", [("style", "kohya"), ("peft", "xlabs")], ids="+".join)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 0.5), (0.0, 0.0), (-1.0, -1.0), (1.0, -0.5)], ids=str)
def test_the_slot_computes_what_separate_peft_adapters_compute(
    reference, transformer, slot, files, inputs, base_output, stack, weights
):
    uses = list(zip(stack, weights, strict=True))
    theirs = reference_output(reference, inputs, uses)
    ours = slot_output(transformer, slot, files, inputs, uses)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    if any(weights):  # not vacuous: the LoRAs do change the output
        assert (theirs - base_output).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["style", "kohya"])
def test_one_lora_and_the_base_model_match_too(reference, transformer, slot, files, inputs, name):
    for uses in ([(name, 1.0)], [(name, 0.5)], []):
        theirs = reference_output(reference, inputs, uses)
        assert (slot_output(transformer, slot, files, inputs, uses) - theirs).abs().max().item() <= TOLERANCE


def test_a_smaller_write_zeroes_the_rows_the_last_one_used(slot, files):
    style, other = converted(files, slot, "style"), converted(files, slot, "other")
    module = "transformer_blocks.0.attn.to_q"
    slot_a, slot_b = slot.weights[module]
    slot.write([(style, 1.0), (other, 1.0)])
    assert slot_a[:8].abs().sum() > 0 and slot_a[8:].abs().sum() == 0
    slot.write([(style, 0.5)])
    assert slot_a[4:].abs().sum() == 0 and slot_b[:, 4:].abs().sum() == 0
    assert torch.equal(slot_b[:, :4], 0.5 * style.factors[module].up)
    slot.write([])  # the base model
    assert all(a.abs().sum() == 0 and b.abs().sum() == 0 for a, b in slot.weights.values())


def with_keys(base: dict, extra: dict) -> dict:
    return {**base, **extra}


UNFIT = {
    "DoRA (PEFT)": (
        "style",
        {"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(32)},
        "DoRA",
    ),
    "DoRA (kohya)": ("kohya", {"lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, 32)}, "DoRA"),
    "LoKr": ("style", {"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.ones(4, 4)}, "LoKr"),
    "LoHa": ("style", {"transformer.transformer_blocks.0.attn.to_q.hada_w1_a": torch.ones(4, 4)}, "LoHa"),
    "text encoder": (
        "style",
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4),
        },
        "text-encoder",
    ),
    "outside the blocks": (
        "style",
        {
            "transformer.x_embedder.lora_A.weight": torch.ones(4, 64),
            "transformer.x_embedder.lora_B.weight": torch.ones(32, 4),
        },
        "outside the slot",
    ),
    "LoRA bias": ("style", {"transformer.transformer_blocks.0.attn.to_q.lora_B.bias": torch.ones(32)}, "lora_B.bias"),
    "wrong shapes": (
        "style",
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 31)},
        "do not fit",
    ),
}


@pytest.mark.parametrize("case", UNFIT)
def test_what_the_slot_cannot_take_is_named(slot, files, case):
    base, extra, reason = UNFIT[case]
    with pytest.raises(SlotUnfit, match=reason):
        convert_lora(with_keys(files[base], extra), slot.targets)


def test_a_file_with_no_transformer_keys_is_unfit(slot):
    with pytest.raises(SlotUnfit, match="no transformer LoRA keys"):
        convert_lora({"unet.down.lora_A.weight": torch.ones(4, 8)}, slot.targets)


def test_the_rank_budget_counts_the_summed_ranks_per_module(slot, tmp_path):
    wide = convert_lora(load_file(str(tiny.write_aitoolkit_lora(tmp_path / "r12.safetensors", rank=12))), slot.targets)
    slot.check([wide])  # 12 <= 16
    with pytest.raises(SlotUnfit, match="summed rank 24 is over the slot's rank budget 16"):
        slot.check([wide, wide])
    with pytest.raises(SlotUnfit):
        slot.write([(wide, 1.0), (wide, 1.0)])


def test_the_weight_cache_keeps_device_bytes_within_its_budget(slot, files):
    lora = converted(files, slot, "style")
    size = lora.numel * 4
    cache = SlotWeightCache("cpu", torch.float32, device_bytes=size + 1)
    cache.put("a", lora)
    cache.put("b", lora)
    assert cache.on_device("a") and not cache.on_device("b")
    assert cache.bytes_on_device == size and cache.bytes_total == 2 * size
    cache.pop("a")
    cache.put("c", lora)
    assert cache.on_device("c") and cache.bytes_on_device == size
    assert sorted(cache.names()) == ["b", "c"]
