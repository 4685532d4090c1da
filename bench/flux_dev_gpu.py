"""Seconds per image of the real FLUX.1-dev architecture through the engine, on a GPU.

No weights are downloaded: every module is built from FLUX.1-dev's published config
(notes/flux-dev-architecture.md) with random weights, directly on the GPU in bf16. Pixels are
meaningless; the arithmetic, memory traffic and sequence lengths (512 T5 tokens, 4096 image tokens
at 1024²) are those of the real model, so the timings are.

    python -m bench.flux_dev_gpu                      # on a CUDA machine: batch 1,2,4,8 at 512² and 1024²
    python -m bench.flux_dev_gpu --scale tiny         # a CPU smoke run of the same code on the small model

Measures, per size and batch: seconds per call, seconds per image, images/s, peak GPU memory; and the
cost of one unfused rank-16 ai-toolkit-style LoRA at batch 1 (the reference's mode).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from serve_app.engine.base import AdapterWeight
from serve_app.engine.pipeline import FluxEngine
from serve_app.engine.workitems import BatchKey, WorkItem
from serve_app.tiny import SCHEDULER_CONFIG, _clip_tokenizer, _t5_tokenizer, build_tiny_pipeline

RESULTS = Path(__file__).parent / "results"

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)


def build_flux_dev_random(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """FLUX.1-dev's architecture with random weights, built on the device (about 34 GB in bf16).

    The tokenizers are the small model's: token ids stay within the real vocabularies, and the
    sequence lengths the pipeline pads to (77 and 512) are what cost time.
    """
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
            text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu"))
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
            vae = AutoencoderKL(**FLUX_DEV_VAE)
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_random_lora(engine: FluxEngine, rank: int = 16) -> str:
    """An ai-toolkit-style adapter (every Linear under the blocks) with random weights, unfused."""
    from peft import LoraConfig

    targets = [name for name, m in engine.pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and "transformer_blocks" in name]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
    engine.pipe.transformer.add_adapter(config, adapter_name="bench")
    return "bench"


def items(n: int, size: int, steps: int) -> list[WorkItem]:
    key = BatchKey(model="flux", width=size, height=size, steps=steps, guidance=4.0)
    return [WorkItem(request_id="bench", index=i, prompt=f"a photo number {i}", seed=i, key=key) for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(engine: FluxEngine, batch: list[WorkItem], adapters=(), repeats: int = 2) -> float:
    engine.generate(batch, adapters)  # warm-up (kernels, allocator)
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(repeats):
        engine.generate(batch, adapters)
    sync(engine.device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "flux_dev_gpu"))
    args = parser.parse_args()

    if args.scale == "full":
        if not torch.cuda.is_available():
            raise SystemExit("--scale full needs a CUDA GPU (use --scale tiny for a CPU smoke run)")
        engine = FluxEngine(build_flux_dev_random(), "cuda")
        device_name = torch.cuda.get_device_name()
    else:
        engine = FluxEngine(build_tiny_pipeline(), "cpu")
        device_name = "cpu (small model: a smoke run, not a measurement of FLUX.1-dev)"

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            if engine.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            seconds = time_call(engine, items(batch, size, args.steps), repeats=args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if engine.device.startswith("cuda") else None
            rows.append({"size": size, "batch": batch, "lora": False, "s_per_call": seconds,
                         "s_per_image": seconds / batch, "images_per_s": batch / seconds, "peak_gib": peak})
            print(rows[-1], flush=True)
        name = add_random_lora(engine)
        seconds = time_call(engine, items(1, size, args.steps), [AdapterWeight(name, 1.0)], repeats=args.repeats)
        rows.append({"size": size, "batch": 1, "lora": True, "s_per_call": seconds, "s_per_image": seconds,
                     "images_per_s": 1 / seconds, "peak_gib": None})
        engine.delete_adapter(name)
        print(rows[-1], flush=True)

    report = {"device": device_name, "steps": args.steps, "dtype": str(engine.pipe.transformer.dtype), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    Path(args.out + ".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; {report['steps']} steps; {report['dtype']}.", "",
             "| size | batch | LoRA (r16, unfused) | s / call | s / image | images / s | vs batch 1 | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["size"]: r["images_per_s"] for r in report["rows"] if r["batch"] == 1 and not r["lora"]}
    for r in report["rows"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['size']}² | {r['batch']} | {'yes' if r['lora'] else 'no'} | {r['s_per_call']:.3f} | "
                     f"{r['s_per_image']:.3f} | {r['images_per_s']:.3f} | "
                     f"{r['images_per_s'] / base[r['size']]:.2f}× | {peak} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
