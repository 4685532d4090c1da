"""The one pipeline loader, and a model's `dtype`: honoured by every tier or refused by the config."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from serve_app.config import TINY_SOURCE, FastPathArgs, ModelArgs
from serve_app.engine.compiled import fast
from serve_app.engine.compiled.fast import CompiledFluxEngine, check_speed_tier
from serve_app.engine.compiled.speed import FROM_MODEL, SpeedArgs
from serve_app.engine.factory import build_engine
from serve_app.engine.loader import dtype_for, load_pipeline, pick_device
from serve_app.workitems import BatchKey, WorkItem


def test_tiny_loads_from_its_cache_directory_in_the_device_dtype(tiny_dir):
    pipe = load_pipeline(TINY_SOURCE, "cpu")  # tiny_dir points FLUX_SERVE_CACHE at the tests' cache
    assert pipe.transformer.dtype == dtype_for("cpu") == torch.float32
    assert pipe.device.type == "cpu"
    assert pipe.name_or_path == str(tiny_dir)
    assert load_pipeline(str(tiny_dir), "cpu", dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


def test_device_and_dtype_picks():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dtype_for("cuda") == torch.bfloat16
    assert dtype_for("cpu", "bfloat16") == dtype_for("cuda", "bfloat16") == torch.bfloat16
    assert dtype_for("cuda", "float16") == torch.float16


@pytest.mark.parametrize(
    ("fields", "engine"), [({"speed": "fp8"}, "speed 'fp8'"), ({"kind": "preview"}, "kind 'preview'")]
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_config_refuses_a_dtype_a_bf16_only_engine_would_ignore(fields, engine, dtype):
    with pytest.raises(ValidationError, match=rf"dtype '{dtype}' cannot run with {engine}"):
        ModelArgs(dtype=dtype, **fields)
    for fine in ("auto", "bfloat16"):
        assert ModelArgs(dtype=fine, **fields).dtype == fine


@pytest.mark.parametrize("speed", ["exact", "compiled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_other_tier_takes_every_dtype(speed, dtype):
    assert ModelArgs(speed=speed, dtype=dtype).dtype == dtype


def test_the_fp8_engine_refuses_a_dtype_other_than_bf16(monkeypatch):
    monkeypatch.setattr(fast, "check_fp8_device", lambda device: None)  # as if on a GPU with fp8
    check_speed_tier("fp8", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        check_speed_tier("fp8", "cuda", torch.float32)


def test_the_compiled_tier_runs_in_the_configured_dtype(tiny_dir):
    torch.compiler.reset()
    fast_path = FastPathArgs(compile_backend="eager", lora_slot_rank=4)
    model = ModelArgs(source=str(tiny_dir), device="cpu", speed="compiled", dtype="bfloat16", fast_path=fast_path)
    engine = build_engine(model)
    try:
        assert isinstance(engine, CompiledFluxEngine)
        assert engine.dtype == engine.pipe.transformer.dtype == engine.pipe.vae.dtype == torch.bfloat16
        assert {a.dtype for a, b in engine.slot.weights.values()} == {torch.bfloat16}
        assert engine.slot_weights.dtype == torch.bfloat16
        key = BatchKey(model="m", width=32, height=32, steps=1, guidance=4.0)
        image = engine.generate([WorkItem(request_id="r", index=0, prompt="a house", seed=1, key=key)])[0]
        assert image.size == (32, 32)
    finally:
        engine.compile_counter.close()
        torch.compiler.reset()


def test_speed_args_take_their_model_fields_from_model_args():
    for name in FROM_MODEL:
        assert repr(SpeedArgs.model_fields[name]) == repr(ModelArgs.model_fields[name])
    fast_path = FastPathArgs(lora_slot_rank=8, compile_backend="eager")
    args = SpeedArgs.of(ModelArgs(speed="compiled", torch_threads=3, fast_path=fast_path))
    assert args == SpeedArgs(speed="compiled", torch_threads=3, lora_slot_rank=8, compile_backend="eager")
    with pytest.raises(ValidationError):
        SpeedArgs(torch_threads=0)
