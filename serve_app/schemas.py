"""The HTTP contract: request, response and error models (docs/api.md).

Request models ignore unknown fields, as the reference server does, so a client written for it
keeps working. Bounds live here and only here; limits that an operator sets (prompts per request,
prompt length, pixels) live in `config.Limits` and are checked in `workitems.build_work_items`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve_app.config import ModelKind
from serve_app.net.url_policy import UrlRefused, split_url
from serve_app.states import JobStatus, LoraMode

MAX_SEED = 2**64 - 1
# The API's own defaults (the reference's). Steps and guidance default per model: GET /v1/models.
DEFAULT_SIZE = 1024
DEFAULT_SEED = 42  # plus the prompt's index
DEFAULT_MULTIPLIER = 1.0
RESOLUTION_DIVISOR = 16
OutputFormat = Literal["jpeg", "png", "webp"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _unicode_text(value: str) -> str:
    """Refuse lone surrogates: JSON can escape one (`"\\ud800"`), but no UTF-8 text holds it, so it
    could be neither tokenized nor echoed back in an error body (found by tests/unit/web/test_fuzz.py)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


def _http_url(value: str) -> str:
    """A webhook URL must be one we would send as it is: http(s), a host, no credentials (url_policy)."""
    try:
        split_url(value)
    except UrlRefused as exc:
        raise ValueError(f"not a usable http(s) URL: {exc.reason}") from None
    return value


WebhookUrl = Annotated[str, Field(max_length=2048), AfterValidator(_http_url)]


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class LoraItem(_Request):
    path: Text = Field(min_length=1, description="Path under the LoRA root, http(s):// URL, hf://owner/repo/file or s3://bucket/key")
    network_multiplier: float | None = Field(
        None, ge=-2.0, le=2.0, description=f"LoRA scale; default {DEFAULT_MULTIPLIER}. 0 gives the base model's image."
    )

    _check_multiplier = field_validator("network_multiplier")(_finite)


class PromptItem(_Request):
    prompt: Text = Field(description="The text; `[trigger]` is replaced by the trigger word")
    trigger_word: Text | None = Field(None, description="Overrides the request's trigger_word for this prompt")
    width: int | None = Field(
        None, ge=64, le=4096, description=f"Default {DEFAULT_SIZE}; floored to a multiple of {RESOLUTION_DIVISOR}"
    )
    height: int | None = Field(
        None, ge=64, le=4096, description=f"Default {DEFAULT_SIZE}; floored to a multiple of {RESOLUTION_DIVISOR}"
    )
    seed: int | None = Field(
        None, ge=-1, le=MAX_SEED, description=f"Default {DEFAULT_SEED} + prompt index; -1 draws one"
    )
    sample_steps: int | None = Field(None, ge=1, le=150, description="Denoising steps; default: the model's")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=20.0, description="FLUX distilled guidance (not CFG); default: the model's"
    )
    neg: Text | None = Field(None, description="Accepted; no effect on FLUX.1-dev, as in the reference")
    network_multiplier: float | None = Field(
        None, ge=-2.0, le=2.0,
        description="Preview models: this prompt's LoRA multiplier (a sample's own), over the LoRA's; "
        "a `--m` flag overrides it. Ignored by reference models.",
    )

    _check_guidance = field_validator("guidance_scale")(_finite)
    _check_multiplier = field_validator("network_multiplier")(_finite)


