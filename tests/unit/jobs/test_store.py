"""The job store, without Ray: a directory, an S3-compatible server (moto), and memory behave alike.

Records round-trip as typed JSON, images as bytes; writes are atomic (a reader never sees half an
object, and no temporary file stays behind); the lease lets one owner in at a time.
"""

from __future__ import annotations

import json
import threading

import pytest

from serve_app.config import JobArgs
from serve_app.jobs.records import JobRecord, StoredItem
from serve_app.jobs.store import FsspecStore, MemoryStore, StoreLease, open_store
from serve_app.schemas import ResultMetadata, WebhookStatus
from serve_app.workitems import BatchKey, LoraUse, WorkItem

REQUEST_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["memory", "directory", "s3"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    if request.param == "directory":
        return open_store(JobArgs(store=str(tmp_path / "jobs")))
    server = request.getfixturevalue("s3")
    return open_store(JobArgs(store=server.new_store_url(), store_options=server.options))


def record(request_id: str = REQUEST_ID, **fields) -> JobRecord:
    item = WorkItem(request_id=request_id, index=0, prompt="a photo", seed=7, neg="",
                    key=BatchKey("flux", 64, 64, 2, 4.0, (LoraUse("aitk/style.safetensors", 0.5),)))
    return JobRecord(request_id=request_id, created_at=1.0, deadline=61.0, items=[StoredItem.of(item)],
                     metadata=ResultMetadata(model="flux", base_model="b"), **fields)


def test_records_and_images_round_trip(store):
    written = record(webhook_url="http://127.0.0.1:9/hook", webhook=WebhookStatus(delivered=False, attempts=1))
    store.put_record(written)
    store.put_image(REQUEST_ID, 0, b"\xff\xd8 jpeg bytes")
    assert store.load_records() == [written]
    assert store.get_image(REQUEST_ID, 0) == b"\xff\xd8 jpeg bytes"
    assert store.image_job_ids() == {REQUEST_ID}
    # A work item comes back exactly as it went in, with the job's deadline, and nothing added: asking for
    # progress is the job manager's choice, not a side effect of reading the record.
    item = written.items[0].work_item(REQUEST_ID, deadline=61.0)
    assert item.key.loras == (LoraUse("aitk/style.safetensors", 0.5),) and item.deadline == 61.0
    assert not item.report_progress


def test_deleting_a_job_removes_its_record_and_images(store):
    store.put_record(record())
    store.put_image(REQUEST_ID, 0, b"a")
    store.put_image(REQUEST_ID, 1, b"b")
    store.delete_job(REQUEST_ID)
    assert store.load_records() == [] and store.image_job_ids() == set()
    with pytest.raises(FileNotFoundError):
        store.get_image(REQUEST_ID, 0)
    store.delete_job(REQUEST_ID)  # deleting again is fine


def test_a_record_of_another_schema_or_a_foreign_file_is_skipped_not_fatal(tmp_path):
    store = FsspecStore(str(tmp_path))
    store.put_record(record())
    other = "f" * 32
    (tmp_path / "records" / f"{other}.json").write_text(json.dumps({**record(other).model_dump(), "schema_version": 2}))
    (tmp_path / "records" / "notes.txt").write_text("not a record")
    assert [r.request_id for r in store.load_records()] == [REQUEST_ID]


def test_a_directory_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    """A reader polling while a large image is rewritten sees one whole version or the other."""
    store = FsspecStore(str(tmp_path))
    versions = [bytes([n]) * 4_000_000 for n in (1, 2)]
    store.put_image(REQUEST_ID, 0, versions[0])
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            data = store.get_image(REQUEST_ID, 0)
            seen.add((len(data), data[0], data[-1]))

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(20):
        store.put_image(REQUEST_ID, 0, versions[n % 2])
    stop.set()
    reader.join()
    assert seen <= {(4_000_000, 1, 1), (4_000_000, 2, 2)}
    assert [p.name for p in (tmp_path / "images" / REQUEST_ID).iterdir()] == ["0"]


def test_a_relative_directory_is_resolved_by_the_builder_and_memory_and_urls_are_kept(tmp_path):
    from serve_app.config import AppArgs

    assert AppArgs().resolved(str(tmp_path)).jobs.store == str(tmp_path / ".flux-serve" / "jobs")
    for store in ("memory", "s3://bucket/prefix"):
        assert AppArgs(jobs=JobArgs(store=store)).resolved(str(tmp_path)).jobs.store == store


def test_the_lease_lets_one_owner_in_until_it_is_released_or_expires(store):
    first = StoreLease(store, "first", lease_s=1.5)
    second = StoreLease(store, "second", lease_s=1.5)
    first.acquire()
    assert second.renew() is False  # someone else holds it
    first.release()
    at_once = second.acquire(poll_s=0.05)  # free: taken at once
    assert first.renew() is False
    waited = first.acquire(poll_s=0.05)  # second never renewed: first waits for the expiry
    assert at_once < 1.0 <= waited < 10


def test_a_lease_names_its_holder_and_a_waiter_logs_once_how_to_use_another_store(tmp_path, caplog):
    """A second server on the same store (a live holder that keeps renewing) is named once, with `jobs.store`;
    /health's cause names it too. The holder's own successor is told it is a hand-over."""
    import logging
    import os
    import socket
    import time

    from serve_app.jobs.store import lease_holder

    store = open_store(JobArgs(store=str(tmp_path / "jobs")))
    holder = StoreLease(store, "holder", lease_s=0.6, server="app 'flux' of the Ray cluster at A")
    holder.acquire()
    lease = store.read_lease()
    assert (lease.host, lease.pid) == (socket.gethostname(), os.getpid())
    assert lease_holder(store, "app 'flux' of the Ray cluster at B").startswith(f"the job store {store.description} "
                                                                                "is held by FluxJobs holder of app")
    assert "jobs.store" in lease_holder(store, "app 'flux' of the Ray cluster at B")
    assert "handed over" in lease_holder(store, "app 'flux' of the Ray cluster at A")
    stop = threading.Event()

    def keep_renewing():
        while not stop.wait(0.1):
            holder.renew()

    renewer = threading.Thread(target=keep_renewing)
    renewer.start()
    waiter = StoreLease(store, "waiter", lease_s=0.6, server="app 'flux' of the Ray cluster at B")
    taken = threading.Event()
    acquiring = threading.Thread(target=lambda: (waiter.acquire(poll_s=0.05), taken.set()))
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        acquiring.start()
        time.sleep(1.5)  # renewed several times meanwhile
        assert not taken.is_set()
        stop.set()
        renewer.join()
        assert taken.wait(5)  # a holder that stops renewing is taken over, as a dead one always was
        acquiring.join()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"pid {os.getpid()} on {socket.gethostname()}" in warnings[0] and "`jobs.store`" in warnings[0]
    assert lease_holder(store) is not None and "waiter" in lease_holder(store)
    waiter.release()
    assert lease_holder(store) is None


def test_a_lease_written_before_it_named_its_holder_still_reads(store):
    from serve_app.jobs.store import Lease

    store.put_lease(Lease.model_validate_json('{"owner": "old", "expires_at": 1.0}'))
    assert store.read_lease().holder() == "FluxJobs old"
