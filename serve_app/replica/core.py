"""GeneratorReplica: what a generator replica does, without Ray Serve.

It takes its engine as an argument (as Ray Serve LLM's `LLMServer` does), so tests drive it with
the small model and no Ray. The Serve deployment (serving/generator.py) is a thin shell around it:
`@serve.batch` calls `run_batch`, `@serve.multiplexed` caches the LoRA sets `load_lora_set` makes,
and `reconfigure` hands over new BatchSettings.

A batch, as `run_batch` runs it:
1. its items are grouped into pipeline calls: one BatchKey per call, cut by the pixel budget
   (engine/batching.py);
2. each call takes the pipeline lock, drops items whose caller gave up (cancel marks, deadlines),
   gets the call's LoRA set and runs the engine on the replica's one engine thread (compiled
   graphs and CUDA graphs are per thread), stopping at a step boundary when every item left is
   unwanted; a failed call of several items is retried item by item, so only the item at fault
   fails;
3. the pipeline lock is released and the gate lets the next wave in before the images are
   encoded (on a worker thread): the pipeline never waits for PNG or JPEG encoding.

A LoRA file reaches the pipeline in one way: `prefetch`, before the item joins a batch, holds the
checked file open (downloading it first on the Downloader's own threads, within the item's
deadline); the adapter cache reads those held bytes on the engine thread; the item's end lets them
go. No network I/O runs on the engine thread or under the pipeline lock, whatever another process
evicts from the download cache meanwhile. A request's own hf_token comes with its items (never in
them) and is used by its prefetch only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from serve_app import errors
from serve_app.config import BatchSettings
from serve_app.engine.images import encode_image
from serve_app.engine.protocol import CallMode, CompileStats, Engine, GenerationInterrupted
from serve_app.errors import ApiError
from serve_app.loras.adapters import AdapterCache, LoraSet
from serve_app.loras.downloader import Downloader
from serve_app.loras.sources import LoraSources
from serve_app.replica.batching import plan_calls
from serve_app.replica.gate import BatchGate
from serve_app.replica.held import HeldFiles
from serve_app.workitems import BatchKey, ItemResult, LoraUse, WorkItem

logger = logging.getLogger("ray.serve")

Outcome = ItemResult | ApiError
Encoder = Callable[[Image.Image, str], bytes]
LoadSet = Callable[[tuple[LoraUse, ...]], Awaitable[LoraSet]]
RunItem = Callable[[WorkItem], Awaitable[Outcome]]
# Told (the call's items, step done, steps) after each denoising step, on the engine thread: keep it quick.
StepsDone = Callable[[Sequence[WorkItem], int, int], None]


class ReplicaObserver:
    """What a replica reports as it works. These are no-ops; serving/metrics.py exports them."""

    def call_done(self, key: BatchKey, images: int, seconds: float) -> None: ...

    def item_failed(self, code: str) -> None: ...

    def lora_set_used(self, hit: bool) -> None: ...

    def lora_loaded(self, seconds: float) -> None: ...

    def lora_set_evicted(self) -> None: ...

    def lora_fetched(self, cache_hits: int, bytes_downloaded: int) -> None: ...

    def compiled(self, stats: CompileStats) -> None: ...


class LoraSets(Protocol):
    """The replica's cache of loaded LoRA sets, keyed by `BatchKey.lora_set_id`."""

    async def get(self, set_id: str, loras: tuple[LoraUse, ...]) -> LoraSet: ...


class LocalLoraSets:
    """An LRU of loaded LoRA sets, for a replica outside Serve (in Serve: `@serve.multiplexed`)."""

    def __init__(self, load: LoadSet, max_sets: int):
        self._load = load
        self._max_sets = max_sets
        self._sets: OrderedDict[str, LoraSet] = OrderedDict()

    async def get(self, set_id: str, loras: tuple[LoraUse, ...]) -> LoraSet:
        if set_id in self._sets:
            self._sets.move_to_end(set_id)
            return self._sets[set_id]
        while len(self._sets) >= self._max_sets:
            _, evicted = self._sets.popitem(last=False)
            evicted.release()
        self._sets[set_id] = await self._load(loras)
        return self._sets[set_id]