class InferenceRequest(_Request):
    model: Text = Field(description="A configured model id, e.g. `flux`")
    trigger_word: Text | None = Field(None, description="Replaces `[trigger]` in every prompt")
    prompts: list[PromptItem] = Field(min_length=1, description="One image per prompt, in order")
    loras: list[LoraItem] = Field(default_factory=list, description="Empty or absent: the base model")
    output_format: OutputFormat = Field("jpeg", description="Image encoding; JPEG quality 95 as the reference")
    hf_token: SecretStr | None = Field(
        None, description="The reference's field: a Hugging Face token for this request's hf:// LoRAs only; "
        "never logged, echoed or stored with the job"
    )
    job_name: Text | None = Field(
        None, max_length=256, description="Preview models: the training job's name, for `[name]` in prompts"
    )
    webhook_url: WebhookUrl | None = Field(
        None,
        description="Async requests only (POST /v1/inference): where the result is POSTed, signed, when the job "
        "ends; its host must be in the server's webhooks.allowed_hosts",
    )

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "flux",
                    "trigger_word": "sks",
                    "prompts": [
                        {"prompt": "[trigger] a photo of a person", "width": 1024, "height": 1024,
                         "seed": 42, "sample_steps": 25, "guidance_scale": 4.0, "neg": ""}
                    ],
                    "loras": [{"path": "demo/demo_lora.safetensors", "network_multiplier": 1.0}],
                }
            ]
        },
    )


# ---- responses ---------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class SubmitResponse(BaseModel):
    request_id: str
    status: Literal["queued"] = "queued"
    status_url: str
    result_url: str
    created_at: str


class JobProgress(BaseModel):
    images_done: int = Field(description="Images of the job finished so far")
    images: int = Field(description="Images the job makes (one per prompt)")
    step: int = Field(description="Denoising steps done by the running image furthest along (0 when none runs)")
    steps: int = Field(description="Denoising steps of that image")


class WebhookStatus(BaseModel):
    delivered: bool = Field(description="The receiver answered 2xx")
    attempts: int = Field(description="Deliveries tried so far")
    last_error: str | None = Field(None, description="Why the last attempt failed; null once delivered")


class StatusResponse(BaseModel):
    request_id: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    error_code: str | None = None
    progress: JobProgress | None = Field(None, description="Updated as the pipeline steps")
    webhook: WebhookStatus | None = Field(None, description="Only when the request gave a webhook_url")


class EffectiveSettings(BaseModel):
    """What a preview model ran for one image, after ai-toolkit's prompt flags and size floors."""

    prompt: str = Field(description="The prompt after the trigger word, `[name]` and the prompt's flags")
    width: int = Field(description="The image's width as drawn (ai-toolkit's floor to 8, then the pipeline's to 16)")
    height: int = Field(description="The image's height as drawn")
    steps: int = Field(description="Denoising steps")
    guidance: float = Field(description="Guidance scale")
    seed: int
    multiplier: float | None = Field(description="The LoRA's multiplier; null for the base model")


class ImageInfo(BaseModel):
    index: int
    format: OutputFormat
    width: int = Field(description=f"Effective width (floored to {RESOLUTION_DIVISOR})")
    height: int = Field(description=f"Effective height (floored to {RESOLUTION_DIVISOR})")
    seed: int = Field(description="The seed used (drawn when the request said -1)")
    effective: EffectiveSettings | None = Field(None, description="Preview models: the settings that ran")
    lora_mode: LoraMode | None = Field(
        None, description="Preview models: `merged`, `hook`, or `none` without a LoRA"
    )


class ImageOutput(ImageInfo):
    url: str = Field(description="Where to download the file")


class InlineImage(ImageInfo):
    data: str = Field(description="Base64 of the file bytes, no data: prefix")


class LoraReport(BaseModel):
    path: str = Field(description="As the request gave it")
    network_multiplier: float
    matched_modules: int | None = Field(None, description="Model modules the file wrapped (once it has loaded)")


class ResultMetadata(BaseModel):
    model: str
    base_model: str
    loras: list[LoraReport] = Field(default_factory=list)
    inference_time: float | None = Field(None, description="Seconds from the start of work to the end")
    speed_tier: str | None = Field(None, description="exact, compiled or fp8: the model's tier that drew the images")
    lora_mode: LoraMode | None = Field(
        None, description="peft (separate adapters) or slot (the compiled tiers' LoRA slot)"
    )


class ImageOutputs(BaseModel):
    images: list[ImageOutput]
    videos: list[Any] = Field(default_factory=list, description="Always empty (the reference's field)")


