"""CompiledFluxEngine: the `compiled` and `fp8` speed tiers (docs/performance.md).

The same pipeline calls as FluxEngine, with three changes to the transformer, made in this order:
1. fp8 tier only: torchao fp8 row-wise weights on the base Linears of the blocks (`fp8.py`);
2. one PEFT adapter, "slot", of rank `lora_slot_rank` over every Linear of the blocks, with its
   scalings turned into tensors by PEFT's hotswap preparation; each call's LoRA set is written
   into it in place (`slot.py`), so no LoRA set, multiplier or the base model recompiles;
3. regional compile of the repeated blocks with fullgraph (`compilation.py`).

A LoRA set the slot cannot take (over the rank budget, DoRA, LoKr, text-encoder keys, modules
outside the blocks) runs as separate PEFT adapters with the compiled code bypassed
(`set_stance("force_eager")`), or is refused with LORA_INCOMPATIBLE: `lora_overflow` says which.
Those PEFT adapters exist only around such calls, so compiled calls always see the same modules.

No Ray here. Not thread-safe: the replica runs every call on one engine thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, ModelMixin
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.hotswap import prepare_model_for_compiled_hotswap
from PIL import Image

from serve_app import errors
from serve_app.config import TINY_SOURCE
from serve_app.engine.compiled import compilation
from serve_app.engine.compiled.attention import log_attention, probe_attention_kernel, select_attention_backend
from serve_app.engine.compiled.fp8 import check_fp8_device, quantize_base_linears
from serve_app.engine.compiled.overflow import PeftOverflow
from serve_app.engine.compiled.slot import LoraSlot, SlotUnfit, SlotWeightCache, convert_lora, slot_targets
from serve_app.engine.compiled.speed import SpeedArgs, WarmupShape
from serve_app.engine.loader import dtype_for, load_pipeline, pick_device
from serve_app.engine.protocol import AdapterWeight, CallMode, CompileStats, StepCallback, StopCheck
from serve_app.engine.reference import FluxEngine
from serve_app.errors import ApiError
from serve_app.loras.files import LoraFile
from serve_app.states import LoraMode
from serve_app.workitems import BatchKey, WorkItem

logger = logging.getLogger(__name__)

SLOT_ADAPTER = "slot"


@dataclass(frozen=True)
class WarmupReport:
    """What `warmup` compiled: the shapes, the seconds it took, and the Dynamo compiles it ran."""

    shapes: tuple[WarmupShape, ...]
    seconds: float
    compiles: int


def check_speed_tier(speed: str, device: str, dtype: torch.dtype) -> None:
    """Refuse before loading anything a `speed` that cannot run on `device` in `dtype`.

    Raises:
        SpeedTierUnavailable: fp8 on a device without fp8 matmuls.
        ValueError: the exact tier (that is FluxEngine), or fp8 in another dtype than bf16.
    """
    if speed == "exact":
        raise ValueError("the exact tier is FluxEngine; CompiledFluxEngine runs 'compiled' and 'fp8'")
    if speed == "fp8":
        check_fp8_device(device)
        if dtype != torch.bfloat16:
            raise ValueError(f"speed tier 'fp8' runs in bfloat16 (torchao's row-wise fp8); dtype is {dtype}")


def install_slot(
    transformer: ModelMixin, targets: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype
) -> LoraSlot:
    """Add the zeroed "slot" adapter over `targets` with tensor scalings of 1; return its weights.

    `prepare_model_for_compiled_hotswap` turns PEFT's float scalings into tensors, which compiled
    code reads as inputs instead of guarding on their values. The slot's weights are cast to
    `dtype` (bf16 on a GPU) even over fp8 base Linears: the LoRA branch is never quantized.
    """
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(targets), init_lora_weights=True)
    transformer.add_adapter(config, adapter_name=SLOT_ADAPTER)
    prepare_model_for_compiled_hotswap(transformer, target_rank=rank)
    weights = {}
    with torch.no_grad():
        for name in targets:
            layer: Any = transformer.get_submodule(name)  # a PEFT LoRA layer: lora_A and lora_B are ModuleDicts
            lora_a, lora_b = layer.lora_A[SLOT_ADAPTER].to(dtype=dtype), layer.lora_B[SLOT_ADAPTER].to(dtype=dtype)
            lora_a.weight.zero_()
            lora_b.weight.zero_()
            weights[name] = (lora_a.weight, lora_b.weight)
    activate_slot_layers(transformer)
    return LoraSlot(weights, rank)


def activate_slot_layers(transformer: torch.nn.Module) -> None:
    """Make "slot" the only active adapter of every LoRA layer, frozen (requires_grad is guarded on)."""
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([SLOT_ADAPTER], inference_mode=True)


class CompiledFluxEngine(FluxEngine):
    """FluxEngine with a compiled transformer, the LoRA slot and optionally fp8 weights.

    Args:
        pipe: a loaded FluxPipeline on `device` (see `load`); the engine runs in its transformer's dtype.
        device: "cuda", "cuda:N" or "cpu" (CPU runs `compiled` for tests; fp8 is refused there).
        speed: the tier and its settings; `speed.speed` is "compiled" or "fp8".

    Raises:
        SpeedTierUnavailable: fp8 on a CPU or a GPU below compute capability 8.9, or without torchao.
        ValueError: fp8 on a pipeline in another dtype than bf16.
    """

    def __init__(self, pipe: FluxPipeline, device: str, speed: SpeedArgs):
        self.dtype = pipe.transformer.dtype  # the slot and the converted LoRAs use it too
        check_speed_tier(speed.speed, device, self.dtype)
        super().__init__(pipe, device)
        self.speed = speed
        self.speed_tier = speed.speed
        if speed.torch_threads:
            torch.set_num_threads(speed.torch_threads)
        transformer = pipe.transformer
        self.attention_backend = select_attention_backend(transformer, speed.attention_backend)
        self.attention_kernel = probe_attention_kernel(transformer, device, self.dtype)
        log_attention(self.attention_backend, self.attention_kernel)
        self.slot_targets = slot_targets(transformer)
        if speed.speed == "fp8":
            count = quantize_base_linears(transformer, set(self.slot_targets))
            logger.info("fp8: %d base Linears quantized (float8 row-wise)", count)
        self.slot = install_slot(transformer, self.slot_targets, speed.lora_slot_rank, self.dtype)
        self.slot_weights = SlotWeightCache(device, self.dtype, speed.adapter_device_bytes)
        self.overflow = PeftOverflow(pipe, lambda: activate_slot_layers(transformer))
        self._slot_content: tuple[tuple[str, float], ...] | None = ()  # what the slot holds; None: unknown
        self.compile_counter = compilation.CompileCounter()
        self._warm_mark: int | None = None
        self._artifacts = self._artifacts_file()
        if self._artifacts is not None:
            compilation.load_compile_artifacts(self._artifacts)
        compilation.compile_blocks(transformer, speed.compile_backend, speed.compile_mode)

    @classmethod
    def load(
        cls,
        source: str = TINY_SOURCE,
        device: str = "auto",
        revision: str | None = None,
        dtype: str = "auto",
        *,
        speed: SpeedArgs | None = None,
    ) -> CompiledFluxEngine:
        """Load `source` in `dtype` (a ModelArgs.dtype) for the tier in `speed` (default: compiled).

        The weights are read straight onto a GPU; fp8 is refused before any weight loads.
        """
        device = pick_device(device)
        speed = speed or SpeedArgs(speed="compiled")
        torch_dtype = dtype_for(device, dtype)
        check_speed_tier(speed.speed, device, torch_dtype)
        return cls(load_pipeline(source, device, revision, torch_dtype, device_map=True), device, speed)

    # ---- adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, lora: LoraFile) -> int:
        """Take a LoRA file's tensors as adapter `name`; return how many modules it adapts.

        A file the slot can take is converted and cached (on the GPU up to `adapter_device_bytes`,
        in pinned host memory past it). Any other file is kept as given for the eager PEFT path,
        after a trial load proves it fits the model, or refused when `lora_overflow` is reject.

        Raises:
            ApiError: LORA_INCOMPATIBLE when the file matches no module, or the slot cannot take it
                and `lora_overflow` is reject (the message says why).
        """
        self.delete_adapter(name)
        tensors = lora.tensors
        try:
            slot_lora = convert_lora(tensors, self.slot_targets)
            self.slot.check([slot_lora])
        except SlotUnfit as unfit:
            if self.speed.lora_overflow == "reject":
                raise ApiError(
                    errors.LORA_INCOMPATIBLE,
                    f"LoRA {name!r} cannot run in the {self.speed_tier} tier's LoRA slot: {unfit}"[:500],
                    {"reason": str(unfit)[:300], "lora_overflow": "reject"},
                ) from None
            matched = self.overflow.keep(name, tensors, str(unfit))
            logger.info("LoRA %s will run on the eager PEFT path: %s", name, unfit)
            return matched
        self.slot_weights.put(name, slot_lora)
        return len(slot_lora.factors)

    def delete_adapter(self, name: str) -> None:
        """Forget adapter `name` and free its weights; a no-op if absent."""
        self.slot_weights.pop(name)
        self.overflow.forget(name)
        if self._slot_content is not None and any(n == name for n, _ in self._slot_content):
            self._slot_content = None  # a new file under this name must be written again
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def adapter_names(self) -> set[str]:
        """The LoRA files held (slot weights, overflow files), and any adapter a PEFT layer still holds
        weights for besides the slot (after an overflow call: none, or it would leak)."""
        return self._held_files() | self.peft_layer_adapters()

    def _held_files(self) -> set[str]:
        """The LoRA files this engine holds; unlike `adapter_names`, no walk over the model's modules."""
        return set(self.slot_weights.names()) | set(self.overflow.files)

    def peft_layer_adapters(self) -> set[str]:
        """PEFT adapters other than the slot that any layer holds now: none between overflow calls."""
        return super().adapter_names() - {SLOT_ADAPTER}

    def adapter_module_count(self, name: str) -> int:
        if name in self.slot_weights:
            return len(self.slot_weights.get(name).factors)
        if name in self.overflow.files:
            return self.overflow.files[name].matched_modules
        return 0

    def describe_call(self, adapters: Sequence[AdapterWeight]) -> CallMode:
        """The tier and LoRA mode of a call: `slot`, or `peft` when the slot cannot take the set.

        Raises:
            ApiError: LORA_INCOMPATIBLE when the slot cannot take the set and `lora_overflow` is reject.
            KeyError: an adapter is not loaded.
        """
        return CallMode(self.speed_tier, self._lora_mode(adapters))

    def activate(self, adapters: Sequence[AdapterWeight]) -> None:
        """Write `adapters` into the slot (empty: the base model), or load them as PEFT adapters on overflow."""
        if self._lora_mode(adapters) == LoraMode.SLOT:
            self.overflow.unload()
            self._write_slot(adapters)
        else:
            self.overflow.activate(adapters, lambda name: self.slot_weights.get(name).peft_state_dict())

    def _lora_mode(self, adapters: Sequence[AdapterWeight]) -> LoraMode:
        held = self._held_files()  # runs before every call: must not walk the model (adapter_names does)
        missing = [a.name for a in adapters if a.name not in held]
        if missing:
            raise KeyError(f"adapters not loaded: {missing}")
        reasons = [self.overflow.files[a.name].reason for a in adapters if a.name in self.overflow.files]
        if not reasons:
            try:
                self.slot.check([self.slot_weights.get(a.name) for a in adapters])
                return LoraMode.SLOT
            except SlotUnfit as unfit:
                reasons = [str(unfit)]
        if self.speed.lora_overflow == "reject":
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"the {self.speed_tier} tier cannot run this LoRA set in its LoRA slot: {reasons[0]}",
                {"reason": reasons[0], "lora_overflow": "reject", "lora_slot_rank": self.slot.rank},
            )
        return LoraMode.PEFT

    def _write_slot(self, adapters: Sequence[AdapterWeight]) -> None:
        content = tuple((a.name, float(a.weight)) for a in adapters)
        if content != self._slot_content:
            self.slot.write([(self.slot_weights.get(name), weight) for name, weight in content])
            self._slot_content = content

    # ---- generation ------------------------------------------------------------------------

    def generate(self, items: Sequence[WorkItem], adapters: Sequence[AdapterWeight] = (),
                 should_stop: StopCheck | None = None, on_step: StepCallback | None = None) -> list[Image.Image]:
        """As FluxEngine.generate; a `peft`-mode call (see describe_call) runs with compiled code bypassed."""
        if self._lora_mode(adapters) == LoraMode.SLOT:
            return super().generate(items, adapters, should_stop, on_step)
        with torch.compiler.set_stance("force_eager"):
            return super().generate(items, adapters, should_stop, on_step)

    def warmup(self) -> None:
        """Compile the warm-up shapes of `speed` before the replica reports healthy."""
        self.compile_shapes()

    def compile_shapes(self, shapes: Sequence[WarmupShape] | None = None) -> WarmupReport:
        """Compile every shape in `shapes` (default: `speed.warmup_shapes`) with the base model.

        Run before the replica reports healthy. Saves the compile artifacts when a compile cache
        directory is set, and marks the point from which `compile_stats().since_warmup` counts.
        """
        shapes = tuple(self.speed.warmup_shapes if shapes is None else shapes)
        compiles = self.compile_counter.compiles
        start = time.perf_counter()
        for shape in shapes:
            self.generate(warmup_items(shape, self.speed.warmup_steps))
        report = WarmupReport(shapes, time.perf_counter() - start, self.compile_counter.compiles - compiles)
        self._warm_mark = self.compile_counter.compiles
        if self._artifacts is not None:
            compilation.save_compile_artifacts(self._artifacts)
        logger.info("warm-up: %d shapes, %d compiles, %.1f s", len(shapes), report.compiles, report.seconds)
        return report

    def compile_stats(self) -> CompileStats | None:
        counter = self.compile_counter
        since = None if self._warm_mark is None else counter.compiles - self._warm_mark
        return CompileStats(counter.compiles, counter.recompiles, since)

    def _artifacts_file(self) -> Path | None:
        cache_dir = compilation.use_compile_cache_dir(self.speed.compile_cache_dir)
        if cache_dir is None:
            return None
        gpu = torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else "cpu"
        speed = self.speed
        tier = f"{speed.speed}-r{speed.lora_slot_rank}-{speed.compile_backend}-{speed.compile_mode}"
        key = f"{tier}-{gpu}-torch{torch.__version__}"
        return compilation.artifacts_path(cache_dir, key)


def warmup_items(shape: WarmupShape, steps: int) -> list[WorkItem]:
    """Base-model work items of one warm-up shape (the prompt does not matter to compiled code)."""
    key = BatchKey(model="warmup", width=shape.width, height=shape.height, steps=steps, guidance=3.5)
    return [WorkItem(request_id="warmup", index=i, prompt="warm-up", seed=i, key=key) for i in range(shape.batch)]


def load_engine(
    source: str = TINY_SOURCE,
    device: str = "auto",
    revision: str | None = None,
    speed: SpeedArgs | None = None,
    dtype: str = "auto",
) -> FluxEngine:
    """The engine of a model's speed tier in its `dtype`: FluxEngine for `exact`, CompiledFluxEngine otherwise.

    Raises:
        SpeedTierUnavailable: the tier cannot run on this device (checked before loading weights).
        ValueError: fp8 in another dtype than bf16 (the configuration refuses that first).
    """
    speed = speed or SpeedArgs()
    if speed.speed == "exact":
        return FluxEngine.load(source, device, revision, dtype)
    return CompiledFluxEngine.load(source, device, revision, dtype, speed=speed)
