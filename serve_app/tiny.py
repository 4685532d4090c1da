"""The built-in small model: FLUX.1-dev's architecture and geometry with tiny random weights.

It lets the whole service (tokenizers, both text encoders, packed latents, the flow-matching
scheduler, VAE decode, LoRA loading) run offline on a CPU at real request sizes. Weights come
from fixed seeds, so every build writes the same bytes. The LoRA writers produce files in the
formats people actually upload (ai-toolkit, PEFT, kohya, XLabs) with shapes that fit this model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from serve_app.config import DEMO_LORA

TINY_VERSION = "v1"  # bump when anything below changes the written bytes
SEED = 1234
# A small English vocabulary: both tokenizers learn these words whole, so prompts map to varied ids.
WORDS = """a an the of and in on with at by for to from is are photo photograph picture image portrait
painting drawing sketch render illustration art style cinematic realistic detailed high quality
cat dog bird horse fish tree flower forest mountain river lake sea ocean beach sky cloud sun moon
star city street house castle car boat train road bridge garden field desert snow rain night day
man woman girl boy child person face eye hair hand smile old young happy beautiful small big tall
red green blue yellow orange purple pink black white gray brown gold silver dark light bright
warm cold soft sharp golden hour sunset sunrise fog mist neon glow shadow lens camera close up
wide shot view background foreground standing sitting walking running flying under over near""".split()
PUNCT = list(".,!?'-:;()\"0123456789")

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)  # fmt: skip
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, mid_block_add_attention=False, use_quant_conv=False,
    use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)  # fmt: skip
TEXT_EMBEDDER_GAIN = 8.0  # see build_tiny_pipeline
LORA_SCALE = 0.15  # std of lora_B: changes a 256px image by ~10-20 levels, keeps it varied
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
)  # fmt: skip


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte-level alphabet: 256 printable characters standing for the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Train BPE on `words` until each is one token (most frequent pair first, ties by order).

    Real training, not ad-hoc merges: replaying the merges by rank then rebuilds every word whole.
    """
    splits = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in splits:
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda pair: counts[pair])  # the first of equals: deterministic
        merges.append(best)
        for pieces in splits:
            i = 0
            while i < len(pieces) - 1:
                if (pieces[i], pieces[i + 1]) == best:
                    pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
                i += 1


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE over the 256-char alphabet (+ `</w>` forms) with merges learnt from WORDS."""
    alphabet = _bytes_to_unicode()
    merges = _bpe_merges(WORDS)
    vocab = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last, as in the real CLIP vocabulary
    vocab_ids = {t: i for i, t in enumerate(dict.fromkeys(vocab))}
    # transformers annotates `merges` as list[str] ("a b" lines); its BPE takes (a, b) pairs as well.
    return CLIPTokenizer(vocab=vocab_ids, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _t5_tokenizer() -> T5Tokenizer:  # transformers 5's tokenizers-backed T5 (T5TokenizerFast is its alias)
    """Unigram vocabulary: whole words score above single characters, so words stay whole."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [c.upper() for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -5.0 - 0.1 * i / len(WORDS)) for i, w in enumerate(WORDS)]
    vocab += [(s, -8.0) for s in ("s", "es", "ed", "ing", "er", "ly", "y")]  # common suffixes
    vocab += [(c, -12.0) for c in chars + PUNCT] + [("▁" + c, -11.0) for c in chars + PUNCT]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _seeded(offset: int) -> None:
    """Reseed before each component so one component's size never shifts another's weights."""
    torch.manual_seed(SEED + offset)


def build_tiny_pipeline() -> FluxPipeline:
    """Build the tiny FLUX pipeline (fp32, CPU) from fixed seeds; no files, no network."""
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    _seeded(1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    )
    _seeded(2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        )  # fmt: skip
    )
    _seeded(3)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    with torch.no_grad():  # default init makes the pooled prompt barely matter; make prompts change images
        for p in transformer.time_text_embed.text_embedder.parameters():
            p.mul_(TEXT_EMBEDDER_GAIN)
    _seeded(4)
    vae = AutoencoderKL(**VAE_CONFIG)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    for model in (text_encoder, text_encoder_2, transformer, vae):
        model.eval()  # freshly constructed modules are in training mode (T5 dropout would make output random)
    return pipe  # fp32: every module was constructed in torch's default dtype


def export_tiny(out_dir: str | Path) -> Path:
    """Write the tiny pipeline as a normal diffusers directory (safetensors) and return its path."""
    out = Path(out_dir)
    build_tiny_pipeline().save_pretrained(out, safe_serialization=True)
    return out


