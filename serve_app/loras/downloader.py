"""Downloader: a replica's one way to get a LoRA file, with downloads on a bounded pool of their own threads.

A replica awaits `hold` before an item joins a batch (its prefetch): this is the only place that
downloads. Downloads run on at most `loras.download_workers` threads owned by this object: a slow
host holds one of those, never the event loop, the default thread pool or the engine's thread.
Cache hits, root files and remembered failures are answered on a short disk check and never queue
behind a download. The callers of one source (the prompts of a request, the items of several
requests) share one download: this is the process's one in-flight de-duplication. A caller's
deadline bounds its wait; the download itself goes on to its own deadline, so the next caller
finds it cached. An s3:// source is first pinned to its object's current version (one HEAD, on
the same threads, shared the same way): an unchanged object is then a cache hit, with no GET.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from serve_app.loras.errors import download_failed
from serve_app.loras.hub import HfToken
from serve_app.loras.sources import FetchResult, HeldLora, LoraRef, LoraSources

# A file published by our download can be evicted by another process before we open it (it is the
# most recently used file then, so only a cache too small for the files in flight does that).
OPEN_ATTEMPTS = 3
_PIN = "pin "  # in-flight pins are keyed apart from downloads (cache keys are hex)
T = TypeVar("T")


@dataclass
class Held:
    """A held file and what getting it cost, for metrics."""

    lora: HeldLora
    remote: bool
    bytes_downloaded: int = 0


class Downloader:
    """Holds LoRA files for a replica, downloading on its own bounded thread pool (module docstring).

    Args:
        sources: the process's LoraSources.
        max_workers: downloads at once; default `loras.download_workers`.
    """

    def __init__(self, sources: LoraSources, max_workers: int | None = None):
        self.sources = sources
        self._pool = ThreadPoolExecutor(
            max_workers or sources.args.download_workers, thread_name_prefix="lora-download"
        )
        self._inflight: dict[str, Future[Any]] = {}  # downloads and pins by key
        self._lock = threading.RLock()  # a done callback may run at once, inside _start

    async def hold(
        self,
        source: str,
        token: str | HfToken | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> Held:
        """The source's checked file, held open on this node; downloaded first if it is not here.

        Args:
            source: as the client sent it, or canonical.
            token: the request's own hf_token (hf:// only).
            deadline: `time.time()` after which the caller stops waiting (the item's deadline).
            request_id: names the request in server-side log lines.

        Returns:
            The held file (close it when done) and the bytes this call's download took.

        Raises:
            ApiError: a coded 4xx; LORA_DOWNLOAD_FAILED ("timed out") when the deadline passes first.
        """
        ref = await asyncio.to_thread(self.sources.resolve, source, token)
        if not ref.pinned:  # s3://: its cache key names the object's current version, which only the store knows
            ref = await self.pin(ref, deadline, request_id)
        downloaded = 0
        for _ in range(OPEN_ATTEMPTS):
            held = await asyncio.to_thread(self.sources.hold, ref)
            if held is not None:
                return Held(held, ref.remote, downloaded)
            fetched = await self.fetch(ref, deadline, request_id)
            downloaded += fetched.bytes_downloaded
            if fetched.held is not None:  # our own download, held since before it was published
                return Held(fetched.held, ref.remote, downloaded)
        raise download_failed(ref.source, "the file left the download cache before it could be opened; try again")

    async def fetch(self, ref: LoraRef, deadline: float | None = None, request_id: str | None = None) -> FetchResult:
        """Download a file into the cache on this pool, shared with the other callers of its source.

        The caller that started the download gets it held (`FetchResult.held`, to close); if that caller
        gives up first, the held file is closed when the download ends.

        Raises:
            ApiError: as `LoraSources.fetch`; LORA_DOWNLOAD_FAILED ("timed out") when the deadline passes first.
        """
        future, started = self._start(ref.key, partial(self.sources.fetch, ref, None, request_id, keep=True))
        result = await self._wait(ref, future, deadline, on_give_up=_close_held if started else None)
        # The bytes count once, for the caller that started the download; the others found it shared.
        return result if started else FetchResult(ref.source, cached=True)

    async def pin(self, ref: LoraRef, deadline: float | None = None, request_id: str | None = None) -> LoraRef:
        """`LoraSources.pin` (one HEAD) on this pool, shared with the other callers of its source.

        Raises:
            ApiError: as `LoraSources.pin`, a remembered failure at once; LORA_DOWNLOAD_FAILED ("timed out")
                when the deadline passes first.
        """
        remembered = self.sources.failures.recall(ref.key)
        if remembered is not None:
            raise remembered
        future, _ = self._start(_PIN + ref.key, partial(self.sources.pin, ref, None, request_id))
        return await self._wait(ref, future, deadline)

    def close(self) -> None:
        """Stop taking downloads; those running finish on their own deadline."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, key: str, job: Callable[[], T]) -> tuple[Future[T], bool]:
        """The job of this key in flight (started on the pool unless it runs already); whether this call started it."""
        with self._lock:
            future = self._inflight.get(key)
            if future is not None:
                return future, False
            future = self._pool.submit(job)
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._forget(key))
            return future, True

    async def _wait(
        self,
        ref: LoraRef,
        future: Future[T],
        deadline: float | None,
        on_give_up: Callable[[Future[T]], None] | None = None,
    ) -> T:
        """The job's result, waited for until the caller's deadline; `on_give_up` runs when the job ends after."""
        left = None if deadline is None else max(0.0, deadline - time.time())
        try:
            # shield: a caller that gives up (timeout, cancel) must not cancel the job others share
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), left)
        except TimeoutError:
            if on_give_up is not None:
                future.add_done_callback(on_give_up)
            raise download_failed(
                ref.source, "timed out: the request's time ran out before the download finished"
            ) from None
        except asyncio.CancelledError:
            if on_give_up is not None:
                future.add_done_callback(on_give_up)
            raise

    def _forget(self, key: str) -> None:
        with self._lock:
            self._inflight.pop(key, None)


def _close_held(future: Future[FetchResult]) -> None:
    """The download's starter gave up: nobody takes the file it held."""
    if not future.cancelled() and future.exception() is None:
        held = future.result().held
        if held is not None:
            held.close()