class CancelMarks:
    """The items a running batch holds, and which of those their callers gave up on.

    Marks exist only while a batch holds the item, so nothing stays behind once it ends.
    """

    def __init__(self) -> None:
        self._held: set[tuple[str, int]] = set()
        self._cancelled: set[tuple[str, int]] = set()

    def hold(self, items: Sequence[WorkItem]) -> None:
        self._held.update(item.ref for item in items)

    def release(self, items: Sequence[WorkItem]) -> None:
        refs = {item.ref for item in items}
        self._held -= refs
        self._cancelled -= refs

    def cancel(self, item: WorkItem) -> None:
        if item.ref in self._held:
            self._cancelled.add(item.ref)

    def is_cancelled(self, item: WorkItem) -> bool:
        return item.ref in self._cancelled

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True)
class ReplicaState:
    """What a replica holds and does now (for operators and tests; read without waiting)."""

    settings: BatchSettings
    running_batches: int
    waiting_items: int
    waves: int
    held_items: int


@dataclass(frozen=True)
class LoraState:
    """The replica's LoRA adapters, read between pipeline calls."""

    loaded: list[str]  # LoRA keys (`LoraUse.key`)
    adapters: list[str]
    adapter_loads: int


@dataclass(frozen=True)
class _Generated:
    """A call's image for one item, before encoding."""

    image: Image.Image
    seconds: float
    lora_modules: tuple[tuple[str, int], ...]
    mode: CallMode


