"""AppArgs: the typed `args` of a Serve config YAML (one pydantic model, validated at start).

Config models forbid unknown fields, so a typo in a YAML fails `serve run` with the field's name
instead of being ignored. Defaults live only here.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from serve_app.net.url_policy import check_host_entry

TINY_SOURCE = "tiny"
DEMO_LORA = "demo/demo_lora.safetensors"  # under the LoRA root: the built-in small model's demo LoRA
GENERATOR_PREFIX = "FluxGenerator-"
JOBS_DEPLOYMENT = "FluxJobs"  # generators look it up by name to report progress

# A model id names its generator deployment (`FluxGenerator-<id>`), so it keeps to characters that
# every part of Serve and Prometheus takes as they are (Serve reserves '#').
ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# `module.path:attribute`
ImportPath = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
# An entry of any `allowed_hosts` list: `.domain`, `name`, `name:port`, `IPv4[:port]`, `[IPv6][:port]` or a
# bare IPv6, checked by the one parser the policy itself uses (net/url_policy.py).
HostEntry = Annotated[str, AfterValidator(check_host_entry)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchSettings(StrictModel):
    """How a generator replica batches work items. Also the generator deployment's `user_config`:
    a YAML may override any of these per deployment, and `serve deploy` applies that live."""

    max_batch_size: PositiveInt = Field(4, description="Work items one batch may hold (Serve's @serve.batch)")
    batch_wait_timeout_s: NonNegativeFloat = Field(
        0.0, description="How long a batch waits to fill; 0: a lone request starts at once"
    )
    # A call holds max(1, pixel_budget // (width·height)) images. The default is the CPU measurement
    # of bench/results/batching.md (three runs): per image, a call of 4 at 256² costs 0.92-1.02× of
    # single calls and 128² gains 16-41%, while 512² loses in twos (1.08-1.15×) and fours
    # (1.18-1.31×), 1024² in twos 1.02-1.28×: so 256² and smaller batch, 512² and larger run alone.
    pixel_budget: PositiveInt = Field(
        256 * 256 * 4, description="Pixels one pipeline call may hold; larger images run alone"
    )

    def updated(self, user_config: dict) -> BatchSettings:
        """These settings with a deployment's `user_config` over them; an unknown key is an error that names it."""
        return BatchSettings.model_validate({**self.model_dump(), **user_config})


SpeedTier = Literal["exact", "compiled", "fp8"]

# diffusers' attention dispatcher names that run offline (no Hub kernel download) plus `auto`.
AttentionBackend = Literal[
    "auto", "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flash", "_flash_3", "sage"
]


class WarmupShape(StrictModel):
    """One call shape compiled before the replica reports healthy."""

    width: PositiveInt = Field(1024, multiple_of=16)
    height: PositiveInt = Field(1024, multiple_of=16)
    batch: PositiveInt = 1


class FastPathArgs(StrictModel):
    """Settings of the `compiled` and `fp8` speed tiers (a model's `fast_path`); `exact` ignores them."""

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
    adapter_device_bytes: NonNegativeInt = Field(
        4 * 2**30,
        description="bytes of converted LoRA weights kept on the GPU; the rest wait in pinned host memory",
    )


class ModelKind(StrEnum):
    """What a model runs: the reference server's pipeline, or ai-toolkit's training preview of a LoRA."""

    REFERENCE = "reference"
    PREVIEW = "preview"


