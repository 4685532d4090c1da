"""FluxIngress: validates requests, splits them into work items and routes them by model; holds no model.

The HTTP routes are `serving.api` (one FastAPI app per replica, from `__serve_build_asgi_app__`);
this class is the service they call. Validation is `serve_app.intake.request_rules`, the LoRA policy
`engine.lora_sources`, async jobs live in the FluxJobs deployment, generation in one generator
deployment per model (`FluxGenerator-<id>`).

Every call to FluxJobs goes through `_ask_jobs`: a call cut off by the death of the FluxJobs
replica is sent again (with backoff, for up to JOBS_RETRY_S) and reaches its replacement, which
has read the jobs back from the store; a repeated submit answers the job already accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app import errors
from serve_app.config import AppArgs, ModelArgs
from serve_app.errors import ApiError, validation_error
from serve_app.intake.request_rules import build_work_items, preview_request, request_tokens
from serve_app.jobs.events import JobUpdate, status_events
from serve_app.jobs.webhooks import WebhookPolicy
from serve_app.loras.sources import LoraSources
from serve_app.schemas import (
    DEFAULT_SIZE,
    RESOLUTION_DIVISOR,
    GenerateResponse,
    HealthResponse,
    InferenceRequest,
    LoraReport,
    ModelCard,
    ModelList,
    PreviewRequest,
    ResultMetadata,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from serve_app.serving.dispatch import Generators
from serve_app.web.guards import InFlight, load_api_key
from serve_app.web.health import health_response, model_health
from serve_app.web.outputs import Links, inline_image, with_matched_modules
from serve_app.web.routes import build_api
from serve_app.workitems import ItemResult, WorkItem

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 5.0
JOBS_RETRY_S = 60.0  # how long a call to FluxJobs keeps being sent again while its replica is replaced
EVENTS_POLL_S = 15.0  # one long-poll of an event stream; a keep-alive goes out after each quiet one


class FluxIngress:
    def __init__(self, generators: dict[str, DeploymentHandle], jobs: DeploymentHandle, args: AppArgs):
        self.args = args
        self.handles = generators
        self.generators = Generators(generators, args.limits.retry_after_s)
        self.jobs = jobs
        self.links = Links(args.base_url)
        self.sources = LoraSources(args.loras)  # the policy only: the generator replica downloads
        self.webhooks = WebhookPolicy(args.webhooks)
        self.api_key = load_api_key(args.auth)
        self.sync_in_flight = InFlight(args.limits.max_sync_items_per_ingress, args.limits.retry_after_s)
        self.context = serve.get_replica_context()

    def __serve_build_asgi_app__(self):
        """Serve asks each replica for its ASGI app after the constructor (late-bound ingress)."""
        return build_api(self, self.args, self.api_key, self.context.replica_id.unique_id)

    async def submit(self, body: InferenceRequest, timeout_s: float) -> SubmitResponse:
        request_id = uuid.uuid4().hex
        items = self._work_items(body, request_id, timeout_s)
        if body.webhook_url is not None:
            await self._check_webhook(body.webhook_url)
        status = await self._ask_jobs(
            "submit", request_id, items, self._metadata(body, items), timeout_s, body.webhook_url,
            request_tokens(body, items),
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
        return await self._ask_jobs("status", request_id)

    async def result(self, request_id: str) -> ResultResponse:
        return await self._ask_jobs("result", request_id)

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        return await self._ask_jobs("image", request_id, index)

    async def cancel(self, request_id: str) -> StatusResponse:
        return await self._ask_jobs("cancel", request_id)

    async def events(self, request_id: str) -> AsyncIterator[bytes]:
        """The job's Server-Sent Events (serving/events.py); REQUEST_NOT_FOUND before the stream starts."""
        first: JobUpdate = await self._ask_jobs("wait_change", request_id, None, 0.0)

        async def next_update(version: str) -> JobUpdate | None:
            try:
                return await self._ask_jobs("wait_change", request_id, version, EVENTS_POLL_S)
            except ApiError:  # gone (retention), or FluxJobs did not come back in time
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

    async def models(self) -> ModelList:
        return ModelList(models=[
            ModelCard(id=m.id, kind=m.kind, description=m.description, base_model=m.base_model,
                      resolution_divisor=RESOLUTION_DIVISOR, default_width=DEFAULT_SIZE, default_height=DEFAULT_SIZE,
                      default_steps=m.default_steps,
                      default_guidance_scale=m.default_guidance_scale)
            for m in self.args.models
        ])

    async def health(self) -> HealthResponse:
        """Each model's state from Serve's status (no replica is woken), then a ping of those that run."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=HEALTH_TIMEOUT_S)
            deployments = status.applications[self.context.app_name].deployments
        except Exception as exc:  # the controller is unreachable: nothing can be vouched for
            logger.warning("health: Serve's status is unavailable (%s)", type(exc).__name__)
            deployments = {}
        models = {m.id: model_health(deployments.get(m.deployment_name)) for m in self.args.models}
        ready = [model for model, health in models.items() if health.state == "ready"]
        pings = [self.handles[model].ready.remote() for model in ready] + [self.jobs.ping.remote()]
        answers = await asyncio.gather(*(_answers(ping) for ping in pings))
        for model, answered in zip(ready, answers):
            if not answered:
                models[model] = models[model].model_copy(update={"state": "unavailable"})
        return health_response(models, jobs_ok=answers[-1])

    # ---- helpers ----------------------------------------------------------------------------

    async def _ask_jobs(self, method: str, *args):
        """Call FluxJobs, sending the call again while a dead replica of it is replaced (module docstring)."""
        deadline = time.monotonic() + JOBS_RETRY_S
        delay = 0.25
        while True:
            try:
                return await getattr(self.jobs, method).remote(*args)
            except (RayActorError, ReplicaUnavailableError) as exc:
                if time.monotonic() + delay > deadline:
                    raise ApiError(errors.JOBS_UNAVAILABLE, "the job service is restarting; retry later",
                                   {"retry_after_s": self.args.limits.retry_after_s}) from None
                logger.warning("FluxJobs.%s: its replica was lost (%s); sending it again", method, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)

    async def _check_webhook(self, url: str) -> None:
        """WEBHOOK_FORBIDDEN now, where the policy can tell; a name that does not resolve yet is let through
        (each delivery checks again)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.webhooks.check, url), timeout=HEALTH_TIMEOUT_S)
        except (TimeoutError, OSError):
            pass

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


async def _answers(ping) -> bool:
    try:
        await asyncio.wait_for(ping, timeout=HEALTH_TIMEOUT_S)
    except Exception:
        return False
    return True
