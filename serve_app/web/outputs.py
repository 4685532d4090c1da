"""Turning work-item results into the API's output models, and the URLs the API hands out."""

from __future__ import annotations

import base64
from typing import Protocol

from serve_app.schemas import EffectiveSettings, InlineImage, ResultMetadata
from serve_app.states import LoraMode
from serve_app.workitems import ItemResult


class ImageRecord(Protocol):
    """What a stored result image (serving/records.StoredImage) holds of an ItemResult."""

    index: int
    width: int
    height: int
    seed: int
    prompt: str
    steps: int
    guidance: float
    multiplier: float | None
    lora_mode: LoraMode
    speed_tier: str
    lora_modules: list[tuple[str, int]]

    @property
    def format(self) -> str: ...  # read-only, so a narrower type (StoredImage's OutputFormat) fits


class Links:
    """Status, result and image URLs: absolute under `base_url` when the args set one, else paths."""

    def __init__(self, base_url: str | None):
        self._base = base_url or ""

    def status(self, request_id: str) -> str:
        return f"{self._base}/v1/requests/{request_id}/status"

    def result(self, request_id: str) -> str:
        return f"{self._base}/v1/requests/{request_id}/result"

    def image(self, request_id: str, index: int) -> str:
        return f"{self._base}/v1/requests/{request_id}/images/{index}"


def image_fields(result: ItemResult | ImageRecord, preview: bool) -> dict:
    """An image entry's fields, from a fresh result or a stored one (they name the same attributes)."""
    fields = {"index": result.index, "format": result.format, "width": result.width, "height": result.height,
              "seed": result.seed}
    if preview:  # what ai-toolkit's flags and floors made of the prompt, and how the LoRA ran
        fields["effective"] = EffectiveSettings(
            prompt=result.prompt, width=result.width, height=result.height, steps=result.steps,
            guidance=result.guidance, seed=result.seed, multiplier=result.multiplier)
        fields["lora_mode"] = result.lora_mode
    return fields


def inline_image(result: ItemResult, preview: bool = False) -> InlineImage:
    return InlineImage(**image_fields(result, preview), data=base64.b64encode(result.data).decode())


def with_matched_modules(metadata: ResultMetadata, result: ItemResult | ImageRecord) -> ResultMetadata:
    """The metadata completed from a result: each LoRA with how many model modules its file matched (all
    items share them), and the speed tier and LoRA mode that drew the images."""
    loras = [lora.model_copy(update={"matched_modules": matched})
             for lora, (_, matched) in zip(metadata.loras, result.lora_modules)]
    return metadata.model_copy(update={"loras": loras, "speed_tier": result.speed_tier, "lora_mode": result.lora_mode})