class ModelArgs(StrictModel):
    """One served model: its own generator deployment, `FluxGenerator-<id>`."""

    id: ModelId = Field("flux", description="The `model` value clients send; names the deployment")
    kind: ModelKind = Field(
        ModelKind.REFERENCE,
        description="`reference`: diffusers' FluxPipeline called as the reference server calls it; `preview`: "
        "ai-toolkit's training preview of a LoRA (its prompt flags, bf16, LoRA merged or as an fp32 branch)",
    )
    description: str = Field("FLUX.1-dev as the reference server runs it", description="One line for GET /v1/models")
    source: str = Field(
        TINY_SOURCE,
        description="`tiny` (the built-in small model), a Hugging Face repo id, or a local diffusers directory",
    )
    base_model: str = Field("black-forest-labs/FLUX.1-dev", description="Reported by GET /v1/models")
    revision: str | None = Field(None, description="Hugging Face revision of `source`")
    default_steps: PositiveInt = Field(25, description="sample_steps when a prompt gives none")
    default_guidance_scale: float = Field(4.0, ge=0, le=20, description="guidance_scale when a prompt gives none")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when there is one")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bf16 on CUDA, fp32 on CPU, as the reference; speed fp8 and preview models "
        "run bf16 only (auto or bfloat16)"
    )
    torch_threads: PositiveInt | None = Field(
        None, description="torch intra-op threads of a replica; unset: Ray's choice (the replica's num_cpus)"
    )
    batching: BatchSettings = Field(default_factory=BatchSettings)
    max_adapters_per_replica: PositiveInt | None = Field(
        None, description="LoRA sets each replica of this model keeps loaded (LRU); unset: "
        "loras.max_adapters_per_replica. Per model because memory per adapter set differs by model"
    )
    speed: SpeedTier = Field(
        "exact", description="exact: eager, PEFT adapters, the reference's pixels; compiled: torch.compile and "
        "a compile-stable LoRA slot; fp8: compiled with fp8 Linears (CUDA compute capability >= 8.9)"
    )
    fast_path: FastPathArgs = Field(default_factory=FastPathArgs, description="Settings of compiled and fp8")
    quantize: bool = Field(
        True, description="Preview models: ai-toolkit's `quantize` (qfloat8 transformer and T5, the trainer UI's "
        "default); false previews an unquantized bf16 run"
    )
    engine: ImportPath | None = Field(
        None, description="Test only: `module:Class` built in place of the kind's engine (its `from_args(model)`)"
    )

    @property
    def deployment_name(self) -> str:
        return GENERATOR_PREFIX + self.id

    @property
    def is_preview(self) -> bool:
        """ai-toolkit's training preview (`kind: preview`), not the reference pipeline: the one place the
        kind is read."""
        return self.kind == ModelKind.PREVIEW

    @model_validator(mode="after")
    def _settings_fit_the_kind(self) -> ModelArgs:
        """A setting only the other kind reads is refused, naming it, never ignored or patched: a preview
        reproduces ai-toolkit's path (exact, loaded its own way), and only a preview reads `quantize`."""
        if self.is_preview:
            misfits = {
                "speed": self.speed != "exact",
                "fast_path": self.fast_path != FastPathArgs(),
                "revision": self.revision is not None,
            }
            why = "a preview reproduces ai-toolkit's path: speed exact, no fast_path, no revision (leave them unset)"
        else:
            misfits = {"quantize": not self.quantize}
            why = "quantize is ai-toolkit's setting, read by preview models only (leave it unset)"
        fields = [name for name, misfit in misfits.items() if misfit]
        if fields:
            verb = "does" if len(fields) == 1 else "do"
            raise ValueError(f"model {self.id!r}: {', '.join(fields)} {verb} not fit kind {self.kind.value!r}; {why}")
        return self

    @model_validator(mode="after")
    def _dtype_fits_the_engine(self) -> ModelArgs:
        # torchao's row-wise fp8 takes bf16 activations; a preview runs ai-toolkit's bf16 on every device.
        bf16_only = "speed 'fp8'" if self.speed == "fp8" else "kind 'preview'" if self.is_preview else None
        if bf16_only and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(
                f"model {self.id!r}: dtype {self.dtype!r} cannot run with {bf16_only}, which runs bfloat16 only; "
                "set dtype to auto or bfloat16"
            )
        return self


class Limits(StrictModel):
    max_prompts_per_request: PositiveInt = Field(16, description="Prompts (images) in one request")
    max_prompt_chars: PositiveInt = Field(4000, description="Characters in one prompt")
    max_pixels_per_image: PositiveInt = Field(4096 * 4096, description="width × height after flooring to 16")
    max_work_per_request: PositiveInt = Field(
        16 * 1024 * 1024 * 50, description="Sum over prompts of width × height × steps"
    )
    max_loras_per_request: PositiveInt = Field(4, description="LoRAs stacked in one request")
    max_body_bytes: PositiveInt = Field(1_000_000, description="Request body size (413 above)")
    max_pending_jobs: PositiveInt = Field(1000, description="Async jobs not yet finished (503 OVERLOADED above)")
    max_pending_items: PositiveInt = Field(4096, description="Work items of unfinished async jobs (503 above)")
    max_sync_items_per_ingress: PositiveInt = Field(
        256, description="Work items of /v1/generate calls in flight per ingress replica (503 above)"
    )
    retry_after_s: PositiveInt = Field(5, description="Retry-After of a 503 OVERLOADED")


