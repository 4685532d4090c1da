"""PreviewModel: a preview model's engine as a generator replica drives it (the Engine protocol).

The replica hands it work items whose prompts, sizes, steps, guidance, seeds and multipliers are
already the effective ones (serve_app.intake.request_rules applied ai-toolkit's prompt flags), and whose
BatchKey says how the request's LoRA runs (`merged` or `hook`, decided per request as ai-toolkit
decides it per sample grid). It draws each image with PreviewEngine, one image per call: ai-toolkit
draws previews one by one, and nothing promises a batch the same bytes on every kernel.

No Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from serve_app.config import ModelArgs
from serve_app.engine.loader import pick_device
from serve_app.engine.preview.lora import PreviewLora
from serve_app.engine.preview.sampling import PreviewEngine
from serve_app.engine.protocol import AdapterWeight, CallMode, CompileStats, StepCallback, StopCheck
from serve_app.loras.files import LoraFile
from serve_app.states import LoraMode
from serve_app.workitems import WorkItem


class PreviewModel:
    """The Engine of a `kind: preview` model (see module docstring)."""

    speed_tier = "exact"
    max_images_per_call = 1

    def __init__(self, engine: PreviewEngine):
        self.engine = engine
        self.device = engine.device
        self._loras: dict[str, PreviewLora] = {}

    @classmethod
    def from_args(cls, model: ModelArgs) -> PreviewModel:
        """The engine of a configured `preview` model (bf16 on every device: ModelArgs refuses another dtype)."""
        return cls(PreviewEngine.load(model.source, pick_device(model.device), quantized=model.quantize))

    # ---- adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, lora: LoraFile) -> int:
        """Map a LoRA file onto the transformer's block Linears (fp32), as ai-toolkit's network does.

        Raises:
            ApiError: LORA_INCOMPATIBLE when it fits no block Linear.
        """
        self._loras[name] = self.engine.load_lora(dict(lora.tensors))
        return self._loras[name].matched_modules

    def delete_adapter(self, name: str) -> None:
        self._loras.pop(name, None)

    def adapter_names(self) -> set[str]:
        return set(self._loras)

    def describe_call(self, adapters: Sequence[AdapterWeight]) -> CallMode:
        """`none` without a LoRA; with one, the request's `merged` or `hook` (its BatchKey's `lora_mode`,
        which the replica reports in place of this)."""
        return CallMode(self.speed_tier, LoraMode.HOOK if adapters else LoraMode.NONE)

    def warmup(self) -> None:
        """Nothing to prepare."""

    def compile_stats(self) -> CompileStats | None:
        return None

    # ---- generation ------------------------------------------------------------------------

    def generate(self, items: Sequence[WorkItem], adapters: Sequence[AdapterWeight] = (),
                 should_stop: StopCheck | None = None, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Draw each item's preview (one image per pipeline call).

        Raises:
            GenerationInterrupted: `should_stop` returned True.
        """
        if len(adapters) > 1:
            raise ValueError("a preview is of one LoRA file")
        adapter = adapters[0] if adapters else None
        lora = self._loras[adapter.name] if adapter else None
        images = []
        for item in items:
            key = item.key
            images.append(self.engine.generate(
                item.prompt, width=key.width, height=key.height, steps=key.steps, guidance=key.guidance,
                seed=item.seed, lora=lora, multiplier=adapter.weight if adapter else 1.0,
                lora_mode=key.lora_mode or LoraMode.HOOK, should_stop=should_stop, on_step=on_step,
            ))
        return images
