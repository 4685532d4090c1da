"""A LoRA as ai-toolkit applies it during training previews: an fp32 forward branch, or merged in fp32.

ai-toolkit's LoRA network (`toolkit/lora_special.py`, `toolkit/network_mixins.py`) wraps every
Linear inside the transformer's `transformer_blocks` and `single_transformer_blocks` (quantized
QLinear too). Its weights are fp32, and a FLUX network is in PEFT format with alpha = rank, so the
scale is exactly 1 and a file's `.alpha` keys change nothing. At preview time it runs either
- as a forward branch on each wrapped Linear: `base(x) + (B(A(x.float())) * m).to(base dtype)`, or
- merged into the weights, `W = (W.float() + m * (B @ A)).to(W.dtype)`, rounded once, when the
  model is not quantized and every image of the call has the same multiplier.
Merging is undone here by restoring copies of the touched weights (ai-toolkit subtracts again,
which drifts bf16 weights a little at every preview).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from optimum.quanto import QModuleMixin

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.intake.preview_flags import choose_lora_mode
from serve_app.states import LoraMode

__all__ = ["LoraMode", "LoraPair", "PreviewLora", "applied_lora", "choose_lora_mode", "map_lora"]
LORA_SCOPE = ("transformer_blocks.", "single_transformer_blocks.")  # ai-toolkit's transformer_only targets
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraPair:
    """The low-rank pair of one Linear, fp32 on the engine's device: A is [rank, in], B is [out, rank]."""

    down: torch.Tensor
    up: torch.Tensor


@dataclass(frozen=True)
class PreviewLora:
    """A LoRA file mapped onto one transformer's block Linears.

    Attributes:
        pairs: module name (as in `transformer.named_modules()`) -> its pair.
        ignored_keys: keys (after conversion) that touch nothing ai-toolkit trains: text
            encoders, modules outside the blocks.
    """

    pairs: dict[str, LoraPair]
    ignored_keys: tuple[str, ...] = ()

    @property
    def matched_modules(self) -> int:
        return len(self.pairs)


def map_lora(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor], device: str) -> PreviewLora:
    """Map a LoRA state dict onto the Linears inside the transformer's blocks.

    Files that are not in the diffusers format (kohya, XLabs, ...) are first converted by diffusers'
    `FluxLoraLoaderMixin.lora_state_dict`, which also drops `.alpha` keys (kohya alphas are baked
    into the converted weights).

    Args:
        transformer: the FluxTransformer2DModel (quantized or not).
        tensors: the file's tensors, e.g. from `safetensors.torch.load_file`.
        device: where the fp32 pairs live.

    Returns:
        The mapped LoRA.

    Raises:
        ApiError: LORA_INCOMPATIBLE when the file cannot be read as a FLUX LoRA, no key matches a
            block Linear, a pair is incomplete, or a shape does not fit its Linear.
    """
    try:
        converted = FluxPipeline.lora_state_dict(dict(tensors))  # a copy: the converter pops keys
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:  # diffusers' converters on odd keys
        raise _incompatible(f"not a FLUX LoRA: {type(exc).__name__}: {exc}") from None
    linears = {name: m for name, m in transformer.named_modules() if _is_block_linear(name, m)}
    pairs: dict[str, LoraPair] = {}
    ignored: list[str] = []
    for key in sorted(converted):
        stem = key.removesuffix(_A_SUFFIX).removesuffix(_B_SUFFIX)
        name = stem.removeprefix("transformer.")
        if stem == key or name not in linears:
            ignored.append(key)  # text encoder, non-block modules, other tensors: ai-toolkit trains none
        elif key.endswith(_A_SUFFIX):
            pairs[name] = _pair_for(name, linears[name], converted[key], converted.get(stem + _B_SUFFIX), device)
        elif stem + _A_SUFFIX not in converted:
            raise _incompatible(f"{name} has lora_B but no lora_A", module=name)
    if not pairs:
        raise _incompatible("none of its keys matches a Linear of the transformer blocks", matched_modules=0)
    return PreviewLora(pairs=pairs, ignored_keys=tuple(ignored))


