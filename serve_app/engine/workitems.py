"""Work items: one normalized prompt each, and the ShapeKey that says which may share a call.

`build_work_items` is the whole of request validation past the schema: a pure function that
returns work items or raises an `ApiError` with its code. It applies the reference's rules
(notes/reference.md sections 1-2): trigger word, floor to 16, defaults, seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.errors import ApiError
from serve_app.schemas import InferenceRequest, PromptItem

RESOLUTION_DIVISOR = 16
DEFAULT_SIZE = 1024
DEFAULT_SEED = 42
DEFAULT_MULTIPLIER = 1.0
RANDOM_SEED_BOUND = 2**31 - 1  # the reference draws torch.randint(0, 2147483647)

_seed_rng = random.SystemRandom()


@dataclass(frozen=True)
class LoraUse:
    """One LoRA file (by canonical source) and the multiplier it runs at."""

    source: str
    multiplier: float


@dataclass(frozen=True)
class ShapeKey:
    """Everything a pipeline call fixes for all its images: items with equal keys may batch."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float
    loras: tuple[LoraUse, ...] = ()

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def lora_set_id(self) -> str:
        return lora_set_id(u.source for u in self.loras)

    def label(self) -> str:
        """A metrics tag: the geometry only, never a LoRA (unbounded cardinality)."""
        return f"{self.width}x{self.height}x{self.steps}"


@dataclass(frozen=True)
class WorkItem:
    """One image to generate, fully normalized."""

    request_id: str
    index: int
    prompt: str
    seed: int
    key: ShapeKey
    neg: str = ""
    output_format: str = "jpeg"
    deadline: float | None = field(default=None, compare=False)


def lora_set_id(sources) -> str:
    """The canonical id of a set of LoRA files (not multipliers): the multiplexed model id."""
    unique = sorted(set(sources))
    if not unique:
        return ""
    digest = hashlib.sha256("\n".join(unique).encode()).hexdigest()[:16]
    return f"loras-{digest}"


