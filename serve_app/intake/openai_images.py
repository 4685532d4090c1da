"""The OpenAI Images API as our own request: `POST /v1/images/generations` becomes the request of
`POST /v1/generate` (docs/api.md#openai-images-api), so every rule, limit and error past this point is that
route's own.

`n` images of one prompt become `n` prompts, image i seeded `seed + i` (the reference's default seeds are
`42 + i` the same way); `size` becomes each prompt's width and height. A value out of a prompt's bounds is
reported under the OpenAI field's name. No Ray, no torch.
"""

from __future__ import annotations

from pydantic import ValidationError

from serve_app.config import AppArgs
from serve_app.errors import validation_error
from serve_app.intake.request_rules import apply_trigger, limit_error
from serve_app.schemas import ImageInfo, ImagesRequest, InferenceRequest, PromptItem

# A prompt's field -> the Images API field it came from, to name it in an error.
_OPENAI_FIELDS = {"width": "size", "height": "size", "seed": "seed", "sample_steps": "num_inference_steps",
                  "guidance_scale": "guidance_scale"}


def image_size(size: str | None) -> tuple[int | None, int | None]:
    """`WIDTHxHEIGHT` as (width, height); absent or `auto` leaves both to the default (the schema checked the form)."""
    if size is None or size == "auto":
        return None, None
    width, height = size.split("x")
    return int(width), int(height)


def inference_request(body: ImagesRequest, args: AppArgs) -> InferenceRequest:
    """The /v1/generate request that draws what `body` asks for.

    Raises:
        ApiError: LIMIT_EXCEEDED for `n` over limits.max_prompts_per_request (checked before `n` prompts are
            built); VALIDATION_ERROR for a size, seed, steps or guidance out of a prompt's bounds.
    """
    limit = args.limits.max_prompts_per_request
    if body.n > limit:
        raise limit_error("max_prompts_per_request", limit, body.n, "n")
    width, height = image_size(body.size)
    try:
        prompts = [
            PromptItem(prompt=body.prompt, width=width, height=height,
                       seed=body.seed if body.seed == -1 else body.seed + i,  # -1: each image draws its own
                       sample_steps=body.num_inference_steps, guidance_scale=body.guidance_scale)
            for i in range(body.n)
        ]
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = _OPENAI_FIELDS.get(str(problem["loc"][0]), str(problem["loc"][0]))
        raise validation_error(["body", field], problem["msg"]) from None
    return InferenceRequest(model=body.model, trigger_word=body.trigger_word, prompts=prompts, loras=body.loras,
                            output_format=body.output_format)


def revised_prompt(body: ImagesRequest, image: ImageInfo) -> str | None:
    """The prompt that drew the image when it is not the one sent (OpenAI's `revised_prompt`), else None: after
    the trigger word, or what a preview model made of it (its flags and `[name]`)."""
    used = image.effective.prompt if image.effective is not None else apply_trigger(body.prompt, body.trigger_word)
    return used if used != body.prompt else None
