"""The compile-stable LoRA slot: LoRA files as (A, B) pairs, written in place into one adapter.

A compiled transformer must not see a new LoRA set or a new multiplier as a new graph. So the
fast tiers keep one PEFT adapter, "slot", of rank R over every Linear of the transformer's blocks,
with its scaling fixed at 1, and write each call's LoRA set into its weights:

    A_slot = [A_1; A_2; 0]            (rows: the LoRAs' ranks stacked, zeros for the rest)
    B_slot = [s_1 B_1 | s_2 B_2 | 0]  (s_i = multiplier_i * alpha_i / rank_i)

so B_slot A_slot x = sum_i s_i B_i A_i x, exactly what separate PEFT adapters compute. The base
model is a zeroed slot. Only tensor values change between calls, never a shape or a Python value
that compiled code guards on.

This module is tensor bookkeeping only: conversion (with diffusers' own converter, so kohya and
XLabs files work too), the checks of what the slot cannot take, the in-place write, and the byte
budget of cached weights. Installing the adapter and compiling live in `fast.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft

# The Linears the slot covers: those inside the repeated blocks that regional compile compiles.
SLOT_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te")

# Raw-key markers of adapter kinds the slot's plain low-rank product cannot express.
UNSUPPORTED_KINDS = {
    "lora_magnitude_vector": "DoRA (magnitude vectors)",
    "dora_scale": "DoRA (dora_scale)",
    "lokr_": "LoKr",
    "hada_": "LoHa",
    ".diff": "full weight differences (.diff)",
}


class SlotUnfit(ValueError):
    """A LoRA file, or a set of them, that the slot cannot take; the message is the reason."""


@dataclass(frozen=True)
class LoraFactor:
    """One module's LoRA: `down` (A) [rank, in] and `up` (B) [out, rank] with alpha/rank folded in."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class SlotLora:
    """A LoRA file converted for the slot: `{module name in the transformer: LoraFactor}`."""

    factors: Mapping[str, LoraFactor]

    @property
    def numel(self) -> int:
        return sum(t.numel() for f in self.factors.values() for t in (f.down, f.up))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.factors.values() for t in (f.down, f.up))

    @property
    def max_rank(self) -> int:
        return max(f.rank for f in self.factors.values())

    def to(self, device: torch.device | str, dtype: torch.dtype, pin: bool = False) -> SlotLora:
        """A copy on `device` in `dtype`; `pin` puts host copies in page-locked memory for async uploads."""

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype)
            return t.pin_memory() if pin and t.device.type == "cpu" else t

        return SlotLora({m: LoraFactor(move(f.down), move(f.up)) for m, f in self.factors.items()})

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The same LoRA in diffusers' PEFT format, without alphas (scale 1: alpha/rank is in `up`)."""
        tensors = {}
        for module, factor in self.factors.items():
            tensors[f"{TRANSFORMER_PREFIX}{module}.lora_A.weight"] = factor.down
            tensors[f"{TRANSFORMER_PREFIX}{module}.lora_B.weight"] = factor.up
        return tensors


