"""Prometheus metrics of the app's replicas (ray.serve.metrics adds deployment, replica and application tags).

Ray exports each beside its own as `ray_<name>` (a Histogram as `_bucket`, `_sum` and `_count`);
deploy/grafana/flux-serve.json charts them (docs/monitoring.md). Generator metrics are tagged by model and
shape (`1024x1024x25`), never by LoRA: LoRA ids are unbounded and Serve already exports
`ray_serve_registered_multiplexed_model_id` per loaded set.

Every count and gauge a panel reads is exported from the replica's start, zeros included (`count`,
`HeldGauge`), so the panel of an event that has not happened yet (a compile, a download, an error code)
reads 0, not "No data". Only the histograms and the images count wait for their first event (the shapes
they are tagged by are not known before).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import cast

from ray.serve import metrics

from serve_app import errors
from serve_app.engine.protocol import CompileStats
from serve_app.errors import ErrorCode
from serve_app.jobs.manager import StatusCounts
from serve_app.replica.core import ReplicaObserver
from serve_app.workitems import BatchKey

logger = logging.getLogger("ray.serve")

_BATCH_BOUNDARIES: list[float] = [1, 2, 3, 4, 6, 8, 12, 16]
_SECONDS_BOUNDARIES: list[float] = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
# Ray forgets a Gauge's value that is not set again within two metrics report intervals (2 × 10 s by
# default; Serve's own gauges are set again on a timer too): each replica sets its gauges this often.
EXPORT_EVERY_S = 5.0

Series = tuple[tuple[str, str], ...]  # one series' tags, sorted


def _tags(*keys: str) -> tuple[str]:
    """Tag keys as Ray 2.60 annotates `tag_keys`: Tuple[str] (one key), though it takes any number."""
    return cast("tuple[str]", keys)


def _series(tags: Mapping[str, str]) -> Series:
    return tuple(sorted(tags.items()))


class HeldGauge:
    """A Gauge that keeps its values and sets them all again on `export`, so Ray keeps exporting them.

    Args:
        name: the exported name, less Ray's `ray_` prefix.
        description: its help text.
        tag_keys: its tag keys (Serve adds deployment, replica and application).
        start: the series exported at 0 from the start, by their tags (the default tags aside).
    """

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...],
                 start: Iterable[Mapping[str, str]] = ({},)) -> None:
        self._gauge = metrics.Gauge(name, description, tag_keys=_tags(*tag_keys))
        # Set from the engine thread and the event loop. The lock also orders the Gauge's sets: a count
        # set back to an older total, even for a moment, would read as a restart to Prometheus' rate().
        self._lock = threading.Lock()
        self._values: dict[Series, float] = {_series(tags): 0.0 for tags in start}

    def set_default_tags(self, tags: dict[str, str]) -> None:
        self._gauge.set_default_tags(tags)

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        series = _series(tags or {})
        with self._lock:
            self._values[series] = value
            self._gauge.set(value, tags=dict(series))

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        series = _series(tags or {})
        with self._lock:
            self._values[series] = total = self._values.get(series, 0.0) + value
            self._gauge.set(total, tags=dict(series))

    def export(self) -> None:
        with self._lock:
            for series, value in self._values.items():
                self._gauge.set(value, tags=dict(series))


def count(name: str, description: str, tag_keys: tuple[str, ...] = ("model",),
          start: Iterable[Mapping[str, str]] = ({},)) -> HeldGauge:
    """A count exported from the replica's start, 0 included: a HeldGauge of its running total, `<name>_total`.

    Ray's Counter cannot record 0 (`inc(0)` raises ValueError), so a Counter is missing from the metrics
    endpoint until its event first happens, and a panel over it reads "No data" where it should read 0.
    Named `<name>_total`, the Gauge is exported under the very name a Counter would have, and `rate()` and
    `increase()` read it alike (a replica that restarts counts from 0 again, as a Counter would).
    """
    return HeldGauge(f"{name}_total", description, tag_keys, start)


async def keep_exporting(export: Callable[[], None]) -> None:
    """Call `export` every EXPORT_EVERY_S for as long as the replica lives (run it as a task of its event loop)."""
    while True:
        try:
            export()
        except Exception:  # one failed export must not end the loop that keeps every metric exported
            logger.exception("exporting metrics failed")
        await asyncio.sleep(EXPORT_EVERY_S)


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
        self.failed_items = count("flux_items_failed", "Work items whose generation failed", ("model", "code"),
                                  start=[{"code": str(errors.GENERATION_FAILED)}])
        self.lora_hits = count("flux_lora_cache_hits", "LoRA set found in the replica's cache")
        self.lora_misses = count("flux_lora_cache_misses", "LoRA set not in the replica's cache")
        self.lora_loads = count("flux_lora_adapter_loads", "LoRA files loaded as adapters")
        self.lora_evictions = count("flux_lora_set_evictions", "LoRA sets evicted from the cache")
        self.lora_load_seconds = metrics.Histogram(
            "flux_lora_load_seconds", "Seconds to load one LoRA file", boundaries=_SECONDS_BOUNDARIES,
            tag_keys=("model",),
        )
        self.url_cache_hits = count("flux_lora_url_cache_hits", "Remote LoRA files found in the download cache")
        self.downloads = count("flux_lora_downloads", "LoRA files downloaded")
        self.bytes_downloaded = count("flux_lora_bytes_downloaded", "Bytes of LoRA files downloaded")
        self.compiles = HeldGauge("flux_compiles", "torch.compile compiles in this replica", ("model",))
        self.recompiles = HeldGauge("flux_recompiles", "Compiles of code compiled before", ("model",))
        self.recompiles_after_warmup = HeldGauge(
            "flux_recompiles_after_warmup", "Compiles since the warm-up ended (0 is the goal)", ("model",)
        )
        for metric in vars(self).values():
            metric.set_default_tags({"model": model})

    def export(self) -> None:
        for metric in vars(self).values():
            if isinstance(metric, HeldGauge):
                metric.export()

    def call_done(self, key: BatchKey, images: int, seconds: float) -> None:
        tags = {"shape": key.label()}
        self.batch_size.observe(images, tags=tags)
        self.images.inc(images, tags=tags)
        self.seconds_per_image.observe(seconds / max(images, 1), tags=tags)

    def item_failed(self, code: str) -> None:
        self.failed_items.inc(tags={"code": str(code)})

    def lora_set_used(self, hit: bool) -> None:
        (self.lora_hits if hit else self.lora_misses).inc()

    def lora_loaded(self, seconds: float) -> None:
        self.lora_loads.inc()
        self.lora_load_seconds.observe(seconds)

    def lora_set_evicted(self) -> None:
        self.lora_evictions.inc()

    def compiled(self, stats: CompileStats) -> None:
        self.compiles.set(stats.compiles)
        self.recompiles.set(stats.recompiles)
        if stats.since_warmup is not None:
            self.recompiles_after_warmup.set(stats.since_warmup)

    def lora_fetched(self, cache_hits: int, bytes_downloaded: int) -> None:
        if cache_hits:
            self.url_cache_hits.inc(cache_hits)
        if bytes_downloaded:  # a download this item started (those it shared count once, for their starter)
            self.downloads.inc()
            self.bytes_downloaded.inc(bytes_downloaded)


class IngressMetrics:
    """An ingress replica's error answers by code (Serve's `ray_serve_num_http_requests` counts every answer
    by HTTP status)."""

    def __init__(self) -> None:
        self.errors = count("flux_request_errors", "Error answers of the HTTP API, by code", ("code",),
                            start=[{"code": str(code)} for code in ErrorCode])

    def request_failed(self, code: ErrorCode) -> None:
        self.errors.inc(tags={"code": str(code)})

    def export(self) -> None:
        self.errors.export()


class JobsMetrics:
    """The job service's jobs by status, read from its JobManager at each export."""

    def __init__(self) -> None:
        self.jobs = metrics.Gauge("flux_jobs", "Jobs the job service holds now, by status", tag_keys=("status",))
        # A count, set from the manager's own running totals (for `_total`, see `count`).
        self.ended = metrics.Gauge("flux_jobs_ended_total", "Jobs ended since the job service started, by status",
                                   tag_keys=("status",))

    def export(self, counts: StatusCounts) -> None:
        for status, held in counts.held.items():
            self.jobs.set(held, tags={"status": str(status)})
        for status, ended in counts.ended.items():
            self.ended.set(ended, tags={"status": str(status)})
