"""The eager PEFT path of the fast tiers: LoRAs the slot cannot take, run as separate PEFT adapters.

With `lora_overflow: eager`, a LoRA set over the slot's rank budget, or holding a file the slot
cannot express (DoRA, LoKr, text-encoder keys, modules outside the blocks), runs the way the
`exact` tier runs it: one PEFT adapter per file, `set_adapters` with the multipliers, compiled code
bypassed. The adapters exist only while such calls run: compiled code guards on each LoRA layer's
adapter dicts, so they are unloaded, and the slot made the only active adapter again, before the
next compiled call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline

from serve_app import errors
from serve_app.engine.protocol import AdapterWeight
from serve_app.errors import ApiError


@dataclass(frozen=True)
class OverflowFile:
    """A LoRA file the slot cannot take, kept as given (host memory) for the PEFT path."""

    tensors: Mapping[str, torch.Tensor]
    reason: str
    matched_modules: int


class PeftOverflow:
    """Files kept for the PEFT path, and the PEFT adapters loaded for the current overflow call.

    Args:
        pipe: the engine's pipeline.
        restore_slot: makes the slot the only active adapter of every LoRA layer again.
    """

    def __init__(self, pipe: FluxPipeline, restore_slot: Callable[[], None]):
        self.pipe = pipe
        self.restore_slot = restore_slot
        self.files: dict[str, OverflowFile] = {}
        self.loaded: tuple[str, ...] = ()  # PEFT adapters in the model now

    def keep(self, name: str, tensors: Mapping[str, torch.Tensor], reason: str) -> int:
        """Keep a file for the PEFT path after a trial load proves it fits; return the modules it adapts.

        Raises:
            ApiError: LORA_INCOMPATIBLE when diffusers cannot load it or it matches no module.
        """
        self.unload()
        try:
            matched = self._load(name, tensors)
        finally:
            self.unload()
        self.files[name] = OverflowFile(dict(tensors), reason, matched)
        return matched

    def forget(self, name: str) -> None:
        self.files.pop(name, None)
        if name in self.loaded:
            self.unload()

    def activate(self, adapters: Sequence[AdapterWeight], tensors_of: Callable[[str], Mapping[str, torch.Tensor]]):
        """Load `adapters` as PEFT adapters (if not loaded already) and set their multipliers.

        Args:
            adapters: the call's adapters and weights.
            tensors_of: a slot-compatible file's tensors in PEFT format (files kept here use their own).
        """
        names = tuple(dict.fromkeys(a.name for a in adapters))
        if names != self.loaded:
            self.unload()
            for name in names:
                self._load(name, self.files[name].tensors if name in self.files else tensors_of(name))
        self.pipe.set_adapters([a.name for a in adapters], adapter_weights=[a.weight for a in adapters])

    def unload(self) -> None:
        """Remove every PEFT adapter loaded here and restore the slot as the only active adapter."""
        if not self.loaded:
            return
        present = {n for names in self.pipe.get_list_adapters().values() for n in names}
        loaded = [n for n in self.loaded if n in present]
        if loaded:
            self.pipe.delete_adapters(loaded)
        self.restore_slot()
        self.loaded = ()

    def _load(self, name: str, tensors: Mapping[str, torch.Tensor]) -> int:
        self.loaded = (*self.loaded, name)  # first: a failed load is still unloaded by `unload`
        try:
            self.pipe.load_lora_weights(dict(tensors), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/RuntimeError/KeyError/AssertionError
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"LoRA {name!r} does not fit this model: {type(exc).__name__}: {exc}"[:500],
                {"adapter": name},
            ) from None
        matched = self._module_count(name)
        if matched == 0:
            raise ApiError(
                errors.LORA_INCOMPATIBLE,
                f"LoRA {name!r}: none of its keys matches a module of this model",
                {"adapter": name, "matched_modules": 0},
            )
        return matched

    def _module_count(self, name: str) -> int:
        count = 0
        for component in (self.pipe.transformer, self.pipe.text_encoder):
            for module in component.modules():
                lora_a = getattr(module, "lora_A", None)
                if lora_a is not None and name in lora_a:
                    count += 1
        return count
