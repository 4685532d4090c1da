"""Event streams and step progress without Ray: the SSE stream of a job, and progress reports that never
block the engine thread and reach FluxJobs a few times a second at most."""

from __future__ import annotations

import asyncio
import threading
import time

from serve_app.client import iter_sse
from serve_app.jobs.events import KEEPALIVE, JobUpdate, status_events
from serve_app.jobs.progress import ProgressForwarder
from serve_app.schemas import JobProgress, StatusResponse
from serve_app.workitems import BatchKey, WorkItem


def update(version: str, status: str, step: int = 0) -> JobUpdate:
    progress = JobProgress(images_done=int(status == "succeeded"), images=1, step=step, steps=4)
    return JobUpdate(version, StatusResponse(request_id="r", status=status, created_at="t", progress=progress))


def collect(first: JobUpdate, following: list[JobUpdate | None]) -> list[bytes]:
    async def next_update(version):
        return following.pop(0)

    async def go():
        return [message async for message in status_events(first, next_update)]

    return asyncio.run(go())


def test_a_running_job_streams_each_change_then_the_end_and_closes():
    messages = collect(update("e:1", "in_queue"), [
        update("e:2", "in_progress", 1), update("e:2", "in_progress", 1),  # a quiet poll: a keep-alive
        update("e:3", "in_progress", 3), update("e:4", "succeeded", 4)])
    assert messages[2] == KEEPALIVE
    events = list(iter_sse(b"".join(messages).decode().split("\n")))
    assert [name for name, _ in events] == ["status", "status", "status", "end"]
    steps = [StatusResponse.model_validate_json(data).progress.step for _, data in events]
    assert steps == [0, 1, 3, 4]
    assert messages[-1].startswith(b"event: end\ndata: {") and messages[-1].endswith(b"}\n\n")


def test_a_finished_job_gets_the_end_event_at_once_and_a_vanished_job_closes_the_stream():
    assert [m.split(b"\n")[0] for m in collect(update("e:9", "failed"), [])] == [b"event: end"]
    assert len(collect(update("e:1", "in_progress"), [None])) == 1


def test_progress_reports_never_wait_and_are_coalesced_to_the_latest():
    sent: list[list] = []

    async def go():
        async def send(updates):
            sent.append(updates)
            await asyncio.sleep(0.2)  # a slow FluxJobs

        forwarder = ProgressForwarder(send, asyncio.get_running_loop(), interval_s=0.1)
        item = WorkItem("r", 0, "p", 1, BatchKey("flux", 64, 64, 50, 4.0), report_progress=True)
        sync_item = WorkItem("s", 0, "p", 1, BatchKey("flux", 64, 64, 50, 4.0))
        slowest = 0.0

        def engine_thread():
            nonlocal slowest
            for step in range(1, 51):
                started = time.perf_counter()
                forwarder.report([item, sync_item], step, 50)
                slowest = max(slowest, time.perf_counter() - started)
                time.sleep(0.02)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        return slowest

    slowest = asyncio.run(go())
    assert slowest < 0.01
    assert 2 <= len(sent) <= 8  # about 1 s of steps, one send per 0.3 s at most
    assert all(len(updates) == 1 and updates[0].request_id == "r" for updates in sent)  # sync items: none
    assert sent[-1][0].step == 50
