"""LoRAs end to end on a real local Ray Serve: real files, real HTTP (docs/models.md, docs/loras.md).

Three models of the session's shared app (tests/serve/apps.py):
- `flux`: one generator replica, a cache of 4 adapters, short download timeouts, a 100 kB file cap (app-wide);
- `flux-affinity`: two generator replicas with a cache of 2 each, used by no other test (both start empty);
- `flux-b`: one replica with its own cache of 2 (and other defaults, which test_api checks).
A local HTTP server on 127.0.0.1 plays the LoRA host for URL sources and counts its hits.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from serve_app import errors, tiny
from serve_app.loras.adapters import adapter_name
from tests.serve.apps import LORA_TIMEOUT_S as TIMEOUT_S
from tests.serve.apps import MAX_LORA_FILE as MAX_FILE
from tests.serve.helpers import free_port, generator_state, wait_finished

pytestmark = pytest.mark.serve

TINY = {"width": 64, "height": 64, "sample_steps": 1}  # load/swap tests: the image hardly matters
SMALL = {"width": 64, "height": 64, "sample_steps": 2}  # image tests
PROMPT = "a photo of a cat"
SEED = 7
AFFINITY = "flux-affinity"
LRU2 = "flux-b"
TRICKLE_S = 3.0  # the slow host: a byte every 0.25 s (never a read timeout), then garbage
STYLE = "aitk/style.safetensors"
FORMATS = {
    "ai-toolkit": STYLE,
    "diffusers-peft": "peft.safetensors",
    "kohya": "kohya.safetensors",  # without single_blocks linear1 (see tiny.write_kohya_lora)
    "xlabs": "xlabs.safetensors",
}
SWAP = [f"swap/l{i}.safetensors" for i in range(8)]


@pytest.fixture(scope="module")
def lora_files(lora_root, tmp_path_factory) -> Path:
    """Extra files under the session's LoRA root: swap LoRAs, broken files, escaping symlinks."""
    for i, path in enumerate(SWAP):
        if not (lora_root / path).exists():
            tiny.write_aitoolkit_lora(lora_root / path, seed=100 + i)
    bad = lora_root / "bad"
    bad.mkdir(exist_ok=True)
    good = (lora_root / STYLE).read_bytes()
    (bad / "corrupt.safetensors").write_bytes(b"\x93\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 200)
    (bad / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (bad / "empty.safetensors").write_bytes(b"")
    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(4, 16),
               "transformer.no_such_block.lora_B.weight": torch.zeros(16, 4)}, str(bad / "wrong_keys.safetensors"))
    outside = tmp_path_factory.mktemp("outside-the-root")
    tiny.write_aitoolkit_lora(outside / "secret.safetensors", seed=5)
    for link, target in (("escape.safetensors", outside / "secret.safetensors"), ("escape_dir", outside)):
        if not (bad / link).is_symlink():
            (bad / link).symlink_to(target)
    return lora_root


@pytest.fixture(scope="module")
def url(app_url, lora_files):
    return app_url


# ---- helpers ----------------------------------------------------------------------------------


def body(loras=(), prompt=PROMPT, seed=SEED, size=SMALL, **extra) -> dict:
    return {"model": "flux", "prompts": [{"prompt": prompt, "seed": seed, **size}], "loras": list(loras),
            "output_format": "png", **extra}


def lora(path: str, multiplier: float = 1.0) -> dict:
    return {"path": path, "network_multiplier": multiplier}


def generate(url: str, loras=(), client: httpx.Client | None = None, **kwargs) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(f"{url}/v1/generate", json=body(loras, **kwargs), timeout=60)


