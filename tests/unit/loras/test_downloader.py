"""Downloader: downloads on a bounded pool of their own threads, awaited with a deadline, shared by the
prompts of a request, remembered when they fail; cache hits never wait behind them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve_app.errors import ApiError
from serve_app.loras.downloader import Downloader, Held
from serve_app.loras.failure_memory import FailureMemory
from serve_app.loras.files import LoraFile
from tests.unit.lora_host import LoraHost, drip, flaky, slow
from tests.unit.loras.test_sources import make, safetensors_bytes


@pytest.fixture
def host():
    server = LoraHost()
    yield server
    server.close()


def download_threads() -> int:
    return sum(t.name.startswith("lora-download") for t in threading.enumerate())


async def take(downloader: Downloader, source: str, deadline: float | None = None) -> Held:
    """Hold a source as a replica's prefetch does, then let it go."""
    got = await downloader.hold(source, deadline=deadline)
    got.lora.close()
    return got


async def outcome(coro):
    try:
        return await coro
    except ApiError as exc:
        return exc


def test_a_cache_hit_never_waits_behind_a_slow_download(tmp_path, host):
    body = safetensors_bytes(tmp_path)
    (tmp_path / "root" / "local.safetensors").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "root" / "local.safetensors").write_bytes(body)
    cached = host.file("/cached.safetensors", body)
    dripping = host.route("/drip.safetensors", drip(body, every_s=0.01))  # ~1 s
    downloader = Downloader(make(tmp_path), max_workers=1)  # one download at a time: the drip holds it

    async def scenario():
        await take(downloader, cached)
        slow_one = asyncio.create_task(take(downloader, dripping))
        while host.counts["/drip.safetensors"] == 0:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        hit = await take(downloader, cached)
        with (await downloader.hold("local.safetensors")).lora as held:
            local = held.read()
        waited = time.monotonic() - start
        await slow_one
        return hit, local, waited

    hit, local, waited = asyncio.run(scenario())
    downloader.close()
    assert hit.bytes_downloaded == 0 and isinstance(local, LoraFile) and waited < 0.3, waited


def test_the_callers_deadline_bounds_its_wait_and_the_download_goes_on(tmp_path, host):
    body = safetensors_bytes(tmp_path)
    url = host.route("/slow.safetensors", slow(body, 0.4))  # within the read timeout: it will succeed
    downloader = Downloader(make(tmp_path))

    async def scenario():
        start = time.monotonic()
        err = await outcome(take(downloader, url, deadline=time.time() + 0.15))
        waited = time.monotonic() - start
        await asyncio.sleep(0.6)  # the download finished for whoever asks next
        return err, waited, await take(downloader, url)

    err, waited, later = asyncio.run(scenario())
    downloader.close()
    assert isinstance(err, ApiError) and err.code == "LORA_DOWNLOAD_FAILED" and "timed out" in err.message
    assert waited < 0.35 and later.bytes_downloaded == 0 and host.counts["/slow.safetensors"] == 1


def test_the_prompts_of_a_request_share_one_attempt_and_its_failure_is_remembered(tmp_path, host):
    missing = host.route("/missing.safetensors", lambda h: (time.sleep(0.2), h.send(404, b""))[1])
    failing = host.route("/failing.safetensors", flaky(b"", failures=10**6, status=503))
    downloader = Downloader(make(tmp_path), max_workers=2)

    async def scenario():
        first = await asyncio.gather(*(outcome(take(downloader, u)) for u in [missing] * 8 + [failing] * 8))
        threads = download_threads()
        again = await asyncio.gather(*(outcome(take(downloader, u)) for u in (missing, failing)))
        return first + again, threads

    errors, threads = asyncio.run(scenario())
    downloader.close()
    assert all(isinstance(e, ApiError) and e.code == "LORA_DOWNLOAD_FAILED" for e in errors)
    assert {e.message for e in errors[:8]} == {errors[-2].message} and "HTTP 404" in errors[0].message
    assert host.counts["/missing.safetensors"] == 1  # 10 asks, one request
    assert host.counts["/failing.safetensors"] == 2  # 10 asks, one download of download_retries attempts
    assert threads <= 2


def test_downloads_run_on_at_most_max_workers_threads(tmp_path, host):
    body = safetensors_bytes(tmp_path)
    urls = [host.route(f"/s{i}.safetensors", slow(body, 0.2)) for i in range(6)]
    downloader = Downloader(make(tmp_path), max_workers=2)
    seen = []

    async def scenario():
        tasks = [asyncio.create_task(take(downloader, u)) for u in urls]
        while not all(t.done() for t in tasks):
            seen.append(download_threads())
            await asyncio.sleep(0.02)
        return [t.result() for t in tasks]

    results = asyncio.run(scenario())
    downloader.close()
    assert all(r.bytes_downloaded == len(body) for r in results) and max(seen) <= 2


def test_concurrent_callers_download_once(tmp_path, host):
    body = safetensors_bytes(tmp_path)
    url = host.route("/good-together", slow(body, 0.3))
    downloader = Downloader(make(tmp_path))

    async def scenario():
        return await asyncio.gather(*(take(downloader, url) for _ in range(4)))

    results = asyncio.run(scenario())
    downloader.close()
    assert host.counts["/good-together"] == 1
    assert sorted(r.bytes_downloaded for r in results) == [0, 0, 0, len(body)]  # counted once, by its starter


def test_failure_memory_expires_and_stays_bounded():
    memory = FailureMemory(ttl_s=0.2, max_entries=3)
    error = ApiError("LORA_DOWNLOAD_FAILED", "gone", {"url": "u"})
    memory.remember("a", error)
    recalled = memory.recall("a")
    assert recalled is not error and (recalled.code, recalled.message, recalled.details) == (
        error.code,
        error.message,
        error.details,
    )
    for key in "bcd":
        memory.remember(key, error)
    assert len(memory) == 3 and memory.recall("a") is None  # the oldest went first
    time.sleep(0.25)
    assert memory.recall("d") is None
