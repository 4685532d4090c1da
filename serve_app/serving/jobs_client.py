"""FluxJobsClient: the ingress's calls to the FluxJobs deployment, one typed method per call.

It is the JobsClient of `web/service.py` (the Protocol `IngressService` is built with). Every call goes
through `_retrying`: a call cut off by the death of the FluxJobs replica (RayActorError, or Serve's
ReplicaUnavailableError) is sent again, with backoff, for up to JOBS_RETRY_S, and reaches its replacement,
which has read the jobs back from the store; a repeated submit answers the job already accepted. Past that,
the client gets 503 JOBS_UNAVAILABLE with `retry_after_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.jobs.events import JobUpdate
from serve_app.schemas import ResultMetadata, ResultResponse, StatusResponse
from serve_app.workitems import WorkItem

logger = logging.getLogger("ray.serve")

JOBS_RETRY_S = 60.0  # how long a call to FluxJobs keeps being sent again while its replica is replaced
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 4.0

T = TypeVar("T")


class FluxJobsClient:
    def __init__(self, handle: DeploymentHandle, retry_after_s: int, retry_s: float = JOBS_RETRY_S):
        self._handle = handle
        self._retry_after_s = retry_after_s
        self._retry_s = retry_s
        self.answered_at: float | None = None  # time.monotonic() of FluxJobs' last answer, for the health probe

    async def submit(self, request_id: str, items: list[WorkItem], metadata: ResultMetadata, timeout_s: float,
                     webhook_url: str | None = None, tokens: dict[str, str] | None = None) -> StatusResponse:
        return await self._retrying("submit", lambda: self._handle.submit.remote(
            request_id, items, metadata, timeout_s, webhook_url, tokens))

    async def status(self, request_id: str) -> StatusResponse:
        return await self._retrying("status", lambda: self._handle.status.remote(request_id))

    async def result(self, request_id: str) -> ResultResponse:
        return await self._retrying("result", lambda: self._handle.result.remote(request_id))

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        return await self._retrying("image", lambda: self._handle.image.remote(request_id, index))

    async def cancel(self, request_id: str) -> StatusResponse:
        return await self._retrying("cancel", lambda: self._handle.cancel.remote(request_id))

    async def wait_change(self, request_id: str, version: str | None, timeout_s: float) -> JobUpdate:
        return await self._retrying("wait_change", lambda: self._handle.wait_change.remote(
            request_id, version, timeout_s))

    async def ping(self) -> bool:
        return await self._retrying("ping", lambda: self._handle.ping.remote())

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Make the call, and make it again while a dead FluxJobs replica is replaced (module docstring)."""
        deadline = time.monotonic() + self._retry_s
        delay = FIRST_DELAY_S
        while True:
            try:
                answer = await call()
            except (RayActorError, ReplicaUnavailableError) as exc:
                if time.monotonic() + delay > deadline:
                    raise ApiError(errors.JOBS_UNAVAILABLE, "the job service is restarting; retry later",
                                   {"retry_after_s": self._retry_after_s}) from None
                logger.warning("FluxJobs.%s: its replica was lost (%s); sending it again", what, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
                continue
            except ApiError:  # FluxJobs answered, with the request's error (no such job, say)
                self.answered_at = time.monotonic()
                raise
            self.answered_at = time.monotonic()
            return answer