class AuthArgs(StrictModel):
    """An optional API key. The key itself never sits in the YAML: it comes from an environment
    variable or a secret file that the YAML names. Off when neither is set."""

    api_key_env: str | None = Field(None, description="Name of the environment variable holding the key")
    api_key_file: str | None = Field(None, description="Path of a file holding the key")


class LoraArgs(StrictModel):
    root: str = Field(".flux-serve/loras", description="Directory relative LoRA paths resolve under")
    cache_dir: str = Field(".flux-serve/lora-cache", description="Disk cache of downloaded LoRA files")
    cache_max_bytes: PositiveInt = Field(20 * 2**30, description="Size cap of the download cache (LRU)")
    max_file_bytes: PositiveInt = Field(2 * 2**30, description="Largest LoRA file accepted")
    # Hugging Face's /resolve/ links redirect to subdomains of huggingface.co and hf.co (the CDN,
    # cas-bridge.xethub.hf.co): every redirect hop must be allowed too, so the defaults hold those.
    allowed_hosts: list[HostEntry] = Field(
        default_factory=lambda: ["huggingface.co", ".huggingface.co", ".hf.co", "civitai.com"],
        description="Hosts http(s):// LoRA URLs and each of their redirects may reach, exactly as spelled: "
        "`name` or `IP` (any port), `name:port` or `IP:port` (that port only), `.domain` (it and its subdomains)",
    )
    allow_private_addresses: bool = Field(
        False, description="Allow downloads from loopback, private and link-local addresses (tests, closed networks)"
    )
    download_timeout_s: PositiveFloat = Field(
        60.0,
        description="Longest wait for a connection or the next bytes; a whole download may take about "
        "this × download_retries plus backoff, however slowly the bytes come",
    )
    download_retries: int = Field(3, ge=1, description="Attempts per download, with backoff")
    download_workers: PositiveInt = Field(4, description="Downloads one process runs at once, on threads of its own")
    failure_ttl_s: float = Field(60.0, ge=60.0, description="Seconds a failed source is answered from memory")
    hf_token_repos: list[str] = Field(
        default_factory=list,
        description="Repos (`owner/name`, or `owner/*`) that may use the server's own HF_TOKEN; none by default",
    )
    hf_enabled: bool = Field(True, description="Allow hf://owner/repo/file sources")
    allowed_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets s3://bucket/key LoRA sources may read, exactly as spelled; empty: s3:// is refused",
    )
    s3_options: dict[str, Any] = Field(
        default_factory=dict,
        description="s3fs options of s3:// sources (e.g. `endpoint_url` of an S3-compatible store, `key`, "
        "`secret`); unset ones come from the node's environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)",
    )
    max_adapters_per_replica: PositiveInt = Field(
        8, description="LoRA sets each generator replica keeps loaded (LRU), unless its model sets its own"
    )
    write_demo: bool = Field(False, description="Write the demo LoRA for the built-in small model on start")

    @field_validator("allowed_buckets")
    @classmethod
    def _buckets_have_s3_names(cls, buckets: list[str]) -> list[str]:
        """S3's naming rules: an entry outside them can never name a bucket, so it is a typo to report at start."""
        for name in buckets:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name) or ".." in name or re.fullmatch(
                r"\d+\.\d+\.\d+\.\d+", name
            ):
                raise ValueError(
                    f"{name!r} is not an S3 bucket name: 3-63 lowercase letters, digits, '.' and '-', starting and "
                    "ending with a letter or digit, no '..', not an IP address"
                )
        return buckets


MEMORY_STORE = "memory"


class JobArgs(StrictModel):
    store: str = Field(
        ".flux-serve/jobs",
        description="Where job records and result images live: a directory (local, or a mount every node "
        "shares), an fsspec URL (`s3://bucket/prefix`, `gs://...`), or `memory` (tests: lost with the replica)",
    )
    store_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options of a URL store (e.g. `client_kwargs.endpoint_url`); credentials "
        "belong in the environment (AWS_ACCESS_KEY_ID, ...), never in the YAML",
    )
    lease_s: PositiveFloat = Field(
        10.0,
        description="How long FluxJobs' hold on the store lasts without renewal: a replacement replica waits "
        "for it when its predecessor died without releasing it",
    )
    max_jobs: PositiveInt = Field(1000, description="Finished jobs kept; the oldest-finished are dropped first")
    ttl_s: PositiveFloat = Field(
        3600.0, description="Seconds a finished job is kept at least, unless max_jobs or the byte cap prunes it"
    )
    max_result_bytes: PositiveInt = Field(
        2 * 2**30, description="Image bytes of finished jobs kept in the store; the oldest-finished are dropped first"
    )
    max_dispatched_items: PositiveInt = Field(
        64, description="Async work items sent to the generators at once; the rest wait `in_queue`"
    )
    timeout_s: PositiveFloat = Field(600.0, description="Seconds a request may take, queueing included")

    @property
    def in_memory(self) -> bool:
        return self.store == MEMORY_STORE

    @property
    def is_directory(self) -> bool:
        return not self.in_memory and "://" not in self.store


