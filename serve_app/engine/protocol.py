"""What a generator replica needs from an engine, whatever the model kind: the Engine protocol.

An engine owns one pipeline. It is not thread-safe: the replica calls it from one engine thread
only, one call at a time. No Ray here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from serve_app.loras.files import LoraFile
from serve_app.states import LoraMode
from serve_app.workitems import WorkItem

# Polled after each denoising step: True stops the call (every image in it is unwanted).
StopCheck = Callable[[], bool]
# Told after each denoising step: (step done, steps of the call).
StepCallback = Callable[[int, int], None]


class GenerationInterrupted(Exception):
    """Every item of a call was cancelled or timed out; the call stopped at a step boundary."""


@dataclass(frozen=True)
class AdapterWeight:
    """A loaded adapter and the weight (the request's network_multiplier) it runs at."""

    name: str
    weight: float


@dataclass(frozen=True)
class CallMode:
    """How an engine runs a call, for the result's metadata (docs/performance.md)."""

    speed_tier: str  # exact | compiled | fp8
    lora_mode: LoraMode  # peft (PEFT adapters, eager) | slot (the compile-stable LoRA slot); a preview's: hook | none


@dataclass(frozen=True)
class CompileStats:
    """The recompile metric of a compiled engine: Dynamo compiles since start, and since warm-up."""

    compiles: int
    recompiles: int  # compiles of a frame that already had compiled code
    since_warmup: int | None  # None before warm-up


class Engine(Protocol):
    device: str
    # Images one pipeline call may hold, whatever the pixel budget says (None: no limit of its own).
    @property
    def max_images_per_call(self) -> int | None:
        """The most images one call may draw (None: the pixel budget decides)."""

    def load_adapter(self, name: str, lora: LoraFile) -> int:
        """Load a LoRA file's tensors (read and checked by LoraSources) as adapter `name`; return how
        many modules it wraps.

        Raises:
            ApiError: LORA_INCOMPATIBLE when the file does not fit the model.
        """

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` and free its weights; a no-op if absent."""

    def adapter_names(self) -> set[str]:
        """The adapters loaded now."""

    def describe_call(self, adapters: Sequence[AdapterWeight]) -> CallMode:
        """The speed tier and LoRA mode a call with these adapters runs in.

        Raises:
            ApiError: LORA_INCOMPATIBLE when the engine refuses to run the set at all.
        """

    def warmup(self) -> None:
        """Prepare before the replica reports healthy (a compiled engine compiles its shapes)."""

    def compile_stats(self) -> CompileStats | None:
        """Compiles so far (None for an engine that does not compile)."""

    def generate(self, items: Sequence[WorkItem], adapters: Sequence[AdapterWeight] = (),
                 should_stop: StopCheck | None = None, on_step: StepCallback | None = None) -> list[Image.Image]:
        """One pipeline call for items of one BatchKey: one image per item, in order.

        Raises:
            GenerationInterrupted: `should_stop` returned True.
        """
