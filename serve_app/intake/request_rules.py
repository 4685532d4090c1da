"""Request → work items: every rule of docs/api.md, docs/models.md past the schema, as one pure function.

`build_work_items` returns one work item per prompt or raises an `ApiError` with its code. For a
reference model it applies the reference's rules (docs/models.md): the model,
operator limits, trigger word, floor to 16, defaults and seeds. For a preview model it applies
ai-toolkit's (preview_flags): `[name]` and `[trigger]`, prompt flags, sizes floored to 8 then 16,
one LoRA, and the merge-or-hook choice made per request. No Ray, no torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pydantic import ValidationError

from serve_app import errors
from serve_app.config import AppArgs, ModelArgs
from serve_app.errors import ApiError, validation_error
from serve_app.intake.preview_flags import PromptFlagError, choose_lora_mode, resolve_preview_settings
from serve_app.loras.hub import SCHEME as HF_SCHEME
from serve_app.loras.hub import HfToken
from serve_app.schemas import (
    DEFAULT_MULTIPLIER,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    RESOLUTION_DIVISOR,
    InferenceRequest,
    LoraItem,
    PreviewRequest,
    PromptItem,
)
from serve_app.states import LoraMode
from serve_app.workitems import BatchKey, LoraUse, WorkItem

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
    if model.is_preview:
        items = _preview_items(request, loras, model, request_id)
    else:
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


def limit_error(name: str, limit: int, value: int, where: str) -> ApiError:
    return ApiError(
        errors.LIMIT_EXCEEDED,
        f"{where}: {value} exceeds the limit {name}={limit}",
        {"limit": name, "max": limit, "value": value, "field": where},
    )


def _check_request_limits(request: InferenceRequest, args: AppArgs) -> None:
    limits = args.limits
    if len(request.prompts) > limits.max_prompts_per_request:
        raise limit_error("max_prompts_per_request", limits.max_prompts_per_request, len(request.prompts), "prompts")
    for i, p in enumerate(request.prompts):
        if len(p.prompt) > limits.max_prompt_chars:
            raise limit_error("max_prompt_chars", limits.max_prompt_chars, len(p.prompt), f"prompts[{i}].prompt")
    if len(request.loras) > limits.max_loras_per_request:
        raise limit_error("max_loras_per_request", limits.max_loras_per_request, len(request.loras), "loras")


def _lora_uses(
    request: InferenceRequest, model: ModelArgs, args: AppArgs, resolve_lora: Callable[[str], str]
) -> tuple[LoraUse, ...]:
    if args.strict_reference and not request.loras:
        raise ApiError(errors.LORA_FILE_REQUIRED, "at least one LoRA is required (strict_reference)",
                       {"field": "loras"})
    if (args.strict_reference or model.is_preview) and len(request.loras) > 1:
        why = "a preview is of one LoRA file" if model.is_preview else "strict_reference"
        raise ApiError(
            errors.SINGLE_LORA_ONLY,
            f"model {model.id!r} takes a single LoRA ({why}); got {len(request.loras)}",
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


def _preview_items(
    request: InferenceRequest, loras: tuple[LoraUse, ...], model: ModelArgs, request_id: str
) -> list[WorkItem]:
    """A preview model's items: each prompt as ai-toolkit's sample() and GenerateImageConfig read it."""
    settings = [_preview_settings(request, p, i, loras, model) for i, p in enumerate(request.prompts)]
    # ai-toolkit merges the LoRA for a whole grid when unquantized and every image has one multiplier.
    mode = choose_lora_mode(model.quantize, [s.multiplier for s in settings]) if loras else LoraMode.UNSET
    items = []
    for i, (p, s) in enumerate(zip(request.prompts, settings)):
        uses = tuple(LoraUse(u.source, s.multiplier, u.token_digest) for u in loras)
        key = BatchKey(model=model.id, width=s.width, height=s.height, steps=s.steps, guidance=s.guidance,
                       loras=uses, lora_mode=mode)
        items.append(WorkItem(request_id=request_id, index=i, prompt=s.prompt, seed=s.seed, key=key,
                              neg=p.neg or "", output_format=request.output_format))
    return items


def _preview_settings(request: InferenceRequest, p: PromptItem, index: int, loras: tuple[LoraUse, ...],
                      model: ModelArgs):
    multiplier = p.network_multiplier if p.network_multiplier is not None else (
        loras[0].multiplier if loras else DEFAULT_MULTIPLIER)
    try:
        return resolve_preview_settings(
            p.prompt,
            width=DEFAULT_SIZE if p.width is None else p.width,
            height=DEFAULT_SIZE if p.height is None else p.height,
            steps=model.default_steps if p.sample_steps is None else p.sample_steps,
            guidance=model.default_guidance_scale if p.guidance_scale is None else float(p.guidance_scale),
            seed=resolve_seed(p.seed, index),
            multiplier=multiplier,
            trigger_word=p.trigger_word if p.trigger_word is not None else request.trigger_word,
            job_name=request.job_name,
        )
    except PromptFlagError as exc:  # a flag's value is checked like the field it overrides
        raise validation_error(["body", "prompts", index, exc.field],
                               f"the prompt's --{exc.flag} {exc.value!r} {exc.reason}") from None
    except ValueError as exc:  # a job name that breaks ai-toolkit's config text
        raise validation_error(["body", "job_name"], str(exc)) from None


def preview_request(preview: PreviewRequest) -> InferenceRequest:
    """A training run's sample grid (`POST /v1/previews`) as one request to a preview model.

    As ai-toolkit's `sample()`: each prompt (or `samples` entry) at the section's size, steps,
    guidance and multiplier, seeded `seed` for all, or `seed + i` with `walk_seed`; a `samples`
    entry's own values win, and a prompt's flags win over both (GenerateImageConfig).
    """
    section = preview.sample
    entries = [{"prompt": text} for text in section.prompts] + [
        sample.model_dump(exclude_none=True) for sample in section.samples]
    neg = section.neg if isinstance(section.neg, str) else ""
    prompts = []
    for i, entry in enumerate(entries):
        seed = section.seed + i if section.walk_seed else section.seed
        fields = {"width": section.width, "height": section.height, "sample_steps": section.sample_steps,
                  "guidance_scale": section.guidance_scale, "neg": neg,
                  "network_multiplier": section.network_multiplier, "seed": seed, **entry}
        try:
            prompts.append(PromptItem.model_validate(fields))
        except ValidationError as exc:  # only a walked seed can leave the bounds its section was checked to
            problem = exc.errors()[0]
            raise validation_error(["body", "sample", "seed"], f"sample {i}: {problem['msg']}") from None
    loras = [LoraItem(path=preview.lora, network_multiplier=section.network_multiplier)] if preview.lora else []
    return InferenceRequest(model=preview.model, trigger_word=preview.trigger_word, job_name=preview.job_name,
                            prompts=prompts, loras=loras, output_format=preview.output_format,
                            hf_token=preview.hf_token)


def _check_work(items: list[WorkItem], args: AppArgs) -> None:
    limits = args.limits
    for item in items:
        if item.key.pixels > limits.max_pixels_per_image:
            raise limit_error(
                "max_pixels_per_image", limits.max_pixels_per_image, item.key.pixels, f"prompts[{item.index}]"
            )
    work = sum(item.key.pixels * item.key.steps for item in items)
    if work > limits.max_work_per_request:
        raise limit_error("max_work_per_request", limits.max_work_per_request, work, "prompts")
