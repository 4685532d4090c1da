"""Requests the tests share across levels: the odd but legal ones (unit over fakes, serve over real Serve),
and the merge of a test's args overrides into its base args."""

from __future__ import annotations

from typing import Any

from serve_app.config import AppArgs
from serve_app.schemas import MAX_SEED

ODD_PROMPTS = ["日本語のプロンプト、猫 🐈‍⬛🎨", "مرحبا بالعالم", "e\u0301\u0301\u0301 zalgo", "a\u200db\ufeffc\u00a0d",
               "nul\u0000inside", "\U0010ffff\U0001d54f", "", "   ", "[trigger] [trigger]", "x" * 4000]
# The sizes the odd request's images come back at: the prompts above, then tall, wide, floored, max guidance.
ODD_SIZES = [(64, 64)] * len(ODD_PROMPTS) + [(64, 4096), (4096, 64), (64, 80), (64, 64)]
ODD_ASYNC_JOB = {"model": "flux", "prompts": [{"prompt": "🦊 im Schnee", "neg": "", "width": 4096, "height": 64,
                                               "sample_steps": 1, "seed": MAX_SEED}], "output_format": "webp"}


def odd_but_legal_request() -> dict:
    """Any text through the tokenizer, the extreme sizes, a floored size, the seed and guidance bounds."""
    prompts: list[dict[str, Any]] = [
        {"prompt": p, "width": 64, "height": 64, "sample_steps": 1, "neg": ""} for p in ODD_PROMPTS
    ]
    prompts += [
        {"prompt": "tall", "width": 64, "height": 4096, "sample_steps": 1},
        {"prompt": "wide", "width": 4096, "height": 64, "sample_steps": 1, "seed": MAX_SEED},
        {"prompt": "floored", "width": 79, "height": 95, "sample_steps": 1, "seed": -1, "guidance_scale": 0},
        {"prompt": "max guidance", "width": 64, "height": 64, "sample_steps": 1, "guidance_scale": 20, "seed": 0},
    ]
    return {"model": "flux", "trigger_word": "ü✓", "prompts": prompts, "loras": [], "output_format": "png"}


def merged_args(base: dict[str, Any], overrides: dict[str, Any]) -> AppArgs:
    """`base` with each override applied: a section (loras, limits, jobs...) is merged, anything else replaced."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return AppArgs.model_validate(base)
