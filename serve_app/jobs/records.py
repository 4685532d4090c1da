"""Job records: what the job store keeps of a job (typed, versioned JSON), and the answers made from them.

A record holds everything needed to answer for a job and to run it again after a restart: its
status, timestamps and deadline, its work items (written out field by field, so a secret a request
carries, such as an `hf_token`, is never among them), the metadata of its result, the images it has
stored and its webhook. It never holds image bytes: those are separate objects of the store.

`jobs_to_prune` is the retention rule (docs/jobs.md), applied to the records of finished jobs.
No Ray here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import JobArgs
from serve_app.errors import ApiError, ErrorCode
from serve_app.schemas import (
    ImageOutput,
    ImageOutputs,
    JobProgress,
    OutputFormat,
    ResultMetadata,
    ResultResponse,
    StatusResponse,
    WebhookStatus,
)
from serve_app.states import JobStatus, LoraMode
from serve_app.web.outputs import Links, image_fields, with_matched_modules
from serve_app.workitems import BatchKey, ItemResult, LoraUse, WorkItem

SCHEMA_VERSION: Final = 1


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with one zone suffix: 2026-11-25T17:00:00.123456Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Stored(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoredLora(_Stored):
    source: str
    multiplier: float
    token_digest: str = ""  # the hash of the request's hf_token (never the token)


class StoredItem(_Stored):
    """One work item as the store keeps it: every field a rerun needs, and nothing else."""

    index: int
    prompt: str
    seed: int
    neg: str
    output_format: OutputFormat
    model: str
    width: int
    height: int
    steps: int
    guidance: float
    loras: list[StoredLora] = Field(default_factory=list)
    lora_mode: LoraMode = LoraMode.UNSET

    @classmethod
    def of(cls, item: WorkItem) -> StoredItem:
        key = item.key
        return cls(
            index=item.index, prompt=item.prompt, seed=item.seed, neg=item.neg, output_format=item.output_format,
            model=key.model, width=key.width, height=key.height, steps=key.steps, guidance=key.guidance,
            loras=[StoredLora(source=use.source, multiplier=use.multiplier, token_digest=use.token_digest)
                   for use in key.loras],
            lora_mode=key.lora_mode,
        )

    def work_item(self, request_id: str, deadline: float) -> WorkItem:
        """The work item as it was stored, with the job's deadline (the request's); nothing else is added."""
        key = BatchKey(
            model=self.model, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance,
            loras=tuple(LoraUse(lora.source, lora.multiplier, lora.token_digest) for lora in self.loras),
            lora_mode=self.lora_mode,
        )
        return WorkItem(
            request_id=request_id, index=self.index, prompt=self.prompt, seed=self.seed, key=key, neg=self.neg,
            output_format=self.output_format, deadline=deadline,
        )


class StoredImage(_Stored):
    """A result image in the store: what the result says of it, and its size."""

    index: int
    seed: int
    width: int
    height: int
    format: OutputFormat
    bytes: int
    seconds: float = 0.0
    lora_modules: list[tuple[str, int]] = Field(default_factory=list, description="(LoRA key, modules matched)")
    speed_tier: str = "exact"
    lora_mode: LoraMode = LoraMode.PEFT
    # What ran (a preview model's `effective`): the item's prompt, steps, guidance and LoRA multiplier.
    prompt: str = ""
    steps: int = 0
    guidance: float = 0.0
    multiplier: float | None = None

    @classmethod
    def of(cls, result: ItemResult) -> StoredImage:
        return cls(
            index=result.index, seed=result.seed, width=result.width, height=result.height, format=result.format,
            bytes=len(result.data), seconds=result.seconds, lora_modules=list(result.lora_modules),
            speed_tier=result.speed_tier, lora_mode=result.lora_mode, prompt=result.prompt, steps=result.steps,
            guidance=result.guidance, multiplier=result.multiplier,
        )


class JobRecord(_Stored):
    """A job as the store keeps it (`records/<request id>.json`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    status: JobStatus = JobStatus.IN_QUEUE
    created_at: float
    deadline: float = Field(description="Unix seconds: the job fails with TIMEOUT past it (jobs.timeout_s)")
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    error_code: ErrorCode | None = None
    items: list[StoredItem]
    metadata: ResultMetadata
    images: list[StoredImage] = Field(default_factory=list, description="Stored so far, in the order they finished")
    webhook_url: str | None = None
    webhook: WebhookStatus | None = None

    @property
    def finished(self) -> bool:
        return self.status.is_final

    @property
    def image_bytes(self) -> int:
        return sum(image.bytes for image in self.images)

    def image(self, index: int) -> StoredImage | None:
        return next((image for image in self.images if image.index == index), None)

    def finish(self, status: JobStatus, finished_at: float, error: ApiError | None = None) -> bool:
        """End the job; the first end wins (a late finisher never overwrites a timeout or a cancel).

        Returns:
            Whether this call ended it.
        """
        if self.finished:
            return False
        self.status = JobStatus(status)
        self.finished_at = finished_at
        if error is not None:
            self.error, self.error_code = error.message, error.code
        return True

    def progress(self, running: dict[int, tuple[int, int]]) -> JobProgress:
        """Images done, and the steps of the running image furthest along; with none running, 0 of the
        next image's steps, or all of the last one's when every image is done.

        Args:
            running: the images running now: index -> (step done, steps).
        """
        waiting = [item for item in self.items if self.image(item.index) is None]
        if running:
            step, steps = max(running.values(), key=lambda s: s[0] / max(s[1], 1))
        elif waiting:
            step, steps = 0, waiting[0].steps
        else:
            step = steps = self.items[-1].steps if self.items else 0
        return JobProgress(images_done=len(self.images), images=len(self.items), step=step, steps=steps)

    def status_response(self, progress: JobProgress) -> StatusResponse:
        return StatusResponse(
            request_id=self.request_id,
            status=self.status,
            created_at=iso(self.created_at),
            started_at=iso(self.started_at),
            finished_at=iso(self.finished_at),
            error=self.error,
            error_code=self.error_code,
            progress=progress,
            webhook=self.webhook,
        )

    def result_response(self, links: Links, preview: bool = False) -> ResultResponse:
        """The body of GET /v1/requests/{id}/result, which is also what a webhook receives.

        Args:
            links: makes the image URLs.
            preview: the job ran on a preview model (its images say what ran: `effective`, `lora_mode`).
        """
        response = ResultResponse(
            request_id=self.request_id, status=self.status, error=self.error, error_code=self.error_code,
            created_at=iso(self.created_at), finished_at=iso(self.finished_at), metadata=self.metadata,
        )
        if self.status == JobStatus.SUCCEEDED:
            images = sorted(self.images, key=lambda image: image.index)
            response.outputs = ImageOutputs(images=[
                ImageOutput(**image_fields(image, preview), url=links.image(self.request_id, image.index))
                for image in images])
            assert self.finished_at is not None  # finish() sets it with the status
            took = round(self.finished_at - (self.started_at or self.created_at), 3)
            response.metadata = with_matched_modules(self.metadata, images[0]).model_copy(
                update={"inference_time": took})
        return response


def jobs_to_prune(finished: list[JobRecord], limits: JobArgs, now: float, keep: str | None = None,
                  room: int = 0) -> list[str]:
    """The finished jobs retention drops now, oldest-finished first.

    First every job finished more than `ttl_s` ago; then, while more than `max_jobs` (less `room` for
    jobs about to be added) are kept or their images hold more than `max_result_bytes`, the
    oldest-finished. Submission time plays no part, so a long job is not dropped the moment it ends.

    Args:
        finished: records of finished jobs.
        limits: the jobs args.
        now: unix seconds.
        keep: a job never dropped (the one that just finished).
        room: places to make for jobs about to be accepted.

    Returns:
        The request ids to delete.
    """
    ordered = sorted(finished, key=lambda record: record.finished_at or 0.0)
    drop = [r for r in ordered if now - (r.finished_at or 0.0) > limits.ttl_s and r.request_id != keep]
    dropped = {r.request_id for r in drop}
    kept = [r for r in ordered if r.request_id not in dropped]
    count, kept_bytes = len(kept), sum(r.image_bytes for r in kept)
    for record in kept:
        if count + room <= limits.max_jobs and kept_bytes <= limits.max_result_bytes:
            break
        if record.request_id == keep:
            continue
        drop.append(record)
        count -= 1
        kept_bytes -= record.image_bytes
    return [record.request_id for record in drop]