def pixels(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    data = base64.b64decode(answer.json()["images"][0]["data"])
    assert data.startswith(b"\x89PNG")
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def error_of(answer: httpx.Response, status: int = 400) -> dict:
    assert answer.status_code == status, answer.text
    return answer.json()["error"]




def generator_stats(model: str = "flux") -> dict:
    """A replica's LoRA state (it waits for a running pipeline call)."""
    state = generator_state(loras=True, deployment=f"FluxGenerator-{model}")
    return {"replica": state.replica, "loaded_sources": state.loras.loaded, "adapters": state.loras.adapters,
            "lora_loads": state.loras.adapter_loads}


def replica_stats(replicas: int, model: str, tries: int = 100) -> dict[str, dict]:
    """Every replica's stats: asks through the load-balanced handle until each has answered."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        stats = generator_stats(model)
        seen.setdefault(stats["replica"], stats)
        if len(seen) == replicas:
            return seen
    raise AssertionError(f"saw {len(seen)} of {replicas} replicas in {tries} calls")


def assert_no_stale_adapter(stats: dict, cache_size: int) -> None:
    assert len(stats["adapters"]) <= cache_size, stats["adapters"]
    assert len(stats["loaded_sources"]) <= cache_size
    # `adapters` names every adapter a PEFT LoRA layer still holds weights for: none of a deleted one.
    assert {adapter_name(s) for s in stats["loaded_sources"]} == set(stats["adapters"]), stats


def wrapped_modules(path: Path) -> int:
    """Modules a diffusers-format file wraps: one per `<module>.lora_A.weight` key."""
    with safe_open(str(path), "pt") as f:
        return len({k.rsplit(".lora_A.", 1)[0] for k in f.keys() if ".lora_A." in k})


@pytest.fixture(scope="module")
def base_image(url) -> np.ndarray:
    return pixels(generate(url))


# ---- 1. formats, multipliers, stacking --------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_and_changes_the_image(url, base_image, fmt):
    answer = generate(url, [lora(FORMATS[fmt])])
    image = pixels(answer)
    assert answer.json()["metadata"]["loras"][0]["matched_modules"] > 0
    assert np.abs(image - base_image).mean() > 1.0, fmt


def test_multiplier_zero_is_the_base_image_and_a_change_of_multiplier_loads_nothing(url, base_image):
    full = pixels(generate(url, [lora(STYLE, 1.0)]))  # loads it if it is not cached yet
    loads = generator_stats()["lora_loads"]
    zero = pixels(generate(url, [lora(STYLE, 0.0)]))
    half = pixels(generate(url, [lora(STYLE, 0.5)]))
    assert generator_stats()["lora_loads"] == loads
    assert np.abs(zero - base_image).max() <= 1
    assert np.abs(half - full).mean() > 1.0 and np.abs(half - base_image).mean() > 1.0


def test_two_stacked_loras_equal_plain_diffusers_with_both_adapters(url, tiny_dir, lora_root):
    from diffusers import FluxPipeline

    weights = {"a": ("aitk", "style.safetensors", 0.8), "b": ("", "peft.safetensors", -0.6)}
    answer = generate(url, [lora(str(Path(d) / f), w) for d, f, w in weights.values()])
    served = pixels(answer)
    assert [entry["network_multiplier"] for entry in answer.json()["metadata"]["loras"]] == [0.8, -0.6]

    pipe = FluxPipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, (folder, file, _) in weights.items():
        pipe.load_lora_weights(str(lora_root / folder), weight_name=file, adapter_name=name, local_files_only=True)
    pipe.set_adapters(list(weights), adapter_weights=[w for _, _, w in weights.values()])
    image = pipe(prompt=PROMPT, height=SMALL["height"], width=SMALL["width"], num_inference_steps=SMALL["sample_steps"],
                 guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    plain = np.asarray(Image.open(buffer)).astype(np.int16)
    assert np.abs(served - plain).max() <= 1


def test_async_job_reports_the_modules_each_lora_matched(url, lora_root):
    request = body([lora(STYLE), lora("peft.safetensors", 0.5)], size=TINY)
    job = httpx.post(f"{url}/v1/inference", json=request).json()
    assert wait_finished(url, job["request_id"])["status"] == "succeeded"
    loras = httpx.get(f"{url}/v1/requests/{job['request_id']}/result").json()["metadata"]["loras"]
    expected = [wrapped_modules(lora_root / STYLE), wrapped_modules(lora_root / "peft.safetensors")]
    assert expected[0] == len(tiny._block_linears()) > 0  # ai-toolkit wraps every block Linear
    assert [entry["matched_modules"] for entry in loras] == expected


# ---- 2. the adapter cache under many swaps ----------------------------------------------------


def test_200_swaps_through_a_cache_of_4_keep_at_most_4_adapters_and_no_stale_weights(url):
    before = generator_stats()["lora_loads"]
    order = [SWAP[(i * 3) % len(SWAP)] for i in range(200)]  # 8 files round the cache of 4: all misses
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda path: generate(url, [lora(path)], client=client, size=TINY), order))
    assert [a.status_code for a in answers] == [200] * len(order)
    stats = generator_stats()
    assert stats["lora_loads"] - before >= len(order) // 2  # the swaps really happened
    assert_no_stale_adapter(stats, cache_size=4)


# ---- 4. URL sources ---------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    counts: Counter
    files: dict[str, bytes]


class _Handler(http.server.BaseHTTPRequestHandler):
    """/lora/<name>: a LoRA file; /big, /bigstream: oversize; /page, /sniffed: HTML; /slow: a timeout;
    /trickle: a slow host that never times out; anything else: 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: _Server = self.server  # type: ignore[assignment]
        path = urlsplit(self.path).path
        srv.counts[path] += 1
        try:
            if path.startswith("/lora/"):
                return self._send(200, srv.files["good"])
            if path.startswith("/bigstream"):  # no Content-Length: the limit must hold while streaming
                return self._send(200, b"\0" * (2 * MAX_FILE), length=None)
            if path.startswith("/big"):
                return self._send(200, b"\0" * (2 * MAX_FILE))
            if path.startswith("/page"):
                return self._send(200, b"<!doctype html><html><body>Sign in</body></html>", "text/html; charset=utf-8")
            if path.startswith("/sniffed"):  # HTML served as a file
                return self._send(200, b"\n<html><body>Sign in</body></html>")
            if path.startswith("/slow"):
                time.sleep(4 * TIMEOUT_S)
                return self._send(200, srv.files["good"])
            if path.startswith("/trickle"):
                return self._trickle()
            return self._send(404, b"not found", "text/plain")
        except OSError:  # the client hung up on purpose (oversize, timeout)
            pass

    def _send(self, status: int, data: bytes, ctype: str = "application/octet-stream", length: int | None = -1):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _trickle(self):
        chunks = int(TRICKLE_S / (TIMEOUT_S / 2))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(chunks))
        self.end_headers()
        for _ in range(chunks):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(TIMEOUT_S / 2)


