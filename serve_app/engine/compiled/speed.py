"""SpeedArgs: how one reference model runs on its replicas (docs/performance.md).

`exact` (the default) is the reference's eager PEFT path. `compiled` compiles the transformer's
repeated blocks and runs LoRAs through one compile-stable slot; `fp8` adds torchao fp8 row-wise
weights on the base Linears. A model's args hold `speed` and `fast_path` (config.py).

Only pydantic here: the GPU benchmark imports it on a machine without the rest of the server.
"""

from __future__ import annotations

from typing import Any

from pydantic import PositiveInt

from serve_app.config import FastPathArgs, ModelArgs, SpeedTier, WarmupShape

__all__ = ["SpeedArgs", "SpeedTier", "WarmupShape"]

FROM_MODEL = ("speed", "torch_threads")  # the fields SpeedArgs takes from ModelArgs, declared there only


def _model_field(name: str) -> Any:
    """ModelArgs' own declaration of field `name`: its default, constraints and description."""
    return ModelArgs.model_fields[name]


class SpeedArgs(FastPathArgs):
    """A model's speed tier and torch threads (ModelArgs') with the fast path's settings (its `fast_path`):
    what a tiered engine is built from."""

    speed: SpeedTier = _model_field("speed")
    torch_threads: PositiveInt | None = _model_field("torch_threads")

    @classmethod
    def of(cls, model: ModelArgs) -> SpeedArgs:
        return cls(**model.model_dump(include=set(FROM_MODEL)), **model.fast_path.model_dump())