def slot_targets(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """`{module name: (out, in)}` of every nn.Linear the slot covers (the blocks' Linears).

    Call it on the model before the slot is installed (PEFT then wraps these Linears).
    """
    return {
        name: (module.out_features, module.in_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(SLOT_BLOCKS) and ".lora_" not in name
    }


def convert_lora(tensors: Mapping[str, torch.Tensor], targets: Mapping[str, tuple[int, int]]) -> SlotLora:
    """Convert a LoRA state dict (any format diffusers reads) into slot factors, in fp32.

    Args:
        tensors: the file's tensors as safetensors loads them.
        targets: `slot_targets(transformer)`.

    Returns:
        The factors of every module the file adapts; alpha/rank is folded into each `up`.

    Raises:
        SlotUnfit: the file holds something the slot cannot take (DoRA, LoKr, LoHa, LoRA biases,
            text-encoder keys, modules outside the slot, shapes that do not fit) or nothing at all.
    """
    for marker, kind in UNSUPPORTED_KINDS.items():
        if any(marker in key for key in tensors):
            raise SlotUnfit(f"{kind} cannot be written into the LoRA slot")
    try:
        # A copy: the converter pops alpha keys from the dict it is given.
        state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as exc:  # noqa: BLE001 - the converters raise ValueError/KeyError/AssertionError
        raise SlotUnfit(f"diffusers cannot convert it: {type(exc).__name__}: {exc}"[:300]) from None
    if any(key.startswith(TEXT_ENCODER_PREFIXES) for key in state_dict):
        raise SlotUnfit("it has text-encoder keys; the slot covers the transformer only")
    pairs = _module_pairs(state_dict)
    outside = sorted(m for m in pairs if m not in targets)
    if outside:
        raise SlotUnfit(f"it adapts modules outside the slot's blocks: {', '.join(outside[:4])}")
    scales = _alpha_scales(pairs, alphas or {})
    factors = {}
    for module, (down, up) in pairs.items():
        out_f, in_f = targets[module]
        if (
            down.ndim != 2
            or up.ndim != 2
            or down.shape[1] != in_f
            or up.shape[0] != out_f
            or up.shape[1] != down.shape[0]
        ):
            raise SlotUnfit(
                f"{module}: LoRA shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit ({out_f}, {in_f})"
            )
        factors[module] = LoraFactor(down.float(), up.float() * scales[module])
    return SlotLora(factors)


def _module_pairs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (lora_A, lora_B)}` from the converted keys `transformer.<module>.lora_{A,B}.weight`."""
    keys = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state_dict.items() if k.startswith(TRANSFORMER_PREFIX)}
    if not keys:
        raise SlotUnfit("it has no transformer LoRA keys")
    if "lora_A" not in next(iter(keys)):
        keys = convert_unet_state_dict_to_peft(keys)  # older diffusers naming, as load_lora_adapter does
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in keys.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                pairs.setdefault(key.removesuffix(f".{part}.weight"), {})[part] = value
                break
        else:
            raise SlotUnfit(f"it has a key the slot cannot take: {key}")
    broken = [m for m, p in pairs.items() if len(p) != 2]
    if broken:
        raise SlotUnfit(f"{broken[0]}: a lora_A without its lora_B (or the reverse)")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def _alpha_scales(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alphas: Mapping) -> dict[str, float]:
    """alpha/rank per module, as diffusers configures PEFT from `<prefix>.<module>.alpha` keys.

    No alphas at all: scale 1 (PEFT convention alpha == rank). A module without an alpha among
    modules with one takes diffusers' default alpha, the first one found (alphas are tensors,
    which diffusers' Counter tells apart by identity).
    """
    by_module = {
        key.removeprefix(TRANSFORMER_PREFIX).removesuffix(".alpha"): float(value) for key, value in alphas.items()
    }
    default = next(iter(by_module.values()), None)
    scales = {}
    for module, (down, _) in pairs.items():
        rank = down.shape[0]
        alpha = by_module.get(module, default)
        scales[module] = 1.0 if alpha is None else alpha / rank
    return scales


class LoraSlot:
    """The slot adapter's weights, written in place with a set of (LoRA, multiplier).

    Args:
        weights: `{module name: (lora_A weight [rank, in], lora_B weight [out, rank])}`, the slot
            adapter's parameters, created zero.
        rank: the slot's rank budget R.
    """

    def __init__(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int):
        self.weights = dict(weights)
        self.rank = rank
        self._used = dict.fromkeys(self.weights, 0)  # rows written by the last write

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        """`{module name: (out, in)}` of the modules the slot covers, as `slot_targets` gives them."""
        return {module: (b.shape[0], a.shape[1]) for module, (a, b) in self.weights.items()}

    def check(self, loras: Sequence[SlotLora]) -> None:
        """Raise SlotUnfit if the LoRAs together need more than R rows in some module."""
        needed: dict[str, int] = {}
        for lora in loras:
            for module, factor in lora.factors.items():
                if module not in self.weights:
                    raise SlotUnfit(f"{module} is not in the slot")
                needed[module] = needed.get(module, 0) + factor.rank
        over = max(needed.values(), default=0)
        if over > self.rank:
            raise SlotUnfit(f"the LoRAs' summed rank {over} is over the slot's rank budget {self.rank}")

    @torch.no_grad()
    def write(self, entries: Sequence[tuple[SlotLora, float]]) -> None:
        """Write `[(lora, multiplier), ...]` into the slot; the rows past them are zeroed.

        An empty list is the base model. Copies from pinned host memory are asynchronous on CUDA;
        the stream orders them before the next forward.
        """
        self.check([lora for lora, _ in entries])
        offsets = dict.fromkeys(self.weights, 0)
        for lora, multiplier in entries:
            for module, factor in lora.factors.items():
                slot_a, slot_b = self.weights[module]
                start, stop = offsets[module], offsets[module] + factor.rank
                slot_a[start:stop].copy_(factor.down, non_blocking=True)
                columns = slot_b[:, start:stop].copy_(factor.up, non_blocking=True)
                if multiplier != 1.0:
                    columns.mul_(multiplier)
                offsets[module] = stop
        for module, used in offsets.items():
            previous = self._used[module]
            if previous > used:  # rows the last write used and this one does not: zero them
                slot_a, slot_b = self.weights[module]
                slot_a[used:previous].zero_()
                slot_b[:, used:previous].zero_()
            self._used[module] = used

    def clear(self) -> None:
        """The base model: every row zero."""
        self.write([])


class SlotWeightCache:
    """Converted LoRAs by adapter name, on the device up to a byte budget and in host memory past it.

    The server decides which files stay loaded (its LRU of LoRA sets); this cache decides where
    their weights live, so GPU memory held by adapters is bounded in bytes, not in files. Host
    copies are pinned on CUDA machines, so writing them into the slot is an async upload.

    Args:
        device: the engine's device (on a CPU engine, device and host memory are the same).
        dtype: the slot's dtype; weights are stored in it.
        device_bytes: the most bytes of converted weights kept on the device.
    """

    def __init__(self, device: str, dtype: torch.dtype, device_bytes: int):
        self.device = device
        self.dtype = dtype
        self.device_bytes = device_bytes
        self._loras: dict[str, SlotLora] = {}
        self._on_device: set[str] = set()

    def put(self, name: str, lora: SlotLora) -> None:
        self.pop(name)
        if self.bytes_on_device + lora.numel * self.dtype.itemsize <= self.device_bytes:
            self._loras[name] = lora.to(self.device, self.dtype)
            self._on_device.add(name)
        else:
            self._loras[name] = lora.to("cpu", self.dtype, pin=self.device.startswith("cuda"))

    def pop(self, name: str) -> SlotLora | None:
        self._on_device.discard(name)
        return self._loras.pop(name, None)

    def get(self, name: str) -> SlotLora:
        return self._loras[name]

    def names(self) -> list[str]:
        return list(self._loras)

    def __contains__(self, name: str) -> bool:
        return name in self._loras

    def on_device(self, name: str) -> bool:
        return name in self._on_device

    @property
    def bytes_on_device(self) -> int:
        return sum(self._loras[n].nbytes for n in self._on_device)

    @property
    def bytes_total(self) -> int:
        return sum(lora.nbytes for lora in self._loras.values())