@pytest.fixture(scope="module")
def lora_host(lora_root):
    server = _Server(("127.0.0.1", free_port()), _Handler)
    server.counts = Counter()
    server.files = {"good": (lora_root / STYLE).read_bytes()}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_lora_is_downloaded_once_then_served_from_the_cache(url, lora_host):
    server, host = lora_host
    source = f"{host}/lora/cached.safetensors"
    by_url = pixels(generate(url, [lora(source, 0.9)]))
    again = pixels(generate(url, [lora(source, 0.5)]))
    job = httpx.post(f"{url}/v1/inference", json=body([lora(source)], size=TINY)).json()
    assert wait_finished(url, job["request_id"])["status"] == "succeeded"
    assert server.counts["/lora/cached.safetensors"] == 1
    # The downloaded file is the root's style LoRA: same pixels as that file from the root.
    assert np.abs(by_url - pixels(generate(url, [lora(STYLE, 0.9)]))).max() <= 1
    assert np.abs(again - by_url).mean() > 1.0


URL_FAILURES = [
    ("/big.safetensors", f"larger than {MAX_FILE} bytes"),
    ("/bigstream.safetensors", f"larger than {MAX_FILE} bytes"),
    ("/page.safetensors", "HTML page"),
    ("/sniffed.safetensors", "HTML page"),
    ("/slow.safetensors", f"timed out after {TIMEOUT_S:g} s"),
    ("/missing.safetensors", "HTTP 404"),
]