def floor_to_divisor(value: int) -> int:
    return (value // RESOLUTION_DIVISOR) * RESOLUTION_DIVISOR


def apply_trigger(prompt: str, trigger_word: str | None) -> str:
    """Replace every literal `[trigger]`; with no trigger word the text stays; nothing is prepended."""
    if not trigger_word:
        return prompt
    return prompt.replace("[trigger]", trigger_word)


def resolve_seed(seed: int | None, index: int) -> int:
    if seed is None:
        return DEFAULT_SEED + index
    if seed == -1:
        return _seed_rng.randrange(RANDOM_SEED_BOUND)
    return seed


def build_work_items(
    request: InferenceRequest,
    args: AppArgs,
    request_id: str,
    resolve_lora: Callable[[str], str] = lambda path: path,
) -> list[WorkItem]:
    """Validate a schema-valid request against the configuration and normalize it.

    Args:
        request: the parsed request body.
        args: the application's args (model, limits, strict_reference).
        request_id: the id of the job the items belong to.
        resolve_lora: maps a request's LoRA path to its canonical source, raising `ApiError`
            (`LORA_SOURCE_FORBIDDEN`, `LORA_NOT_FOUND`, ...) for one that cannot be used.

    Returns:
        One work item per prompt, in prompt order.

    Raises:
        ApiError: with the contract code of the first rule broken.
    """
    _check_model(request, args)
    _check_request_limits(request, args)
    loras = _lora_uses(request, args, resolve_lora)
    items = [_work_item(request, prompt, i, loras, args, request_id) for i, prompt in enumerate(request.prompts)]
    _check_work(items, args)
    return items


def _check_model(request: InferenceRequest, args: AppArgs) -> None:
    if request.model != args.model.id:
        raise ApiError(
            errors.MODEL_NOT_FOUND,
            f"model {request.model!r} is not served here; available: {[args.model.id]}",
            {"model": request.model, "available": [args.model.id]},
        )


def _limit_error(name: str, limit: int, value: int, where: str) -> ApiError:
    return ApiError(
        errors.LIMIT_EXCEEDED,
        f"{where}: {value} exceeds the limit {name}={limit}",
        {"limit": name, "max": limit, "value": value, "field": where},
    )


def _check_request_limits(request: InferenceRequest, args: AppArgs) -> None:
    limits = args.limits
    if len(request.prompts) > limits.max_prompts_per_request:
        raise _limit_error("max_prompts_per_request", limits.max_prompts_per_request, len(request.prompts), "prompts")
    for i, p in enumerate(request.prompts):
        if len(p.prompt) > limits.max_prompt_chars:
            raise _limit_error("max_prompt_chars", limits.max_prompt_chars, len(p.prompt), f"prompts[{i}].prompt")
    if len(request.loras) > limits.max_loras_per_request:
        raise _limit_error("max_loras_per_request", limits.max_loras_per_request, len(request.loras), "loras")


def _lora_uses(request: InferenceRequest, args: AppArgs, resolve_lora: Callable[[str], str]) -> tuple[LoraUse, ...]:
    if args.strict_reference and not request.loras:
        raise ApiError(errors.LORA_FILE_REQUIRED, "at least one LoRA is required (strict_reference)", {"field": "loras"})
    if args.strict_reference and len(request.loras) > 1:
        raise ApiError(
            errors.SINGLE_LORA_ONLY,
            f"model {args.model.id!r} takes a single LoRA (strict_reference); got {len(request.loras)}",
            {"field": "loras", "count": len(request.loras)},
        )
    uses: list[LoraUse] = []
    for i, item in enumerate(request.loras):
        source = resolve_lora(item.path)
        if any(u.source == source for u in uses):
            raise ApiError(
                errors.VALIDATION_ERROR,
                f"loras[{i}].path names a LoRA already listed: {item.path!r}",
                {"errors": [{"loc": ["body", "loras", i, "path"], "msg": "listed twice", "type": "duplicate"}]},
            )
        multiplier = DEFAULT_MULTIPLIER if item.network_multiplier is None else float(item.network_multiplier)
        uses.append(LoraUse(source=source, multiplier=multiplier))
    return tuple(uses)


def _work_item(
    request: InferenceRequest,
    p: PromptItem,
    index: int,
    loras: tuple[LoraUse, ...],
    args: AppArgs,
    request_id: str,
) -> WorkItem:
    width = floor_to_divisor(DEFAULT_SIZE if p.width is None else p.width)
    height = floor_to_divisor(DEFAULT_SIZE if p.height is None else p.height)
    steps = args.model.default_steps if p.sample_steps is None else p.sample_steps
    guidance = args.model.default_guidance_scale if p.guidance_scale is None else float(p.guidance_scale)
    key = ShapeKey(model=request.model, width=width, height=height, steps=steps, guidance=guidance, loras=loras)
    return WorkItem(
        request_id=request_id,
        index=index,
        prompt=apply_trigger(p.prompt, p.trigger_word or request.trigger_word),
        seed=resolve_seed(p.seed, index),
        key=key,
        neg=p.neg or "",
        output_format=request.output_format,
    )


def _check_work(items: list[WorkItem], args: AppArgs) -> None:
    limits = args.limits
    for item in items:
        if item.key.pixels > limits.max_pixels_per_image:
            raise _limit_error(
                "max_pixels_per_image", limits.max_pixels_per_image, item.key.pixels, f"prompts[{item.index}]"
            )
    work = sum(item.key.pixels * item.key.steps for item in items)
    if work > limits.max_work_per_request:
        raise _limit_error("max_work_per_request", limits.max_work_per_request, work, "prompts")


@dataclass(frozen=True)
class ItemResult:
    """The generated image of one work item, encoded, with what the client is told about it."""

    request_id: str
    index: int
    seed: int
    width: int
    height: int
    format: str
    data: bytes = field(repr=False)
    seconds: float = 0.0
    lora_modules: tuple[tuple[str, int], ...] = ()  # (source, matched module count)
