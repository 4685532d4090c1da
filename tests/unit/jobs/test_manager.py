"""JobManager without Ray: jobs kept in a real store, surviving a restart, reporting progress, pruned by retention.

A "restart" is what FluxJobs goes through: the old manager stops (it writes nothing more) and a new
one over the same store restores and starts. Work items go to a dispatcher of the test's own (the
generators' place), which can hold an item to catch a job mid-way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import pytest
import standardwebhooks
from botocore.exceptions import EndpointConnectionError

from serve_app import errors
from serve_app.config import AppArgs, JobArgs, WebhookArgs
from serve_app.errors import ApiError
from serve_app.intake.request_rules import build_work_items
from serve_app.jobs.manager import JobManager
from serve_app.jobs.progress import ItemProgress
from serve_app.jobs.records import JobRecord, StoredImage, iso, jobs_to_prune
from serve_app.jobs.store import MemoryStore, open_store
from serve_app.jobs.webhooks import WebhookSender
from serve_app.schemas import InferenceRequest, ResultMetadata
from serve_app.states import FINAL_STATUSES, JobStatus
from serve_app.workitems import ItemResult, WorkItem
from tests.support.receiver import Receiver

METADATA = ResultMetadata(model="flux", base_model="black-forest-labs/FLUX.1-dev")
HOOKS = WebhookArgs(allowed_hosts=["127.0.0.1"], allow_private_addresses=True, backoff_s=0.1, timeout_s=1.0)
HOOKS_SECRET = "whsec_c2VjcmV0IG9mIHRoZSBtYW5hZ2VyIHRlc3Rz"


class Generators:
    """Stands where the generator deployments are: answers each item with an image of its own bytes.
    Items whose prompt holds "hold" wait until `release` is set."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.items: list[WorkItem] = []
        self.release = asyncio.Event()

    async def run_one(self, item: WorkItem, tokens: dict[str, str] | None = None) -> ItemResult | ApiError:
        self.calls.append(item.ref)
        self.items.append(item)
        if "hold" in item.prompt:
            await self.release.wait()
        if "fail" in item.prompt:
            return ApiError(errors.GENERATION_FAILED, "generation failed: a marked prompt")
        return ItemResult(request_id=item.request_id, index=item.index, seed=item.seed, width=item.key.width,
                          height=item.key.height, format="png", data=f"image {item.ref}".encode())


def args(**jobs) -> AppArgs:
    return AppArgs(jobs=JobArgs(store="memory", **jobs))


def manager(store, generators: Generators, **jobs) -> JobManager:
    return JobManager(store, args(**jobs), generators.run_one, models={"flux"})


def items(request_id: str, *prompts: str) -> list[WorkItem]:
    body = InferenceRequest(model="flux", prompts=[{"prompt": p, "width": 64, "height": 64, "sample_steps": 3}
                                                   for p in prompts])
    return build_work_items(body, args(), request_id)


async def submit(jobs: JobManager, *prompts: str, timeout_s: float = 60.0) -> str:
    request_id = uuid.uuid4().hex
    await jobs.submit(request_id, items(request_id, *prompts), METADATA, timeout_s)
    return request_id


