"""FluxJobs: the store and runner of async jobs, one deployment that every ingress replica asks.

Keeping jobs in their own deployment (not in an ingress replica) means status and result are right
whichever ingress replica answers, and a job keeps running if the ingress replica that took it dies.
Finished jobs (with their image bytes) are kept for `jobs.ttl_s`, pruned oldest-finished first when
`jobs.max_jobs` or `jobs.max_result_bytes` forces it.

A job's items wait here until one of `jobs.max_dispatched_items` slots frees up, so a job that has
not reached a generator yet is really `in_queue`, and cancelling it means its work never runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ray.serve.handle import DeploymentHandle

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.engine.workitems import ItemResult, WorkItem
from serve_app.errors import ApiError
from serve_app.schemas import ImageOutputs, JobStatus, ResultMetadata, ResultResponse, StatusResponse
from serve_app.serving.dispatch import Generators
from serve_app.serving.guards import overloaded
from serve_app.serving.outputs import Links, image_output, with_matched_modules

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
    metadata: ResultMetadata
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    status: JobStatus = "in_queue"
    error: str | None = None
    error_code: str | None = None
    results: list[ItemResult] = field(default_factory=list)
    task: asyncio.Task | None = None
    tokens: dict[str, str] = field(default_factory=dict, repr=False)  # the request's hf_token: memory only

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def result_bytes(self) -> int:
        return sum(len(r.data) for r in self.results)

    def finish(self, status: JobStatus, error: ApiError | None = None) -> None:
        """The first finish wins: a late finisher never overwrites a timeout or a cancel."""
        if self.finished:
            return
        self.status = status
        self.finished_at = time.time()
        if error is not None:
            self.error, self.error_code = error.message, error.code

    def status_response(self) -> StatusResponse:
        return StatusResponse(
            request_id=self.request_id,
            status=self.status,
            created_at=iso(self.created_at),
            started_at=iso(self.started_at),
            finished_at=iso(self.finished_at),
            error=self.error,
            error_code=self.error_code,
        )


@dataclass(frozen=True)
class JobCounts:
    """Jobs held now: all of them, and the unfinished ones with their work items."""

    jobs: int
    active_jobs: int
    active_items: int


class FluxJobs:
    def __init__(self, generators: dict[str, DeploymentHandle], args: AppArgs):
        self.args = args
        self.generators = Generators(generators, args.limits.retry_after_s)
        self.links = Links(args.base_url)
        self.jobs: dict[str, Job] = {}
        self.slots = asyncio.Semaphore(args.jobs.max_dispatched_items)

    async def ping(self) -> bool:
        return True

    async def counts(self) -> JobCounts:
        return self._counts()

    def _counts(self) -> JobCounts:
        active = [j for j in self.jobs.values() if not j.finished]
        return JobCounts(jobs=len(self.jobs), active_jobs=len(active), active_items=sum(len(j.items) for j in active))

    async def submit(self, request_id: str, items: list[WorkItem], metadata: ResultMetadata, timeout_s: float,
                     tokens: dict[str, str] | None = None) -> StatusResponse:
        """Accept a job, or refuse it with OVERLOADED before anything is queued.

        An accepted job is never dropped for load: it runs, fails with a code, or is cancelled.
        `tokens` (the request's own hf_token per LoRA key) are kept in memory for the dispatch only.
        """
        self._prune(room=1)
        self._check_capacity(len(items))
        job = Job(request_id=request_id, items=items, metadata=metadata, tokens=dict(tokens or {}))
        self.jobs[request_id] = job
        job.task = asyncio.create_task(self._run(job, timeout_s))
        return job.status_response()

    async def status(self, request_id: str) -> StatusResponse:
        return self._get(request_id).status_response()

    async def result(self, request_id: str) -> ResultResponse:
        job = self._get(request_id)
        status = job.status_response()
        response = ResultResponse(
            request_id=job.request_id, status=job.status, error=job.error, error_code=job.error_code,
            created_at=status.created_at, finished_at=status.finished_at, metadata=job.metadata,
        )
        if job.status == "succeeded":
            preview = self.args.model(job.metadata.model).kind == "preview"
            response.outputs = ImageOutputs(images=[image_output(r, self.links, preview) for r in job.results])
            response.metadata = with_matched_modules(job.metadata, job.results[0]).model_copy(
                update={"inference_time": round(job.finished_at - (job.started_at or job.created_at), 3)}
            )
        return response

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        job = self._get(request_id)
        if job.status != "succeeded" or not 0 <= index < len(job.results):
            raise ApiError(
                errors.REQUEST_NOT_FOUND,
                f"request {request_id!r} has no image {index} (status {job.status})",
                {"request_id": request_id, "index": index, "status": job.status},
            )
        result = job.results[index]
        return result.data, result.format

    async def cancel(self, request_id: str) -> StatusResponse:
        job = self._get(request_id)
        if not job.finished:
            job.finish("canceled", ApiError(errors.CANCELED, "cancelled by the client"))
            if job.task is not None:
                job.task.cancel()
        return job.status_response()

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
        except Exception:  # a bug here must still end the job
            logger.exception("job %s failed", job.request_id)
            job.finish("failed", ApiError(errors.GENERATION_FAILED, "the job failed in the server"))
            return
        failures = [r for r in results if isinstance(r, ApiError)]
        if failures:
            job.finish("failed", failures[0])
            return
        job.results = list(results)
        job.finish("succeeded")
        self._prune(keep=job.request_id)

    async def _run_item(self, job: Job, item: WorkItem) -> ItemResult | ApiError:
        async with self.slots:
            if job.started_at is None:
                job.started_at = time.time()
                job.status = "in_progress"
            return await self.generators.run_one(item, job.tokens or None)

    def _check_capacity(self, new_items: int) -> None:
        limits = self.args.limits
        counts = self._counts()
        if counts.active_jobs + 1 > limits.max_pending_jobs:
            raise overloaded("async jobs pending", "max_pending_jobs", limits.max_pending_jobs, limits.retry_after_s)
        if counts.active_items + new_items > limits.max_pending_items:
            raise overloaded("async work items pending", "max_pending_items", limits.max_pending_items,
                             limits.retry_after_s)

    def _get(self, request_id: str) -> Job:
        job = self.jobs.get(request_id)
        if job is None:
            raise ApiError(errors.REQUEST_NOT_FOUND, f"no request {request_id!r} (unknown or expired)",
                           {"request_id": request_id})
        return job

    def _prune(self, room: int = 0, keep: str | None = None) -> None:
        """Drop finished jobs past their time, then, oldest-finished first, while more than `max_jobs`
        (less `room` for jobs about to be added) are kept or their images hold more than
        `max_result_bytes`. The job `keep` (the one that just finished) is never dropped."""
        limits = self.args.jobs
        now = time.time()
        finished = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: j.finished_at)
        for job in [j for j in finished if now - j.finished_at > limits.ttl_s and j.request_id != keep]:
            del self.jobs[job.request_id]
        finished = [j for j in finished if j.request_id in self.jobs]
        kept_bytes = sum(job.result_bytes for job in finished)
        count = len(finished)
        for job in finished:
            if count + room <= limits.max_jobs and kept_bytes <= limits.max_result_bytes:
                break
            if job.request_id == keep:
                continue
            kept_bytes -= job.result_bytes
            count -= 1
            del self.jobs[job.request_id]
