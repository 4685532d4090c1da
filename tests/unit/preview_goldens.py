"""The ai-toolkit preview goldens (../shared/golden/preview): outputs of ai-toolkit itself, used as fixtures.

They are never regenerated with this project's code. A checkout without them skips the tests that
need them; FLUX_SERVE_PREVIEW_GOLDENS points elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from serve_app import preview_flags

GOLDEN_DIR = Path(
    os.environ.get("FLUX_SERVE_PREVIEW_GOLDENS", Path(__file__).resolve().parents[3] / "shared/golden/preview")
)
GOLDENS = ("g1", "g2", "g3")
needs_goldens = pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason=f"no preview goldens at {GOLDEN_DIR}")


def load_golden(name: str) -> dict:
    return json.loads((GOLDEN_DIR / f"{name}.json").read_text())


def settings_for(golden: dict) -> preview_flags.PreviewSettings:
    """A golden's request fields through the flag parser, the way the server calls it."""
    request = golden["request"]
    prompt = request["prompts"][0]
    return preview_flags.resolve_preview_settings(
        prompt["prompt"],
        width=prompt["width"],
        height=prompt["height"],
        steps=prompt["sample_steps"],
        guidance=prompt["guidance_scale"],
        seed=prompt["seed"],
        multiplier=request["loras"][0]["network_multiplier"],
        trigger_word=request.get("trigger_word"),
        job_name=request.get("job_name"),
    )
