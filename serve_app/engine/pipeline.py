"""FluxEngine: one diffusers FluxPipeline, called exactly the way the reference server calls it.

The reference (notes/reference.md section 2) calls `pipe(prompt, height, width,
num_inference_steps, guidance_scale, generator, negative_prompt)` and leaves everything else at
diffusers' defaults (max_sequence_length 512, true_cfg_scale 1.0, the model's own scheduler).
We do the same for a list of items that share a ShapeKey, with one CPU generator per image, so
an image does not depend on what else shared its call.

No Ray here: this module runs, is tested and is benchmarked without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import FluxPipeline
from PIL import Image

from serve_app import errors
from serve_app.config import TINY_SOURCE
from serve_app.engine.workitems import WorkItem
from serve_app.errors import ApiError

logger = logging.getLogger(__name__)

# Test-only fault injection (AppArgs.fault_injection): a prompt holding this marker fails its call.
FAIL_MARKER = "[[fail]]"


class GenerationInterrupted(Exception):
    """Every item of a call was cancelled or timed out; the call stopped at a step boundary."""


@dataclass(frozen=True)
class AdapterWeight:
    """A loaded adapter and the weight (the request's network_multiplier) it runs at."""

    name: str
    weight: float


@dataclass(frozen=True)
class CallMode:
    """How an engine runs a call, for the result's metadata (SPEC section 7)."""

    speed_tier: str  # exact | compiled | fp8
    lora_mode: str  # peft (PEFT adapters, eager) | slot (the compile-stable LoRA slot)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def dtype_for(device: str) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU, as the reference."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_flux_pipeline(source: str, device: str, revision: str | None = None) -> FluxPipeline:
    """Load a FluxPipeline from `tiny`, a local diffusers directory or a Hugging Face repo id.

    `tiny` is built once into a cache directory and then loaded through the same
    `from_pretrained` path as any other directory, so what is served is exactly what
    `python -m serve_app.tiny --out DIR` exports.
    """
    if source == TINY_SOURCE:
        from serve_app.tiny import ensure_tiny_dir

        source = str(ensure_tiny_dir())
    kwargs = {"dtype": dtype_for(device)}
    if revision and not Path(source).is_dir():
        kwargs["revision"] = revision
    pipe = FluxPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class FluxEngine:
    """Owns one FluxPipeline: adapters in, images out. Not thread-safe: callers serialize."""

    speed_tier = "exact"

    def __init__(self, pipe: FluxPipeline, device: str, fault_injection: bool = False):
        self.pipe = pipe
        self.device = device
        self.fault_injection = fault_injection
        self.steps_run = 0  # denoising steps executed since start: lets tests see a call stop early

    @classmethod
    def load(
        cls,
        source: str = TINY_SOURCE,
        device: str = "auto",
        revision: str | None = None,
        fault_injection: bool = False,
    ) -> "FluxEngine":
        device = pick_device(device)
        return cls(load_flux_pipeline(source, device, revision), device, fault_injection)

    # ---- adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path) -> int:
        """Load a LoRA file as the PEFT adapter `name`; return how many modules it wraps.

        diffusers converts kohya and XLabs files; ai-toolkit files are already in its format.
        A file of which no key matches the model would be a silent no-op in diffusers, so it
        is refused here with LORA_INCOMPATIBLE.
        """
        path = Path(path)
        try:
            self.pipe.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=name, local_files_only=True
            )
        except Exception as exc:  # diffusers raises ValueError/RuntimeError/KeyError/AssertionError
            self.delete_adapter(name)
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"LoRA {path.name!r} does not fit this model: {type(exc).__name__}: {exc}"[:500],
                {"file": path.name},
            ) from None
        matched = self.adapter_module_count(name)
        if matched == 0:
            self.delete_adapter(name)
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"LoRA {path.name!r}: none of its keys matches a module of this model",
                {"file": path.name, "matched_modules": 0},
            )
        return matched

    def adapter_module_count(self, name: str) -> int:
        """Modules (in every LoRA-loadable component) that carry adapter `name`."""
        count = 0
        for component in self._lora_components():
            for module in component.modules():
                lora_a = getattr(module, "lora_A", None)
                if lora_a is not None and name in lora_a:
                    count += 1
        return count

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from every component and free its weights; a no-op if absent."""
        present = {n for names in self.pipe.get_list_adapters().values() for n in names}
        if name in present:
            self.pipe.delete_adapters([name])
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def adapter_names(self) -> set[str]:
        return {n for names in self.pipe.get_list_adapters().values() for n in names}

    def layer_adapter_names(self) -> set[str]:
        """Adapter names that any PEFT LoRA layer still holds weights for (its lora_A/lora_B keys).

        After `delete_adapter` this must be a subset of `adapter_names()`: a layer keeping the
        weights of a deleted adapter would leak memory with every LoRA swap.
        """
        held: set[str] = set()
        for component in self._lora_components():
            for module in component.modules():
                for attr in ("lora_A", "lora_B"):
                    weights = getattr(module, attr, None)
                    if isinstance(weights, torch.nn.ModuleDict):
                        held.update(weights.keys())
        return held

    def activate(self, adapters: Sequence[AdapterWeight]) -> None:
        """Make exactly `adapters` active at their weights, or the base model if empty.

        `load_lora_weights` activates only the adapter it loaded, so this runs before every call.
        """
        if not adapters:
            if self.adapter_names():
                self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([a.name for a in adapters], adapter_weights=[a.weight for a in adapters])

    def describe_call(self, adapters: Sequence[AdapterWeight]) -> CallMode:
        """The speed tier and LoRA mode a call with `adapters` runs in (the exact tier: always PEFT)."""
        return CallMode(self.speed_tier, "peft")

    def _lora_components(self):
        for name in self.pipe._lora_loadable_modules:
            component = getattr(self.pipe, name, None)
            if component is not None:
                yield component

    # ---- generation ------------------------------------------------------------------------

    def generate(
        self,
        items: Sequence[WorkItem],
        adapters: Sequence[AdapterWeight] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """Run one pipeline call for items that share a ShapeKey; one image per item, in order.

        Args:
            items: work items with equal `key`.
            adapters: the LoRA adapters (already loaded) and their weights for this call.
            should_stop: polled after each denoising step; when it returns True the call stops
                and GenerationInterrupted is raised (used when every item is cancelled).
        """
        key = items[0].key
        if any(item.key != key for item in items):
            raise ValueError("a pipeline call takes items of one ShapeKey only")
        if self.fault_injection and any(FAIL_MARKER in item.prompt for item in items):
            raise RuntimeError(f"fault injection: a prompt holds {FAIL_MARKER}")
        self.activate(adapters)
        stopped = False

        def on_step_end(pipe, step, timestep, callback_kwargs):
            nonlocal stopped
            self.steps_run += 1
            if should_stop is not None and should_stop():
                stopped = True
                pipe._interrupt = True  # FluxPipeline skips the remaining steps
            return callback_kwargs

        with torch.inference_mode():
            output = self.pipe(
                prompt=[item.prompt for item in items],
                negative_prompt=[item.neg for item in items],
                height=key.height,
                width=key.width,
                num_inference_steps=key.steps,
                guidance_scale=key.guidance,
                generator=[torch.Generator("cpu").manual_seed(item.seed) for item in items],
                callback_on_step_end=on_step_end,
            )
        if stopped:
            raise GenerationInterrupted(f"stopped after step {self.steps_run}")
        return list(output.images)