async def finished(jobs: JobManager, request_id: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await jobs.status(request_id)
        if status.status in ("succeeded", "failed", "canceled"):
            return status
        await asyncio.sleep(0.01)
    raise TimeoutError(request_id)


@pytest.fixture(params=["directory", "s3"])
def durable_store(request, tmp_path):
    """Opens the same store again each time it is called, as a restarted replica does."""
    if request.param == "directory":
        return lambda: open_store(JobArgs(store=str(tmp_path / "jobs")))
    s3 = request.getfixturevalue("s3")
    url = s3.new_store_url()
    return lambda: open_store(JobArgs(store=url, store_options=s3.options))


# ---- running and reading jobs ----------------------------------------------------------------------


def test_a_job_runs_and_its_images_are_read_from_the_store_not_memory():
    store = MemoryStore()

    async def go():
        jobs = manager(store, Generators())
        jobs.start()
        request_id = await submit(jobs, "one", "two")
        status = await finished(jobs, request_id)
        result = await jobs.result(request_id)
        first = await jobs.image(request_id, 1)
        store.delete_job(request_id)  # the bytes are nowhere else
        with pytest.raises(ApiError) as gone:
            await jobs.image(request_id, 1)
        jobs.close()
        return status, result, first, gone.value

    status, result, first, gone = asyncio.run(go())
    assert status.status == "succeeded" and status.progress.images_done == status.progress.images == 2
    assert [image.url for image in result.outputs.images] == [
        f"/v1/requests/{result.request_id}/images/0", f"/v1/requests/{result.request_id}/images/1"]
    assert first == (f"image ('{result.request_id}', 1)".encode(), "png")
    assert gone.code == errors.REQUEST_NOT_FOUND


def test_a_failed_item_fails_its_job_with_the_items_code():
    async def go():
        jobs = manager(MemoryStore(), Generators())
        jobs.start()
        status = await finished(jobs, await submit(jobs, "fine", "fail me"))
        jobs.close()
        return status

    status = asyncio.run(go())
    assert (status.status, status.error_code) == ("failed", errors.GENERATION_FAILED)


def test_a_repeated_submit_answers_the_job_already_accepted():
    async def go():
        generators = Generators()
        jobs = manager(MemoryStore(), generators)
        request_id = uuid.uuid4().hex
        first = await jobs.submit(request_id, items(request_id, "once"), METADATA, 60)
        again = await jobs.submit(request_id, items(request_id, "once"), METADATA, 60)
        await finished(jobs, request_id)
        jobs.close()
        return first, again, generators.calls

    first, again, calls = asyncio.run(go())
    assert first.created_at == again.created_at and len(calls) == 1


def test_concurrent_submits_never_exceed_the_pending_limit():
    """Each submit waits for its record to be written: the ones arriving meanwhile must still count it."""

    async def go():
        jobs = JobManager(MemoryStore(), AppArgs(jobs=JobArgs(store="memory"), limits={"max_pending_jobs": 3}),
                          Generators().run_one, models={"flux"})
        request_ids = [uuid.uuid4().hex for _ in range(8)]
        answers = await asyncio.gather(*(jobs.submit(r, items(r, "hold"), METADATA, 60) for r in request_ids),
                                       return_exceptions=True)
        jobs.close()
        return answers

    answers = asyncio.run(go())
    refused = [a for a in answers if isinstance(a, ApiError)]
    assert len(answers) - len(refused) == 3 and {a.code for a in refused} == {errors.OVERLOADED}


def test_a_store_that_cannot_be_written_refuses_the_job_with_503():
    class BrokenStore(MemoryStore):
        def put_record(self, record):
            raise OSError("disk full")

    async def go():
        jobs = manager(BrokenStore(), Generators())
        request_id = uuid.uuid4().hex
        with pytest.raises(ApiError) as refused:
            await jobs.submit(request_id, items(request_id, "x"), METADATA, 60)
        return refused.value, jobs.counts()

    refused, counts = asyncio.run(go())
    assert refused.code == errors.JOBS_UNAVAILABLE and refused.status_code == 503
    assert counts.jobs == 0


class FlakyStore(MemoryStore):
    """Its record writes raise each of `errors` in turn, then work."""

    def __init__(self, *errors: Exception):
        super().__init__()
        self.errors = list(errors)
        self.writes = 0

    def put_record(self, record):
        self.writes += 1
        if self.errors:
            raise self.errors.pop(0)
        super().put_record(record)


@pytest.mark.parametrize("fault", [OSError("connection reset"), EndpointConnectionError(endpoint_url="http://s3")])
def test_a_store_fault_is_tried_again(fault):
    async def go():
        store = FlakyStore(fault)
        jobs = manager(store, Generators())
        request_id = uuid.uuid4().hex
        status = await jobs.submit(request_id, items(request_id, "x"), METADATA, 60)
        jobs.close()
        return status, store

    status, store = asyncio.run(go())
    assert status.status == "in_queue" and store.writes == 2 and len(store.load_records()) == 1


@pytest.mark.parametrize("bug", [TypeError("an argument the store does not take"), ValueError("a bad value"),
                                 AttributeError("no such field")])
def test_a_bug_in_a_store_call_raises_at_once_and_is_not_passed_off_as_a_store_fault(bug):
    async def go():
        store = FlakyStore(bug, bug, bug)
        jobs = manager(store, Generators())
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        with pytest.raises(type(bug)) as raised:
            await jobs.submit(request_id, items(request_id, "x"), METADATA, 60)
        return raised.value, store, jobs.counts(), time.monotonic() - started

    raised, store, counts, elapsed = asyncio.run(go())
    assert raised is bug and store.writes == 1 and elapsed < 0.3  # no retry, no backoff
    assert counts.jobs == 0


def test_cancelling_a_queued_job_means_its_work_never_runs():
    async def go():
        generators = Generators()
        jobs = manager(MemoryStore(), generators, max_dispatched_items=1)
        blocker = await submit(jobs, "hold the only slot")
        queued = await submit(jobs, "never runs")
        await asyncio.sleep(0.05)
        cancelled = await jobs.cancel(queued)
        generators.release.set()
        await finished(jobs, blocker)
        jobs.close()
        return cancelled, generators.calls, queued

    cancelled, calls, queued = asyncio.run(go())
    assert (cancelled.status, cancelled.error_code) == ("canceled", errors.CANCELED)
    assert all(request_id != queued for request_id, _ in calls)


def test_jobs_by_status_name_every_status_and_count_each_end_once():
    """What FluxJobs exports as metrics (serving/metrics.py): every status from the start, 0 included."""

    async def go():
        generators = Generators()
        jobs = manager(MemoryStore(), generators, max_dispatched_items=1)
        start = jobs.status_counts()
        running = await submit(jobs, "hold the only slot")
        queued = await submit(jobs, "waits")
        await asyncio.sleep(0.05)
        middle = jobs.status_counts()
        await jobs.cancel(queued)
        await jobs.cancel(queued)  # ends nothing more
        generators.release.set()
        await finished(jobs, running)
        await finished(jobs, await submit(jobs, "fail me"))
        end = jobs.status_counts()
        jobs.close()
        return start, middle, end

    start, middle, end = asyncio.run(go())
    assert start.held == dict.fromkeys(JobStatus, 0)
    assert start.ended == dict.fromkeys(FINAL_STATUSES, 0)
    assert (middle.held[JobStatus.IN_PROGRESS], middle.held[JobStatus.IN_QUEUE]) == (1, 1)
    assert end.held == {**dict.fromkeys(JobStatus, 0), **dict.fromkeys(FINAL_STATUSES, 1)}
    assert end.ended == dict.fromkeys(FINAL_STATUSES, 1)


# ---- progress and change notification ---------------------------------------------------------------


def test_progress_follows_the_running_image_and_wakes_waiters():
    async def go():
        generators = Generators()
        jobs = manager(MemoryStore(), generators)
        request_id = await submit(jobs, "hold me")
        first = await jobs.wait_change(request_id, None, 0)
        while first.status.status != "in_progress":
            first = await jobs.wait_change(request_id, first.version, 1)
        waiter = asyncio.create_task(jobs.wait_change(request_id, first.version, 5))
        jobs.progress([ItemProgress(request_id, 0, 2, 3)])
        woken = await asyncio.wait_for(waiter, 1)
        quiet = await jobs.wait_change(request_id, woken.version, 0.05)  # nothing changed: same version
        generators.release.set()
        done = await finished(jobs, request_id)
        jobs.progress([ItemProgress(request_id, 0, 1, 3)])  # late: that image has ended
        after = await jobs.status(request_id)
        jobs.close()
        return first, woken, quiet, done, after

    first, woken, quiet, done, after = asyncio.run(go())
    assert first.status.progress.model_dump() == {"images_done": 0, "images": 1, "step": 0, "steps": 3}
    assert woken.version != first.version
    assert woken.status.progress.model_dump() == {"images_done": 0, "images": 1, "step": 2, "steps": 3}
    assert quiet.version == woken.version
    assert done.progress.model_dump() == after.progress.model_dump() == {
        "images_done": 1, "images": 1, "step": 3, "steps": 3}


# ---- deadline ---------------------------------------------------------------------------------------


def test_a_job_keeps_the_requests_deadline_and_asks_for_progress_before_and_after_a_restart():
    """The ingress sets the request's deadline on its items: the job gets no more time than that, through
    the store and a restart, and its items ask for progress because they are a job's, on every run."""
    store = MemoryStore()
    deadline = time.time() + 30  # the request's; the job service would give 60 s from now

    async def before():
        generators = Generators()
        jobs = manager(store, generators)
        request_id = uuid.uuid4().hex
        sent = [replace(item, deadline=deadline) for item in items(request_id, "hold")]
        assert not sent[0].report_progress  # as the ingress sends them
        accepted = await jobs.submit(request_id, sent, METADATA, 60)
        while not generators.items:
            await asyncio.sleep(0.01)
        jobs.close()
        return request_id, accepted, generators.items

    request_id, accepted, first_run = asyncio.run(before())
    record = store.load_records()[0]
    assert record.deadline == deadline and accepted.created_at == iso(deadline - 60)

    async def after():
        generators = Generators()
        generators.release.set()
        jobs = manager(store, generators)
        jobs.restore()
        jobs.start()
        status = await finished(jobs, request_id)
        jobs.close()
        return status, generators.items

    status, second_run = asyncio.run(after())
    assert status.status == "succeeded"
    for item in first_run + second_run:
        assert item.deadline == deadline and item.report_progress


def test_a_job_past_the_requests_deadline_fails_with_timeout_naming_the_requests_time():
    async def go():
        jobs = manager(MemoryStore(), Generators())
        request_id = uuid.uuid4().hex
        sent = [replace(item, deadline=time.time() + 0.2) for item in items(request_id, "hold")]
        await jobs.submit(request_id, sent, METADATA, 0.2)
        status = await finished(jobs, request_id)
        jobs.close()
        return status

    status = asyncio.run(go())
    assert (status.status, status.error_code) == ("failed", errors.TIMEOUT)
    assert status.error == "the request did not finish within 0.2 s"


# ---- restart ------------------------------------------------------------------------------------------


def test_after_a_restart_finished_jobs_stay_readable_and_unfinished_ones_run_again(durable_store):
    async def before_restart():
        generators = Generators()
        jobs = manager(durable_store(), generators)
        jobs.start()
        done = await submit(jobs, "finished before")
        await finished(jobs, done)
        cut_off = await submit(jobs, "stored before", "hold: cut off")
        while (await jobs.status(cut_off)).progress.images_done < 1:
            await asyncio.sleep(0.01)
        queued = await submit(jobs, "hold: never started")
        jobs.close()  # the replica is gone: nothing more is written
        return done, cut_off, queued

    done, cut_off, queued = asyncio.run(before_restart())

    async def after_restart():
        generators = Generators()
        generators.release.set()
        jobs = manager(durable_store(), generators)
        report = jobs.restore()
        restored = {request_id: (await jobs.status(request_id)).status for request_id in (done, cut_off, queued)}
        jobs.start()
        statuses = [await finished(jobs, request_id) for request_id in (cut_off, queued)]
        images = [await jobs.image(request_id, 0) for request_id in (done, cut_off, queued)]
        jobs.close()
        return report, restored, statuses, images, generators.calls

    report, restored, statuses, images, calls = asyncio.run(after_restart())
    assert (report.finished, report.resumed) == (1, 2)
    assert restored == {done: "succeeded", cut_off: "in_queue", queued: "in_queue"}
    assert [s.status for s in statuses] == ["succeeded", "succeeded"]
    assert images[0] == (f"image ('{done}', 0)".encode(), "png")
    # The image stored before the restart is kept, not made again.
    assert sorted(calls) == sorted([(cut_off, 1), (queued, 0)])


def test_a_job_whose_time_ran_out_while_no_replica_ran_it_fails_with_timeout(tmp_path):
    async def before():
        jobs = manager(open_store(JobArgs(store=str(tmp_path))), Generators())
        request_id = await submit(jobs, "hold", timeout_s=0.2)
        jobs.close()
        return request_id

    request_id = asyncio.run(before())
    time.sleep(0.3)

    async def after():
        jobs = manager(open_store(JobArgs(store=str(tmp_path))), Generators())
        jobs.restore()
        jobs.start()
        status = await finished(jobs, request_id)
        jobs.close()
        return status

    status = asyncio.run(after())
    assert (status.status, status.error_code) == ("failed", errors.TIMEOUT)
    assert "restarted" in status.error


def test_a_restored_job_of_a_model_no_longer_served_fails_with_its_code(tmp_path):
    async def go():
        store = open_store(JobArgs(store=str(tmp_path)))
        jobs = manager(store, Generators())
        request_id = await submit(jobs, "hold")
        jobs.close()
        again = JobManager(store, args(), Generators().run_one, models={"another-model"})
        again.restore()
        again.start()
        status = await finished(again, request_id)
        again.close()
        return status

    status = asyncio.run(go())
    assert (status.status, status.error_code) == ("failed", errors.MODEL_NOT_FOUND)


def test_images_left_without_a_record_are_deleted_on_restore(tmp_path):
    store = open_store(JobArgs(store=str(tmp_path)))
    store.put_image("a" * 32, 0, b"orphan")
    report = manager(store, Generators()).restore()
    assert report.orphans_deleted == 1 and store.image_job_ids() == set()


def test_a_webhook_not_delivered_before_a_restart_is_delivered_after_it(tmp_path):
    """FluxJobs stores each attempt: its successor resumes the delivery where it stopped, as the same
    message (the same webhook-id)."""
    args = AppArgs(jobs=JobArgs(store=str(tmp_path)), webhooks=HOOKS)
    first = Receiver(statuses=(500,) * 5)  # the attempts before the restart fail
    url, port = first.url, first.port

    def replica() -> JobManager:
        return JobManager(open_store(args.jobs), args, Generators().run_one, {"flux"},
                          WebhookSender(HOOKS, HOOKS_SECRET))

    async def before(jobs: JobManager) -> str:
        request_id = uuid.uuid4().hex
        await jobs.submit(request_id, items(request_id, "x"), METADATA, 60, webhook_url=url)
        await finished(jobs, request_id)
        while jobs.store.load_records()[0].webhook.attempts < 1:  # the failed attempt is stored
            await asyncio.sleep(0.01)
        jobs.close()
        return request_id

    async def after(jobs: JobManager, request_id: str):
        jobs.restore()
        jobs.start()
        while not (await jobs.status(request_id)).webhook.delivered:
            await asyncio.sleep(0.02)
        status, result = await jobs.status(request_id), await jobs.result(request_id)
        jobs.close()
        return status, result

    with first:
        request_id = asyncio.run(before(replica()))
    with Receiver(port=port) as receiver:
        status, result = asyncio.run(after(replica(), request_id))
    assert status.webhook.delivered and status.webhook.attempts >= 2 and status.webhook.last_error is None
    assert [d.body for d in receiver.deliveries] == [result.model_dump_json().encode()]
    # one message before and after the restart: its webhook-id comes from the stored job, not the replica
    deliveries = [*first.deliveries, *receiver.deliveries]
    assert first.deliveries and {d.headers["webhook-id"] for d in deliveries} == {f"msg_{request_id}"}
    for delivery in deliveries:
        standardwebhooks.Webhook(HOOKS_SECRET).verify(delivery.body, delivery.headers)


# ---- retention ----------------------------------------------------------------------------------------


def finished_record(request_id: str, image_bytes: int, finished_ago_s: float = 0.0) -> JobRecord:
    now = time.time()
    record = JobRecord(request_id=request_id, created_at=now - 100, deadline=now + 500, items=[], metadata=METADATA,
                       images=[StoredImage(index=0, seed=1, width=64, height=64, format="png", bytes=image_bytes)])
    record.finish("succeeded", now - finished_ago_s)
    return record


def prune(records, keep=None, room=0, **limits) -> list[str]:
    return sorted(jobs_to_prune(records, JobArgs(**limits), time.time(), keep, room))


def test_the_oldest_finished_jobs_go_first_past_the_count():
    records = [finished_record(f"j{i}", 10, finished_ago_s=10 - i) for i in range(5)]
    assert prune(records, max_jobs=3) == ["j0", "j1"]
    assert prune(records, max_jobs=3, room=1) == ["j0", "j1", "j2"]


def test_pruning_goes_by_finish_time_not_submit_time_and_spares_the_job_just_finished():
    # Submitted first, finished last: a long job. It must not vanish the moment it succeeds.
    records = [finished_record("long", 10), finished_record("a", 10, finished_ago_s=5),
               finished_record("b", 10, finished_ago_s=3)]
    assert prune(records, keep="long", max_jobs=2) == ["a"]
    records = [finished_record("old", 10, finished_ago_s=5), finished_record("just", 10)]
    assert prune(records, keep="just", max_jobs=1) == ["old"]


def test_finished_jobs_past_their_time_are_dropped():
    assert prune([finished_record("old", 10, finished_ago_s=61), finished_record("new", 10)], ttl_s=60) == ["old"]


def test_image_bytes_are_bounded():
    records = [finished_record(f"j{i}", 1000, finished_ago_s=10 - i) for i in range(4)]
    assert prune(records, max_result_bytes=2500) == ["j0", "j1"]


def test_retention_deletes_from_the_store_and_never_drops_unfinished_jobs(tmp_path):
    async def go():
        store = open_store(JobArgs(store=str(tmp_path)))
        generators = Generators()
        jobs = manager(store, generators, max_jobs=1)
        jobs.start()
        running = await submit(jobs, "hold")
        first = await submit(jobs, "first")
        await finished(jobs, first)
        second = await submit(jobs, "second")
        await finished(jobs, second)
        kept = sorted(record.request_id for record in store.load_records())
        generators.release.set()
        await finished(jobs, running)
        jobs.close()
        return kept, sorted([running, second]), first

    kept, expected, first = asyncio.run(go())
    assert kept == expected and first not in kept


@pytest.mark.parametrize("ts,text", [(0.0, "1970-01-01T00:00:00.000000Z"), (1.5, "1970-01-01T00:00:01.500000Z")])
def test_timestamps_are_iso_utc_with_one_zone_suffix(ts, text):
    assert iso(ts) == text
    assert iso(time.time()).count("Z") == 1 and "+" not in iso(time.time())


def test_a_stored_item_and_image_keep_every_field_a_rerun_and_a_result_need():
    """A preview item (its merge choice), a LoRA fetched with a token (its hash, never the token), and the
    image's tier and effective settings survive the record's JSON."""
    from serve_app.jobs.records import StoredImage, StoredItem
    from serve_app.workitems import BatchKey, LoraUse

    key = BatchKey(model="flux-preview-bf16", width=112, height=96, steps=5, guidance=3.5,
                   loras=(LoraUse("hf://o/r/x.safetensors", 0.75, "0123abcd"),), lora_mode="merged")
    item = WorkItem(request_id="r", index=2, prompt="sks a cat", seed=7, key=key, output_format="png")
    stored = StoredItem.model_validate_json(StoredItem.of(item).model_dump_json())
    assert stored.work_item("r", deadline=1.0).key == key
    result = ItemResult(request_id="r", index=2, seed=7, width=112, height=96, format="png", data=b"x",
                        lora_modules=(("hf://o/r/x.safetensors (token 0123abcd)", 12),), speed_tier="exact",
                        lora_mode="merged", prompt="sks a cat", steps=5, guidance=3.5, multiplier=0.75)
    image = StoredImage.model_validate_json(StoredImage.of(result).model_dump_json())
    assert (image.lora_mode, image.prompt, image.steps, image.guidance, image.multiplier) == (
        "merged", "sks a cat", 5, 3.5, 0.75)
