"""FluxJobs: the async-jobs deployment, a thin Serve shell around JobManager (serving/job_manager.py).

One replica (app.py) that every ingress replica asks, so status, result and event streams are right
whichever ingress replica answers, and a job keeps running if the ingress replica that took it dies.
The jobs themselves live in the job store (serving/store.py), so they also outlive this replica:
- on start it takes the store's lease (a replacement waits while its predecessor still drains, or
  until the lease of one that died expires), reads the store back and runs what was unfinished;
- a task renews the lease; a replica that finds it taken stops working at once;
- its destructor, which Serve calls once the replica has drained, stops the jobs and gives the
  lease up, so a redeploy's new replica takes over without waiting for the lease to expire.
Its jobs by status go to `ray.serve.metrics` every few seconds (serving/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs
from serve_app.jobs.events import JobUpdate
from serve_app.jobs.manager import JobCounts, JobManager
from serve_app.jobs.progress import ItemProgress
from serve_app.jobs.store import StoreLease, open_store
from serve_app.jobs.webhooks import WebhookSender, load_secret
from serve_app.schemas import ResultMetadata, ResultResponse, StatusResponse
from serve_app.serving.dispatch import Generators
from serve_app.serving.metrics import JobsMetrics, keep_exporting
from serve_app.workitems import WorkItem

logger = logging.getLogger("ray.serve")

MAX_WAIT_S = 30.0  # the longest a wait_change call is held open


def server_name() -> str:
    """This server, as a job store's lease names its holder: the Serve app and its Ray cluster (called in a
    replica). Two `make serve` from one checkout are two Ray clusters: two servers on the same store."""
    return f"app {serve.get_replica_context().app_name!r} of the Ray cluster at {ray.get_runtime_context().gcs_address}"


class FluxJobs:
    def __init__(self, generators: dict[str, DeploymentHandle], args: AppArgs):
        # A missing or undecodable webhook secret fails the start with load_secret's message, before the lease
        secret = load_secret(args.webhooks)
        webhooks = WebhookSender(args.webhooks, secret) if secret else None
        self.store = open_store(args.jobs)
        owner = f"{serve.get_replica_context().replica_id.unique_id}-{uuid.uuid4().hex[:8]}"
        self.lease = StoreLease(self.store, owner, args.jobs.lease_s, server_name())
        waited = self.lease.acquire()
        dispatch = Generators(generators, args.limits.retry_after_s)
        self.manager = JobManager(self.store, args, dispatch.run_one, {m.id for m in args.models}, webhooks)
        report = self.manager.restore()
        logger.info("job store %s: lease taken after %.1f s; %d finished jobs kept, %d unfinished resumed, "
                    "%d orphaned image sets deleted", self.store.description, waited, report.finished,
                    report.resumed, report.orphans_deleted)
        self.manager.start()
        self._lease_task = asyncio.get_running_loop().create_task(self._keep_lease())
        self.metrics = JobsMetrics()
        self._metrics_task = asyncio.get_running_loop().create_task(keep_exporting(self._export_metrics))

    def __del__(self) -> None:
        """Serve calls this after draining (and Python may again later): stop, and hand the store over."""
        manager = getattr(self, "manager", None)
        if manager is None or manager.closed:
            return
        manager.close()
        self._lease_task.cancel()
        self._metrics_task.cancel()
        try:
            self.lease.release()
        except Exception as exc:  # the successor then waits for the lease to expire
            logger.warning("job store lease not released: %s", type(exc).__name__)

    async def _keep_lease(self) -> None:
        while not self.manager.closed:
            await asyncio.sleep(self.lease.lease_s / 3)
            try:
                held = await asyncio.to_thread(self.lease.renew)
            except Exception as exc:  # the store is unreachable: keep trying while the lease lasts
                logger.warning("job store lease not renewed: %s", type(exc).__name__)
                continue
            if not held:
                logger.error("job store %s: another FluxJobs replica holds the lease; this one stops",
                             self.store.description)
                self.manager.close()

    def _export_metrics(self) -> None:
        # A replica that lost the store's lease holds jobs no more: its series age out of Ray's export.
        if not self.manager.closed:
            self.metrics.export(self.manager.status_counts())

    async def ping(self) -> bool:
        return True

    async def counts(self) -> JobCounts:
        return self.manager.counts()

    async def submit(self, request_id: str, items: list[WorkItem], metadata: ResultMetadata, timeout_s: float,
                     webhook_url: str | None = None, tokens: dict[str, str] | None = None) -> StatusResponse:
        return await self.manager.submit(request_id, items, metadata, timeout_s, webhook_url, tokens)

    async def status(self, request_id: str) -> StatusResponse:
        return await self.manager.status(request_id)

    async def result(self, request_id: str) -> ResultResponse:
        return await self.manager.result(request_id)

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        return await self.manager.image(request_id, index)

    async def cancel(self, request_id: str) -> StatusResponse:
        return await self.manager.cancel(request_id)

    async def wait_change(self, request_id: str, version: str | None, timeout_s: float) -> JobUpdate:
        """Long-poll: the job's status once it differs from `version` (event streams, serving/events.py)."""
        return await self.manager.wait_change(request_id, version, min(timeout_s, MAX_WAIT_S))

    async def progress(self, updates: list[ItemProgress]) -> None:
        """Denoising steps from generator replicas (serving/progress.py)."""
        self.manager.progress(updates)
