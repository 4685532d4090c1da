"""IngressService: what the HTTP routes call, without Ray: validates requests, splits them into work items,
runs sync requests on the generators and hands async jobs to the jobs service; holds no model.

It is built from what it is given: the app's args, a generators client, a jobs client and a health function.
In Serve, `serving/ingress.py` (`FluxIngress`, the Serve shell) gives it `serving/dispatch.Generators`,
`serving/jobs_client.FluxJobsClient` (every call to FluxJobs, sent again while its replica is replaced) and
its own health probe. The unit tests (`tests/unit/web/`) give it the fakes of `tests/support/fake_service.py`
and drive the real routes (`web/routes.build_api`) with starlette's TestClient, so each HTTP rule is
tested without a Serve deploy. The two clients are Protocols, so mypy checks the real ones against them.

Validation is `serve_app.intake.request_rules`, the LoRA policy `loras.sources` (no download here: the
generator replica downloads), the webhook policy `jobs.webhooks`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Protocol
from urllib.parse import urljoin

from serve_app import errors
from serve_app.config import AppArgs, ModelArgs
from serve_app.errors import ApiError, ErrorCode, validation_error
from serve_app.intake.openai_images import inference_request, revised_prompt
from serve_app.intake.request_rules import build_work_items, preview_request, request_tokens
from serve_app.jobs.events import JobUpdate, status_events
from serve_app.jobs.webhooks import WebhookPolicy
from serve_app.loras.listing import list_root
from serve_app.loras.sources import LoraSources
from serve_app.schemas import (
    DEFAULT_SIZE,
    RESOLUTION_DIVISOR,
    GenerateResponse,
    HealthResponse,
    ImageData,
    ImageOutput,
    ImagesRequest,
    ImagesResponse,
    InferenceRequest,
    LoraFileInfo,
    LoraList,
    LoraReport,
    ModelCard,
    ModelList,
    PreviewRequest,
    ResultMetadata,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from serve_app.states import JobStatus
from serve_app.web.guards import InFlight
from serve_app.web.outputs import Links, inline_image, with_matched_modules
from serve_app.workitems import ItemResult, WorkItem

logger = logging.getLogger("ray.serve")

WEBHOOK_CHECK_S = 5.0  # the longest a submit waits on the webhook URL's DNS check
EVENTS_POLL_S = 15.0  # one long-poll of an event stream; a keep-alive goes out after each quiet one


class GeneratorsClient(Protocol):
    """Runs work items on their models' generators (serving/dispatch.Generators in Serve)."""

    async def run(self, items: list[WorkItem], tokens: dict[str, str] | None = None) -> list[ItemResult | ApiError]:
        """One outcome per item, in order; a failure comes back as an ApiError value, never raised."""
        ...


class JobsClient(Protocol):
    """The async jobs service (serving/jobs_client.FluxJobsClient, the FluxJobs deployment, in Serve).

    Each call raises ApiError for what the client is told: REQUEST_NOT_FOUND, OVERLOADED, JOBS_UNAVAILABLE...
    """

    async def submit(self, request_id: str, items: list[WorkItem], metadata: ResultMetadata, timeout_s: float,
                     webhook_url: str | None = None, tokens: dict[str, str] | None = None) -> StatusResponse: ...

    async def status(self, request_id: str) -> StatusResponse: ...

    async def result(self, request_id: str) -> ResultResponse: ...

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]: ...

    async def cancel(self, request_id: str) -> StatusResponse: ...

    async def wait_change(self, request_id: str, version: str | None, timeout_s: float) -> JobUpdate: ...

    async def ping(self) -> bool: ...


HealthCheck = Callable[[], Awaitable[HealthResponse]]


