"""The `compiled` tier on the small model (CPU, fp32): no recompiles, the exact tier's images.

On CPU the blocks compile with `aot_eager`: inductor would take minutes here, and what these tests
guard is Dynamo's side (graphs, guards, recompiles), which is the same for every backend. Images
are compared with the `exact` tier's (FluxEngine, PEFT adapters) within 1 level of 8 bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from serve_app.engine.compiled import compilation
from serve_app.engine.compiled.fast import CompiledFluxEngine, load_engine
from serve_app.engine.compiled.fp8 import SpeedTierUnavailable
from serve_app.engine.compiled.speed import SpeedArgs, WarmupShape
from serve_app.engine.protocol import AdapterWeight, CallMode
from serve_app.engine.reference import FluxEngine
from serve_app.errors import ApiError
from serve_app.loras.files import LoraFile
from serve_app.workitems import BatchKey, WorkItem

FILES = {
    "style": "aitk/style.safetensors",
    "other": "aitk/other.safetensors",
    "kohya": "kohya.safetensors",
    "peft": "peft.safetensors",
    "xlabs": "xlabs.safetensors",
}
SIZE, STEPS = 64, 2
SLOT_RANK = 8  # the small model's LoRAs have rank 4: two fit, three overflow


def compiled_args(**overrides) -> SpeedArgs:
    defaults = {
        "speed": "compiled",
        "compile_backend": "aot_eager",
        "lora_slot_rank": SLOT_RANK,
        "warmup_shapes": (WarmupShape(width=SIZE, height=SIZE),),
        "warmup_steps": STEPS,
        "torch_threads": 1,
    }
    return SpeedArgs(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def files(lora_root) -> dict[str, dict[str, torch.Tensor]]:
    tensors = {name: load_file(str(lora_root / rel)) for name, rel in FILES.items()}
    gen = torch.Generator().manual_seed(5)
    tensors["dora"] = dict(tensors["style"])  # ai-toolkit file + DoRA magnitudes: the eager path only
    for key, up in tensors["style"].items():
        if key.endswith("lora_B.weight"):
            magnitude = torch.rand(up.shape[0], generator=gen) + 0.5
            tensors["dora"][key.replace("lora_B.weight", "lora_magnitude_vector")] = magnitude.half()
    return tensors


@pytest.fixture(scope="module")
def exact(tiny_dir, files) -> FluxEngine:
    """The exact tier with one PEFT adapter per file, loaded as FluxEngine loads them."""
    engine = FluxEngine.load(str(tiny_dir), device="cpu")
    for name, tensors in files.items():
        engine.pipe.load_lora_weights(dict(tensors), adapter_name=name)
    return engine


@pytest.fixture(scope="module")
def fast(tiny_dir, files) -> CompiledFluxEngine:
    torch.compiler.reset()  # graphs compiled by other test modules must not count here
    engine = CompiledFluxEngine.load(str(tiny_dir), "cpu", speed=compiled_args())
    engine.warmup()
    for name, tensors in files.items():
        engine.load_adapter(name, LoraFile(name, dict(tensors), {}, 0))
    yield engine
    engine.compile_counter.close()
    torch.compiler.reset()


def items(seed: int = 1) -> list[WorkItem]:
    key = BatchKey(model="flux-fast", width=SIZE, height=SIZE, steps=STEPS, guidance=4.0)
    return [WorkItem(request_id="r", index=0, prompt="a red house by the sea", seed=seed, key=key)]


def weights(uses) -> list[AdapterWeight]:
    return [AdapterWeight(name, weight) for name, weight in uses]


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def max_level_diff(fast, exact, adapters) -> int:
    return int(np.abs(pixels(fast.generate(items(), adapters)[0]) - pixels(exact.generate(items(), adapters)[0])).max())


# swap -> another LoRA -> multiplier change -> base model -> stacks -> back
SEQUENCE = [
    [("style", 1.0)],
    [("other", 1.0)],
    [("other", 0.5)],
    [("other", -1.0)],
    [],
    [("style", 1.0), ("kohya", -1.0)],
    [("peft", 0.5), ("xlabs", 1.0)],
    [("other", 0.0)],
    [("style", 1.0)],
]


def test_swaps_multipliers_the_base_and_stacks_never_recompile_and_match_exact(fast, exact):
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails the call
        for uses in SEQUENCE:
            assert fast.describe_call(weights(uses)) == CallMode("compiled", "slot")
            assert max_level_diff(fast, exact, weights(uses)) <= 1, uses
    assert fast.compile_stats().since_warmup == 0
    base = pixels(fast.generate(items(), [])[0])
    with_lora = pixels(fast.generate(items(), weights([("style", 1.0)]))[0])
    assert np.abs(with_lora - base).mean() > 1.0  # the slot really holds the LoRA


def test_a_set_over_the_rank_budget_runs_on_the_peft_path_and_the_slot_comes_back(fast, exact):
    over = weights([("style", 1.0), ("other", 0.5), ("kohya", 1.0)])  # rank 12 > 8
    assert fast.describe_call(over) == CallMode("compiled", "peft")
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert max_level_diff(fast, exact, over) <= 1
        assert max_level_diff(fast, exact, weights([("style", 0.5)])) <= 1  # compiled again, no recompile
    assert fast.compile_stats().since_warmup == 0
    assert fast.peft_layer_adapters() == set()  # no PEFT adapter left in the model


def test_a_dora_file_runs_on_the_peft_path(fast, exact):
    assert fast.adapter_module_count("dora") == fast.adapter_module_count("style")
    assert fast.describe_call(weights([("dora", 1.0)])).lora_mode == "peft"
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert max_level_diff(fast, exact, weights([("dora", 0.8)])) <= 1
        fast.generate(items(), [])
    assert fast.compile_stats().since_warmup == 0


def test_a_file_matching_no_module_is_refused(fast):
    wrong = {
        "transformer.no_such_block.lora_A.weight": torch.zeros(4, 8),
        "transformer.no_such_block.lora_B.weight": torch.zeros(8, 4),
    }
    with pytest.raises(ApiError) as info:
        fast.load_adapter("wrong", LoraFile("wrong", dict(wrong), {}, 0))
    assert info.value.code == "LORA_INCOMPATIBLE"
    assert "wrong" not in fast.adapter_names() and fast.peft_layer_adapters() == set()


def test_reject_refuses_what_the_slot_cannot_take(tiny_dir, files):
    strict = CompiledFluxEngine.load(str(tiny_dir), "cpu", speed=compiled_args(lora_overflow="reject"))
    with pytest.raises(ApiError, match="DoRA") as info:
        strict.load_adapter("dora", LoraFile("dora", files["dora"], {}, 0))
    assert info.value.code == "LORA_INCOMPATIBLE" and "dora" not in strict.adapter_names()
    for name in ("style", "other", "kohya"):
        strict.load_adapter(name, LoraFile(name, files[name], {}, 0))
    over = weights([("style", 1.0), ("other", 1.0), ("kohya", 1.0)])
    for call in (strict.describe_call, lambda a: strict.generate(items(), a)):
        with pytest.raises(ApiError, match="rank budget 8") as info:
            call(over)
        assert info.value.code == "LORA_INCOMPATIBLE"
    assert strict.compile_stats().compiles == 0  # refused before any work
    strict.compile_counter.close()


def test_fp8_is_refused_on_a_cpu_before_any_weight_loads(tiny_dir):
    for load in (CompiledFluxEngine.load, load_engine):
        with pytest.raises(SpeedTierUnavailable, match="compute capability >= 8.9"):
            load(str(tiny_dir), "cpu", speed=SpeedArgs(speed="fp8"))


def test_the_exact_tier_reports_peft_calls(exact):
    assert exact.describe_call(weights([("style", 1.0)])) == CallMode("exact", "peft")


def test_a_calls_lora_mode_is_chosen_without_walking_the_model(fast, monkeypatch):
    def walk(self):
        raise AssertionError("walked every module of the model")

    monkeypatch.setattr(FluxEngine, "adapter_names", walk)  # the walk over every PEFT layer
    assert fast.describe_call(weights([("style", 1.0), ("other", 0.5)])) == CallMode("compiled", "slot")
    assert fast.describe_call(weights([("dora", 1.0)])) == CallMode("compiled", "peft")
    with pytest.raises(KeyError, match="not loaded"):
        fast.describe_call(weights([("missing", 1.0)]))


def test_a_foreign_compile_artifacts_file_is_ignored(tmp_path):
    path = compilation.artifacts_path(tmp_path, "compiled-r64-inductor-default-NVIDIA H200-torch2.11")
    assert " " not in path.name
    path.write_bytes(b"not a cache")
    assert compilation.load_compile_artifacts(path) is False
