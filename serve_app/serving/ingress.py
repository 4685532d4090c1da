"""FluxIngress: validates requests, splits them into work items and routes them; holds no model.

The HTTP routes are in `serving.api` (built per replica by `__serve_build_asgi_app__`); this class
is what they call. Validation is `engine.workitems.build_work_items`, LoRA policy
`engine.lora_sources`, async jobs live in the FluxJobs deployment, generation in FluxGenerator.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from dataclasses import replace

from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.engine.images import CONTENT_TYPES
from serve_app.engine.lora_sources import LoraSources
from serve_app.engine.workitems import ItemResult, WorkItem, build_work_items
from serve_app.errors import ApiError
from serve_app.schemas import InferenceRequest, ModelCard
from serve_app.serving.dispatch import GeneratorClient
from serve_app.serving.guards import InFlight, load_api_key
from serve_app.serving.jobs import add_matched_modules

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 5.0


class FluxIngress:
    def __init__(self, generator: DeploymentHandle, jobs: DeploymentHandle, args: AppArgs):
        self.args = args
        self.generator = generator
        self.client = GeneratorClient(generator, args.limits.retry_after_s)
        self.jobs = jobs
        self.sources = LoraSources(args.loras)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.api_key = load_api_key(args.auth)
        self.sync_in_flight = InFlight(args.limits.max_sync_items_per_ingress, args.limits.retry_after_s)

    def __serve_build_asgi_app__(self):
        """Serve asks each replica for its ASGI app after the constructor (late-bound ingress)."""
        from serve_app.serving.api import build_api

        return build_api(self)

    async def submit(self, body: InferenceRequest, timeout_s: float) -> dict:
        """Queue an async job: one image per prompt. Poll `status_url`, then read `result_url`."""
        request_id = uuid.uuid4().hex
        items = self._work_items(body, request_id, timeout_s)
        status = await self.jobs.submit.remote(request_id, items, self._metadata(body, items), timeout_s)
        logger.info("job %s queued: %d items", request_id, len(items))
        return {
            "request_id": request_id,
            "status": "queued",
            "status_url": self._url(f"/v1/requests/{request_id}/status"),
            "result_url": self._url(f"/v1/requests/{request_id}/result"),
            "created_at": status["created_at"],
        }

    async def status(self, request_id: str) -> dict:
        return await self.jobs.status.remote(request_id)

    async def result(self, request_id: str) -> dict:
        body = await self.jobs.result.remote(request_id)
        images = body.pop("images", None)
        body["outputs"] = None
        if images is not None:
            for image in images:
                image["url"] = self._url(f"/v1/requests/{request_id}/images/{image['index']}")
            body["outputs"] = {"images": images, "videos": []}
        body.pop("started_at", None)
        return body

    async def image(self, request_id: str, index: int) -> Response:
        data, fmt = await self.jobs.image.remote(request_id, index)
        return Response(content=data, media_type=CONTENT_TYPES[fmt])

    async def cancel(self, request_id: str) -> dict:
        """Cancel a job: queued work never runs; a running call stops at its next step if it serves no one else."""
        return await self.jobs.cancel.remote(request_id)

    async def generate(self, body: InferenceRequest, timeout_s: float) -> dict:
        """Generate synchronously; images come back inline as base64."""
        request_id = uuid.uuid4().hex
        items = self._work_items(body, request_id, timeout_s)
        with self.sync_in_flight.hold(len(items)):
            await self._fetch_remote_loras(items)
            started = time.perf_counter()
            try:
                outcomes = await asyncio.wait_for(self.client.run(items), timeout=timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(errors.TIMEOUT, f"the request did not finish within {timeout_s:g} s") from None
        for outcome in outcomes:
            if isinstance(outcome, ApiError):
                raise outcome
        metadata = self._metadata(body, items, outcomes)
        metadata["inference_time"] = round(time.perf_counter() - started, 3)
        return {
            "request_id": request_id,
            "status": "succeeded",
            "images": [_image_output(r, inline=True) for r in outcomes],
            "metadata": metadata,
        }

    async def models(self) -> dict:
        model = self.args.model
        card = ModelCard(
            id=model.id,
            base_model=model.base_model,
            default_steps=model.default_steps,
            default_guidance_scale=model.default_guidance_scale,
        )
        return {"models": [card.model_dump()]}

    async def health(self) -> JSONResponse:
        """200 when the generator and the job store answer, else 503."""
        try:
            await asyncio.wait_for(
                asyncio.gather(self.generator.ready.remote(), self.jobs.ping.remote()), timeout=HEALTH_TIMEOUT_S
            )
        except Exception as exc:
            return JSONResponse({"status": "unhealthy", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "healthy"})

    # ---- helpers ----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.args.base_url or ''}{path}"

    def _work_items(self, body: InferenceRequest, request_id: str, timeout_s: float) -> list[WorkItem]:
        items = build_work_items(body, self.args, request_id, resolve_lora=self.sources.canonical)
        deadline = time.time() + timeout_s
        return [replace(item, deadline=deadline) for item in items]

    def _metadata(self, body: InferenceRequest, items: list[WorkItem], outcomes: list[ItemResult] = ()) -> dict:
        loras = [{"path": lora.path, "network_multiplier": use.multiplier} for lora, use in zip(body.loras, items[0].key.loras)]
        if outcomes:
            add_matched_modules(loras, outcomes[0])
        return {"model": body.model, "base_model": self.args.model.base_model, "loras": loras}

    async def _fetch_remote_loras(self, items: list[WorkItem]) -> None:
        """Download URL and hf:// LoRAs before queueing, so a bad source is a 400 of this call."""
        for use in items[0].key.loras:
            if "://" in use.source:
                await asyncio.to_thread(self.sources.local_file, use.source)


def _image_output(result: ItemResult, url: str | None = None, inline: bool = False) -> dict:
    entry = {
        "index": result.index,
        "format": result.format,
        "width": result.width,
        "height": result.height,
        "seed": result.seed,
    }
    if inline:
        entry["data"] = base64.b64encode(result.data).decode()
    else:
        entry["url"] = url
    return entry
