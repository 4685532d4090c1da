"""Prometheus metrics of a generator replica (ray.serve.metrics adds deployment and replica tags).

Tagged by model and shape (`1024x1024x25`), never by LoRA: LoRA ids are unbounded and Serve
already exports `ray_serve_registered_multiplexed_model_id` per loaded set.
"""

from __future__ import annotations

from typing import cast

from ray.serve import metrics

from serve_app.engine.protocol import CompileStats
from serve_app.replica.core import ReplicaObserver
from serve_app.workitems import BatchKey

_BATCH_BOUNDARIES: list[float] = [1, 2, 3, 4, 6, 8, 12, 16]
_SECONDS_BOUNDARIES: list[float] = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]


def _tags(*keys: str) -> tuple[str]:
    """Tag keys as Ray 2.60 annotates `tag_keys`: Tuple[str] (one key), though it takes any number."""
    return cast("tuple[str]", keys)


class GeneratorMetrics(ReplicaObserver):
    def __init__(self, model: str) -> None:
        shape = _tags("model", "shape")
        self.batch_size = metrics.Histogram(
            "flux_batch_size", "Images per pipeline call", boundaries=_BATCH_BOUNDARIES, tag_keys=shape
        )
        self.images = metrics.Counter("flux_images_generated", "Images generated", tag_keys=shape)
        self.seconds_per_image = metrics.Histogram(
            "flux_generation_seconds_per_image",
            "Pipeline call seconds divided by its images",
            boundaries=_SECONDS_BOUNDARIES,
            tag_keys=shape,
        )
        self.failed_items = metrics.Counter(
            "flux_items_failed", "Work items that failed", tag_keys=_tags("model", "code")
        )
        self.lora_hits = metrics.Counter("flux_lora_cache_hits", "LoRA set found in the replica's cache", ("model",))
        self.lora_misses = metrics.Counter(
            "flux_lora_cache_misses", "LoRA set not in the replica's cache", tag_keys=("model",)
        )
        self.lora_loads = metrics.Counter("flux_lora_adapter_loads", "LoRA files loaded as adapters", ("model",))
        self.lora_evictions = metrics.Counter("flux_lora_set_evictions", "LoRA sets evicted from the cache", ("model",))
        self.lora_load_seconds = metrics.Histogram(
            "flux_lora_load_seconds", "Seconds to load one LoRA file", boundaries=_SECONDS_BOUNDARIES,
            tag_keys=("model",),
        )
        self.url_cache_hits = metrics.Counter("flux_lora_url_cache_hits", "Downloaded LoRA found on disk", ("model",))
        self.bytes_downloaded = metrics.Counter(
            "flux_lora_bytes_downloaded", "Bytes of LoRA files downloaded", tag_keys=("model",)
        )
        self.compiles = metrics.Gauge("flux_compiles", "torch.compile compiles in this replica", tag_keys=("model",))
        self.recompiles_after_warmup = metrics.Gauge(
            "flux_recompiles_after_warmup", "Compiles since the warm-up ended (0 is the goal)", tag_keys=("model",)
        )
        for metric in vars(self).values():
            metric.set_default_tags({"model": model})

    def call_done(self, key: BatchKey, images: int, seconds: float) -> None:
        tags = {"shape": key.label()}
        self.batch_size.observe(images, tags=tags)
        self.images.inc(images, tags=tags)
        self.seconds_per_image.observe(seconds / max(images, 1), tags=tags)

    def item_failed(self, code: str) -> None:
        self.failed_items.inc(tags={"code": code})

    def lora_set_used(self, hit: bool) -> None:
        (self.lora_hits if hit else self.lora_misses).inc()

    def lora_loaded(self, seconds: float) -> None:
        self.lora_loads.inc()
        self.lora_load_seconds.observe(seconds)

    def lora_set_evicted(self) -> None:
        self.lora_evictions.inc()

    def compiled(self, stats: CompileStats) -> None:
        self.compiles.set(stats.compiles)
        if stats.since_warmup is not None:
            self.recompiles_after_warmup.set(stats.since_warmup)

    def lora_fetched(self, cache_hits: int, bytes_downloaded: int) -> None:
        if cache_hits:
            self.url_cache_hits.inc(cache_hits)
        if bytes_downloaded:
            self.bytes_downloaded.inc(bytes_downloaded)