def _is_block_linear(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and name.startswith(LORA_SCOPE)  # quanto's QLinear is a Linear


def _pair_for(name: str, linear: torch.nn.Linear, down: torch.Tensor, up: torch.Tensor | None, device) -> LoraPair:
    if up is None:
        raise _incompatible(f"{name} has lora_A but no lora_B", module=name)
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise _incompatible(f"{name}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not pair", module=name)
    if down.shape[1] != linear.in_features or up.shape[0] != linear.out_features:
        raise _incompatible(
            f"{name}: LoRA {up.shape[0]}x{down.shape[1]} does not fit the Linear "
            f"{linear.out_features}x{linear.in_features}",
            module=name,
        )
    # fp32 as ai-toolkit's network holds them; fp16/bf16 file values convert exactly.
    return LoraPair(down=down.to(device, torch.float32), up=up.to(device, torch.float32))


def _incompatible(reason: str, **details) -> ApiError:
    return ApiError(errors.LORA_INCOMPATIBLE, f"LoRA does not fit this model: {reason}"[:500], details)


@contextlib.contextmanager
def applied_lora(
    transformer: torch.nn.Module, lora: PreviewLora | None, multiplier: float, mode: LoraMode
) -> Iterator[None]:
    """Apply `lora` at `multiplier` for the duration of the block, then take it off.

    Args:
        transformer: the transformer the LoRA was mapped onto.
        lora: the LoRA, or None for the base model.
        multiplier: the network multiplier.
        mode: `"hook"` (forward branch) or `"merged"` (into bf16 weights; unquantized only).

    Raises:
        TypeError: `"merged"` on a quantized Linear.
    """
    if lora is None:
        yield
        return
    linears = dict(transformer.named_modules())
    if mode == LoraMode.MERGED:
        with _merged(linears, lora, multiplier):
            yield
    elif multiplier == 0:
        yield  # ai-toolkit skips the branch when the multiplier is 0
    else:
        with _hooked(linears, lora, multiplier):
            yield


@contextlib.contextmanager
def _hooked(linears: dict[str, torch.nn.Module], lora: PreviewLora, multiplier: float) -> Iterator[None]:
    handles = [linears[name].register_forward_hook(_branch(pair, multiplier)) for name, pair in lora.pairs.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _branch(pair: LoraPair, multiplier: float):
    # ai-toolkit keeps the multiplier as a 1-element fp32 tensor: torch.tensor((m,)) rounds m to fp32.
    factor = torch.tensor((multiplier,), dtype=torch.float32, device=pair.down.device)

    def add_lora_output(module, args, output):
        lora_output = torch.nn.functional.linear(torch.nn.functional.linear(args[0].float(), pair.down), pair.up)
        # ai-toolkit also multiplies by its scale (alpha / rank = 1.0 exactly): an exact no-op, left out.
        return output + (lora_output * factor).to(output.dtype)

    return add_lora_output


@contextlib.contextmanager
def _merged(linears: dict[str, torch.nn.Module], lora: PreviewLora, multiplier: float) -> Iterator[None]:
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, pair in lora.pairs.items():
                if isinstance(linears[name], QModuleMixin):
                    raise TypeError(f"cannot merge a LoRA into the quantized Linear {name}; use mode 'hook'")
                weight = _weight(linears[name])
                originals[name] = weight.detach().clone()
                merged = weight.float() + multiplier * (pair.up @ pair.down)  # network_mixins.merge_in
                weight.copy_(merged.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                _weight(linears[name]).copy_(original)  # the exact original bits, never a bf16 subtraction


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    """A block Linear's weight (typed: `Module.__getattr__` says Tensor or Module)."""
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight
