"""FluxEngine: one diffusers FluxPipeline, called exactly the way the reference server calls it.

The reference (docs/models.md) calls `pipe(prompt, height, width,
num_inference_steps, guidance_scale, generator, negative_prompt)` and leaves everything else at
diffusers' defaults (max_sequence_length 512, true_cfg_scale 1.0, the model's own scheduler).
We do the same for a list of items that share a BatchKey, with one CPU generator per image, so
an image does not depend on what else shared its call.

No Ray here: this module runs, is tested and is benchmarked without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch
from diffusers import FluxPipeline
from PIL import Image

from serve_app import errors
from serve_app.config import TINY_SOURCE, ModelArgs
from serve_app.engine.loader import dtype_for, load_pipeline, pick_device
from serve_app.engine.protocol import (
    AdapterWeight,
    CallMode,
    CompileStats,
    GenerationInterrupted,
    StepCallback,
    StopCheck,
)
from serve_app.errors import ApiError
from serve_app.loras.errors import display_source
from serve_app.loras.files import LoraFile
from serve_app.states import LoraMode
from serve_app.workitems import WorkItem

logger = logging.getLogger(__name__)


def _adapter_config(metadata: dict[str, str]) -> dict | None:
    """diffusers' own LoRA config from a file's metadata (`lora_adapter_metadata`), if it holds one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    return config if isinstance(config, dict) and config else None


class FluxEngine:
    """Owns one FluxPipeline: adapters in, images out. Not thread-safe: callers serialize."""

    speed_tier = "exact"
    max_images_per_call: int | None = None  # the pixel budget decides

    def __init__(self, pipe: FluxPipeline, device: str):
        self.pipe = pipe
        self.device = device

    @classmethod
    def load(cls, source: str = TINY_SOURCE, device: str = "auto", revision: str | None = None,
             dtype: str = "auto") -> FluxEngine:
        device = pick_device(device)
        return cls(load_pipeline(source, device, revision, dtype_for(device, dtype)), device)

    @classmethod
    def from_args(cls, model: ModelArgs) -> FluxEngine:
        """The engine of a configured `reference` model."""
        return cls.load(model.source, model.device, model.revision, model.dtype)

    # ---- adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, lora: LoraFile) -> int:
        """Load a LoRA file's tensors as the PEFT adapter `name`; return how many modules it wraps.

        diffusers converts kohya and XLabs files; ai-toolkit files are already in its format. The
        tensors come in memory (`LoraSources.read`), never as a path, so what is loaded is what was
        checked. A file of which no key matches the model would be a silent no-op in diffusers, so
        it is refused here with LORA_INCOMPATIBLE; diffusers' own words go to the log, not the client.
        """
        shown = display_source(lora.source)
        try:
            self._load_tensors(name, lora)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/RuntimeError/KeyError/AssertionError
            self.delete_adapter(name)
            logger.warning("LoRA %s does not fit this model: %s: %s", shown, type(exc).__name__, str(exc)[:500])
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"LoRA {shown!r} does not fit this model (its tensors do not match the model's layers)",
                {"path": shown},
            ) from None
        matched = self.adapter_module_count(name)
        if matched == 0:
            self.delete_adapter(name)
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"LoRA {shown!r} does not fit this model: none of its keys matches a module of it",
                {"path": shown, "matched_modules": 0},
            )
        return matched

    def _load_tensors(self, name: str, lora: LoraFile) -> None:
        config = _adapter_config(lora.metadata)
        if config is None:
            self.pipe.load_lora_weights(dict(lora.tensors), adapter_name=name)
            return
        # diffusers reads a file's own LoRA config (rank, alpha, patterns) only when it opens the file
        # itself; given a dict it would guess alpha = rank. So a file that carries its config (one saved
        # by diffusers) is loaded with it, the way load_lora_weights loads such a file from a path.
        tensors = dict(lora.tensors)
        self.pipe.load_lora_into_transformer(tensors, None, self.pipe.transformer, adapter_name=name, metadata=config)
        if any(k.startswith("text_encoder.") for k in tensors):
            self.pipe.load_lora_into_text_encoder(
                tensors, None, self.pipe.text_encoder, prefix="text_encoder", adapter_name=name, metadata=config
            )

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
        """The adapters loaded now: registered with the pipeline, or holding weights in any LoRA layer.

        After `delete_adapter` a name must be gone from both: a layer keeping the weights of a
        deleted adapter would leak memory with every LoRA swap, and would show here.
        """
        registered = {n for names in self.pipe.get_list_adapters().values() for n in names}
        held: set[str] = set()
        for component in self._lora_components():
            for module in component.modules():
                for attr in ("lora_A", "lora_B"):
                    weights = getattr(module, attr, None)
                    if isinstance(weights, torch.nn.ModuleDict):
                        held.update(weights.keys())
        return registered | held

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
        return CallMode(self.speed_tier, LoraMode.PEFT)

    def warmup(self) -> None:
        """Nothing to prepare: the exact tier runs eager."""

    def compile_stats(self) -> CompileStats | None:
        return None

    def _lora_components(self):
        for name in self.pipe._lora_loadable_modules:
            component = getattr(self.pipe, name, None)
            if component is not None:
                yield component

    # ---- generation ------------------------------------------------------------------------

    def generate(self, items: Sequence[WorkItem], adapters: Sequence[AdapterWeight] = (),
                 should_stop: StopCheck | None = None, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Run one pipeline call for items that share a BatchKey; one image per item, in order.

        Args:
            items: work items with equal `key`.
            adapters: the LoRA adapters (already loaded) and their weights for this call.
            should_stop: polled after each denoising step; when it returns True the call stops
                and GenerationInterrupted is raised (used when every item is cancelled).
            on_step: told (step, steps) after each denoising step (progress).
        """
        key = items[0].key
        if any(item.key != key for item in items):
            raise ValueError("a pipeline call takes items of one BatchKey only")
        self.activate(adapters)
        stopped = False

        def on_step_end(pipe, step, timestep, callback_kwargs):
            nonlocal stopped
            if on_step is not None:
                on_step(step + 1, key.steps)
            if should_stop is not None and should_stop():
                stopped = True
                pipe._interrupt = True  # FluxPipeline's own flag: it skips the remaining steps
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
            raise GenerationInterrupted("every image of the call was cancelled or timed out")
        return list(output.images)
