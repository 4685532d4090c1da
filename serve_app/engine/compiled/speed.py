"""SpeedArgs: how one reference model runs on its replicas (SPEC section 7).

`exact` (the default) is the reference's eager PEFT path. `compiled` compiles the transformer's
repeated blocks and runs LoRAs through one compile-stable slot; `fp8` adds torchao fp8 row-wise
weights on the base Linears. A model's args hold `speed` and `fast_path` (config.py).

Only pydantic here: the GPU benchmark imports it on a machine without the rest of the server.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from serve_app.config import FastPathArgs, ModelArgs, SpeedTier, WarmupShape

LoraMode = Literal["peft", "slot"]
__all__ = ["LoraMode", "SpeedArgs", "SpeedTier", "WarmupShape"]


class SpeedArgs(FastPathArgs):
    """A model's speed tier with the fast path's settings: what a tiered engine is built from."""

    speed: SpeedTier = Field("exact", description="exact (eager, PEFT), compiled, or fp8 (compiled + fp8 Linears)")
    torch_threads: PositiveInt | None = Field(None, description="torch intra-op threads (4 for a GPU replica)")

    @classmethod
    def of(cls, model: ModelArgs) -> SpeedArgs:
        return cls(speed=model.speed, torch_threads=model.torch_threads, **model.fast_path.model_dump())

