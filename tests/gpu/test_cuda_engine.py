"""The engine's tiers on a CUDA GPU (bf16, as the reference runs): skipped on machines without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from serve_app.engine.compiled.fast import CompiledFluxEngine
from serve_app.engine.compiled.fp8 import FP8_MIN_CAPABILITY, SpeedTierUnavailable
from serve_app.engine.compiled.speed import SpeedArgs, WarmupShape
from serve_app.engine.loader import dtype_for
from serve_app.engine.protocol import AdapterWeight
from serve_app.engine.reference import FluxEngine
from serve_app.loras.files import LoraFile
from serve_app.workitems import BatchKey, WorkItem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

KEY = BatchKey(model="flux", width=256, height=256, steps=4, guidance=4.0)
LORAS = {"style": "aitk/style.safetensors", "other": "aitk/other.safetensors"}


def items(n: int) -> list[WorkItem]:
    return [WorkItem(request_id="g", index=i, prompt=f"a photo {i}", seed=i, key=KEY) for i in range(n)]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_cuda_engine_runs_in_bf16_with_cpu_generators(tiny_dir):
    engine = FluxEngine.load(str(tiny_dir), device="cuda")
    assert engine.pipe.transformer.dtype == dtype_for("cuda") == torch.bfloat16
    batched = engine.generate(items(4))
    alone = engine.generate(items(1))
    assert batched[0].size == (256, 256)
    # bf16 batched kernels may differ slightly from batch 1; the noise is the same CPU draw.
    assert np.abs(pixels(batched[0]) - pixels(alone[0])).mean() < 2.0


def test_compiled_tier_swaps_loras_without_recompiling_and_stays_near_exact(tiny_dir, lora_root):
    speed = SpeedArgs(speed="compiled", lora_slot_rank=16, warmup_shapes=(WarmupShape(width=256, height=256),))
    fast = CompiledFluxEngine.load(str(tiny_dir), "cuda", speed=speed)
    exact = FluxEngine.load(str(tiny_dir), device="cuda")
    fast.warmup()
    for name, rel in LORAS.items():
        tensors = load_file(str(lora_root / rel))
        fast.load_adapter(name, LoraFile(name, dict(tensors), {}, 0))
        exact.pipe.load_lora_weights(dict(tensors), adapter_name=name)
    sets = ([("style", 1.0)], [("other", 0.5)], [], [("style", 1.0), ("other", -1.0)], [("style", 1.0)])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for uses in sets:
            adapters = [AdapterWeight(n, w) for n, w in uses]
            assert fast.describe_call(adapters).lora_mode == "slot"
            ours, theirs = fast.generate(items(1), adapters)[0], exact.generate(items(1), adapters)[0]
            assert np.abs(pixels(ours) - pixels(theirs)).mean() < 2.0, uses  # bf16: compiled kernels differ slightly
    assert fast.compile_stats().since_warmup == 0


def test_fp8_tier_runs_where_the_gpu_has_fp8_and_is_refused_below(tiny_dir):
    pytest.importorskip("torchao")
    speed = SpeedArgs(speed="fp8", warmup_shapes=(WarmupShape(width=256, height=256),))
    if torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        with pytest.raises(SpeedTierUnavailable, match="8.9"):
            CompiledFluxEngine.load(str(tiny_dir), "cuda", speed=speed)
        return
    engine = CompiledFluxEngine.load(str(tiny_dir), "cuda", speed=speed)
    engine.warmup()
    image = engine.generate(items(1))[0]
    assert image.size == (256, 256) and pixels(image).std() > 0