@pytest.mark.parametrize("path,reason", URL_FAILURES, ids=[p.strip("/").split(".")[0] for p, _ in URL_FAILURES])
def test_a_bad_url_answers_400_download_failed_with_its_reason(url, lora_host, path, reason):
    server, host = lora_host
    source = f"{host}{path}"
    error = error_of(generate(url, [lora(source)], size=TINY))
    assert error["code"] == errors.LORA_DOWNLOAD_FAILED
    assert source in error["message"] and reason in error["message"], error
    assert error["details"] == {"url": source, "reason": error["details"]["reason"]}
    assert server.counts[path] == (2 if path == "/slow.safetensors" else 1)  # only a timeout is retried


def test_an_async_job_with_a_bad_url_fails_with_download_failed(url, lora_host):
    # Documented behaviour: /v1/inference checks the URL's policy (host, scheme) at once but does not
    # download; the generator fetches it, so a dead link fails the job, not the submit call.
    _, host = lora_host
    job = httpx.post(f"{url}/v1/inference", json=body([lora(f"{host}/missing-async.safetensors")], size=TINY))
    assert job.status_code == 200, job.text
    status = wait_finished(url, job.json()["request_id"])
    assert status["status"] == "failed"
    assert status["error_code"] == errors.LORA_DOWNLOAD_FAILED
    assert "HTTP 404" in status["error"]


