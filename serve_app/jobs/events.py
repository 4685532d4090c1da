"""Live job updates: the change signal FluxJobs keeps per job, and the Server-Sent Events stream (docs/jobs.md).

FluxJobs bumps a job's `ChangeSignal` at every change (status, progress, webhook). The ingress
long-polls `FluxJobs.wait_change(id, version, timeout_s)` and turns each new version into an
`event: status` message; the final status goes out as `event: end`, and the stream closes. Any
ingress replica can stream any job, since the state lives in FluxJobs.

A version is `<epoch>:<count>`, the epoch being drawn by each FluxJobs replica when it starts: a
stream that outlives a FluxJobs restart then sees a new version at once, never a count that
happens to equal the one it waited past.

No Ray here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from serve_app.schemas import StatusResponse

KEEPALIVE = b": keepalive\n\n"  # an SSE comment: keeps proxies from closing a quiet stream


@dataclass(frozen=True)
class JobUpdate:
    """A job's status at one version (what `FluxJobs.wait_change` answers)."""

    version: str
    status: StatusResponse

    @property
    def finished(self) -> bool:
        return self.status.status.is_final


class ChangeSignal:
    """A change count, and a way to wait for the next change (one event loop only)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.count += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()  # wakes every waiter of the count that just ended

    async def wait(self, timeout_s: float) -> None:
        """Until the next bump, or `timeout_s`, whichever comes first."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass


def sse_message(event: str, data: str) -> bytes:
    """One SSE message. `data` is compact JSON: one line, so one `data:` field."""
    return f"event: {event}\ndata: {data}\n\n".encode()


def status_message(update: JobUpdate) -> bytes:
    return sse_message("end" if update.finished else "status", update.status.model_dump_json())


async def status_events(
    first: JobUpdate, next_update: Callable[[str], Awaitable[JobUpdate | None]]
) -> AsyncIterator[bytes]:
    """The SSE stream of one job, from its status `first`.

    Args:
        first: the job's status now (a finished job gets its `end` message at once).
        next_update: the job's status once its version differs from the one given, or the same
            version after a quiet while (a keep-alive comment goes out); None when the job is gone.

    Yields:
        `event: status` at each change, then one `event: end` with the final status.
    """
    update = first
    while True:
        yield status_message(update)
        if update.finished:
            return
        while True:
            following = await next_update(update.version)
            if following is None:
                return
            if following.version != update.version:
                update = following
                break
            yield KEEPALIVE
