"""Step progress, from a generator replica's engine thread to FluxJobs, without slowing generation.

The engine calls the replica's `on_steps(items, step, steps)` after each denoising step, on the
engine thread. `ProgressForwarder.report` only records the latest step of each async job's item
under a lock and, when nothing was pending, wakes a task on the replica's event loop; that task
sends everything pending in one call, then waits `interval_s` before it sends again. So FluxJobs
gets at most a few updates a second per generator replica (each the latest, older ones dropped),
and the engine never waits for FluxJobs: a slow or restarting FluxJobs only delays updates.

No Ray here: the Serve shell passes a `send` that calls FluxJobs through its handle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from serve_app.workitems import WorkItem

logger = logging.getLogger("ray.serve")

INTERVAL_S = 0.25  # at most four updates a second
SEND_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ItemProgress:
    """A running image's denoising step, as its generator replica reports it."""

    request_id: str
    index: int
    step: int
    steps: int


Send = Callable[[list[ItemProgress]], Awaitable[object]]


class ProgressForwarder:
    """Coalesces step reports and sends them from the event loop (module docstring).

    Args:
        send: delivers a batch of updates (to FluxJobs).
        loop: the event loop the sending task runs on (the replica's).
        interval_s: the least time between two sends.
    """

    def __init__(self, send: Send, loop: asyncio.AbstractEventLoop, interval_s: float = INTERVAL_S):
        self._send = send
        self._loop = loop
        self._interval_s = interval_s
        self._pending: dict[tuple[str, int], ItemProgress] = {}
        self._lock = threading.Lock()
        self._sending = False
        self._task: asyncio.Task | None = None

    def report(self, items: Sequence[WorkItem], step: int, steps: int) -> None:
        """Called on the engine thread after each step: never blocks on anything but a short lock."""
        wanted = [item for item in items if item.report_progress]
        if not wanted:
            return
        with self._lock:
            for item in wanted:
                self._pending[item.ref] = ItemProgress(item.request_id, item.index, step, steps)
            start = not self._sending
            self._sending = True
        if start:
            self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = self._loop.create_task(self._send_pending())

    async def _send_pending(self) -> None:
        while True:
            with self._lock:
                updates = list(self._pending.values())
                self._pending.clear()
                if not updates:
                    self._sending = False
                    return
            try:
                await asyncio.wait_for(self._send(updates), SEND_TIMEOUT_S)
            except Exception as exc:  # progress is best effort: the job's end is reported anyway
                logger.debug("progress update not delivered: %s", type(exc).__name__)
            await asyncio.sleep(self._interval_s)
