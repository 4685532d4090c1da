"""PreviewEngine: draws a LoRA's training preview the way ostris/ai-toolkit's `generate_images` does.

What differs from the reference engine (engine/reference.py), all read in ai-toolkit (docs/models.md):
- bf16 on every device, CPU included; with `quantize`, every Linear of the transformer and of T5
  is optimum-quanto qfloat8 (`quantize` then `freeze`), as `load_model` does with `quantize: true`;
- the scheduler is ai-toolkit's own FLUX FlowMatchEuler config, not the checkpoint's;
- the prompt is encoded by ai-toolkit's `encode_prompts_flux` (CLIP pooled output, T5's last hidden
  state over 512 padded tokens, no attention mask) and passed as embeddings: no negative prompt,
  no true CFG, `guidance_scale` is FLUX's distilled guidance;
- the noise comes from a CPU generator seeded with the seed, drawn in bf16 on the CPU;
- the VAE weights go bf16 -> fp16 -> bf16 before decoding in bf16;
- the LoRA is an fp32 branch or is merged in fp32 (preview/lora.py).
One image per call, as ai-toolkit draws previews one by one (on CPU a batch of two gave the same
bytes as each alone, but nothing in ai-toolkit's path promises that on other kernels).
Torch's thread count is left alone: the goldens were drawn on 1 thread, and 1 and 2 threads give
the same bytes here (128x96 and 512x384), so exactness does not need it.

No Ray here: this module runs, is tested and is benchmarked without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from optimum.quanto import freeze, qfloat8, quantize
from PIL import Image

from serve_app.engine.loader import load_pipeline
from serve_app.engine.preview.lora import LoraMode, PreviewLora, applied_lora, map_lora
from serve_app.engine.protocol import GenerationInterrupted

__all__ = ["GenerationInterrupted", "PreviewEngine", "encode_prompt", "load_preview_pipeline"]

DTYPE = torch.bfloat16
T5_MAX_LENGTH = 512
# toolkit/sampler.py `flux_config` (the "flowmatch" sampler for arch flux); its own scheduler class
# only adds training helpers. FLUX.1-dev's checkpoint has the same numbers, schnell's do not.
AITOOLKIT_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 256,
    "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
}  # fmt: skip


@dataclass(frozen=True)
class PromptEmbeddings:
    """What `encode_prompts_flux` hands the pipeline: T5 [1, 512, d] and CLIP pooled [1, d], bf16."""

    text: torch.Tensor
    pooled: torch.Tensor


def load_preview_pipeline(source: str | Path, device: str, quantized: bool) -> FluxPipeline:
    """Load a FLUX model the way ai-toolkit's `load_model` does for `arch: flux`.

    The weights come through the engines' one loader (engine/loader.py), in bf16 on the CPU; then each
    model goes to `device` in ai-toolkit's order, quantized after its move as ai-toolkit does.

    Args:
        source: `tiny`, a diffusers FLUX directory (the small model's, or FLUX.1-dev's) or a repo id.
        device: `cpu` or `cuda[:n]`; the dtype is bf16 on both.
        quantized: quantize the transformer's and T5's Linears to qfloat8 (ai-toolkit's
            `quantize: true`, the trainer UI's default).

    Returns:
        A FluxPipeline with ai-toolkit's scheduler, ready for `generate`.
    """
    pipe = load_pipeline(str(source), "cpu", dtype=DTYPE)
    transformer, text_encoder, text_encoder_2, vae = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae
    transformer.to(device)  # loaded in bf16 already: only the move
    if quantized:
        _quantize(transformer)  # after loading in bf16 and moving to the device, as ai-toolkit does
    text_encoder_2.to(device, dtype=DTYPE)  # also casts the `wo` layers transformers may keep in fp32
    if quantized:
        _quantize(text_encoder_2)
    text_encoder.to(device)
    # ai-toolkit moves the VAE to its vae_dtype (fp16) and back to bf16 before sampling: weights
    # that fp16 cannot hold (tiny or huge magnitudes) change on the way.
    # torch's own `Module.to`: diffusers' override warns on any cast that it should have been made at
    # load time, and this round trip is the point.
    torch.nn.Module.to(torch.nn.Module.to(vae, device, dtype=torch.float16), dtype=DTYPE)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(AITOOLKIT_FLUX_SCHEDULER)
    for model in (text_encoder, text_encoder_2, transformer, vae):
        model.eval().requires_grad_(False)
    return pipe


def _quantize(model: torch.nn.Module) -> None:
    # quanto's quantize visits every submodule; only nn.Linear has a weight-only counterpart here
    # (LayerNorm needs activations, there is no Conv2d), which is ai-toolkit's util/quantize.py loop.
    quantize(model, weights=qfloat8)
    freeze(model)


def encode_prompt(pipe: FluxPipeline, prompt: str) -> PromptEmbeddings:
    """ai-toolkit's `train_tools.encode_prompts_flux` for one prompt (no dropout, no attention mask).

    Args:
        pipe: a pipeline from `load_preview_pipeline`.
        prompt: the prompt after flag processing (preview_flags.resolve_preview_settings).

    Returns:
        The embeddings, cast to the transformer's dtype as `generate_images` does.
    """
    device = pipe.text_encoder.device
    clip_ids = pipe.tokenizer(
        [prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_overflowing_tokens=False, return_length=False, return_tensors="pt",
    ).input_ids  # fmt: skip
    pooled = pipe.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    pooled = pooled.to(dtype=pipe.text_encoder.dtype, device=device)
    t5_ids = pipe.tokenizer_2(
        [prompt], padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
        return_length=False, return_overflowing_tokens=False, return_tensors="pt",
    ).input_ids  # fmt: skip
    text = pipe.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
    text = text.to(dtype=pipe.text_encoder_2.dtype, device=device)
    dtype = pipe.transformer.dtype
    return PromptEmbeddings(text=text.to(device, dtype=dtype), pooled=pooled.to(device, dtype=dtype))


class PreviewEngine:
    """Owns the preview pipeline of one model. Not thread-safe: callers serialize calls.

    Args:
        pipe: a pipeline from `load_preview_pipeline`.
        device: the device it lives on.
        quantized: whether it was quantized (a merged LoRA needs unquantized weights).
    """

    def __init__(self, pipe: FluxPipeline, device: str, quantized: bool):
        self.pipe = pipe
        self.device = device
        self.quantized = quantized

    @classmethod
    def load(cls, source: str | Path, device: str = "cpu", quantized: bool = True) -> PreviewEngine:
        """Load `tiny`, a diffusers FLUX directory or a repo id as ai-toolkit would for a job with
        `quantize: <quantized>`."""
        return cls(load_preview_pipeline(source, device, quantized), device, quantized)

    def load_lora(self, tensors: dict[str, torch.Tensor]) -> PreviewLora:
        """Map a LoRA file's tensors onto this model's transformer blocks.

        Args:
            tensors: the safetensors state dict (ai-toolkit/diffusers keys, or a format diffusers converts).

        Returns:
            The LoRA, ready for `generate`; `matched_modules` says how many Linears it changes.

        Raises:
            ApiError: LORA_INCOMPATIBLE when it fits no block Linear or a shape does not fit.
        """
        return map_lora(self.pipe.transformer, tensors, self.device)

    def generate(
        self,
        prompt: str,
        *,
        width: int, height: int, steps: int, guidance: float, seed: int,
        lora: PreviewLora | None = None,
        multiplier: float = 1.0,
        lora_mode: LoraMode = LoraMode.HOOK,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Image.Image:
        """Draw one preview image, as one iteration of ai-toolkit's `generate_images` loop.

        Args:
            prompt: the prompt text, flags already processed.
            width, height: the image size; FluxPipeline floors both to 16.
            steps: denoising steps.
            guidance: FLUX's distilled guidance scale.
            seed: seeds the CPU generator the noise is drawn from (0..2**64-1).
            lora: a LoRA from `load_lora`, or None for the base model.
            multiplier: the LoRA's network multiplier.
            lora_mode: `"merged"` or `"hook"` (preview_lora.choose_lora_mode decides per request).
            should_stop: polled after every denoising step; True stops the call.
            on_step: called after every denoising step with (steps done, steps in all).

        Returns:
            The image.

        Raises:
            GenerationInterrupted: `should_stop()` returned True.
            ValueError: `"merged"` asked of a quantized model.
        """
        if lora_mode == LoraMode.MERGED and self.quantized:
            raise ValueError("a LoRA cannot be merged into a quantized model: use lora_mode='hook'")

        def on_step_end(pipe, step, timestep, callback_kwargs):
            latents = callback_kwargs["latents"]
            if latents.dtype != pipe.transformer.dtype:  # generate_images' guard; latents stay bf16 here
                latents = latents.to(pipe.transformer.dtype)
            if on_step is not None:
                on_step(step + 1, steps)
            if should_stop is not None and should_stop():
                raise GenerationInterrupted(f"stopped after step {step + 1} of {steps}")
            return {"latents": latents}

        # Encoding too runs without autograd, as in ai-toolkit (generate_images is under no_grad): encoded
        # with grad enabled, g1 moved from 1 level off its golden to 3 (other CPU kernels get picked).
        with torch.inference_mode(), applied_lora(self.pipe.transformer, lora, multiplier, lora_mode):
            embeddings = encode_prompt(self.pipe, prompt)
            output = self.pipe(
                prompt_embeds=embeddings.text,
                pooled_prompt_embeds=embeddings.pooled,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),  # ai-toolkit: torch.manual_seed(seed)
                callback_on_step_end=on_step_end,
            )
        return output.images[0]
