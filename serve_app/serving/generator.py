"""FluxGenerator: the Serve deployment that owns one FluxEngine (one FluxPipeline).

- Dynamic batching: every work item enters one `@serve.batch` queue; the batch function groups
  its items by ShapeKey and cuts each group by the pixel budget (engine.batching), so items of
  different keys never share a call and the replica keeps no state per key. A BatchGate in front
  of the queue holds arrivals while a batch runs and lets them in together when it ends (Serve
  would otherwise form a batch of one per arrival: see serving/batch_gate.py), so batches form
  under load while a lone request, with `batch_wait_timeout_s: 0`, starts at once.
- `max_batch_size`, `batch_wait_timeout_s` and `pixel_budget` come from the deployment's
  user_config and change live through `reconfigure` (no restart).
- LoRA cache: `@serve.multiplexed` keyed by the request's LoRA-set id, sized from the args; the
  ingress sets the same id on its handle call so Serve routes to replicas that hold the set.
- One asyncio lock around adapter loading and each pipeline call: Serve splits a batch by
  multiplexed id and runs the parts concurrently (notes/rayserve.md section 2), while the
  pipeline's adapter state is global. The call itself runs in a thread (`asyncio.to_thread`)
  so the event loop keeps batching and answering health checks.
- One failing item does not fail its batch: a failed call is retried item by item and only the
  item that fails alone gets the error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import torch
from ray import serve

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.engine.adapters import AdapterCache, LoraSet
from serve_app.engine.batching import plan_calls
from serve_app.engine.images import encode_image
from serve_app.engine.lora_sources import LoraSources
from serve_app.engine.pipeline import FluxEngine, GenerationInterrupted
from serve_app.engine.workitems import ItemResult, WorkItem
from serve_app.errors import ApiError
from serve_app.serving.batch_gate import BatchGate
from serve_app.serving.metrics import GeneratorMetrics

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_BATCH_WAIT_S = 0.0


class FluxGenerator:
    def __init__(self, args: AppArgs):
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.args = args
        self.pixel_budget = args.batching.pixel_budget
        self.metrics = GeneratorMetrics()
        self.engine = FluxEngine.load(args.model.source, args.device, args.model.revision, args.fault_injection)
        self.sources = LoraSources(args.loras)
        self.adapters = AdapterCache(
            self.engine, self.sources, on_load=self.metrics.record_lora_load, on_evict=self.metrics.lora_evictions.inc
        )
        self.lock = asyncio.Lock()
        self.gate = BatchGate()
        self.calls: list[dict] = []  # the last 1000 pipeline calls (see _record_call), for tests
        self._call_seq = itertools.count(1)
        self._in_batch: set[tuple[str, int]] = set()  # items a running batch function holds
        self._cancelled: set[tuple[str, int]] = set()  # of those, the ones their caller gave up
        self._set_sources: dict[str, tuple[str, ...]] = {}

        # Closures, not methods: Serve fixes a decorated method's options at import time, and
        # these sizes come from the args and the user_config.
        async def load_lora_set(set_id: str) -> LoraSet:
            return await asyncio.to_thread(self.adapters.acquire, self._set_sources[set_id])

        async def run_batch(items: list[WorkItem]) -> list[Any]:
            return await self._run_batch(items)

        self._lora_sets = serve.multiplexed(max_num_models_per_replica=args.loras.max_adapters_per_replica)(
            load_lora_set
        )
        self._batch = serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)(
            run_batch
        )

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings from the deployment's user_config; applied live, no restart."""
        if "max_batch_size" in user_config:
            self._batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "pixel_budget" in user_config:
            self.pixel_budget = int(user_config["pixel_budget"])

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, item: WorkItem) -> ItemResult | ApiError:
        """Generate one work item; an error comes back as a value (it survives any pickling)."""
        try:
            await self._fetch_loras(item)
        except ApiError as exc:
            return exc
        await self.gate.enter(item.key)  # while a batch runs, wait for the next wave (batch_gate.py)
        try:
            return await self._batch(item)
        except asyncio.CancelledError:
            # The caller cancelled (job cancel or timeout): a call already running with this
            # item stops at the next step if nothing else in it is still wanted.
            if (item.request_id, item.index) in self._in_batch:
                self._cancelled.add((item.request_id, item.index))
            raise

    async def check_health(self) -> None:
        """Serve's health probe: the engine is loaded and the event loop answers."""
        if self.engine is None:
            raise RuntimeError("engine not loaded")

    async def ready(self) -> bool:
        return True

    async def batch_state(self) -> dict:
        """The batching settings and what is in flight, without waiting for the pipeline lock."""
        return {
            "max_batch_size": self._batch._get_max_batch_size(),
            "batch_wait_timeout_s": self._batch._get_batch_wait_timeout_s(),
            "pixel_budget": self.pixel_budget,
            "running_batches": self.gate.running,
            "waiting_items": self.gate.waiting,
            "waves": self.gate.waves,
        }

    async def stats(self) -> dict:
        """Replica internals, for tests and debugging (not part of the HTTP API)."""
        async with self.lock:  # the adapter state is stable only between pipeline calls
            adapters = sorted(self.engine.adapter_names())
            layer_adapters = sorted(self.engine.layer_adapter_names())
            loaded_sources = self.adapters.loaded_sources()
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "actor_name": _actor_name(),
            "calls": list(self.calls),
            "adapters": adapters,
            "lora_layer_adapters": layer_adapters,
            "loaded_sources": loaded_sources,
            "url_downloads": self.sources.stats["url_downloads"],
            "lora_loads": self.adapters.loads,
            "steps_run": self.engine.steps_run,
            "max_batch_size": self._batch._get_max_batch_size(),
            "batch_wait_timeout_s": self._batch._get_batch_wait_timeout_s(),
            "pixel_budget": self.pixel_budget,
            "asyncio_tasks": len(asyncio.all_tasks()),
            "cancelled_marks": len(self._cancelled) + len(self._in_batch),
            "set_sources": len(self._set_sources),
            "gate_waiting": self.gate.waiting,
            "gate_running": self.gate.running,
            "gate_waves": self.gate.waves,
        }

    # ---- batches ----------------------------------------------------------------------------

    async def _run_batch(self, items: list[WorkItem]) -> list[ItemResult | ApiError]:
        ids = [(item.request_id, item.index) for item in items]
        self._in_batch.update(ids)
        self.gate.batch_started()
        results: list[ItemResult | ApiError | None] = [None] * len(items)
        try:
            for call in plan_calls([item.key for item in items], self.pixel_budget):
                outcomes = await self._run_call([items[i] for i in call])
                for i, outcome in zip(call, outcomes):
                    results[i] = outcome
        finally:
            self._in_batch.difference_update(ids)
            self._cancelled.difference_update(ids)
            self.gate.batch_finished()
        return results

    async def _run_call(self, items: list[WorkItem]) -> list[ItemResult | ApiError]:
        async with self.lock:
            live = [item for item in items if not self._is_dead(item)]
            if not live:
                return [self._dead_error(item) for item in items]
            try:
                lora_set = await self._acquire_loras(live[0])
            except ApiError as exc:
                return [exc for _ in items]
            outcomes = await self._generate_or_split(live, lora_set)
        by_index = {(item.request_id, item.index): out for item, out in zip(live, outcomes)}
        return [by_index.get((item.request_id, item.index)) or self._dead_error(item) for item in items]

    async def _fetch_loras(self, item: WorkItem) -> None:
        """Fetch and check the LoRA files an item needs and the replica lacks, before it joins a batch.

        Async jobs reach the generator with their URLs not yet downloaded and their files not yet
        checked. Doing that inside the batch (under the pipeline lock, one batch at a time) would
        stall every other item of the replica for up to timeout × retries, and a broken file would
        first make Serve's LRU evict a good cached set. Here a slow host or a broken file costs only
        its own item; the load under the lock then finds a checked file (URLs: in the disk cache).
        """
        loaded = set(self.adapters.loaded_sources())
        for use in item.key.loras:
            if use.source not in loaded:
                hits, downloaded = self.sources.stats["url_cache_hits"], self.sources.stats["bytes_downloaded"]
                await asyncio.to_thread(self.sources.local_file, use.source)
                self.metrics.record_fetch(
                    self.sources.stats["url_cache_hits"] - hits, self.sources.stats["bytes_downloaded"] - downloaded
                )

    async def _acquire_loras(self, item: WorkItem) -> LoraSet | None:
        key = item.key
        if not key.loras:
            return None
        set_id = key.lora_set_id
        self._set_sources[set_id] = tuple(u.source for u in key.loras)
        loads_before = self.adapters.loads
        try:
            lora_set = await self._lora_sets(set_id)
        finally:
            self._set_sources.pop(set_id, None)
        if self.adapters.loads == loads_before:
            self.metrics.lora_hits.inc()
        else:
            self.metrics.lora_misses.inc()
        return lora_set

    async def _generate_or_split(self, items: list[WorkItem], lora_set: LoraSet | None) -> list[ItemResult | ApiError]:
        try:
            return await asyncio.to_thread(self._generate_call, items, lora_set)
        except GenerationInterrupted:
            return [self._dead_error(item) for item in items]
        except Exception as exc:
            if len(items) == 1:
                logger.exception("generation failed for %s[%d]", items[0].request_id, items[0].index)
                self.metrics.failed_items.inc(tags={"code": errors.GENERATION_FAILED})
                return [ApiError(errors.GENERATION_FAILED, f"generation failed: {type(exc).__name__}: {exc}"[:500])]
            # The call is shared: find the item at fault by running each alone.
            logger.warning("a call of %d items failed (%s); retrying them one by one", len(items), exc)
            outcomes: list[ItemResult | ApiError] = []
            for item in items:
                outcomes.extend(await self._generate_or_split([item], lora_set))
            return outcomes

    def _generate_call(self, items: list[WorkItem], lora_set: LoraSet | None) -> list[ItemResult]:
        """Runs in a worker thread while the lock is held."""
        key = items[0].key
        record = self._record_call(items)
        adapters = self.adapters.weights(key.loras)
        start = time.perf_counter()
        images = self.engine.generate(items, adapters, should_stop=lambda: all(self._is_dead(i) for i in items))
        seconds = time.perf_counter() - start
        record.update(ok=True, seconds=round(seconds, 4))
        self.metrics.record_call(key.label(), len(items), seconds)
        lora_modules = tuple((u.source, self.adapters.matched_modules(u.source)) for u in key.loras)
        return [
            ItemResult(
                request_id=item.request_id,
                index=item.index,
                seed=item.seed,
                width=key.width,
                height=key.height,
                format=item.output_format,
                data=encode_image(image, item.output_format),
                seconds=seconds / len(items),
                lora_modules=lora_modules,
            )
            for item, image in zip(items, images)
        ]

    def _record_call(self, items: list[WorkItem]) -> dict:
        """Note a pipeline call before it runs: what tests check batching by (`stats()["calls"]`).

        `keys` counts the distinct ShapeKeys handed to the call (the engine refuses more than one,
        so a mixed call would show up here as a failed call with keys > 1, not be hidden by the
        one-by-one retry); `ok` turns True and `seconds` (the pipeline's time) is set when the call
        returns images.
        """
        record = {
            "seq": next(self._call_seq),
            "shape": items[0].key.label(),
            "images": len(items),
            "keys": len({item.key for item in items}),
            "requests": sorted({item.request_id for item in items}),
            "ok": False,
        }
        self.calls.append(record)
        del self.calls[:-1000]
        return record

    def _is_dead(self, item: WorkItem) -> bool:
        """Cancelled by its caller, or past its deadline: no longer worth a denoising step."""
        if (item.request_id, item.index) in self._cancelled:
            return True
        return item.deadline is not None and time.time() > item.deadline

    def _dead_error(self, item: WorkItem) -> ApiError:
        if (item.request_id, item.index) in self._cancelled:
            return ApiError(errors.CANCELED, "the request was cancelled")
        return ApiError(errors.TIMEOUT, "the request timed out")


def _actor_name() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_actor_name()
    except Exception:  # outside an actor
        return None
