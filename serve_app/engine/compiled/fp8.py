"""The fp8 tier's weights: torchao fp8 row-wise on the base Linears of the compiled blocks.

Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) stores each weight in float8_e4m3
with a scale per output row and quantizes activations per row at run time; the matmul runs on
fp8 tensor cores, which exist from compute capability 8.9 (Ada, Hopper). Only the Linears inside
the repeated blocks are quantized: they hold nearly all FLOPs and are the compiled region (fp8
without compile is slower than bf16: 10.4 s against 7.9 s per image in lora-fast's table). It runs
before the LoRA slot is installed, so the slot's lora_A/lora_B stay in bf16 and PEFT wraps the
quantized Linears.

torchao is imported only here and only when the fp8 tier is used: it is no CPU dependency.
"""

from __future__ import annotations

import torch

FP8_MIN_CAPABILITY = (8, 9)


class SpeedTierUnavailable(RuntimeError):
    """The configured speed tier cannot run on this device; raised before any weights load."""


def check_fp8_device(device: str) -> None:
    """Refuse fp8 where the hardware has no fp8 matmul: CPUs and CUDA devices below 8.9.

    Raises:
        SpeedTierUnavailable: with the device and what the tier needs.
    """
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise SpeedTierUnavailable(
            f"speed tier 'fp8' needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); this replica runs "
            f"on {device!r}. Use speed 'compiled' or 'exact' here."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise SpeedTierUnavailable(
            f"speed tier 'fp8' needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}. Use speed 'compiled' here."
        )


def quantize_base_linears(transformer: torch.nn.Module, module_names: set[str]) -> int:
    """Quantize the named nn.Linear modules to fp8 row-wise in place; return how many were quantized.

    Args:
        transformer: the model, before any LoRA adapter is added.
        module_names: the Linears to quantize (the slot's targets); `lora_` modules never are.

    Raises:
        SpeedTierUnavailable: torchao is not installed.
    """
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise SpeedTierUnavailable(f"speed tier 'fp8' needs torchao (>= 0.18): {exc}") from None

    quantized = []

    def is_base_linear(module: torch.nn.Module, name: str) -> bool:
        chosen = isinstance(module, torch.nn.Linear) and name in module_names and "lora_" not in name
        if chosen:
            quantized.append(name)
        return chosen

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=is_base_linear)
    return len(quantized)
