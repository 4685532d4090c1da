"""Request → work items: every rule of SPEC section 1 past the schema, as one pure function.

`build_work_items` returns one work item per prompt or raises an `ApiError` with its code. It
applies the reference's rules (notes/reference.md sections 1-2): the model, operator limits,
trigger word, floor to 16, defaults and seeds. No Ray, no torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from serve_app import errors
from serve_app.config import AppArgs, ModelArgs
from serve_app.engine.hf_sources import SCHEME as HF_SCHEME
from serve_app.engine.hf_sources import HfToken
from serve_app.engine.workitems import BatchKey, LoraUse, WorkItem
from serve_app.errors import ApiError, validation_error
from serve_app.schemas import (
    DEFAULT_MULTIPLIER,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    RESOLUTION_DIVISOR,
    InferenceRequest,
    PromptItem,
)

RANDOM_SEED_BOUND = 2**31 - 1  # the reference draws torch.randint(0, 2147483647)

_seed_rng = random.SystemRandom()


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
        args: the application's args (models, limits, strict_reference).
        request_id: the id of the job the items belong to.
        resolve_lora: maps a request's LoRA path to its canonical source, raising `ApiError`
            (`LORA_SOURCE_FORBIDDEN`, `LORA_NOT_FOUND`, ...) for one that cannot be used.

    Returns:
        One work item per prompt, in prompt order.

    Raises:
        ApiError: with the contract code of the first rule broken.
    """
    model = find_model(request.model, args)
    _check_request_limits(request, args)
    loras = _lora_uses(request, model, args, resolve_lora)
    items = [_work_item(request, prompt, i, loras, model, request_id) for i, prompt in enumerate(request.prompts)]
    _check_work(items, args)
    return items


def find_model(model_id: str, args: AppArgs) -> ModelArgs:
    """The configured model a request names, or MODEL_NOT_FOUND listing those served."""
    model = args.model(model_id)
    if model is None:
        available = [m.id for m in args.models]
        raise ApiError(
            errors.MODEL_NOT_FOUND,
            f"model {model_id!r} is not served here; available: {available}",
            {"model": model_id, "available": available},
        )
    return model


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


def _lora_uses(
    request: InferenceRequest, model: ModelArgs, args: AppArgs, resolve_lora: Callable[[str], str]
) -> tuple[LoraUse, ...]:
    if args.strict_reference and not request.loras:
        raise ApiError(errors.LORA_FILE_REQUIRED, "at least one LoRA is required (strict_reference)",
                       {"field": "loras"})
    if args.strict_reference and len(request.loras) > 1:
        raise ApiError(
            errors.SINGLE_LORA_ONLY,
            f"model {model.id!r} takes a single LoRA (strict_reference); got {len(request.loras)}",
            {"field": "loras", "count": len(request.loras)},
        )
    digest = _token_digest(request)
    uses: list[LoraUse] = []
    for i, item in enumerate(request.loras):
        source = resolve_lora(item.path)
        if any(u.source == source for u in uses):
            raise validation_error(["body", "loras", i, "path"], f"names a LoRA already listed: {item.path!r}",
                                   "duplicate")
        multiplier = DEFAULT_MULTIPLIER if item.network_multiplier is None else float(item.network_multiplier)
        token_digest = digest if source.startswith(HF_SCHEME) else ""
        uses.append(LoraUse(source=source, multiplier=multiplier, token_digest=token_digest))
    return tuple(uses)


def _token_digest(request: InferenceRequest) -> str:
    """A short hash of the request's own hf_token ("" without one): what a LoRA's identity holds of it."""
    if request.hf_token is None:
        return ""
    try:
        return HfToken(request.hf_token.get_secret_value()).digest[:16]
    except ValueError as exc:  # its message never holds the token
        raise validation_error(["body", "hf_token"], str(exc)) from None


def request_tokens(request: InferenceRequest, items: list[WorkItem]) -> dict[str, str]:
    """The request's hf_token for each of its LoRAs fetched with it, by LoRA key: what travels beside the
    work items to the generators (and is never stored with a job)."""
    if request.hf_token is None or not items:
        return {}
    token = request.hf_token.get_secret_value()
    return {use.key: token for use in items[0].key.loras if use.token_digest}


def _work_item(
    request: InferenceRequest,
    p: PromptItem,
    index: int,
    loras: tuple[LoraUse, ...],
    model: ModelArgs,
    request_id: str,
) -> WorkItem:
    width = floor_to_divisor(DEFAULT_SIZE if p.width is None else p.width)
    height = floor_to_divisor(DEFAULT_SIZE if p.height is None else p.height)
    steps = model.default_steps if p.sample_steps is None else p.sample_steps
    guidance = model.default_guidance_scale if p.guidance_scale is None else float(p.guidance_scale)
    key = BatchKey(model=model.id, width=width, height=height, steps=steps, guidance=guidance, loras=loras)
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