class GeneratorReplica:
    """A generator replica's batching, cancellation, failure handling and encoding (module docstring).

    Args:
        engine: the engine that owns the pipeline (called on the engine thread only).
        sources: LoRA source policy and files.
        settings: batch settings; `configure` replaces them.
        max_lora_sets: LoRA sets kept loaded (LRU).
        lora_sets: builds the LoRA-set cache from a loader and a size; Serve's shell passes its
            `@serve.multiplexed` one.
        observer: told what happens, for metrics.
        encode: image encoder (format → bytes).
        on_steps: told each denoising step of each call (progress of async jobs), on the engine thread.
    """

    def __init__(
        self,
        engine: Engine,
        sources: LoraSources,
        settings: BatchSettings,
        *,
        max_lora_sets: int = 8,
        lora_sets: Callable[[LoadSet, int], LoraSets] = LocalLoraSets,
        observer: ReplicaObserver | None = None,
        encode: Encoder = encode_image,
        on_steps: StepsDone | None = None,
    ):
        self.engine = engine
        self.sources = sources
        self.settings = settings
        self.observer = observer or ReplicaObserver()
        self.encode = encode
        self.on_steps = on_steps
        self.held = HeldFiles()
        self.adapters = AdapterCache(
            engine, self.held.read, on_load=self.observer.lora_loaded, on_evict=self.observer.lora_set_evicted
        )
        self.lora_sets = lora_sets(self.load_lora_set, max_lora_sets)
        self.gate = BatchGate()
        self.marks = CancelMarks()
        self.lock = asyncio.Lock()  # one pipeline call at a time: Serve runs sub-batches concurrently
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-engine")
        self.downloader = Downloader(sources)
        self._max_per_call = engine.max_images_per_call  # a preview model: one, as ai-toolkit draws them
        stats = engine.compile_stats()
        if stats is not None:  # the warm-up's compiles, told before any call (and again after each)
            self.observer.compiled(stats)

    def configure(self, settings: BatchSettings) -> None:
        self.settings = settings

    def close(self) -> None:
        self._engine_thread.shutdown(wait=True)
        self.downloader.close()

    # ---- before a batch ----------------------------------------------------------------------

    async def generate(self, item: WorkItem, tokens: Mapping[str, str] | None, batch: RunItem) -> Outcome:
        """One item's way through the replica: prefetch, the gate, its batch; its LoRA files held throughout.

        Args:
            item: the work item.
            tokens: the request's own hf_token per LoRA key (`LoraUse.key`), if it sent one.
            batch: runs the item in a batch (Serve's `@serve.batch` over `run_batch`).
        """
        error = await self.prefetch(item, tokens)
        if error is not None:
            return error
        try:
            await self.admit(item)
            return await batch(item)
        except asyncio.CancelledError:
            self.cancel(item)  # the caller gave up (job cancel or timeout)
            raise
        finally:
            self.release(item)

    async def prefetch(self, item: WorkItem, tokens: Mapping[str, str] | None = None) -> ApiError | None:
        """Hold the LoRA files an item needs, downloading any that are not on this node, before it joins a batch.

        This is the replica's one download point. Doing it inside the batch (under the pipeline lock)
        would stall every other item for up to the download's deadline, and a broken file would first
        make the LRU evict a good set: here it costs only its own item. The item holds its files until
        `release`, so the bytes its adapters load are the bytes fetched here.

        Args:
            item: the work item.
            tokens: the request's own hf_token per LoRA key (`LoraUse.key`), if it sent one.

        Returns:
            None, or the item's error (a coded 4xx); on an error the item holds nothing.
        """
        taken: list[str] = []
        try:
            for use in _unique(item.key.loras):
                token = (tokens or {}).get(use.key)
                got = await self.downloader.hold(use.source, token, item.deadline, item.request_id)
                self.held.add(use.key, got.lora)
                taken.append(use.key)
                self.observer.lora_fetched(int(got.remote and not got.bytes_downloaded), got.bytes_downloaded)
        except ApiError as exc:
            for key in taken:
                self.held.drop(key)
            return exc
        return None

    def release(self, item: WorkItem) -> None:
        """The item is done (or gone): let go of the files its prefetch held."""
        for use in _unique(item.key.loras):
            self.held.drop(use.key)

    async def admit(self, item: WorkItem) -> None:
        """Wait at the gate while a batch runs (serve_app/replica/gate.py says why)."""
        await self.gate.enter(item.key)

    def cancel(self, item: WorkItem) -> None:
        """The caller gave up: a running call stops at its next step if nothing in it is still wanted."""
        self.marks.cancel(item)

    # ---- a batch -----------------------------------------------------------------------------

    async def run_batch(self, items: Sequence[WorkItem]) -> list[Outcome]:
        """Generate a batch: one outcome per item, in order; failures come back as values."""
        self.marks.hold(items)
        self.gate.batch_started()
        encodings: list[tuple[list[int], asyncio.Future]] = []
        outcomes: list[Outcome | None] = [None] * len(items)
        try:
            for call in plan_calls([item.key for item in items], self.settings.pixel_budget, self._max_per_call):
                generated = await self._run_call([items[i] for i in call])
                for i, result in zip(call, generated):
                    if isinstance(result, ApiError):
                        outcomes[i] = result
                done = [(i, result) for i, result in zip(call, generated) if isinstance(result, _Generated)]
                if done:
                    encodings.append(([i for i, _ in done], self._encode_later(items, done)))
        finally:
            self.marks.release(items)
            self.gate.batch_finished()  # the pipeline is free: the next wave may start while we encode
        for indices, encoding in encodings:
            for i, outcome in zip(indices, await encoding):
                outcomes[i] = outcome
        return [outcome for outcome in outcomes if outcome is not None]  # every item has its outcome by now

    async def _run_call(self, items: list[WorkItem]) -> list[_Generated | ApiError]:
        async with self.lock:
            live = [item for item in items if not self._is_dead(item)]
            if not live:
                return [self._dead_error(item) for item in items]
            try:
                await self._acquire_loras(live[0].key)
            except ApiError as exc:
                return [exc for _ in items]
            by_ref = dict(zip((item.ref for item in live), await self._generate_or_split(live)))
        # An item cancelled or timed out while its call-mates kept the call going gets no image.
        return [self._dead_error(item) if self._is_dead(item) else by_ref[item.ref] for item in items]

    async def _acquire_loras(self, key: BatchKey) -> LoraSet | None:
        if not key.loras:
            return None
        loads = self.adapters.loads
        lora_set = await self.lora_sets.get(key.lora_set_id, key.loras)
        self.observer.lora_set_used(hit=self.adapters.loads == loads)
        return lora_set

    async def load_lora_set(self, loras: tuple[LoraUse, ...]) -> LoraSet:
        """Load a set's missing files as adapters (on the engine thread: it changes the pipeline)."""
        return await self._on(self._engine_thread, self.adapters.acquire, loras)

    async def _generate_or_split(self, items: list[WorkItem]) -> list[_Generated | ApiError]:
        try:
            return await self._on(self._engine_thread, self._generate_call, items)
        except GenerationInterrupted:
            return [self._dead_error(item) for item in items]
        except ApiError as exc:  # the engine refused the call's LoRA set (a tier that rejects overflow)
            return [exc for _ in items]
        except Exception as exc:
            if len(items) == 1:
                logger.exception("generation failed for %s[%d]", items[0].request_id, items[0].index)
                self.observer.item_failed(errors.GENERATION_FAILED)
                # The exception's text stays in the log: it may name paths or internals.
                return [ApiError(errors.GENERATION_FAILED,
                                 f"generation failed ({type(exc).__name__}); the server log has the detail")]
            # The call is shared: find the item at fault by running each alone.
            logger.warning("a call of %d items failed (%s); retrying them one by one", len(items), exc)
            outcomes: list[_Generated | ApiError] = []
            for item in items:
                outcomes.extend(await self._generate_or_split([item]))
            return outcomes

    def _generate_call(self, items: list[WorkItem]) -> list[_Generated]:
        """One pipeline call, on the engine thread, while the lock is held."""
        key = items[0].key
        adapters = self.adapters.weights(key.loras)
        mode = self.engine.describe_call(adapters)
        if key.lora_mode and key.loras:  # a preview request's own choice (merged or hook)
            mode = CallMode(mode.speed_tier, key.lora_mode)
        start = time.perf_counter()
        on_step = None
        if self.on_steps is not None:
            on_steps = self.on_steps

            def on_step(step: int, steps: int) -> None:
                on_steps(items, step, steps)

        images = self.engine.generate(
            items, adapters, should_stop=lambda: all(self._is_dead(i) for i in items), on_step=on_step
        )
        seconds = time.perf_counter() - start
        self.observer.call_done(key, len(items), seconds)
        stats = self.engine.compile_stats()
        if stats is not None:
            self.observer.compiled(stats)
        lora_modules = tuple((u.key, self.adapters.matched_modules(u.key)) for u in key.loras)
        return [_Generated(image, seconds / len(items), lora_modules, mode) for image in images]

    def _encode_later(self, items: Sequence[WorkItem], done: list[tuple[int, _Generated]]) -> asyncio.Future:
        """Encode a call's images on a worker thread; the future gives their outcomes in order."""
        return asyncio.ensure_future(asyncio.to_thread(self._encode_all, [(items[i], g) for i, g in done]))

    def _encode_all(self, generated: list[tuple[WorkItem, _Generated]]) -> list[Outcome]:
        return [self._encode_one(item, g) for item, g in generated]

    def _encode_one(self, item: WorkItem, generated: _Generated) -> Outcome:
        try:
            data = self.encode(generated.image, item.output_format)
        except Exception as exc:  # never lose the batch over one image
            logger.exception("encoding failed for %s[%d]", item.request_id, item.index)
            return ApiError(errors.GENERATION_FAILED, f"encoding the image failed: {type(exc).__name__}")
        return ItemResult(
            request_id=item.request_id,
            index=item.index,
            seed=item.seed,
            width=item.key.width,
            height=item.key.height,
            format=item.output_format,
            data=data,
            seconds=generated.seconds,
            lora_modules=generated.lora_modules,
            speed_tier=generated.mode.speed_tier,
            lora_mode=generated.mode.lora_mode,
            prompt=item.prompt,
            steps=item.key.steps,
            guidance=item.key.guidance,
            multiplier=item.key.loras[0].multiplier if item.key.loras else None,
        )

    # ---- state -------------------------------------------------------------------------------

    def state(self) -> ReplicaState:
        return ReplicaState(
            settings=self.settings,
            running_batches=self.gate.running,
            waiting_items=self.gate.waiting,
            waves=self.gate.waves,
            held_items=len(self.marks),
        )

    async def lora_state(self) -> LoraState:
        """Read on the engine thread, so never in the middle of a load or a call."""

        def read() -> LoraState:
            return LoraState(
                loaded=self.adapters.loaded_keys(),
                adapters=sorted(self.engine.adapter_names()),
                adapter_loads=self.adapters.loads,
            )

        return await self._on(self._engine_thread, read)

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))

    def _is_dead(self, item: WorkItem) -> bool:
        """Cancelled by its caller, or past its deadline: no longer worth a denoising step."""
        if self.marks.is_cancelled(item):
            return True
        return item.deadline is not None and time.time() > item.deadline

    def _dead_error(self, item: WorkItem) -> ApiError:
        if self.marks.is_cancelled(item):
            return ApiError(errors.CANCELED, "the request was cancelled")
        return ApiError(errors.TIMEOUT, "the request timed out")


def _unique(loras: Sequence[LoraUse]) -> list[LoraUse]:
    """One per file: a request may name the same file twice."""
    return list({use.key: use for use in loras}.values())
