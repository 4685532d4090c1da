"""The job store: job records and result images, kept where a FluxJobs restart does not lose them.

`open_store(jobs)` names the store from `jobs.store`: a directory (local disk, or a mount every node
shares), an fsspec URL (`s3://bucket/prefix`, `gs://...`), or `memory` (tests; lost with the replica).
Under the store's root:

    records/<request id>.json    one JobRecord per job (serving/records.py): typed, versioned JSON
    images/<request id>/<index>  the job's result images, as the encoded bytes the client downloads
    lease.json                   which FluxJobs replica owns the store now (StoreLease)

Every write is atomic, so a reader sees the old object or the new one, never half of one: in a
directory a write goes to a temporary file next to the target, is flushed to disk and renamed over
it; an object store's PUT (S3, GCS) is atomic by itself, so a URL store writes the object directly.

The calls block (local disk or network): FluxJobs makes them on worker threads. No Ray here.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Protocol

import fsspec
from botocore.exceptions import BotoCoreError, ClientError
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ValidationError

from serve_app.config import JobArgs
from serve_app.jobs.records import JobRecord

logger = logging.getLogger("ray.serve")

RECORDS = "records"
IMAGES = "images"
LEASE = "lease.json"
# Request ids are uuid4 hex (serving/ingress.py); anything else found in a store is not ours.
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def _store_faults() -> tuple[type[BaseException], ...]:
    faults: list[type[BaseException]] = [
        OSError,  # disk and mount errors; s3fs turns the S3 answers it knows into these too
        FSTimeoutError,  # an fsspec call that ran out of time
        BotoCoreError,  # what s3fs passes on untranslated: no connection, no credentials, ...
        ClientError,
    ]
    try:
        from aiohttp import ClientError as HttpClientError  # under aiobotocore (s3fs), gcsfs, http
    except ImportError:  # pragma: no cover - s3fs brings it
        pass
    else:
        faults.append(HttpClientError)
    return tuple(faults)


# What a store call raises when the store itself fails (worth another try); anything else is a bug.
STORE_FAULTS = _store_faults()


class Lease(BaseModel):
    owner: str
    expires_at: float  # unix seconds
    # Who holds it, for the log and /health of a server that waits for it (a lease written before these
    # fields has them empty): the holder's host, process and server (its app and Ray cluster).
    host: str = ""
    pid: int = 0
    server: str = ""

    def holder(self) -> str:
        """`FluxJobs <owner> of <server>, pid <pid> on <host>`, with what the lease says."""
        where = " ".join(part for part in (f"pid {self.pid}" if self.pid else "",
                                            f"on {self.host}" if self.host else "") if part)
        return " ".join(part for part in (f"FluxJobs {self.owner}", f"of {self.server}" if self.server else "",
                                          f"({where})" if where else "") if part)


class JobStore(Protocol):
    """Where FluxJobs keeps records and images. Missing objects raise FileNotFoundError."""

    description: str  # for logs: the store's location, never its options (they may hold credentials)

    def put_record(self, record: JobRecord) -> None: ...

    def load_records(self) -> list[JobRecord]:
        """Every readable record; one that does not parse is logged and skipped."""

    def put_image(self, request_id: str, index: int, data: bytes) -> None: ...

    def get_image(self, request_id: str, index: int) -> bytes: ...

    def delete_job(self, request_id: str) -> None:
        """The record first (the job is then gone for readers), then its images; missing parts are fine."""

    def image_job_ids(self) -> set[str]:
        """Request ids that have images in the store (to find images a crash left without a record)."""

    def read_lease(self) -> Lease | None: ...

    def put_lease(self, lease: Lease) -> None: ...

    def delete_lease(self) -> None: ...


def open_store(jobs: JobArgs) -> JobStore:
    """The store `jobs.store` names (a directory is resolved to an absolute path by the app builder)."""
    if jobs.in_memory:
        return MemoryStore()
    return FsspecStore(jobs.store, jobs.store_options)


def _parse_records(blobs: dict[str, bytes]) -> list[JobRecord]:
    records = []
    for request_id, data in blobs.items():
        try:
            record = JobRecord.model_validate_json(data)
        except ValidationError as exc:  # another schema version, or not ours: never guess
            logger.error("job store: record %s is unreadable, skipped (%d problems)", request_id, exc.error_count())
            continue
        if record.request_id != request_id:
            logger.error("job store: record %s names another request id, skipped", request_id)
            continue
        records.append(record)
    return records


class MemoryStore:
    """The store of tests: in this process's memory, lost with it. Records are kept as JSON all the
    same, so they go through the same serialization as in a durable store."""

    description = "memory"

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        self._images: dict[tuple[str, int], bytes] = {}
        self._lease: Lease | None = None
        self._lock = threading.Lock()  # called from worker threads

    def put_record(self, record: JobRecord) -> None:
        data = record.model_dump_json().encode()
        with self._lock:
            self._records[record.request_id] = data

    def load_records(self) -> list[JobRecord]:
        with self._lock:
            blobs = dict(self._records)
        return _parse_records(blobs)

    def put_image(self, request_id: str, index: int, data: bytes) -> None:
        with self._lock:
            self._images[(request_id, index)] = bytes(data)

    def get_image(self, request_id: str, index: int) -> bytes:
        with self._lock:
            try:
                return self._images[(request_id, index)]
            except KeyError:
                raise FileNotFoundError(f"{request_id}/{index}") from None

    def delete_job(self, request_id: str) -> None:
        with self._lock:
            self._records.pop(request_id, None)
            for key in [key for key in self._images if key[0] == request_id]:
                del self._images[key]

    def image_job_ids(self) -> set[str]:
        with self._lock:
            return {request_id for request_id, _ in self._images}

    def read_lease(self) -> Lease | None:
        return self._lease

    def put_lease(self, lease: Lease) -> None:
        self._lease = lease

    def delete_lease(self) -> None:
        self._lease = None


class FsspecStore:
    """A directory or an fsspec URL (a plain path is the local filesystem).

    Args:
        location: a directory path or a URL such as `s3://bucket/prefix`.
        options: fsspec storage options for a URL (endpoint, region, ...).
    """

    def __init__(self, location: str, options: dict[str, Any] | None = None):
        self.description = location
        self.fs, root = fsspec.core.url_to_fs(location, **(options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            os.makedirs(self._path(RECORDS), exist_ok=True)
            os.makedirs(self._path(IMAGES), exist_ok=True)

    # ---- records and images ------------------------------------------------------------------

    def put_record(self, record: JobRecord) -> None:
        self._write(self._record_path(record.request_id), record.model_dump_json().encode())

    def load_records(self) -> list[JobRecord]:
        paths = [path for path in self._list(RECORDS) if _REQUEST_ID.match(_record_id(path))]
        # One call for all: an object store fetches them concurrently.
        blobs = self.fs.cat(paths, on_error="omit") if paths else {}
        return _parse_records({_record_id(path): data for path, data in blobs.items()})

    def put_image(self, request_id: str, index: int, data: bytes) -> None:
        self._write(self._image_path(request_id, index), data)

    def get_image(self, request_id: str, index: int) -> bytes:
        return self.fs.cat_file(self._image_path(request_id, index))

    def delete_job(self, request_id: str) -> None:
        self._remove(self._record_path(request_id))
        self._remove(self._path(IMAGES, request_id), recursive=True)

    def image_job_ids(self) -> set[str]:
        names = {_basename(path) for path in self._list(IMAGES)}
        return {name for name in names if _REQUEST_ID.match(name)}

    # ---- lease ---------------------------------------------------------------------------------

    def read_lease(self) -> Lease | None:
        try:
            return Lease.model_validate_json(self.fs.cat_file(self._path(LEASE)))
        except FileNotFoundError:
            return None
        except ValidationError:
            logger.error("job store: %s is unreadable; treated as free", LEASE)
            return None

    def put_lease(self, lease: Lease) -> None:
        self._write(self._path(LEASE), lease.model_dump_json().encode())

    def delete_lease(self) -> None:
        self._remove(self._path(LEASE))

    # ---- paths and atomic writes ---------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _record_path(self, request_id: str) -> str:
        return self._path(RECORDS, f"{request_id}.json")

    def _image_path(self, request_id: str, index: int) -> str:
        return self._path(IMAGES, request_id, str(index))

    def _write(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def _list(self, folder: str) -> list[str]:
        try:
            return list(self.fs.ls(self._path(folder), detail=False))
        except FileNotFoundError:
            return []

    def _remove(self, path: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _record_id(path: str) -> str:
    name = _basename(path)
    return name.removesuffix(".json") if name.endswith(".json") else ""


class StoreLease:
    """FluxJobs' hold on its store, so that no job is run by two replicas at once.

    Serve keeps FluxJobs at one replica, but a redeploy starts the replacement while the old replica
    still drains its requests (Serve 2.60: replicas that are stopping do not count). The new replica
    therefore waits for the lease: the old one gives it up in its destructor, or it expires `lease_s`
    after the last renewal of a replica that died. Whoever finds another owner in the lease while
    renewing has lost it and stops working (FluxJobs then writes nothing more).

    A lease that is renewed while this replica waits belongs to a live holder: another server started on
    the same store (a second `make serve` from the same checkout, say) keeps it for as long as it runs.
    The waiter logs once who holds it (the lease records its host, pid and server) and how to give this
    server a store of its own; meanwhile /health answers 503 naming the holder (`lease_holder`).

    Args:
        store: the job store.
        owner: a unique name of this replica.
        lease_s: how long a hold lasts without renewal.
        server: which server this replica belongs to (its app and Ray cluster), written in the lease.
    """

    SETTLE_S = 0.2  # two replicas writing the lease at once: the last writer wins; look again after this

    def __init__(self, store: JobStore, owner: str, lease_s: float, server: str = ""):
        self.store = store
        self.owner = owner
        self.lease_s = lease_s
        self.server = server

    def acquire(self, poll_s: float = 0.5) -> float:
        """Wait until this replica holds the lease (blocking); return the seconds waited."""
        start = time.monotonic()
        first: Lease | None = None  # the lease found held when this replica started to wait
        announced = False
        while True:
            current = self.store.read_lease()
            if current is None or current.owner == self.owner or current.expires_at <= time.time():
                self._write()
                time.sleep(self.SETTLE_S)
                held = self.store.read_lease()
                if held is not None and held.owner == self.owner:
                    return time.monotonic() - start
            elif first is None:
                first = current
                logger.info("job store %s: waiting for the lease of %s (expires in %.1f s unless renewed)",
                            self.store.description, current.holder(), current.expires_at - time.time())
            elif not announced and current.expires_at > first.expires_at and current.server != self.server:
                # Renewed while this replica waits, by another server: alive, it keeps it as long as it runs.
                # (This server's own previous replica renews it too while it drains, then hands it over.)
                logger.warning("job store %s is in use by %s, which keeps renewing its lease: this server waits "
                               "until that one stops. To run both, give this one a store of its own (`jobs.store` "
                               "in its config, e.g. another directory).",
                               self.store.description, current.holder())
                announced = True
            time.sleep(poll_s)

    def renew(self) -> bool:
        """Extend the hold; False when another replica holds the lease now (this one must stop)."""
        current = self.store.read_lease()
        if current is not None and current.owner != self.owner:
            return False
        self._write()
        return True

    def release(self) -> None:
        """Give the lease up, if it is still ours."""
        current = self.store.read_lease()
        if current is not None and current.owner == self.owner:
            self.store.delete_lease()

    def _write(self) -> None:
        self.store.put_lease(Lease(owner=self.owner, expires_at=time.time() + self.lease_s, host=socket.gethostname(),
                                   pid=os.getpid(), server=self.server))


def lease_holder(store: JobStore, server: str = "") -> str | None:
    """Why this server's FluxJobs may not answer (for /health): who holds the store's lease, if anyone does
    now; None when it is free or expired."""
    lease = store.read_lease()
    if lease is None or lease.expires_at <= time.time():
        return None
    if server and lease.server == server:
        return f"the job store {store.description} is being handed over from {lease.holder()}"
    return (f"the job store {store.description} is held by {lease.holder()}, and this server's FluxJobs waits "
            f"for it; to run both servers give this one its own store (`jobs.store` in its config)")
