"""serve_app.tiny: the built-in small FLUX model (offline, deterministic) and its LoRA writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open

from serve_app import tiny


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    return tiny.export_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipe(exported_dir):
    pipe = FluxPipeline.from_pretrained(exported_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a photo of a cat at sunset", height=64, width=64) -> np.ndarray:
    out = pipe(
        prompt, height=height, width=width, num_inference_steps=2, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return np.asarray(out.images[0], dtype=np.float32)


def assert_varied(img: np.ndarray) -> None:
    assert np.isfinite(img).all()
    assert img.std() > 10, "image is (nearly) constant"
    assert len(np.unique(img)) > 50


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(exported_dir, tmp_path):
    other = tiny.export_tiny(tmp_path / "again")
    first, second = files_of(exported_dir), files_of(other)
    assert "model_index.json" in first and "transformer/diffusion_pytorch_model.safetensors" in first
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_loads_with_plain_diffusers_and_generates(pipe):
    assert pipe.transformer.config.in_channels == 64
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    img = generate(pipe, height=96, width=128)
    assert img.shape == (96, 128, 3)  # PIL size (128, 96): width first
    assert_varied(img)


def test_generation_is_deterministic_and_prompt_dependent(pipe):
    a = generate(pipe, "a photo of a cat at sunset")
    assert np.array_equal(a, generate(pipe, "a photo of a cat at sunset"))
    assert np.abs(a - generate(pipe, "a red car on a wet street, neon")).mean() > 2


def test_tokenizers_give_varied_ids(pipe):
    clip = pipe.tokenizer("a photo of a dog").input_ids
    t5 = pipe.tokenizer_2("a photo of a dog").input_ids
    assert len(set(clip)) == len(clip) - 1  # bos, a, photo, of, dog, eos: words stay whole ("a" twice)
    assert len(t5) == 6 and t5[-1] == pipe.tokenizer_2.eos_token_id
    assert pipe.tokenizer("a photo of a cat").input_ids != clip


WRITERS = {
    "aitoolkit": tiny.write_aitoolkit_lora,
    "peft": tiny.write_peft_lora,
    "kohya": tiny.write_kohya_lora,
    "xlabs": tiny.write_xlabs_lora,
}


@pytest.mark.parametrize("fmt", WRITERS)
def test_lora_loads_and_changes_the_image(pipe, tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"{fmt}.safetensors")
    base = generate(pipe)
    pipe.load_lora_weights(str(path), adapter_name=fmt)
    try:
        pipe.set_adapters([fmt], [1.0])
        styled = generate(pipe)
    finally:
        pipe.delete_adapters(fmt)
    assert np.abs(styled - base).mean() > 2
    assert_varied(styled)
    assert np.array_equal(generate(pipe), base)  # unloading restores the base model


def test_peft_alpha_scales_the_update(tmp_path):
    with safe_open(tiny.write_peft_lora(tmp_path / "a.safetensors", rank=4), "pt") as f:
        alphas = [k for k in f.keys() if k.endswith(".alpha")]
        assert alphas and all(f.get_tensor(k).item() == 8.0 for k in alphas)
    with safe_open(tiny.write_peft_lora(tmp_path / "b.safetensors", with_alpha=False), "pt") as f:
        assert not any(k.endswith(".alpha") for k in f.keys())


def test_aitoolkit_file_matches_ai_toolkit_format(exported_dir, tmp_path):
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(exported_dir / "transformer"))
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    }
    path = tiny.write_aitoolkit_lora(tmp_path / "my_style.safetensors", rank=4)
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    expected = {f"transformer.{n}.lora_{ab}.weight" for n in linears for ab in "AB"}
    assert keys == expected  # every Linear of every block, nothing else, no `.alpha`
    for name, linear in linears.items():
        assert tensors[f"transformer.{name}.lora_A.weight"].shape == (4, linear.in_features)
        assert tensors[f"transformer.{name}.lora_B.weight"].shape == (linear.out_features, 4)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert meta["format"] == "pt" and meta["ss_base_model_version"] == "flux.1"
    assert meta["name"] == meta["ss_output_name"] == "my_style"
    assert json.loads(meta["software"])["name"] == "ai-toolkit"
    assert json.loads(meta["training_info"]) == {"step": 250, "epoch": 1}
    again = tiny.write_aitoolkit_lora(tmp_path / "my_style2.safetensors", rank=4)
    with safe_open(again, "pt") as f:
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in keys)  # deterministic from the seed


def test_kohya_file_has_no_linear1(tmp_path):
    with safe_open(tiny.write_kohya_lora(tmp_path / "k.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear2.alpha" in keys
    assert not any("linear1" in k for k in keys)


def test_ensure_tiny_dir_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_SERVE_CACHE", str(tmp_path))
    first = tiny.ensure_tiny_dir()
    assert first == tmp_path / f"tiny-{tiny.TINY_VERSION}"
    mtime = (first / "model_index.json").stat().st_mtime_ns
    monkeypatch.setattr(tiny, "export_tiny", lambda out: pytest.fail("rebuilt an existing model"))
    assert tiny.ensure_tiny_dir() == first
    assert (first / "model_index.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary dirs left behind


def test_ensure_tiny_dir_loses_a_race_cleanly(tmp_path, monkeypatch):
    target = tmp_path / f"tiny-{tiny.TINY_VERSION}"
    real_export = tiny.export_tiny

    def export_while_another_process_wins(out):
        real_export(out)
        real_export(target)  # the other process renames its finished dir into place first

    monkeypatch.setattr(tiny, "export_tiny", export_while_another_process_wins)
    assert tiny.ensure_tiny_dir(tmp_path) == target
    assert (target / "model_index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # ours was discarded


def test_cli_writes_model_and_demo_lora(tmp_path, capsys):
    tiny.main(["--out", str(tmp_path / "m"), "--lora", str(tmp_path / "demo.safetensors")])
    assert (tmp_path / "m" / "model_index.json").exists()
    assert (tmp_path / "demo.safetensors").exists()
    assert str(tmp_path / "m") in capsys.readouterr().out


def test_the_demo_lora_is_written_once_whole_and_as_the_ai_toolkit_writer_writes_it(tmp_path):
    """Each tiny generator replica makes sure of it at its start: several may race, none sees half a file."""
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.config import DEMO_LORA

    root = tmp_path / "loras"
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: tiny.ensure_demo_lora(root), range(4)))
    assert paths == [root / DEMO_LORA] * 4
    assert [p.name for p in (root / DEMO_LORA).parent.iterdir()] == ["demo_lora.safetensors"]  # no leftovers
    expected = tiny.write_aitoolkit_lora(tmp_path / "plain" / "demo_lora.safetensors")
    with safe_open(root / DEMO_LORA, "pt") as ours, safe_open(expected, "pt") as theirs:
        assert ours.metadata() == theirs.metadata() and ours.metadata()["name"] == "demo_lora"
        assert sorted(ours.keys()) == sorted(theirs.keys())
        assert all(torch.equal(ours.get_tensor(k), theirs.get_tensor(k)) for k in ours.keys())
    written = (root / DEMO_LORA).stat().st_mtime_ns
    tiny.ensure_demo_lora(root)
    assert (root / DEMO_LORA).stat().st_mtime_ns == written  # there: left alone
