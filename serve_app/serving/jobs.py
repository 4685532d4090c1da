"""FluxJobs: the store and runner of async jobs, one deployment that every ingress replica asks.

Keeping jobs in their own deployment (not in an ingress replica) means status and result are right
whichever ingress replica answers, and a job keeps running if the ingress replica that took it dies.
Finished jobs (with their image bytes) are kept for `jobs.ttl_s` and at most `jobs.max_jobs`.

A job's items wait here until one of `jobs.max_dispatched_items` slots frees up, so a job that has
not reached the generator yet is really `in_queue`, and cancelling it means its work never runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.engine.workitems import ItemResult, WorkItem
from serve_app.errors import ApiError
from serve_app.serving.dispatch import GeneratorClient
from serve_app.serving.guards import overloaded

logger = logging.getLogger("ray.serve")

FINISHED = ("succeeded", "failed", "canceled")


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with one zone suffix: 2026-11-25T17:00:00.123456Z."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Job:
    request_id: str
    items: list[WorkItem]
    metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    status: str = "in_queue"
    error: str | None = None
    error_code: str | None = None
    results: list[ItemResult | None] = field(default_factory=list)
    task: asyncio.Task | None = None

    @property
    def result_bytes(self) -> int:
        return sum(len(r.data) for r in self.results if isinstance(r, ItemResult))

    def finish(self, status: str, error: ApiError | None = None) -> None:
        """The first finish wins: a late finisher never overwrites a timeout or a cancel."""
        if self.status in FINISHED:
            return
        self.status = status
        self.finished_at = time.time()
        if error is not None:
            self.error, self.error_code = error.message, error.code

    def status_body(self) -> dict:
        return {
            "request_id": self.request_id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "error": self.error,
            "error_code": self.error_code,
        }


class FluxJobs:
    def __init__(self, generator: DeploymentHandle, args: AppArgs):
        self.args = args
        self.client = GeneratorClient(generator, args.limits.retry_after_s)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.slots = asyncio.Semaphore(args.jobs.max_dispatched_items)

    async def ping(self) -> bool:
        return True

    async def submit(self, request_id: str, items: list[WorkItem], metadata: dict, timeout_s: float) -> dict:
        """Accept a job, or refuse it with OVERLOADED before anything is queued.

        An accepted job is never dropped for load: it runs, fails with a code, or is cancelled.
        """
        self._prune(room=1)
        self._check_capacity(len(items))
        job = Job(request_id=request_id, items=items, metadata=metadata, results=[None] * len(items))
        self.jobs[request_id] = job
        job.task = asyncio.create_task(self._run(job, timeout_s))
        return job.status_body()

    async def status(self, request_id: str) -> dict:
        return self._get(request_id).status_body()

    async def result(self, request_id: str) -> dict:
        job = self._get(request_id)
        body = job.status_body()
        body["metadata"] = {**job.metadata, "loras": [dict(lora) for lora in job.metadata["loras"]]}
        if job.status == "succeeded":
            body["metadata"]["inference_time"] = round(job.finished_at - (job.started_at or job.created_at), 3)
            body["images"] = [_image_entry(r) for r in job.results if r is not None]
            add_matched_modules(body["metadata"]["loras"], job.results[0])
        return body

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        job = self._get(request_id)
        if job.status != "succeeded" or not 0 <= index < len(job.results) or job.results[index] is None:
            raise ApiError(
                errors.REQUEST_NOT_FOUND,
                f"request {request_id!r} has no image {index} (status {job.status})",
                {"request_id": request_id, "index": index, "status": job.status},
            )
        result = job.results[index]
        return result.data, result.format

    async def cancel(self, request_id: str) -> dict:
        job = self._get(request_id)
        if job.status not in FINISHED:
            job.finish("canceled", ApiError(errors.CANCELED, "cancelled by the client"))
            if job.task is not None:
                job.task.cancel()
        return job.status_body()

    async def counts(self) -> dict:
        active = [j for j in self.jobs.values() if j.status not in FINISHED]
        return {"jobs": len(self.jobs), "active_jobs": len(active), "active_items": sum(len(j.items) for j in active)}

    # ---- running ----------------------------------------------------------------------------

    async def _run(self, job: Job, timeout_s: float) -> None:
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(self._run_item(job, item) for item in job.items)), timeout=timeout_s
            )
        except asyncio.TimeoutError:
            job.finish("failed", ApiError(errors.TIMEOUT, f"the request did not finish within {timeout_s:g} s"))
            return
        except asyncio.CancelledError:
            return  # cancel() has already recorded the status
        except Exception as exc:  # a bug here must still end the job
            logger.exception("job %s failed", job.request_id)
            job.finish("failed", ApiError(errors.GENERATION_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        failures = [r for r in results if isinstance(r, ApiError)]
        if failures:
            job.finish("failed", failures[0])
            return
        job.results = list(results)
        job.finish("succeeded")
        self._prune()

    async def _run_item(self, job: Job, item: WorkItem) -> ItemResult | ApiError:
        async with self.slots:
            if job.started_at is None:
                job.started_at = time.time()
                job.status = "in_progress"
            return await self.client.run_one(item)

    def _check_capacity(self, new_items: int) -> None:
        limits = self.args.limits
        active = [j for j in self.jobs.values() if j.status not in FINISHED]
        if len(active) + 1 > limits.max_pending_jobs:
            raise overloaded("async jobs pending", "max_pending_jobs", limits.max_pending_jobs, limits.retry_after_s)
        if sum(len(j.items) for j in active) + new_items > limits.max_pending_items:
            raise overloaded("async work items pending", "max_pending_items", limits.max_pending_items,
                             limits.retry_after_s)

    def _get(self, request_id: str) -> Job:
        job = self.jobs.get(request_id)
        if job is None:
            raise ApiError(errors.REQUEST_NOT_FOUND, f"no request {request_id!r} (unknown or expired)",
                           {"request_id": request_id})
        return job

    def _prune(self, room: int = 0) -> None:
        """Drop finished jobs past their time, then the oldest finished ones while there are more
        than `max_jobs` (less `room` for jobs about to be added) or their images hold more than
        `max_result_bytes`: the store's memory stays bounded whatever the traffic."""
        limits = self.args.jobs
        now = time.time()
        for job in [j for j in self.jobs.values() if j.status in FINISHED]:
            if now - job.finished_at > limits.ttl_s:
                del self.jobs[job.request_id]
        finished = [j for j in self.jobs.values() if j.status in FINISHED]
        kept_bytes = sum(job.result_bytes for job in finished)
        for count, job in zip(range(len(finished), 0, -1), finished):
            if count + room <= limits.max_jobs and kept_bytes <= limits.max_result_bytes:
                break
            kept_bytes -= job.result_bytes
            del self.jobs[job.request_id]


def add_matched_modules(loras: list[dict], result: ItemResult) -> None:
    """Report, per LoRA of the request, how many model modules its file matched."""
    for entry, (_, matched) in zip(loras, result.lora_modules):
        entry["matched_modules"] = matched


def _image_entry(result: ItemResult) -> dict:
    return {
        "index": result.index,
        "format": result.format,
        "width": result.width,
        "height": result.height,
        "seed": result.seed,
    }