def test_a_slow_lora_host_does_not_stall_the_replica(url, lora_host):
    server, host = lora_host
    job = httpx.post(f"{url}/v1/inference", json=body([lora(f"{host}/trickle.safetensors")], size=TINY)).json()
    deadline = time.time() + 10
    while server.counts["/trickle.safetensors"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert server.counts["/trickle.safetensors"] == 1  # the generator is downloading it now
    start = time.perf_counter()
    pixels(generate(url, size=TINY))
    assert time.perf_counter() - start < TRICKLE_S / 2  # it did not wait for the download
    # The host drips bytes for longer than a whole download may take: cut off at the download's deadline.
    status = wait_finished(url, job["request_id"])
    assert status["status"] == "failed" and status["error_code"] == errors.LORA_DOWNLOAD_FAILED, status
    assert "timed out" in status["error"]


# ---- 5. forbidden sources and broken files ----------------------------------------------------


def test_traversal_absolute_and_symlink_escapes_are_forbidden(url, lora_files):
    paths = ["../x.safetensors", "aitk/../../x.safetensors", "aitk/../aitk/../../etc/x.safetensors",
             "/etc/passwd.safetensors", str(lora_files / STYLE),  # absolute, even inside the root
             "bad/escape.safetensors", "bad/escape_dir/secret.safetensors", "file:///etc/x.safetensors"]
    for path in paths:
        for endpoint in ("/v1/generate", "/v1/inference"):
            answer = httpx.post(f"{url}{endpoint}", json=body([lora(path)], size=TINY), timeout=60)
            error = error_of(answer)
            assert error["code"] == errors.LORA_SOURCE_FORBIDDEN, (path, endpoint, error)
            assert error["message"]


BROKEN = [
    ("bad/corrupt.safetensors", errors.LORA_INVALID, "not a safetensors file"),
    ("bad/truncated.safetensors", errors.LORA_INVALID, "truncated"),
    ("bad/empty.safetensors", errors.LORA_INVALID, "empty"),
    ("bad/wrong_keys.safetensors", errors.LORA_INCOMPATIBLE, "does not fit this model"),
]


@pytest.mark.parametrize("path,code,words", BROKEN, ids=[p.split("/")[1].split(".")[0] for p, _, _ in BROKEN])
def test_a_broken_file_answers_400_and_the_replica_carries_on(url, lora_files, path, code, words):
    for cached in SWAP[:4]:  # fill the cache of 4
        pixels(generate(url, [lora(cached)], size=TINY))
    error = error_of(generate(url, [lora(path)], size=TINY))
    assert error["code"] == code and words in error["message"], error
    assert str(lora_files) not in error["message"]  # the source as the client gave it, no server path
    job = httpx.post(f"{url}/v1/inference", json=body([lora(path)], size=TINY)).json()
    status = wait_finished(url, job["request_id"])
    assert (status["status"], status["error_code"]) == ("failed", code)
    if code == errors.LORA_INVALID:  # refused before loading: it evicted nothing from the cache
        assert generator_stats()["loaded_sources"] == sorted(SWAP[:4])
    # The replica is fine: the base model and a good LoRA still generate, and nothing half-loaded stays.
    pixels(generate(url, size=TINY))
    pixels(generate(url, [lora(STYLE)], size=TINY))
    stats = generator_stats()
    assert_no_stale_adapter(stats, cache_size=4)
    assert path not in stats["loaded_sources"]


# ---- 3. LoRA affinity across replicas ---------------------------------------------------------


def test_affinity_routing_keeps_adapter_loads_low_on_two_replicas(url):
    """4 LoRAs, 2 replicas holding 2 each: affinity settles each LoRA on one replica.

    Serve learns which sets a replica holds from pushes every 0.1 s. On the small model a request
    takes ~50 ms, so a burst of LoRAs no replica has seen yet would land before the first push and
    load some on both replicas; each new LoRA is therefore sent alone first, as new LoRAs trickle
    in on a real service (where one image takes seconds). Without affinity (random routing, 4 LoRAs
    through caches of 2) nearly every one of the 48 requests would load its adapter.
    """
    loras = SWAP[4:8]
    before = replica_stats(2, AFFINITY)
    assert all(not stats["loaded_sources"] for stats in before.values())  # a clean start
    for path in loras:  # first sight of each LoRA
        pixels(generate(url, [lora(path)], size=SMALL, model=AFFINITY))
        time.sleep(0.5)
    order = [loras[i % len(loras)] for i in range(44)]  # then round robin, 4 at a time
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: generate(url, [lora(p)], client=client, size=SMALL, model=AFFINITY),
                                order))
    assert [a.status_code for a in answers] == [200] * len(order)
    after = replica_stats(2, AFFINITY)
    assert set(after) == set(before)
    loads = sum(after[r]["lora_loads"] - before[r]["lora_loads"] for r in after)
    assert loads <= 2 * len(loras) * 2, loads
    for stats in after.values():
        assert_no_stale_adapter(stats, cache_size=2)


# ---- 2. LRU eviction (a model's own cache of 2) ------------------------------------------------
# (strict_reference, an intake rule, is tested without Serve: tests/unit/web/test_api.py)


def test_an_lru_of_2_really_unloads_the_evicted_adapter(url):
    """`flux-b` sets its own cache of 2 over the app's 4: the per-model setting reaches its replicas."""
    first, second, third = SWAP[:3]
    for path in (first, second, third):
        pixels(generate(url, [lora(path)], size=TINY, model=LRU2))
    stats = generator_stats(LRU2)
    assert stats["loaded_sources"] == sorted([second, third])
    assert adapter_name(first) not in stats["adapters"]
    assert_no_stale_adapter(stats, cache_size=2)
    loads = stats["lora_loads"]
    pixels(generate(url, [lora(first)], size=TINY, model=LRU2))  # back again: loaded anew, `second` goes
    stats = generator_stats(LRU2)
    assert stats["lora_loads"] == loads + 1
    assert stats["loaded_sources"] == sorted([first, third])
    assert_no_stale_adapter(stats, cache_size=2)
