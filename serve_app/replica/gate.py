"""BatchGate: hold arrivals while a batch runs, then let them into Serve's batch queue together.

Why it exists: Ray Serve 2.60's `@serve.batch` loop (`_BatchQueue._process_batches`) forms the
next batch as soon as its wait ends, whether or not the previous batch is still running; only the
task it then creates waits for the `max_concurrent_batches` semaphore. With
`batch_wait_timeout_s=0` (so that a lone request never waits), every item that arrives during a
pipeline call would become a batch of its own, queued behind that call: under load nothing would
ever batch. A longer wait does not help either: it only collects what arrives within the window.

So the generator asks the gate before it hands an item to the batch queue:
- while no batch function runs, items pass at once (a lone request starts immediately, and the
  batch wait, if any, collects the items that arrive in its window);
- while one runs, arrivals wait; when the last running batch finishes with the pipeline (its
  images may still be encoding: replica.py tells the gate before it encodes), every waiting item passes
  in one event-loop turn, ordered so that items of one key are adjacent (each key in order of its
  first arrival, items in arrival order), so Serve's in-order cut by `max_batch_size` gives
  mostly single-key batches.

The gate holds only the items waiting at it (bounded by the replica's `max_ongoing_requests`);
it keeps nothing per key once a wave has passed. Pure asyncio, no Ray: one event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable


class BatchGate:
    def __init__(self) -> None:
        self._running = 0  # batch functions in progress (Serve may run sub-batches concurrently)
        self._waiting: list[tuple[Hashable, asyncio.Future]] = []
        self.waves = 0  # waves released, for stats

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    async def enter(self, key: Hashable) -> None:
        """Return when the item of this key may join the batch queue."""
        if self._running == 0 and not self._waiting:
            return
        entry = (key, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry in self._waiting:  # cancelled while still waiting
                self._waiting.remove(entry)
            raise

    def batch_started(self) -> None:
        self._running += 1

    def batch_finished(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._release()

    def _release(self) -> None:
        if not self._waiting:
            return
        first_seen: dict[Hashable, int] = {}
        for key, _ in self._waiting:
            first_seen.setdefault(key, len(first_seen))
        wave = sorted(self._waiting, key=lambda entry: first_seen[entry[0]])  # stable: arrival order per key
        self._waiting = []
        self.waves += 1
        # Futures wake their tasks in the order they are resolved, all before Serve's batch loop
        # (woken by the first enqueue) runs again, so the whole wave is in the queue when it forms.
        for _, future in wave:
            if not future.done():
                future.set_result(None)
