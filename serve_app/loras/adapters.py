"""Adapter bookkeeping for one replica: LoRA files loaded once, shared by every cached LoRA set.

The replica's LRU (Serve's `@serve.multiplexed`) holds LoRA *sets* (the files of one request).
Two sets may share a file: {A, B} and {A}. Each file is loaded once as a PEFT adapter and counts
the sets that hold it, so evicting {A, B} unloads B but keeps A while {A} is cached.
Not thread-safe: the replica calls it on its engine thread only, while it holds the pipeline lock.
A file's bytes come from `read_file`, the replica's held copy: nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from serve_app.engine.protocol import AdapterWeight, Engine
from serve_app.loras.errors import display_source
from serve_app.loras.files import LoraFile
from serve_app.workitems import LoraUse

logger = logging.getLogger(__name__)


def adapter_name(key: str) -> str:
    """A PEFT-safe adapter name for a LoRA file's key (module dict keys may not hold dots)."""
    return "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class _Loaded:
    name: str
    matched_modules: int
    refs: int = 0


@dataclass
class LoraSet:
    """A cached set of LoRA files, as Serve's multiplexed LRU holds it.

    Serve calls `__del__` on eviction (in a worker thread) and the garbage collector may call it
    again later: `release` makes the second call a no-op.
    """

    keys: tuple[str, ...]  # the `LoraUse.key` of each file
    _release: Callable[[LoraSet], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self)

    def __del__(self) -> None:
        self.release()


class AdapterCache:
    """Loads, shares and unloads the adapters of the LoRA sets a replica holds."""

    def __init__(
        self,
        engine: Engine,
        read_file: Callable[[LoraUse], LoraFile],
        on_load: Callable[[float], None] | None = None,
        on_evict: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.read_file = read_file  # the bytes prefetch held for this file, read from disk
        self.on_load = on_load  # metrics hooks: a file loaded (its seconds), a set released
        self.on_evict = on_evict
        self._loaded: dict[str, _Loaded] = {}
        self.loads = 0  # files loaded since start: a multiplier change must not add one

    def acquire(self, loras: Sequence[LoraUse]) -> LoraSet:
        """Load what is missing of a set's files and hold each of them for the set.

        Args:
            loras: the set's LoRAs (their multipliers do not matter here: they apply per call).

        Raises:
            ApiError: a coded 4xx of the first file that cannot be read or loaded; none stays held.
        """
        unique = {use.key: use for use in loras}
        taken: list[str] = []
        try:
            for key in sorted(unique):
                self._hold(unique[key])
                taken.append(key)
        except BaseException:
            for key in taken:
                self._drop(key)
            raise
        return LoraSet(tuple(sorted(unique)), self._release_set)

    def weights(self, uses: Sequence[LoraUse]) -> list[AdapterWeight]:
        """The adapter weights of a call: each loaded file at its request's multiplier."""
        return [AdapterWeight(self._loaded[u.key].name, u.multiplier) for u in uses]

    def matched_modules(self, key: str) -> int:
        return self._loaded[key].matched_modules

    def loaded_keys(self) -> list[str]:
        """The keys (`LoraUse.key`) of the LoRA files loaded now."""
        return sorted(self._loaded)

    def _hold(self, use: LoraUse) -> None:
        entry = self._loaded.get(use.key)
        if entry is None:
            entry = self._load(use)
            self._loaded[use.key] = entry
        entry.refs += 1

    def _load(self, use: LoraUse) -> _Loaded:
        start = time.perf_counter()
        lora = self.read_file(use)
        name = adapter_name(use.key)
        matched = self.engine.load_adapter(name, lora)
        self.loads += 1
        seconds = time.perf_counter() - start
        logger.info("loaded LoRA %s as %s (%d modules) in %.3f s", display_source(use.source), name, matched, seconds)
        if self.on_load is not None:
            self.on_load(seconds)
        return _Loaded(name=name, matched_modules=matched)

    def _drop(self, key: str) -> None:
        entry = self._loaded.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del self._loaded[key]
            self.engine.delete_adapter(entry.name)
            logger.info("unloaded LoRA adapter %s", entry.name)

    def _release_set(self, lora_set: LoraSet) -> None:
        for key in lora_set.keys:
            self._drop(key)
        if self.on_evict is not None:
            self.on_evict()
