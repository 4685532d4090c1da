"""SpeedArgs: how one reference model runs on its replicas (SPEC section 7).

`exact` (the default) is the reference's eager PEFT path. `compiled` compiles the transformer's
repeated blocks and runs LoRAs through one compile-stable slot; `fp8` adds torchao fp8 row-wise
weights on the base Linears. The main config nests this model into each model's args.

Only pydantic here: the GPU benchmark imports it on a machine without the rest of the server.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from serve_app.config import StrictModel

SpeedTier = Literal["exact", "compiled", "fp8"]
LoraMode = Literal["peft", "slot"]

# diffusers' attention dispatcher names that run offline (no Hub kernel download) plus `auto`.
AttentionBackend = Literal[
    "auto", "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flash", "_flash_3", "sage"
]


class WarmupShape(StrictModel):
    """One call shape compiled before the replica reports healthy."""

    width: PositiveInt = Field(1024, multiple_of=16)
    height: PositiveInt = Field(1024, multiple_of=16)
    batch: PositiveInt = 1


class SpeedArgs(StrictModel):
    speed: SpeedTier = Field("exact", description="exact (eager, PEFT), compiled, or fp8 (compiled + fp8 Linears)")
    lora_slot_rank: PositiveInt = Field(
        64, description="rank budget of the LoRA slot: the summed ranks of one call's LoRAs must fit in it"
    )
    lora_overflow: Literal["eager", "reject"] = Field(
        "eager",
        description="a LoRA set the slot cannot take runs on the eager PEFT path (eager) or is refused "
        "with LORA_INCOMPATIBLE (reject)",
    )
    compile_backend: str = Field("inductor", description="torch.compile backend (aot_eager for CPU tests)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (inductor only); reduce-overhead needs one engine thread"
    )
    warmup_shapes: tuple[WarmupShape, ...] = Field(
        (
            WarmupShape(width=1024, height=1024),
            WarmupShape(width=512, height=512),
            WarmupShape(width=512, height=512, batch=2),
        ),
        description="compiled in order before the replica is healthy. The first shape keeps a static (fastest) "
        "graph; a second size makes the image length dynamic and a batch of 2 makes the batch dynamic, after "
        "which no size or batch recompiles (batch 1 keeps its own graph: Dynamo specializes sizes of 1)",
    )
    warmup_steps: PositiveInt = Field(
        2, description="denoising steps per warm-up call (each step runs the same graphs)"
    )
    compile_cache_dir: str | None = Field(
        None,
        description="node-local directory for inductor's cache and the saved compile artifacts: the next "
        "replica on the node loads them and skips most of the compile",
    )
    attention_backend: AttentionBackend = Field(
        "auto", description="diffusers attention backend; auto keeps native SDPA (cuDNN on recent torch/H100)"
    )
    torch_threads: PositiveInt | None = Field(None, description="torch intra-op threads (4 for a GPU replica)")
    adapter_device_bytes: NonNegativeInt = Field(
        4 * 2**30,
        description="bytes of converted LoRA weights kept on the GPU; the rest wait in pinned host memory",
    )