class ResultResponse(BaseModel):
    request_id: str
    status: JobStatus
    outputs: ImageOutputs | None = None
    error: str | None = None
    error_code: str | None = None
    created_at: str
    finished_at: str | None = None
    metadata: ResultMetadata


class GenerateResponse(BaseModel):
    request_id: str
    status: Literal[JobStatus.SUCCEEDED] = JobStatus.SUCCEEDED
    images: list[InlineImage]
    metadata: ResultMetadata


class ModelCard(BaseModel):
    id: str
    kind: ModelKind = Field(
        description="`reference`: the reference server's pipeline; `preview`: ai-toolkit's training previews"
    )
    description: str
    base_model: str
    resolution_divisor: int
    default_width: int = Field(description="width when a prompt gives none")
    default_height: int = Field(description="height when a prompt gives none")
    default_steps: int
    default_guidance_scale: float


class ModelList(BaseModel):
    models: list[ModelCard]


class LoraFileInfo(BaseModel):
    path: str = Field(description="the name to send in `loras[].path`: relative to the LoRA root, '/'-separated")
    size_bytes: int


class LoraList(BaseModel):
    loras: list[LoraFileInfo] = Field(description="sorted by `path`")
    truncated: bool = Field(
        description="the root holds more files than one answer lists: these are the first by `path`"
    )


class SampleItem(_Request):
    """One entry of an ai-toolkit `sample.samples` list: a prompt and its own settings."""

    prompt: Text
    width: int | None = Field(None, ge=64, le=4096)
    height: int | None = Field(None, ge=64, le=4096)
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    network_multiplier: float | None = Field(None, ge=-2.0, le=2.0)
    neg: Text | None = None

    _check_multiplier = field_validator("network_multiplier")(_finite)


class SampleSection(_Request):
    """The `sample:` section of an ai-toolkit job config, with ai-toolkit's own defaults (SampleConfig).

    Either form works: `prompts` (texts) or `samples` (entries with their own settings). Keys that
    change nothing here (sampler, sample_every, format...) are ignored.
    """

    prompts: list[Text] = Field(default_factory=list)
    samples: list[SampleItem] = Field(default_factory=list)
    width: int = Field(512, ge=64, le=4096)
    height: int = Field(512, ge=64, le=4096)
    seed: int = Field(0, ge=-1, le=MAX_SEED)
    walk_seed: bool = Field(False, description="The i-th image's seed is seed + i")
    guidance_scale: float = Field(7.0, ge=0.0, le=20.0)
    sample_steps: int = Field(20, ge=1, le=150)
    neg: Text | bool = Field("", description="Negative prompt (no effect on FLUX.1-dev)")
    network_multiplier: float = Field(1.0, ge=-2.0, le=2.0)

    _check_guidance = field_validator("guidance_scale")(_finite)
    _check_multiplier = field_validator("network_multiplier")(_finite)

    @model_validator(mode="after")
    def _has_prompts(self) -> SampleSection:
        if not self.prompts and not self.samples:
            raise ValueError("the sample section needs `prompts` or `samples`")
        return self


class PreviewRequest(_Request):
    """Reproduce a training run's sample grid: `POST /v1/previews` (an async job, one image per sample)."""

    model: Text = Field(description="A preview model: `flux-preview` (quantize: true) or `flux-preview-bf16`")
    lora: Text | None = Field(
        None, description="The LoRA: a root-relative path, URL, hf:// or s3://; none: the base model"
    )
    trigger_word: Text | None = Field(None, description="The job's trigger_word")
    job_name: Text | None = Field(None, max_length=256, description="The job's name, for `[name]`")
    sample: SampleSection
    output_format: OutputFormat = "jpeg"
    hf_token: SecretStr | None = Field(None, description="As in /v1/inference")


class ModelHealth(BaseModel):
    state: Literal["ready", "scaled_to_zero", "starting", "unavailable"] = Field(
        description="`scaled_to_zero`: no replica, by its autoscaling (not an error; a request wakes it)"
    )
    replicas: int = Field(description="Replicas running")


