"""An engine for tests over Serve: the real FluxEngine, plus fault injection and records of its calls.

A test names it in its model args (`engine: "tests.support.engines:RecordingEngine"`), so none of
this exists in production code. Each replica process appends its records to files under the
directory in $FLUX_TEST_RECORDS, which the tests read back (`tests/serve/helpers.py`):
- `calls-<pid>.jsonl`: one JSON line per pipeline call (start time `t`, model, shape, images, batch
  keys, requests, ok, seconds);
- `steps-<pid>`: one byte per denoising step run, so a test can see a call stop early.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from serve_app.config import ModelArgs
from serve_app.engine.protocol import AdapterWeight, StepCallback, StopCheck
from serve_app.engine.reference import FluxEngine
from serve_app.workitems import WorkItem

FAIL_MARKER = "[[fail]]"  # a prompt holding it fails its whole pipeline call
RECORDS_ENV = "FLUX_TEST_RECORDS"


class RecordingEngine(FluxEngine):
    @classmethod
    def from_args(cls, model: ModelArgs) -> RecordingEngine:
        engine = super().from_args(model)
        engine.records = Path(os.environ[RECORDS_ENV])
        engine.records.mkdir(parents=True, exist_ok=True)
        return engine

    def generate(
        self,
        items: Sequence[WorkItem],
        adapters: Sequence[AdapterWeight] = (),
        should_stop: StopCheck | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        record = {"t": time.time(), "pid": os.getpid(), "model": items[0].key.model,
                  "shape": items[0].key.label(), "images": len(items), "keys": len({item.key for item in items}),
                  "requests": sorted({item.request_id for item in items}), "ok": False}
        steps = self.records / f"steps-{os.getpid()}"

        def count_step(step: int, total: int) -> None:
            with open(steps, "ab") as f:
                f.write(b".")
            if on_step is not None:
                on_step(step, total)

        try:
            if any(FAIL_MARKER in item.prompt for item in items):
                raise RuntimeError(f"fault injection: a prompt holds {FAIL_MARKER}")
            images = super().generate(items, adapters, should_stop, count_step)
            record["ok"] = True
            return images
        finally:
            record["seconds"] = time.time() - record["t"]
            with open(self.records / f"calls-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