class IngressService:
    """The ingress's request logic (module docstring); `web/routes.py`'s ApiService."""

    def __init__(self, args: AppArgs, generators: GeneratorsClient, jobs: JobsClient, health: HealthCheck):
        self.args = args
        self.generators = generators
        self.jobs = jobs
        self._health = health
        self.links = Links(args.base_url)
        self.sources = LoraSources(args.loras)  # the policy only: the generator replica downloads
        self.webhooks = WebhookPolicy(args.webhooks)
        self.sync_in_flight = InFlight(args.limits.max_sync_items_per_ingress, args.limits.retry_after_s)

    async def submit(self, body: InferenceRequest, timeout_s: float) -> SubmitResponse:
        request_id = uuid.uuid4().hex
        items = self._work_items(body, request_id, timeout_s)
        if body.webhook_url is not None:
            await self._check_webhook(body.webhook_url)
        status = await self.jobs.submit(
            request_id, items, self._metadata(body, items), timeout_s, body.webhook_url, request_tokens(body, items),
        )
        logger.info("job %s queued: %d items of model %s", request_id, len(items), body.model)
        return SubmitResponse(
            request_id=request_id,
            status_url=self.links.status(request_id),
            result_url=self.links.result(request_id),
            created_at=status.created_at,
        )

    async def preview(self, body: PreviewRequest, timeout_s: float) -> SubmitResponse:
        """Reproduce a training run's sample grid on a preview model: one async job, one image per sample."""
        model = self.args.model(body.model)
        if model is not None and not model.is_preview:
            previews = [m.id for m in self.args.models if m.is_preview]
            raise validation_error(["body", "model"], f"{body.model!r} is not a preview model; these are: {previews}")
        return await self.submit(preview_request(body), timeout_s)

    async def status(self, request_id: str) -> StatusResponse:
        return await self.jobs.status(request_id)

    async def result(self, request_id: str) -> ResultResponse:
        return await self.jobs.result(request_id)

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        return await self.jobs.image(request_id, index)

    async def cancel(self, request_id: str) -> StatusResponse:
        return await self.jobs.cancel(request_id)

    async def events(self, request_id: str) -> AsyncIterator[bytes]:
        """The job's Server-Sent Events (jobs/events.py); REQUEST_NOT_FOUND before the stream starts."""
        first = await self.jobs.wait_change(request_id, None, 0.0)

        async def next_update(version: str) -> JobUpdate | None:
            try:
                return await self.jobs.wait_change(request_id, version, EVENTS_POLL_S)
            except ApiError:  # gone (retention), or the jobs service did not come back in time
                return None

        return status_events(first, next_update)

    async def generate(self, body: InferenceRequest, timeout_s: float) -> GenerateResponse:
        if body.webhook_url is not None:
            raise validation_error(["body", "webhook_url"], "webhooks are for async requests (POST /v1/inference)")
        request_id = uuid.uuid4().hex
        items = self._work_items(body, request_id, timeout_s)
        tokens = request_tokens(body, items)
        with self.sync_in_flight.hold(len(items)):
            started = time.perf_counter()
            try:  # one timeout for the downloads (in the replica's prefetch) and the generation
                outcomes = await asyncio.wait_for(self.generators.run(items, tokens), timeout=timeout_s)
            except TimeoutError:
                raise ApiError(errors.TIMEOUT, f"the request did not finish within {timeout_s:g} s") from None
        results: list[ItemResult] = []
        for outcome in outcomes:
            if isinstance(outcome, ApiError):
                raise outcome
            results.append(outcome)
        metadata = with_matched_modules(self._metadata(body, items), results[0])
        metadata.inference_time = round(time.perf_counter() - started, 3)
        preview = self._model(body.model).is_preview
        return GenerateResponse(
            request_id=request_id, images=[inline_image(result, preview) for result in results], metadata=metadata
        )

    async def images(self, body: ImagesRequest, timeout_s: float, origin: str) -> ImagesResponse:
        """The OpenAI Images API: its request made ours (`intake/openai_images.py`) and run as /v1/generate's.

        With `response_format: url` the request runs as an async job instead, waited for here: its images stay
        in the job store for jobs.ttl_s, at the URLs the job's result gives, made absolute on `origin` (the URL
        the client called) unless the args set `base_url`.
        """
        created = int(time.time())
        request = inference_request(body, self.args)
        if body.response_format == "url":
            stored = await self._job_images(request, timeout_s)
            data = [ImageData(url=urljoin(origin, image.url), revised_prompt=revised_prompt(body, image))
                    for image in stored]
        else:
            answer = await self.generate(request, timeout_s)
            data = [ImageData(b64_json=image.data, revised_prompt=revised_prompt(body, image))
                    for image in answer.images]
        return ImagesResponse(created=created, data=data)

    async def models(self) -> ModelList:
        return ModelList(models=[
            ModelCard(id=m.id, kind=m.kind, description=m.description, base_model=m.base_model,
                      resolution_divisor=RESOLUTION_DIVISOR, default_width=DEFAULT_SIZE, default_height=DEFAULT_SIZE,
                      default_steps=m.default_steps,
                      default_guidance_scale=m.default_guidance_scale)
            for m in self.args.models
        ])

    async def loras(self) -> LoraList:
        """The LoRA files under the root (loras/listing.py), walked on a worker thread: the root may be slow
        network storage, and the event loop serves every other request meanwhile."""
        listing = await asyncio.to_thread(list_root, self.sources)
        return LoraList(loras=[LoraFileInfo(path=f.path, size_bytes=f.size) for f in listing.files],
                        truncated=listing.truncated)

    async def health(self) -> HealthResponse:
        return await self._health()

    # ---- helpers ----------------------------------------------------------------------------

    async def _check_webhook(self, url: str) -> None:
        """WEBHOOK_FORBIDDEN now, where the policy can tell; a name that does not resolve yet is let through
        (each delivery checks again)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.webhooks.check, url), timeout=WEBHOOK_CHECK_S)
        except (TimeoutError, OSError):
            pass

    async def _job_images(self, body: InferenceRequest, timeout_s: float) -> list[ImageOutput]:
        """Run a request as an async job (as /v1/inference), wait for its end, and answer the images it stored;
        a failed job raises its error. Its caller waits on this replica as a sync caller does, so its items
        count against max_sync_items_per_ingress too."""
        with self.sync_in_flight.hold(len(body.prompts)):
            request_id = (await self.submit(body, timeout_s)).request_id
            update = await self.jobs.wait_change(request_id, None, 0.0)
            while not update.finished:  # at the latest by the job's deadline, when it fails with TIMEOUT
                update = await self.jobs.wait_change(request_id, update.version, EVENTS_POLL_S)
        status = update.status
        if status.status != JobStatus.SUCCEEDED:
            code = ErrorCode(status.error_code or errors.GENERATION_FAILED)
            raise ApiError(code, status.error or f"request {request_id} {status.status}", {"request_id": request_id})
        result = await self.jobs.result(request_id)
        return result.outputs.images if result.outputs is not None else []

    def _work_items(self, body: InferenceRequest, request_id: str, timeout_s: float) -> list[WorkItem]:
        items = build_work_items(body, self.args, request_id, resolve_lora=self.sources.canonical)
        deadline = time.time() + timeout_s
        return [replace(item, deadline=deadline) for item in items]

    def _metadata(self, body: InferenceRequest, items: list[WorkItem]) -> ResultMetadata:
        loras = [LoraReport(path=lora.path, network_multiplier=use.multiplier)
                 for lora, use in zip(body.loras, items[0].key.loras)]
        model = self._model(body.model)
        return ResultMetadata(model=model.id, base_model=model.base_model, loras=loras)

    def _model(self, model_id: str) -> ModelArgs:
        """A request's model, which `build_work_items` has already checked is served."""
        model = self.args.model(model_id)
        if model is None:
            raise ApiError(errors.MODEL_NOT_FOUND, f"model {model_id!r} is not served here")
        return model