class HealthResponse(BaseModel):
    status: Literal["healthy", "unhealthy"]
    models: dict[str, ModelHealth] = Field(default_factory=dict)
    unavailable: list[str] = Field(default_factory=list, description="Models (or `jobs`) that do not answer")
    causes: dict[str, str] = Field(
        default_factory=dict, description="Why an entry of `unavailable` is, where the probe can tell (e.g. `jobs`: "
        "the job store is held by another server)"
    )


# ---- the OpenAI Images API (POST /v1/images/generations) ---------------------------------

_SIZE_FORM = re.compile(r"[0-9]{1,6}x[0-9]{1,6}")


def _image_size(value: str) -> str:
    """The form of an Images API size; its bounds are a prompt's width and height (intake/openai_images.py)."""
    if value != "auto" and not _SIZE_FORM.fullmatch(value):
        raise ValueError("must be WIDTHxHEIGHT (e.g. 1024x768) or auto")
    return value


ImageSize = Annotated[str, AfterValidator(_image_size)]
# The fields whose `null` means their default, as the Images API reads it.
_OPENAI_DEFAULTED = ("n", "response_format", "output_format", "seed", "loras")


class ImagesRequest(_Request):
    """An OpenAI Images API request, plus our extensions (the official SDK sends those in `extra_body`).

    It runs as the /v1/generate request `intake/openai_images.py` makes of it: `n` prompts, image i seeded
    `seed + i`; steps, guidance and the size are checked against that request's bounds there. The Images API
    fields we accept and ignore are not declared: like every request model here, it ignores unknown fields
    (quality, style, background, moderation, output_compression, user, partial_images, stream...).
    """

    model: Text = Field(description="A configured model id (GET /v1/models), e.g. `flux`")
    prompt: Text = Field(description="The text; `[trigger]` is replaced by `trigger_word`")
    n: int = Field(1, ge=1, description="Images to draw, up to the server's limits.max_prompts_per_request")
    size: ImageSize | None = Field(
        None, examples=["1024x1024", "768x1344", "auto"],
        description=f"`WIDTHxHEIGHT`, each 64..4096, floored to a multiple of {RESOLUTION_DIVISOR}; "
        f"absent or `auto`: {DEFAULT_SIZE}x{DEFAULT_SIZE}",
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="`url`: the images are kept as an async job's and the answer gives their URLs"
    )
    output_format: OutputFormat = Field("png", description="Image encoding (JPEG quality 95, WebP lossless)")
    # Extensions (extra_body): the fields of /v1/generate's request under their diffusers names.
    seed: int = Field(DEFAULT_SEED, description="Image i uses seed + i; -1 draws one per image")
    num_inference_steps: int | None = Field(None, description="Denoising steps, 1..150; default: the model's")
    guidance_scale: float | None = Field(None, description="FLUX distilled guidance, 0..20; default: the model's")
    loras: list[LoraItem] = Field(default_factory=list, description="As /v1/generate's `loras`")
    trigger_word: Text | None = Field(None, description="Replaces `[trigger]` in the prompt")

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "flux", "prompt": "[trigger] a photo of a person", "n": 1,
                                         "size": "1024x1024", "trigger_word": "sks", "seed": 42,
                                         "loras": [{"path": "demo/demo_lora.safetensors"}]}]},
    )

    @field_validator(*_OPENAI_DEFAULTED, mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI clients send `null` for a field left unset (e.g. `"n": null`): it means the default."""
        if value is None:
            return cls.model_fields[str(info.field_name)].get_default(call_default_factory=True)
        return value


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="Base64 of the image file (response_format b64_json)")
    url: str | None = Field(None, description="Where to download it (response_format url), while its job is kept")
    revised_prompt: str | None = Field(
        None, description="The prompt that drew the image, when it differs from the one sent (the trigger word)"
    )


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time, in seconds")
    data: list[ImageData]
