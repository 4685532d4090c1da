"""Downloader: the async face of LoraSources, with downloads on a bounded pool of their own threads.

A replica (or the ingress's sync path) awaits `fetch` before an item joins a batch. Downloads run
on at most `loras.download_workers` threads owned by this object: a slow host holds one of those,
never the event loop, the default thread pool or the engine's thread. Cache hits, root files and
remembered failures are answered on a short disk check and never queue behind a download. The
callers of one source (the prompts of a request) share one download. A caller's deadline bounds
its wait; the download itself goes on to its own deadline, so the next caller finds it cached.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from serve_app.loras.errors import download_failed
from serve_app.loras.files import LoraFile
from serve_app.loras.hub import HfToken
from serve_app.loras.sources import FetchResult, LoraSources


class Downloader:
    """Runs LoraSources downloads on its own bounded thread pool; owned by one process (replica, ingress).

    Args:
        sources: the process's LoraSources.
        max_workers: downloads at once; default `loras.download_workers`.
    """

    def __init__(self, sources: LoraSources, max_workers: int | None = None):
        self.sources = sources
        self._pool = ThreadPoolExecutor(
            max_workers or sources.args.download_workers, thread_name_prefix="lora-download"
        )
        self._inflight: dict[str, Future] = {}
        self._lock = threading.RLock()  # a done callback may run at once, inside _start

    async def fetch(
        self,
        source: str,
        token: str | HfToken | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> FetchResult:
        """Make a source's file available on this node; see `LoraSources.fetch`.

        Args:
            source: as the client sent it, or canonical.
            token: the request's own hf_token (hf:// only).
            deadline: `time.time()` after which the caller stops waiting (the sync path passes what
                is left of the request's timeout, a replica the item's deadline).
            request_id: names the request in server-side log lines.

        Raises:
            ApiError: a coded 4xx; LORA_DOWNLOAD_FAILED ("timed out") when the deadline passes first.
        """
        probe = await asyncio.to_thread(self._probe, source, token)
        if isinstance(probe, FetchResult):
            return probe
        future = self._start(probe, source, token, request_id)
        left = None if deadline is None else max(0.0, deadline - time.time())
        try:
            # shield: a caller that gives up (timeout, cancel) must not cancel the download others share
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), left)
        except asyncio.TimeoutError:
            raise download_failed(
                source, "timed out: the request's time ran out before the download finished"
            ) from None

    async def read(
        self,
        source: str,
        token: str | HfToken | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> LoraFile:
        """The hand-over to a loader (`LoraSources.read`), with any download on this pool.

        Raises:
            ApiError: as `fetch`, and LORA_INVALID for a file whose tensors cannot be read.
        """
        for _ in range(2):
            lora = await asyncio.to_thread(self.sources.read_local, source, token)
            if lora is not None:
                return lora
            await self.fetch(source, token, deadline, request_id)
        raise download_failed(source, "the file left the download cache before it could be read; try again")

    def close(self) -> None:
        """Stop taking downloads; those running finish on their own deadline."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _probe(self, source: str, token: str | HfToken | None) -> FetchResult | str:
        """A hit (or a refusal) at once, else the download's key."""
        hit = self.sources.lookup(source, token)
        return hit if hit is not None else self.sources.key(source, token)

    def _start(self, key: str, source: str, token: str | HfToken | None, request_id: str | None) -> Future:
        with self._lock:
            future = self._inflight.get(key)
            if future is None:
                future = self._pool.submit(self.sources.fetch, source, token, None, request_id)
                self._inflight[key] = future
                future.add_done_callback(lambda _: self._forget(key))
            return future

    def _forget(self, key: str) -> None:
        with self._lock:
            self._inflight.pop(key, None)
