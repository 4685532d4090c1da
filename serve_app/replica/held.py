"""The LoRA files a replica's items hold, from their prefetch until their batch ends.

Prefetch (on the event loop) adds a file for each item that needs it; the adapter cache (on the
engine thread) reads the held bytes when it loads the adapter; the item's end drops its hold. The
first holder's descriptor is kept: later holders of the same file close theirs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from serve_app.loras.errors import download_failed
from serve_app.loras.files import LoraFile
from serve_app.loras.sources import HeldLora
from serve_app.workitems import LoraUse


@dataclass
class _Entry:
    lora: HeldLora
    holders: int


class HeldFiles:
    """Held LoRA files by key (`LoraUse.key`), counted by the items that hold them. Thread-safe."""

    def __init__(self) -> None:
        self._files: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # the event loop adds and drops, the engine thread reads

    def add(self, key: str, lora: HeldLora) -> None:
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                self._files[key] = _Entry(lora, 1)
                return
            entry.holders += 1
        lora.close()

    def drop(self, key: str) -> None:
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return
            entry.holders -= 1
            if entry.holders > 0:
                return
            del self._files[key]
        entry.lora.close()

    def read(self, use: LoraUse) -> LoraFile:
        """The held file's tensors, read from disk.

        Raises:
            ApiError: LORA_DOWNLOAD_FAILED when no item holds the file any more (every caller gave up).
        """
        with self._lock:
            entry = self._files.get(use.key)
        if entry is None:
            raise download_failed(use.source, "the file was let go before it was loaded; try again")
        return entry.lora.read()

    def __len__(self) -> int:
        return len(self._files)
