"""JobManager: async jobs that outlive the FluxJobs replica; FluxJobs' logic, without Ray Serve.

FluxJobs (serving/jobs.py) is a thin Serve shell around it, as FluxGenerator is around
GeneratorReplica, so tests drive it without Ray: with a directory or S3 store, a dispatch
function of their own and real webhook receivers.

Where things live:
- the job store (serving/store.py) holds each job's record and images. The record is written when
  the job is accepted (before the submit call answers), when it starts, when each image is stored,
  when it ends and after each webhook attempt. Images are written as they come back and are not
  kept here;
- this object holds an index of the records (no image bytes) and what is only live: each running
  image's denoising step, the change signal event streams wait on, and the tasks that run jobs
  and deliver webhooks.

A job's deadline is its request's: the one the ingress set on the work items when it took the
request (`jobs.timeout_s`, or a shorter X-Flux-Timeout). The record keeps it, and the items run
again from the record carry it, with `report_progress` asked for here (an async job's images report
their steps to FluxJobs).

Restart (`restore`, then `start`): the records are read back. Unfinished jobs go back to
`in_queue` and run again (images already stored are kept, not made again), unless their deadline
passed while no replica ran them: those end `failed` with TIMEOUT. Finished jobs whose webhook is
not delivered resume their deliveries.

A job's items wait for one of `jobs.max_dispatched_items` slots before they go to a generator, so
a job that has not reached a generator is really `in_queue`, and cancelling it means its work
never runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.errors import ApiError
from serve_app.jobs.events import ChangeSignal, JobUpdate
from serve_app.jobs.progress import ItemProgress
from serve_app.jobs.records import JobRecord, StoredImage, StoredItem, jobs_to_prune
from serve_app.jobs.store import STORE_FAULTS, JobStore
from serve_app.jobs.webhooks import WebhookSender, message_id
from serve_app.schemas import ResultMetadata, ResultResponse, StatusResponse, WebhookStatus
from serve_app.states import FINAL_STATUSES, JobStatus
from serve_app.web.guards import overloaded
from serve_app.web.outputs import Links
from serve_app.workitems import ItemResult, WorkItem

logger = logging.getLogger("ray.serve")

# Runs one work item on its model's generators, with the request's hf_tokens (or None) beside it.
Dispatch = Callable[[WorkItem, dict[str, str] | None], Awaitable[ItemResult | ApiError]]
STORE_ATTEMPTS = 3
SWEEP_S = 60.0  # retention also runs this often, so an idle service drops expired jobs too


def request_deadline(items: list[WorkItem], default: float) -> float:
    """The job's deadline: the one the ingress gave the request's items (unix seconds, `jobs.timeout_s` or
    X-Flux-Timeout from when it took the request), so the job has no more time than the request asked
    for; `default` for items without one."""
    deadlines = [item.deadline for item in items if item.deadline is not None]
    return min(deadlines) if deadlines else default


@dataclass
class Job:
    """A job held by the manager: its record, and what is only live."""

    record: JobRecord
    signal: ChangeSignal = field(default_factory=ChangeSignal)
    steps: dict[int, tuple[int, int]] = field(default_factory=dict)  # running images: index -> (step, steps)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one store write of this job at a time
    task: asyncio.Task | None = None
    removed: bool = False  # pruned: nothing more is written
    # The request's own hf_token per LoRA key: in memory only, never in the record. A job run again
    # after a restart runs without it (a private hf:// file not in the download cache then fails).
    tokens: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class JobCounts:
    """Jobs held now: all of them, and the unfinished ones with their work items."""

    jobs: int
    active_jobs: int
    active_items: int


@dataclass(frozen=True)
class StatusCounts:
    """Jobs by status, every status present (0 included), for metrics."""

    held: dict[JobStatus, int]  # the jobs held now
    ended: dict[JobStatus, int]  # the jobs this manager ended since it started, by final status


@dataclass(frozen=True)
class RestoreReport:
    finished: int
    resumed: int
    orphans_deleted: int


class JobManager:
    """Accepts, runs, reports and keeps async jobs (module docstring).

    Args:
        store: where records and images live.
        args: the app's args (jobs, limits, base_url).
        dispatch: runs one work item on its model's generators; failures come back as values.
        models: the model ids served now (a restored job may name one no longer served).
        webhooks: delivers webhooks; None when they are off.
    """

    def __init__(self, store: JobStore, args: AppArgs, dispatch: Dispatch, models: set[str],
                 webhooks: WebhookSender | None = None):
        self.store = store
        self.args = args
        self.dispatch = dispatch
        self.models = models
        self.webhooks = webhooks
        self.links = Links(args.base_url)
        self.jobs: dict[str, Job] = {}
        self.slots = asyncio.Semaphore(args.jobs.max_dispatched_items)
        self.epoch = uuid.uuid4().hex[:8]  # part of every version: see serving/events.py
        self.closed = False
        self._tasks: set[asyncio.Task] = set()
        self._ended = dict.fromkeys(sorted(FINAL_STATUSES), 0)

    # ---- lifecycle -------------------------------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Read the store's records back (blocking: call before serving); `start` then runs them."""
        for record in self.store.load_records():
            if not record.finished:
                record.status = JobStatus.IN_QUEUE
            self.jobs[record.request_id] = Job(record)
        orphans = self.store.image_job_ids() - set(self.jobs)  # images a crash left without a record
        for request_id in orphans:
            self.store.delete_job(request_id)
        finished = sum(job.record.finished for job in self.jobs.values())
        return RestoreReport(finished=finished, resumed=len(self.jobs) - finished, orphans_deleted=len(orphans))

    def start(self) -> None:
        """Run the restored unfinished jobs (oldest first), resume their webhooks, start retention.

        Needs the running event loop.
        """
        for job in sorted(self.jobs.values(), key=lambda job: job.record.created_at):
            if not job.record.finished:
                job.task = asyncio.create_task(self._run(job, restored=True))
            elif self._webhook_pending(job):
                self._start_webhook(job)
        self._spawn(self._sweep())

    def close(self) -> None:
        """Stop: write nothing more and cancel every task (a successor replica takes over)."""
        self.closed = True
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ---- the API FluxJobs serves -----------------------------------------------------------------

    async def submit(self, request_id: str, items: list[WorkItem], metadata: ResultMetadata, timeout_s: float,
                     webhook_url: str | None = None, tokens: dict[str, str] | None = None) -> StatusResponse:
        """Accept a job once it is in the store, or refuse it before anything is queued.

        A repeated submit of the same request id (a retry after FluxJobs restarted) answers the job
        already accepted.

        Raises:
            ApiError: OVERLOADED past the pending limits; JOBS_UNAVAILABLE when the store cannot be written.
        """
        if request_id in self.jobs:
            return self._status(self.jobs[request_id])
        await self._prune(room=1)
        self._check_capacity(len(items))
        deadline = request_deadline(items, time.time() + timeout_s)
        record = JobRecord(
            request_id=request_id, created_at=deadline - timeout_s, deadline=deadline,
            items=[StoredItem.of(item) for item in items], metadata=metadata, webhook_url=webhook_url,
            webhook=WebhookStatus(delivered=False, attempts=0) if webhook_url else None,
        )
        job = Job(record, tokens=dict(tokens or {}))
        self.jobs[request_id] = job  # counted now: a submit arriving while this one is written sees it
        try:
            await self._save(job)
        except STORE_FAULTS as exc:
            del self.jobs[request_id]
            logger.error("job %s not accepted: the job store failed (%s)", request_id, type(exc).__name__)
            raise ApiError(errors.JOBS_UNAVAILABLE, "the job store cannot be written now; retry later",
                           {"retry_after_s": self.args.limits.retry_after_s}) from None
        except Exception:  # a bug, not the store: not accepted, and not passed off as a store fault
            del self.jobs[request_id]
            raise
        job.task = asyncio.create_task(self._run(job))
        return self._status(job)

    async def status(self, request_id: str) -> StatusResponse:
        return self._status(self._get(request_id))

    async def result(self, request_id: str) -> ResultResponse:
        record = self._get(request_id).record
        return record.result_response(self.links, self._is_preview(record))

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        record = self._get(request_id).record
        stored = record.image(index)
        if record.status != JobStatus.SUCCEEDED or stored is None:
            raise ApiError(
                errors.REQUEST_NOT_FOUND,
                f"request {request_id!r} has no image {index} (status {record.status})",
                {"request_id": request_id, "index": index, "status": record.status},
            )
        try:
            data = await asyncio.to_thread(self.store.get_image, request_id, index)
        except FileNotFoundError:  # pruned meanwhile
            raise ApiError(errors.REQUEST_NOT_FOUND, f"request {request_id!r} expired",
                           {"request_id": request_id}) from None
        return data, stored.format

    async def cancel(self, request_id: str) -> StatusResponse:
        job = self._get(request_id)
        if not job.record.finished:
            if job.task is not None:
                job.task.cancel()  # its generator calls are cancelled too: queued work never runs
            await self._finish(job, JobStatus.CANCELED, ApiError(errors.CANCELED, "cancelled by the client"))
        return self._status(job)

    async def wait_change(self, request_id: str, version: str | None, timeout_s: float) -> JobUpdate:
        """The job's status once its version differs from `version` (at once for None), or after `timeout_s`."""
        job = self._get(request_id)
        if version is not None and version == self._version(job):
            await job.signal.wait(timeout_s)
        return JobUpdate(version=self._version(job), status=self._status(job))

    def progress(self, updates: list[ItemProgress]) -> None:
        """Steps reported by generator replicas; only images still running here count."""
        for update in updates:
            job = self.jobs.get(update.request_id)
            if job is None or job.record.finished or update.index not in job.steps:
                continue  # late: that image has ended
            if job.steps[update.index] != (update.step, update.steps):
                job.steps[update.index] = (update.step, update.steps)
                job.signal.bump()

    def counts(self) -> JobCounts:
        active = [job.record for job in self.jobs.values() if not job.record.finished]
        return JobCounts(jobs=len(self.jobs), active_jobs=len(active), active_items=sum(len(r.items) for r in active))

    def status_counts(self) -> StatusCounts:
        held = dict.fromkeys(JobStatus, 0)
        for job in self.jobs.values():
            held[job.record.status] += 1
        return StatusCounts(held=held, ended=dict(self._ended))

    # ---- running a job ---------------------------------------------------------------------------

    async def _run(self, job: Job, restored: bool = False) -> None:
        record = job.record
        if record.finished:  # cancelled while its record was being written
            return
        missing = sorted({item.model for item in record.items} - self.models)
        if missing:
            not_served = ApiError(errors.MODEL_NOT_FOUND, f"model {missing[0]!r} is not served")
            await self._finish(job, JobStatus.FAILED, not_served)
            return
        timeout = f"the request did not finish within {record.deadline - record.created_at:g} s"
        if restored and record.deadline <= time.time():
            why = f"{timeout} (its time ran out while the job service restarted)"
            await self._finish(job, JobStatus.FAILED, ApiError(errors.TIMEOUT, why))
            return
        # The request's deadline (the record's), and a job's own wish: its items report their steps here.
        items = [replace(stored.work_item(record.request_id, record.deadline), report_progress=True)
                 for stored in record.items if record.image(stored.index) is None]
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(self._run_item(job, item) for item in items)), timeout=record.deadline - time.time()
            )
        except TimeoutError:
            await self._finish(job, JobStatus.FAILED, ApiError(errors.TIMEOUT, timeout))
            return
        except asyncio.CancelledError:
            return  # cancelled by the client (cancel() ended it) or the replica is closing
        except Exception:  # a bug here must still end the job
            logger.exception("job %s failed", record.request_id)
            failed = ApiError(errors.GENERATION_FAILED, "the job failed in the server")
            await self._finish(job, JobStatus.FAILED, failed)
            return
        failures = [outcome for outcome in outcomes if outcome is not None]
        if failures:
            await self._finish(job, JobStatus.FAILED, failures[0])
        else:
            await self._finish(job, JobStatus.SUCCEEDED)

    async def _run_item(self, job: Job, item: WorkItem) -> ApiError | None:
        """Generate and store one image; the image's bytes leave this replica as soon as they are stored."""
        async with self.slots:
            job.steps[item.index] = (0, item.key.steps)
            if job.record.status == JobStatus.IN_QUEUE:
                job.record.status = JobStatus.IN_PROGRESS
                job.record.started_at = job.record.started_at or time.time()
                await self._save_quietly(job)
            job.signal.bump()
            outcome = await self.dispatch(item, job.tokens or None)
        job.steps.pop(item.index, None)
        if isinstance(outcome, ApiError):
            return outcome
        if job.record.finished:
            return None  # it ended meanwhile (timeout, cancel): the image is not kept
        try:
            await self._store_call(self.store.put_image, outcome.request_id, outcome.index, outcome.data)
        except Exception as exc:
            logger.error("job %s: image %d not stored (%s)", job.record.request_id, item.index, type(exc).__name__)
            return ApiError(errors.GENERATION_FAILED, "the image could not be stored")
        job.record.images.append(StoredImage.of(outcome))
        job.signal.bump()
        await self._save_quietly(job)
        return None

    async def _finish(self, job: Job, status: JobStatus, error: ApiError | None = None) -> None:
        if not job.record.finish(status, time.time(), error):
            return
        self._ended[status] += 1
        job.steps.clear()
        job.signal.bump()
        await self._save_quietly(job)
        if self._webhook_pending(job):
            self._start_webhook(job)
        await self._prune(keep=job.record.request_id)

    # ---- webhooks --------------------------------------------------------------------------------

    def _webhook_pending(self, job: Job) -> bool:
        state = job.record.webhook
        if job.record.webhook_url is None or state is None or state.delivered:
            return False
        if self.webhooks is None:
            logger.warning("job %s has a webhook_url but webhooks are off now: not sent", job.record.request_id)
            return False
        return state.attempts < self.webhooks.args.max_attempts

    def _start_webhook(self, job: Job) -> None:
        self._spawn(self._deliver(job))

    async def _deliver(self, job: Job) -> None:
        record = job.record
        body = record.result_response(self.links, self._is_preview(record)).model_dump_json().encode()

        async def on_attempt(state: WebhookStatus) -> None:
            record.webhook = state
            job.signal.bump()
            await self._save_quietly(job)

        webhooks, url, webhook = self.webhooks, record.webhook_url, record.webhook
        if webhooks is None or url is None or webhook is None:  # never: _webhook_pending checked them
            return
        final = await webhooks.deliver(url, body, webhook, on_attempt, message_id(record.request_id))
        logger.info("job %s webhook: delivered=%s after %d attempts (%s)", record.request_id, final.delivered,
                    final.attempts, final.last_error or "ok")

    # ---- retention -------------------------------------------------------------------------------

    async def _prune(self, keep: str | None = None, room: int = 0) -> None:
        finished = [job.record for job in self.jobs.values() if job.record.finished]
        for request_id in jobs_to_prune(finished, self.args.jobs, time.time(), keep, room):
            job = self.jobs.pop(request_id, None)
            if job is not None:
                await self._remove(job)

    async def _remove(self, job: Job) -> None:
        async with job.lock:  # after any write in flight, which would otherwise bring the record back
            job.removed = True
            job.signal.bump()
            if self.closed:
                return
            try:
                await self._store_call(self.store.delete_job, job.record.request_id)
            except Exception as exc:  # found again by the next restart's retention
                logger.error("job %s: not deleted from the store (%s)", job.record.request_id, type(exc).__name__)

    async def _sweep(self) -> None:
        interval = min(SWEEP_S, self.args.jobs.ttl_s / 2)
        while True:
            await self._prune()
            await asyncio.sleep(interval)

    # ---- the store -------------------------------------------------------------------------------

    async def _save(self, job: Job) -> None:
        """Write the job's record as it is now; writes of one job go in order, the last one wins."""
        async with job.lock:
            if self.closed or job.removed:
                return
            await self._store_call(self.store.put_record, job.record.model_copy(deep=True))

    async def _save_quietly(self, job: Job) -> None:
        """`_save`, logging a failure: the job goes on (a restart would then find an older record)."""
        try:
            await self._save(job)
        except Exception as exc:
            logger.error("job %s: record not written (%s: %s)", job.record.request_id, type(exc).__name__, exc)

    async def _store_call(self, fn: Callable, *args):
        """A store call on a worker thread, tried again after a short wait when the store fails
        (`STORE_FAULTS`); a missing object, or anything else (a bug), raises at once."""
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                return await asyncio.to_thread(fn, *args)
            except FileNotFoundError:
                raise
            except STORE_FAULTS:
                if attempt == STORE_ATTEMPTS:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)

    # ---- helpers ---------------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _is_preview(self, record: JobRecord) -> bool:
        model = self.args.model(record.metadata.model)
        return model is not None and model.is_preview

    def _version(self, job: Job) -> str:
        return f"{self.epoch}:{job.signal.count}"

    def _status(self, job: Job) -> StatusResponse:
        return job.record.status_response(job.record.progress(job.steps))

    def _check_capacity(self, new_items: int) -> None:
        limits = self.args.limits
        counts = self.counts()
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
