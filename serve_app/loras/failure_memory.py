"""A short memory of sources that failed, so the prompts of a request share one attempt.

Without it, a dead URL is tried again for every prompt of the request (each holding a download
thread for its whole timeout) and for every request that names it. Entries live `ttl_s` (at least
a minute in the args); the map holds at most `max_entries`, dropping the oldest first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from serve_app.errors import ApiError
from serve_app.loras.errors import copy_error


class FailureMemory:
    """source key -> the coded error its last attempt ended with, for `ttl_s` seconds. Thread-safe.

    Args:
        ttl_s: how long a failure is remembered.
        max_entries: the most failures remembered at once.
    """

    def __init__(self, ttl_s: float, max_entries: int = 1024):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, ApiError]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: str, error: ApiError) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (time.monotonic() + self.ttl_s, copy_error(error))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def recall(self, key: str) -> ApiError | None:
        """A fresh copy of the remembered error, or None if there is none (or it expired)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, error = entry
            if time.monotonic() >= expires:
                del self._entries[key]
                return None
            return copy_error(error)

    def __len__(self) -> int:
        return len(self._entries)