def ensure_tiny_dir(cache_dir: str | Path | None = None) -> Path:
    """Return `<cache>/tiny-v1`, building it once. Safe when several processes race to build it."""
    if cache_dir is None:
        cache_dir = os.environ.get("FLUX_SERVE_CACHE") or Path.home() / ".cache" / "flux-serve"
    target = Path(cache_dir).expanduser() / f"tiny-{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a reader never sees a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise stick to the shared cache dir
    try:
        export_tiny(tmp)
        os.rename(tmp, target)  # fails if another process already put a full directory there
    except OSError:
        if not (target / "model_index.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# LoRA files for the tiny model, one writer per on-disk format that diffusers can convert.


def _block_linears() -> dict[str, tuple[int, int]]:
    """`{module name: (out, in)}` for every nn.Linear inside the transformer's blocks."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    }


def _down_up(gen: torch.Generator, out_f: int, in_f: int, rank: int, scale: float) -> tuple[torch.Tensor, ...]:
    """A random low-rank pair: down [rank, in] with unit-norm rows on average, up [out, rank] * scale."""
    down = torch.randn(rank, in_f, generator=gen) / in_f**0.5
    up = torch.randn(out_f, rank, generator=gen) * scale
    return down, up


def _save(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_aitoolkit_lora(path: str | Path, *, rank: int = 4, seed: int = 0, scale: float = LORA_SCALE) -> Path:
    """ai-toolkit's FLUX format: every block Linear, `transformer.<m>.lora_A/B.weight`, fp16, no alpha."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in _block_linears().items():
        down, up = _down_up(gen, out_f, in_f, rank, scale)
        tensors[f"transformer.{name}.lora_A.weight"] = down.half()
        tensors[f"transformer.{name}.lora_B.weight"] = up.half()
    stem = Path(path).stem
    software = {"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.12.11"}
    metadata = {
        "format": "pt",
        "software": json.dumps(software),
        "ss_base_model_version": "flux.1",
        "ss_output_name": stem,
        "name": stem,
        "version": "1.0",
        "training_info": json.dumps({"step": 250, "epoch": 1}),
    }
    return _save(path, tensors, metadata)


def ensure_demo_lora(lora_root: str | Path) -> Path:
    """`<lora root>/demo/demo_lora.safetensors` (`loras.write_demo`), written once. Safe when several replicas
    race to write it: each writes beside it and renames, so a reader never sees half a file."""
    path = Path(lora_root) / DEMO_LORA
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))  # the file keeps its name: it is in its metadata
    try:
        write_aitoolkit_lora(tmp / path.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_peft_lora(path: str | Path, *, rank: int = 4, seed: int = 1, with_alpha: bool = True) -> Path:
    """diffusers/PEFT format on the attention projections only, with `.alpha` = 2 * rank if asked."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in _block_linears().items():
        if not name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")):
            continue
        down, up = _down_up(gen, out_f, in_f, rank, LORA_SCALE)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
        if with_alpha:
            tensors[f"transformer.{name}.alpha"] = torch.tensor(float(2 * rank))
    return _save(path, tensors)


def write_kohya_lora(path: str | Path, *, rank: int = 4, seed: int = 2) -> Path:
    """kohya/sd-scripts format (BFL module names, lora_down/lora_up/alpha, fused qkv).

    `single_blocks_N_linear1` is left out: diffusers' converter hard-codes FLUX.1's full widths for it.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = _block_linears()
    d = shapes["transformer_blocks.0.attn.to_q"][0]  # hidden width
    mlp = shapes["transformer_blocks.0.ff.net.0.proj"][0]
    double = {"attn_qkv": (3 * d, d), "attn_proj": (d, d), "mlp_0": (mlp, d), "mlp_2": (d, mlp), "mod_lin": (6 * d, d)}
    single = {"linear2": (d, d + mlp), "modulation_lin": (3 * d, d)}
    modules = {}
    for i in range(TRANSFORMER_CONFIG["num_layers"]):
        for stream in ("img", "txt"):
            modules.update({f"lora_unet_double_blocks_{i}_{stream}_{k}": v for k, v in double.items()})
    for i in range(TRANSFORMER_CONFIG["num_single_layers"]):
        modules.update({f"lora_unet_single_blocks_{i}_{k}": v for k, v in single.items()})
    tensors = {}
    for name, (out_f, in_f) in modules.items():
        down, up = _down_up(gen, out_f, in_f, rank, LORA_SCALE)
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)  # scale 0.5, like alpha=rank/2
    return _save(path, tensors)


def write_xlabs_lora(path: str | Path, *, rank: int = 4, seed: int = 3) -> Path:
    """XLabs format: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (1 = image, 2 = text)."""
    gen = torch.Generator().manual_seed(seed)
    d = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    tensors = {}
    for i in range(TRANSFORMER_CONFIG["num_layers"]):
        for kind, out_f in (("qkv", 3 * d), ("proj", d)):
            for stream in (1, 2):
                down, up = _down_up(gen, out_f, d, rank, LORA_SCALE)
                tensors[f"double_blocks.{i}.processor.{kind}_lora{stream}.down.weight"] = down.half()
                tensors[f"double_blocks.{i}.processor.{kind}_lora{stream}.up.weight"] = up.half()
    return _save(path, tensors)


def main(argv: list[str] | None = None) -> None:
    """`python -m serve_app.tiny --out DIR [--lora FILE]`: write the tiny model (and the demo LoRA)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline into")
    parser.add_argument("--lora", help="also write the ai-toolkit demo LoRA to this .safetensors path")
    args = parser.parse_args(argv)
    print(export_tiny(args.out))
    if args.lora:
        print(write_aitoolkit_lora(args.lora))


if __name__ == "__main__":
    main()
