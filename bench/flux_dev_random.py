"""FLUX.1-dev's architecture with random weights, and random LoRAs for it: GPU benchmarks without downloads.

Every module is built from FLUX.1-dev's published config (docs/performance.md) directly
on the device in the target dtype. Pixels are meaningless; the arithmetic, memory traffic and
sequence lengths (512 T5 tokens, 4096 image tokens at 1024²) are the real model's, so timings are.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from serve_app.engine.compiled.slot import slot_targets
from serve_app.tiny import SCHEDULER_CONFIG, _clip_tokenizer, _t5_tokenizer

FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
FLUX_DEV_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}  # fmt: skip
T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
    "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu",
}  # fmt: skip
TRANSFORMER_SEED = 3  # a rebuilt transformer gets the same weights


def _seeded(device: str, seed: int) -> None:
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)


@contextmanager
def built_in(device: str, dtype: torch.dtype):
    """Modules constructed inside are created on `device` in `dtype`: no fp32 host copy of 12B parameters."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_flux_transformer(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer with random weights (23.8 GB in bf16); the same weights at every build."""
    _seeded(device, TRANSFORMER_SEED)
    with built_in(device, dtype):
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    return transformer.eval()


def build_flux_dev_random(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """FLUX.1-dev's pipeline with random weights (about 34 GB in bf16).

    The tokenizers are the small model's: token ids stay within the real vocabularies, and the
    sequence lengths the pipeline pads to (77 and 512) are what cost time.
    """
    with built_in(device, dtype):
        _seeded(device, 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        _seeded(device, 2)
        text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL)).eval()
        _seeded(device, 4)
        vae = AutoencoderKL(**FLUX_DEV_VAE).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(),
        transformer=build_flux_transformer(device, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(
    transformer: torch.nn.Module, rank: int, seed: int, device: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """An ai-toolkit-style LoRA over every Linear of the blocks, A and B both non-zero.

    A's rows have unit norm on average and B has std 0.05/sqrt(rank): each LoRA changes a Linear's
    output by a few percent, like a trained one. Call it before any adapter wraps the Linears.
    """
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in slot_targets(transformer).items():
        down = torch.randn(rank, in_f, generator=gen, device=device) / in_f**0.5
        up = torch.randn(out_f, rank, generator=gen, device=device) * (0.05 / rank**0.5)
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(dtype)
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(dtype)
    return tensors


def probe_inputs(transformer: FluxTransformer2DModel, size: int, device: str, dtype: torch.dtype) -> dict:
    """Inputs of one transformer call for a `size`² image, in the dtypes FluxPipeline passes.

    Same shapes and dtypes as a pipeline call, so a compiled transformer reuses that call's graph.
    """
    gen = torch.Generator(device).manual_seed(7)
    config, side, text = transformer.config, size // 16, 512

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return {
        "hidden_states": randn(1, side * side, config.in_channels),
        "encoder_hidden_states": randn(1, text, config.joint_attention_dim),
        "pooled_projections": randn(1, config.pooled_projection_dim),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype),
        "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
