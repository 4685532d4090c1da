"""The download cache's cap and its hand-over, with downloads in flight and a second process.

The cap counts downloads in flight (their .part files are reserved at their announced size), and a
file handed to a loader is read from a descriptor this process holds: another process evicting it
can make us fetch it again, never fail the load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_app.errors import ApiError
from serve_app.loras.cache import DownloadCache
from tests.unit.lora_host import LoraHost, drip
from tests.unit.loras.test_sources import cache_files, fetch, make, read, safetensors_bytes

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def host():
    server = LoraHost()
    yield server
    server.close()


def disk_bytes(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory) if directory.exists() else ():
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
    return total


def test_downloads_in_flight_count_against_the_cap(tmp_path, host):
    """Five slow downloads into a cache with room for two: the cache never holds more than its cap."""
    body = safetensors_bytes(tmp_path)
    cap = 2 * len(body) + 1
    src = make(tmp_path, cache_max_bytes=cap)
    urls = [host.route(f"/slow{i}.safetensors", drip(body, every_s=0.004)) for i in range(5)]
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], disk_bytes(tmp_path / "cache"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()

    def fetch_one(url):
        try:
            return fetch(src, url)
        except ApiError as exc:
            return exc

    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(fetch_one, urls))
    stop.set()
    sampler.join()
    refused = [o for o in outcomes if isinstance(o, ApiError)]
    assert peak[0] <= cap, (peak[0], cap)
    assert 1 <= len(outcomes) - len(refused) <= 2 and refused, outcomes
    assert all(o.code == "LORA_DOWNLOAD_FAILED" and "no room" in o.message for o in refused)
    assert disk_bytes(tmp_path / "cache") <= cap and all(
        name.endswith(".safetensors") for name in cache_files(tmp_path)
    )


EVICTOR = r"""
import sys, time
from serve_app.config import LoraArgs
from serve_app.loras.sources import LoraSources
from serve_app.errors import ApiError

cache, base, size, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
src = LoraSources(LoraArgs(root=cache + "-root", cache_dir=cache, cache_max_bytes=size + 1,
                           allowed_hosts=["127.0.0.1"], allow_private_addresses=True))
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    try:
        src.fetch(src.resolve(f"{base}/other.safetensors?{i}"))  # each one evicts everything else from the shared cache
    except ApiError:  # no room while the other process downloads: the cap holds, try the next one
        pass
    i += 1
print(i)
"""


@pytest.mark.slow  # a subprocess of its own
def test_a_file_evicted_by_another_process_is_never_a_failed_load(tmp_path, host):
    body = safetensors_bytes(tmp_path)
    host.file("/other.safetensors", body)
    url = host.file("/mine.safetensors", body)
    src = make(tmp_path, cache_max_bytes=10 * len(body))
    fetch(src, url)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    evictor = subprocess.Popen(
        [sys.executable, "-c", EVICTOR, str(tmp_path / "cache"), host.base, str(len(body)), "4"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    reads = 0
    try:
        while host.counts["/other.safetensors"] == 0 and evictor.poll() is None:
            time.sleep(0.01)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            lora = read(src, url)  # between the fetch and the read, the other process may have evicted it
            assert lora.size == len(body) and lora.source == url
            reads += 1
    finally:
        evictions = int(evictor.communicate(timeout=60)[0])
    assert evictions > 10 and reads > 10
    assert host.counts["/mine.safetensors"] > 1  # it was evicted and fetched again, and no read failed


def test_reservations_are_visible_and_dead_downloads_are_swept(tmp_path):
    cache = DownloadCache(tmp_path / "c", cap_bytes=1000, stale_part_s=60)
    with cache.part("k") as part:
        part.expect(600)  # another process sees 600 bytes taken at once
        assert disk_bytes(tmp_path / "c") == 600
        with pytest.raises(Exception) as info, cache.part("k2") as other:
            other.expect(600)
        assert type(info.value).__name__ == "CacheFull"
    assert disk_bytes(tmp_path / "c") == 0  # an abandoned part is removed with its reservation
    dead = tmp_path / "c" / ".dead.x.part"
    dead.write_bytes(b"x" * 900)
    os.utime(dead, (time.time() - 120,) * 2)  # no write for longer than any download may take
    cache.make_room()
    assert not dead.exists()
