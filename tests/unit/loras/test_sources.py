"""LoraSources against real files and a real local HTTP server (no mocks of the network).

Root-relative paths, the URL policy as the ingress applies it (`canonical`), downloads into the
disk cache (`fetch`), and the hand-over to a loader (`hold`, then the held file's `read`). Redirects and misbehaving hosts are in
test_safe_fetch.py, hf:// in test_hf_sources.py, the cache's cap across processes in
test_download_cache.py, the async Downloader in test_downloader.py.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serve_app.config import LoraArgs
from serve_app.errors import ApiError
from serve_app.loras.cache import cache_key
from serve_app.loras.files import LoraFile, looks_like_html
from serve_app.loras.sources import FetchResult, LoraSources
from tests.unit.lora_host import LoraHost, flaky, redirect, slow, stream_without_length

TIMEOUT_S = 0.5
MAX_FILE = 64 * 1024
ROOT_REFUSALS = {"LORA_NOT_FOUND", "LORA_SOURCE_FORBIDDEN", "LORA_INVALID"}


def safetensors_bytes(tmp: Path, n: int = 2) -> bytes:
    path = tmp / f"t{n}.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.full((n, n), float(n))}, str(path))
    return path.read_bytes()


@pytest.fixture
def host():
    server = LoraHost()
    yield server
    server.close()


@pytest.fixture
def good(tmp_path) -> bytes:
    return safetensors_bytes(tmp_path)


def make(tmp_path: Path, **overrides) -> LoraSources:
    fields = {
        "root": str(tmp_path / "root"),
        "cache_dir": str(tmp_path / "cache"),
        "max_file_bytes": MAX_FILE,
        "allowed_hosts": ["127.0.0.1", ".example.com", "huggingface.co"],
        "allow_private_addresses": True,
        "download_timeout_s": TIMEOUT_S,
        "download_retries": 2,
    }
    fields.update(overrides)
    (tmp_path / "root").mkdir(parents=True, exist_ok=True)
    return LoraSources(LoraArgs(**fields))


def raises(codes: str | set[str], fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code in ({codes} if isinstance(codes, str) else codes), err
    assert 400 <= err.status_code < 500
    back = pickle.loads(pickle.dumps(err))  # crosses Ray handles: must survive pickling intact
    assert (back.code, back.message, back.details) == (err.code, err.message, err.details)
    return err


def fetch(src: LoraSources, path: str, token: str | None = None) -> FetchResult:
    """Resolve a source as the client sent it, then fetch it (a root file needs nothing)."""
    return src.fetch(src.resolve(path, token))


def read(src: LoraSources, path: str, token: str | None = None) -> LoraFile:
    """What a replica loads: the file fetched, held open, then read (a file evicted in between is fetched again)."""
    ref = src.resolve(path, token)
    for _ in range(5):  # a hit can be evicted by another process before it is opened: then it is fetched again
        held = src.hold(ref) or src.fetch(ref, keep=True).held  # a download is held since before it was published
        if held is not None:
            with held:
                return held.read()
    raise AssertionError(f"{path} could not be held")


def cache_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []


# ---- root-relative paths ---------------------------------------------------------------------


def test_root_paths_canonical_and_read(tmp_path, good):
    src = make(tmp_path)
    (tmp_path / "root" / "demo").mkdir()
    (tmp_path / "root" / "demo" / "demo_lora.safetensors").write_bytes(good)
    assert src.canonical("demo/demo_lora.safetensors") == "demo/demo_lora.safetensors"
    assert src.canonical("./demo//demo_lora.safetensors") == "demo/demo_lora.safetensors"
    lora = read(src, "demo/demo_lora.safetensors")
    assert isinstance(lora, LoraFile) and lora.source == "demo/demo_lora.safetensors" and lora.size == len(good)
    assert torch.equal(lora.tensors["transformer.x.lora_A.weight"], torch.full((2, 2), 2.0))
    assert fetch(src, "demo/demo_lora.safetensors").cached


@pytest.mark.parametrize(
    "path",
    [
        "../x.safetensors",
        "a/../../x.safetensors",
        "a/../b.safetensors",
        "/etc/passwd",
        "..\\x.safetensors",
        "a\\b.safetensors",
        "x\x00.safetensors",
        "x\n.safetensors",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.safetensors",
        "s3://b/x.safetensors",
        "C:/x.safetensors",
        "a" * 5000 + ".safetensors",
    ],
)
def test_forbidden_paths(tmp_path, path):
    raises("LORA_SOURCE_FORBIDDEN", make(tmp_path).canonical, path)


@pytest.mark.parametrize(
    "path",
    [
        "%2e%2e/outside.safetensors",
        "..%2Foutside.safetensors",
        "%252e%252e/outside.safetensors",
        "．．/outside.safetensors",
        "..%c0%afoutside.safetensors",
        "%2fetc%2fpasswd.safetensors",
        "root/../outside.safetensors",
        "~/outside.safetensors",
    ],
)
def test_encoded_root_paths_never_leave_the_root(tmp_path, good, path):
    """No decoding happens on root-relative paths: an encoded '..' is a (missing) name under the root."""
    (tmp_path / "outside.safetensors").write_bytes(good)
    src = make(tmp_path)
    for call in (src.canonical, partial(read, src), partial(fetch, src)):
        raises(ROOT_REFUSALS, call, path)


def test_symlinks(tmp_path, good):
    src = make(tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(good)
    (tmp_path / "root" / "escape.safetensors").symlink_to(outside)
    (tmp_path / "root" / "dir").symlink_to(tmp_path)
    for call in (src.canonical, partial(read, src)):
        raises("LORA_SOURCE_FORBIDDEN", call, "escape.safetensors")
        raises("LORA_SOURCE_FORBIDDEN", call, "dir/outside.safetensors")
    inside = tmp_path / "root" / "real.safetensors"
    inside.write_bytes(good)
    (tmp_path / "root" / "alias.safetensors").symlink_to(inside)
    assert src.canonical("alias.safetensors") == "alias.safetensors"
    assert read(src, "alias.safetensors").size == len(good)


def test_a_directory_swapped_for_a_symlink_cannot_redirect_a_read(tmp_path):
    """A thread swaps root/d between a real directory and a symlink to a secret directory as fast as
    it can, while reads run: each read gets the file under the root or a refusal, never the secret."""
    src = make(tmp_path)
    root = tmp_path / "root"
    (root / "real").mkdir()
    save_file({"transformer.x.lora_A.weight": torch.ones(2, 2)}, str(root / "real" / "x.safetensors"))
    secret = tmp_path / "secret"
    secret.mkdir()
    save_file({"transformer.x.lora_A.weight": torch.full((2, 2), 7.0)}, str(secret / "x.safetensors"))
    (root / "link").symlink_to(secret)
    os.rename(root / "real", root / "d")
    stop = threading.Event()

    def swap():  # rename is atomic: root/d is always either the real directory or the symlink
        while not stop.is_set():
            os.rename(root / "d", root / "real")
            os.rename(root / "link", root / "d")
            os.rename(root / "d", root / "link")
            os.rename(root / "real", root / "d")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen = {"inside": 0, "refused": 0}
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sum(seen.values()) < 3000:
            try:
                lora = read(src, "d/x.safetensors")
            except ApiError as exc:
                assert exc.code in ROOT_REFUSALS, exc
                assert str(tmp_path) not in exc.message
                seen["refused"] += 1
                continue
            assert lora.tensors["transformer.x.lora_A.weight"][0, 0].item() == 1.0, "read the secret file"
            seen["inside"] += 1
    finally:
        stop.set()
        swapper.join()
    assert seen["inside"] > 0 and seen["refused"] > 0, seen  # both states were met: the race was exercised


def test_missing_directory_and_extension(tmp_path):
    src = make(tmp_path)
    (tmp_path / "root" / "d.safetensors").mkdir()
    (tmp_path / "root" / "w.ckpt").write_bytes(b"x")
    assert "missing.safetensors" in raises("LORA_NOT_FOUND", src.canonical, "missing.safetensors").message
    raises("LORA_NOT_FOUND", src.canonical, "d.safetensors")
    assert ".safetensors" in raises("LORA_INVALID", src.canonical, "w.ckpt").message


def test_a_fifo_or_unreadable_file_is_refused_without_blocking(tmp_path, good):
    src = make(tmp_path)
    os.mkfifo(tmp_path / "root" / "pipe.safetensors")
    start = time.monotonic()
    raises(ROOT_REFUSALS, read, src, "pipe.safetensors")  # opened non-blocking: no writer can stall us
    assert time.monotonic() - start < 1
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "root" / "locked.safetensors"
        locked.write_bytes(good)
        locked.chmod(0)
        raises("LORA_INVALID", read, src, "locked.safetensors")


# ---- file checks -----------------------------------------------------------------------------


def test_broken_files_are_invalid_and_named_by_their_source(tmp_path):
    src = make(tmp_path)
    good = safetensors_bytes(tmp_path, 4)
    cases = {
        "empty": b"",
        "not a safetensors": os.urandom(256),
        "truncated": good[:-10],
        "truncated ": good[:5],
        "holds no tensors": struct.pack("<Q", 28) + b'{"__metadata__": {"a": "b"}}',
        "not JSON": struct.pack("<Q", 4) + b"\xff{{{",
        "larger than": good + b"\0" * MAX_FILE,
    }
    for why, body in cases.items():
        (tmp_path / "root" / "f.safetensors").write_bytes(body)
        err = raises("LORA_INVALID", read, src, "f.safetensors")
        assert why.strip() in err.message and "f.safetensors" in err.message
        assert str(tmp_path) not in err.message


# ---- http(s) URLs ----------------------------------------------------------------------------


def test_url_policy_and_rewrite(tmp_path):
    src = make(tmp_path)
    hf = "https://huggingface.co/owner/repo/blob/main/x.safetensors"
    assert src.canonical(hf) == "https://huggingface.co/owner/repo/resolve/main/x.safetensors"
    assert src.canonical("https://CDN.Example.com/a.safetensors") == "https://cdn.example.com/a.safetensors"
    assert src.canonical("http://127.0.0.1:9/a?x=1") == "http://127.0.0.1:9/a?x=1"
    assert src.canonical("http://127.0.0.1:9/a b/é.safetensors") == "http://127.0.0.1:9/a%20b/%C3%A9.safetensors"
    assert "/tree/" in raises("LORA_SOURCE_FORBIDDEN", src.canonical, "https://huggingface.co/o/r/tree/main").message
    for url in (
        "https://evil.com/x.safetensors",
        "https://example.com.evil.com/x",
        "http://u:p@127.0.0.1/x",
        "http://127.0.0.1:0/x",
        "http://127.0.0.1:99999/x",
        "http://[::1/x",
        "http:///x",
        "gopher://x/",
    ):
        raises("LORA_SOURCE_FORBIDDEN", src.canonical, url)
    raises("LORA_SOURCE_FORBIDDEN", make(tmp_path, allowed_hosts=["127.0.0.1:1"]).canonical, "http://127.0.0.1:2/x")
    raises("LORA_SOURCE_FORBIDDEN", fetch, src, "https://evil.com/x.safetensors")  # fetch checks too


@pytest.mark.parametrize(
    "spelling",
    [
        "2130706433",
        "127.0.0.1.",
        "localhost",
        "0x7f.0.0.1",
        "127.1",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "127.0.0.01",
    ],
)
def test_an_ip_port_entry_allows_no_other_spelling_of_it(tmp_path, host, good, spelling):
    host.file("/x.safetensors", good)
    src = make(tmp_path, allowed_hosts=[f"127.0.0.1:{host.port}"])
    assert fetch(src, f"{host.base}/x.safetensors").bytes_downloaded == len(good)
    url = f"http://{spelling}:{host.port}/x.safetensors"
    err = raises("LORA_SOURCE_FORBIDDEN", fetch, src, url)
    assert "allowed_hosts" in err.message
    assert host.counts["/x.safetensors"] == 1  # the other spelling sent nothing


def test_private_addresses_need_the_switch(tmp_path, host, good):
    host.file("/x.safetensors", good)
    for entry, url in (
        (f"127.0.0.1:{host.port}", f"{host.base}/x.safetensors"),
        (f"localhost:{host.port}", f"http://localhost:{host.port}/x.safetensors"),
    ):
        closed = make(tmp_path, allowed_hosts=[entry], allow_private_addresses=False)
        err = raises("LORA_SOURCE_FORBIDDEN", fetch, closed, url)
        assert "private" in err.message and "127.0.0.1" not in err.message.replace(url, "")
        assert host.counts["/x.safetensors"] == 0
    assert fetch(make(tmp_path, allowed_hosts=[f"localhost:{host.port}"]),
                 f"http://localhost:{host.port}/x.safetensors").bytes_downloaded == len(good)


def test_download_once_then_cache_hit(tmp_path, host, good):
    src = make(tmp_path)
    url = src.canonical(host.file("/good-once.safetensors", good))
    first = fetch(src, url)
    assert (first.cached, first.bytes_downloaded) == (False, len(good))
    assert cache_files(tmp_path) == [cache_key(url) + ".safetensors"]  # named by a hash: no client text on disk
    assert fetch(src, url).cached and read(src, url).size == len(good)
    assert host.counts["/good-once.safetensors"] == 1


def test_same_host_redirect_and_retry_after_500(tmp_path, host, good):
    src = make(tmp_path)
    host.file("/good-redirected", good)
    assert read(src, host.route("/redirect", redirect("/good-redirected"))).size == len(good)
    assert read(src, host.route("/flaky", flaky(good, failures=1))).size == len(good)
    assert host.counts["/flaky"] == 2


@pytest.mark.parametrize(
    "path, answer, code, reason",
    [
        ("/missing", lambda h: h.send(404, b"nope", "text/plain"), "LORA_DOWNLOAD_FAILED", "HTTP 404"),
        (
            "/page",
            lambda h: h.send(200, b"<html>a model page</html>", "text/html; charset=utf-8"),
            "LORA_DOWNLOAD_FAILED",
            "HTML",
        ),
        ("/page-octet", lambda h: h.send(200, b"\n<!DOCTYPE html><html></html>"), "LORA_DOWNLOAD_FAILED", "HTML"),
        ("/big", lambda h: h.send(200, b"x" * (MAX_FILE + 1)), "LORA_DOWNLOAD_FAILED", f"larger than {MAX_FILE} bytes"),
        (
            "/big-stream",
            stream_without_length(b"{" * 1024, MAX_FILE // 1024 + 8),
            "LORA_DOWNLOAD_FAILED",
            f"larger than {MAX_FILE} bytes",
        ),
        ("/corrupt", lambda h: h.send(200, os.urandom(4096)), "LORA_INVALID", "not a safetensors file"),
    ],
)
def test_download_failures_not_retried(tmp_path, host, path, answer, code, reason):
    src = make(tmp_path)
    url = host.route(path, answer)
    err = raises(code, fetch, src, url)
    assert reason in err.message and url in err.message  # names the URL, not a cache path
    if code == "LORA_DOWNLOAD_FAILED":
        assert err.details == {"url": url, "reason": err.details["reason"]}
    assert host.counts[path] == 1
    assert cache_files(tmp_path) == []  # nothing partial or invalid kept


def test_timeout_retried_then_fails(tmp_path, host, good):
    src = make(tmp_path)
    url = host.route("/slow", slow(good, 3 * TIMEOUT_S))
    err = raises("LORA_DOWNLOAD_FAILED", fetch, src, url)
    assert f"timed out after {TIMEOUT_S:g} s" in err.message
    assert host.counts["/slow"] == 2  # download_retries attempts


def test_connection_refused(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = raises("LORA_DOWNLOAD_FAILED", fetch, make(tmp_path), f"http://127.0.0.1:{port}/x")
    assert "connection refused" in err.message


def test_secret_query_values_never_show_in_messages(tmp_path, host):
    url = host.route("/gone", lambda h: h.send(404, b""))
    err = raises("LORA_DOWNLOAD_FAILED", fetch, make(tmp_path), url + "?type=Model&token=s3cr3t&X-Amz-Signature=abc")
    assert "s3cr3t" not in err.message + str(err.details) and "abc" not in err.message
    assert "type=Model" in err.message


def test_lru_eviction(tmp_path, host, good):
    size = len(good)
    src = make(tmp_path, cache_max_bytes=2 * size + 1)  # room for two files
    host.file("/good-lru", good)
    a, b = (src.canonical(f"{host.base}/good-lru?{i}") for i in "ab")
    for url in (a, b):
        fetch(src, url)
    os.utime(src.cache.path(cache_key(a)), (time.time() - 100,) * 2)
    os.utime(src.cache.path(cache_key(b)), (time.time() - 50,) * 2)
    assert fetch(src, a).cached  # a hit: a becomes the most recently used
    fetch(src, f"{host.base}/good-lru?c")
    assert cache_files(tmp_path) == sorted(
        cache_key(u) + ".safetensors" for u in (a, src.canonical(f"{host.base}/good-lru?c"))
    )
    assert src.cache.evictions == 1


def test_a_file_larger_than_the_whole_cache_is_refused(tmp_path, host, good):
    src = make(tmp_path, cache_max_bytes=len(good) - 1)
    err = raises("LORA_DOWNLOAD_FAILED", fetch, src, host.file("/x.safetensors", good))
    assert "download cache has no room" in err.message and cache_files(tmp_path) == []


def test_html_sniffing_spares_safetensors_starting_with_lt():
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(0x3C)
    assert not looks_like_html(struct.pack("<Q", len(header)) + header)  # first byte is 0x3C == "<"
    assert looks_like_html(b"  <!doctype html><html>")


def test_messages_carry_no_server_path_pid_or_traceback(tmp_path, host, good):
    src = make(tmp_path, cache_max_bytes=len(good) - 1)
    (tmp_path / "root" / "bad.safetensors").write_bytes(b"\x93" * 50)
    cases = [
        ("bad.safetensors",),
        (host.file("/x.safetensors", good),),
        ("missing.safetensors",),
        (host.route("/garbage", lambda h: h.wfile.write(b"NOT HTTP\r\n\r\n")),),
    ]
    for args in cases:
        with pytest.raises(ApiError) as info:
            read(src, *args)
        text = info.value.message + repr(info.value.details)
        for leak in (str(tmp_path), str(os.getpid()), "Traceback", "/tmp", "Errno"):
            assert leak not in text, (leak, text)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