class WebhookArgs(StrictModel):
    """Where `webhook_url` may point, and how deliveries are signed and retried (docs/jobs.md)."""

    allowed_hosts: list[HostEntry] = Field(
        default_factory=list,
        description="Hosts a webhook_url may name, exactly as spelled: `name` or `IP` (any port), `name:port` "
        "or `IP:port` (that port only), `.domain` (it and its subdomains); empty: webhooks are refused",
    )
    allow_private_addresses: bool = Field(
        False, description="Allow webhooks to loopback, private and link-local addresses (local use, tests)"
    )
    secret_env: str = Field(
        "FLUX_SERVE_WEBHOOK_SECRET", description="Environment variable holding the signing secret"
    )
    secret_file: str | None = Field(
        None, description="File holding the signing secret, read when the environment variable is unset; "
        "from either, the text with surrounding whitespace stripped is the secret: `whsec_` + base64 (docs/jobs.md)"
    )
    generate_secret: bool = Field(
        False, description="Write a random secret to `secret_file` on start if neither it nor the variable is set"
    )
    max_attempts: int = Field(5, ge=1, le=20, description="Deliveries tried in all; any answer but 2xx is retried")
    backoff_s: PositiveFloat = Field(2.0, description="Wait before the first retry; each next one waits twice as long")
    timeout_s: PositiveFloat = Field(10.0, description="Longest wait for a connection or an answer, per attempt")

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)

    @model_validator(mode="after")
    def _a_generated_secret_has_a_file(self) -> WebhookArgs:
        if self.generate_secret and not self.secret_file:
            raise ValueError("webhooks.generate_secret needs webhooks.secret_file (where to write it)")
        return self


class AppArgs(StrictModel):
    models: list[ModelArgs] = Field(
        default_factory=lambda: [ModelArgs()], min_length=1, description="The models served, one deployment each"
    )
    loras: LoraArgs = Field(default_factory=LoraArgs)
    limits: Limits = Field(default_factory=Limits)
    jobs: JobArgs = Field(default_factory=JobArgs)
    auth: AuthArgs = Field(default_factory=AuthArgs)
    webhooks: WebhookArgs = Field(default_factory=WebhookArgs)
    base_url: str | None = Field(None, description="Prefix for status/result/image URLs; paths if unset")
    cors_origins: list[str] = Field(default_factory=list)
    strict_reference: bool = Field(False, description="Answer SINGLE_LORA_ONLY / LORA_FILE_REQUIRED like the reference")

    @model_validator(mode="after")
    def _model_ids_are_unique(self) -> AppArgs:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"models: each id must be unique; repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _base_url_has_no_trailing_slash(self) -> AppArgs:
        if self.base_url is not None and self.base_url.endswith("/"):
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        return self

    def model(self, model_id: str) -> ModelArgs | None:
        """The configured model of this id, or None."""
        return next((m for m in self.models if m.id == model_id), None)

    def resolved(self, start_dir: str | None = None) -> AppArgs:
        """A copy with local paths (LoRA root and cache, a directory job store, the webhook secret file)
        resolved to absolute paths, once, by the app builder.

        Relative paths are taken against the directory `serve run` starts in, so every replica
        (whatever its working directory) sees the same files.
        """
        base = Path(start_dir or os.getcwd())

        def absolute(path: str) -> str:
            return str((base / path).resolve())

        loras = self.loras.model_copy(
            update={"root": absolute(self.loras.root), "cache_dir": absolute(self.loras.cache_dir)}
        )
        jobs = self.jobs
        if jobs.is_directory:
            jobs = jobs.model_copy(update={"store": absolute(jobs.store)})
        webhooks = self.webhooks
        if webhooks.secret_file:
            webhooks = webhooks.model_copy(update={"secret_file": absolute(webhooks.secret_file)})
        return self.model_copy(update={"loras": loras, "jobs": jobs, "webhooks": webhooks})
