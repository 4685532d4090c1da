"""LoraSources against real files and a real local HTTP server (no mocks of httpx).

The server counts requests per (method, path) so tests can prove "downloaded once, then cached"
and "retried after a 500". It also plays a minimal Hugging Face Hub for hf:// sources.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import pickle
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub.constants  # imported before any test sets HF_ENDPOINT, so nothing leaks into it
import pytest
import torch
from safetensors.torch import save_file

from serve_app.config import LoraArgs
from serve_app.engine.lora_sources import LoraSources
from serve_app.errors import ApiError

SLOW_S = 1.5
TIMEOUT_S = 0.5
MAX_FILE = 64 * 1024
COMMIT = "c" * 40


def _safetensors_bytes(tmp: Path, n: int = 2) -> bytes:
    path = tmp / f"t{n}.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(n, n)}, str(path))
    return path.read_bytes()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    counts: Counter


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _send(self, status: int, body: bytes = b"", ctype="application/octet-stream", head=False, **headers):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", headers.pop("length", str(len(body))))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        if not head:
            try:
                self.wfile.write(body)
            except OSError:  # the client hung up on purpose (oversize, timeout)
                pass

    def _answer(self, head: bool):
        srv: _Server = self.server  # type: ignore[assignment]
        path = urlsplit(self.path).path
        srv.counts[(self.command, path)] += 1
        good = srv.files["good"]
        if "/resolve/" in path:
            return self._hub(path, head)
        if path.startswith("/good"):
            return self._send(200, good, head=head)
        if path == "/missing":
            return self._send(404, b"nope", "text/plain")
        if path == "/page":
            return self._send(200, b"<html><body>a model page</body></html>", "text/html; charset=utf-8")
        if path == "/page-octet":
            return self._send(200, b"\n<!DOCTYPE html><html></html>")
        if path == "/slow":
            time.sleep(SLOW_S)
            return self._send(200, good)
        if path == "/big":
            return self._send(200, b"x" * 16, length=str(MAX_FILE * 10))
        if path == "/big-stream":  # no Content-Length: only the stream shows it is too big
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(MAX_FILE // 1024 + 8):
                    self.wfile.write(good[:8] + b"x" * 1016)
            except OSError:
                pass
            return
        if path == "/corrupt":
            return self._send(200, os.urandom(4096))
        if path == "/flaky":
            status = 500 if srv.counts[("GET", path)] == 1 else 200
            return self._send(status, good if status == 200 else b"oops")
        if path == "/redirect":
            return self._send(302, b"", Location="/good-redirected")
        return self._send(404, b"")

    def _hub(self, path: str, head: bool):
        """/{owner}/{repo}/resolve/{revision}/{file}, answered with the headers huggingface_hub reads."""
        srv: _Server = self.server  # type: ignore[assignment]
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        filename = rest.partition("/")[2]
        if repo != "alice/lora":
            return self._send(404, b"", head=head, X_Error_Code="RepoNotFound")
        body = srv.files.get(f"hub:{filename}")
        if body is None:
            return self._send(404, b"", head=head, X_Error_Code="EntryNotFound", X_Repo_Commit=COMMIT)
        etag = hashlib.sha256(body).hexdigest()
        self._send(200, body, head=head, X_Repo_Commit=COMMIT, ETag=f'"{etag}"')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    srv = _Server(("127.0.0.1", 0), _Handler)
    good = _safetensors_bytes(tmp)
    srv.files = {"good": good, "hub:x.safetensors": good, "hub:sub/y.safetensors": _safetensors_bytes(tmp, 3),
                 "hub:bad.safetensors": b"\x00" * 100}
    srv.counts = Counter()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def make(tmp_path: Path, **overrides) -> LoraSources:
    fields = dict(root=str(tmp_path / "root"), cache_dir=str(tmp_path / "cache"), max_file_bytes=MAX_FILE,
                  allowed_hosts=["127.0.0.1", ".example.com", "huggingface.co"],
                  download_timeout_s=TIMEOUT_S, download_retries=2)
    fields.update(overrides)
    (tmp_path / "root").mkdir(exist_ok=True)
    return LoraSources(LoraArgs(**fields))


def raises(code: str, fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    err = info.value
    assert err.code == code, err
    back = pickle.loads(pickle.dumps(err))  # crosses Ray handles: must survive pickling intact
    assert (back.code, back.message, back.details) == (err.code, err.message, err.details)
    return err


# ---- root-relative paths ---------------------------------------------------------------------


def test_root_paths_canonical_and_local(tmp_path):
    src = make(tmp_path)
    (tmp_path / "root" / "demo").mkdir()
    (tmp_path / "root" / "demo" / "demo_lora.safetensors").write_bytes(_safetensors_bytes(tmp_path))
    assert src.canonical("demo/demo_lora.safetensors") == "demo/demo_lora.safetensors"
    assert src.canonical("./demo//demo_lora.safetensors") == "demo/demo_lora.safetensors"
    local = src.local_file("demo/demo_lora.safetensors")
    assert local == (tmp_path / "root" / "demo" / "demo_lora.safetensors").resolve()


@pytest.mark.parametrize("path", ["../x.safetensors", "a/../../x.safetensors", "a/../b.safetensors",
                                  "/etc/passwd", "..\\x.safetensors", "a\\b.safetensors", "x\x00.safetensors",
                                  "file:///etc/passwd", "ftp://127.0.0.1/x.safetensors", "s3://b/x.safetensors"])
def test_forbidden_paths(tmp_path, path):
    raises("LORA_SOURCE_FORBIDDEN", make(tmp_path).canonical, path)


def test_symlinks(tmp_path):
    src = make(tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_safetensors_bytes(tmp_path))
    (tmp_path / "root" / "escape.safetensors").symlink_to(outside)
    (tmp_path / "root" / "dir").symlink_to(tmp_path)
    raises("LORA_SOURCE_FORBIDDEN", src.canonical, "escape.safetensors")
    raises("LORA_SOURCE_FORBIDDEN", src.canonical, "dir/outside.safetensors")
    inside = tmp_path / "root" / "real.safetensors"
    inside.write_bytes(outside.read_bytes())
    (tmp_path / "root" / "alias.safetensors").symlink_to(inside)
    assert src.canonical("alias.safetensors") == "alias.safetensors"
    assert src.local_file("alias.safetensors") == inside.resolve()


def test_missing_directory_and_extension(tmp_path):
    src = make(tmp_path)
    (tmp_path / "root" / "d.safetensors").mkdir()
    (tmp_path / "root" / "w.ckpt").write_bytes(b"x")
    assert "missing.safetensors" in raises("LORA_NOT_FOUND", src.canonical, "missing.safetensors").message
    raises("LORA_NOT_FOUND", src.canonical, "d.safetensors")
    assert ".safetensors" in raises("LORA_INVALID", src.canonical, "w.ckpt").message


# ---- validation ------------------------------------------------------------------------------


def test_validate_file(tmp_path):
    src = make(tmp_path)
    good = _safetensors_bytes(tmp_path, 4)
    cases = {
        "empty": b"",
        "not a safetensors": os.urandom(256),
        "truncated": good[:-10],
        "truncated ": good[:5],
        "holds no tensors": (lambda h: struct.pack("<Q", len(h)) + h)(b'{"__metadata__": {"a": "b"}}'),
        "not JSON": struct.pack("<Q", 4) + b"\xff{{{",
    }
    for why, body in cases.items():
        path = tmp_path / "f.safetensors"
        path.write_bytes(body)
        assert why.strip() in raises("LORA_INVALID", src.validate_file, path).message
    path.write_bytes(good)
    src.validate_file(path)
    raises("LORA_INVALID", make(tmp_path, max_file_bytes=len(good) - 1).validate_file, path)


# ---- http(s) URLs ----------------------------------------------------------------------------


def test_url_policy_and_rewrite(tmp_path):
    src = make(tmp_path)
    hf = "https://huggingface.co/owner/repo/blob/main/x.safetensors"
    assert src.canonical(hf) == "https://huggingface.co/owner/repo/resolve/main/x.safetensors"
    assert src.canonical("https://CDN.Example.com/a.safetensors") == "https://cdn.example.com/a.safetensors"
    assert src.canonical("http://127.0.0.1:9/a?x=1") == "http://127.0.0.1:9/a?x=1"
    assert "/tree/" in raises("LORA_SOURCE_FORBIDDEN", src.canonical, "https://huggingface.co/o/r/tree/main").message
    for url in ("https://evil.com/x.safetensors", "https://example.com.evil.com/x", "http://u:p@127.0.0.1/x"):
        raises("LORA_SOURCE_FORBIDDEN", src.canonical, url)
    raises("LORA_SOURCE_FORBIDDEN", make(tmp_path, allowed_hosts=["127.0.0.1:1"]).canonical, "http://127.0.0.1:2/x")
    raises("LORA_SOURCE_FORBIDDEN", src.local_file, "https://evil.com/x.safetensors")  # local_file checks too


def test_download_once_then_cache_hit(tmp_path, server, base):
    src = make(tmp_path)
    url = src.canonical(f"{base}/good-once.safetensors")
    first = src.local_file(url)
    assert first.parent == tmp_path / "cache"
    assert first.name == hashlib.sha256(url.encode()).hexdigest() + ".safetensors"
    assert first.read_bytes() == server.files["good"]
    assert src.local_file(url) == first
    assert server.counts[("GET", "/good-once.safetensors")] == 1
    assert src.stats["url_downloads"] == 1 and src.stats["url_cache_hits"] == 1
    assert src.stats["bytes_downloaded"] == len(server.files["good"])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temp files left


def test_redirect_and_retry_after_500(tmp_path, server, base):
    src = make(tmp_path)
    assert src.local_file(f"{base}/redirect").read_bytes() == server.files["good"]
    assert src.local_file(f"{base}/flaky").read_bytes() == server.files["good"]
    assert server.counts[("GET", "/flaky")] == 2


@pytest.mark.parametrize("path, code, reason", [
    ("/missing", "LORA_DOWNLOAD_FAILED", "HTTP 404"),
    ("/page", "LORA_DOWNLOAD_FAILED", "HTML"),
    ("/page-octet", "LORA_DOWNLOAD_FAILED", "HTML"),
    ("/big", "LORA_DOWNLOAD_FAILED", f"larger than {MAX_FILE} bytes"),
    ("/big-stream", "LORA_DOWNLOAD_FAILED", f"larger than {MAX_FILE} bytes"),
    ("/corrupt", "LORA_INVALID", "not a safetensors file"),
])
def test_download_failures_not_retried(tmp_path, server, base, path, code, reason):
    src = make(tmp_path)
    err = raises(code, src.local_file, base + path)
    assert reason in err.message and base + path in err.message  # names the URL, not a cache path
    if code == "LORA_DOWNLOAD_FAILED":
        assert err.details == {"url": base + path, "reason": err.details["reason"]}
    assert server.counts[("GET", path)] == 1
    assert list((tmp_path / "cache").iterdir()) == []  # nothing partial or invalid kept


def test_timeout_retried_then_fails(tmp_path, server, base):
    src = make(tmp_path)
    before = server.counts[("GET", "/slow")]
    err = raises("LORA_DOWNLOAD_FAILED", src.local_file, f"{base}/slow")
    assert f"timed out after {TIMEOUT_S:g} s" in err.message
    assert server.counts[("GET", "/slow")] - before == 2  # download_retries attempts


def test_connection_refused(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = raises("LORA_DOWNLOAD_FAILED", make(tmp_path).local_file, f"http://127.0.0.1:{port}/x")
    assert "connection refused" in err.message


def test_lru_eviction(tmp_path, server, base):
    size = len(server.files["good"])
    src = make(tmp_path, cache_max_bytes=2 * size + 1)  # room for two files
    a, b = (src.local_file(f"{base}/good-lru?{i}") for i in "ab")
    os.utime(a, (time.time() - 100,) * 2)
    os.utime(b, (time.time() - 50,) * 2)
    src.local_file(f"{base}/good-lru?a")  # hit: a becomes the most recently used
    c = src.local_file(f"{base}/good-lru?c")
    assert a.exists() and c.exists() and not b.exists()
    assert src.stats["cache_evictions"] == 1
    tiny = make(tmp_path, cache_max_bytes=1)  # never evicts the file just downloaded
    assert tiny.local_file(f"{base}/good-lru?d").exists()


# ---- hf:// -----------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch, base):
    """huggingface_hub talking to the local server (tests/conftest.py turns offline mode on)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", base)
    return base


def test_hf_download_then_cache(tmp_path, server, hub):
    src = make(tmp_path)
    for source, key in (("hf://alice/lora/x.safetensors", "/alice/lora/resolve/main/x.safetensors"),
                        ("hf://alice/lora@v1/sub/y.safetensors", "/alice/lora/resolve/v1/sub/y.safetensors")):
        assert src.canonical(source) == source == src.canonical(source.replace("hf:", "HF:"))
        path = src.local_file(source)
        assert path.read_bytes() == server.files[f"hub:{key.rpartition('/resolve/')[2].partition('/')[2]}"]
        assert (tmp_path / "cache" / "hf") in path.parents
        before = dict(server.counts)
        assert src.local_file(source) == path  # cache hit: no request at all
        assert dict(server.counts) == before and before[("GET", key)] == 1
    assert src.stats["url_downloads"] == 2 and src.stats["url_cache_hits"] == 2


def test_hf_errors(tmp_path, server, hub, monkeypatch):
    src = make(tmp_path)
    err = raises("LORA_DOWNLOAD_FAILED", src.local_file, "hf://bob/none/x.safetensors")
    assert "repository not found" in err.message and err.details["url"] == "hf://bob/none/x.safetensors"
    assert "file not found" in raises("LORA_DOWNLOAD_FAILED", src.local_file, "hf://alice/lora/no.safetensors").message
    raises("LORA_INVALID", src.local_file, "hf://alice/lora/bad.safetensors")
    raises("LORA_INVALID", src.canonical, "hf://alice/lora/x.bin")
    raises("LORA_SOURCE_FORBIDDEN", src.canonical, "hf://alice/x.safetensors")
    raises("LORA_SOURCE_FORBIDDEN", make(tmp_path, hf_enabled=False).canonical, "hf://alice/lora/x.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = raises("LORA_DOWNLOAD_FAILED", src.local_file, "hf://alice/lora/sub/y.safetensors")
    assert "offline" in err.message


def test_concurrent_threads_download_once(tmp_path, server, base):
    from concurrent.futures import ThreadPoolExecutor

    src = make(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: src.local_file(f"{base}/good-threads"), range(4)))
    assert len(paths) == 1 and server.counts[("GET", "/good-threads")] == 1


def test_html_sniffing_spares_safetensors_starting_with_lt():
    from serve_app.engine.lora_sources import _looks_like_html

    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(0x3C)
    assert not _looks_like_html(struct.pack("<Q", len(header)) + header)  # first byte is 0x3C == "<"
    assert _looks_like_html(b"  <!doctype html><html>")


def test_hf_blobs_share_the_cache_cap(tmp_path, server, hub, base):
    size = len(server.files["good"])
    src = make(tmp_path, cache_max_bytes=size + 1)  # room for one file
    blob = src.local_file("hf://alice/lora/x.safetensors")
    src.local_file(f"{base}/good-after-hf")
    assert not blob.exists() and src.stats["cache_evictions"] == 1
    assert src.local_file("hf://alice/lora/x.safetensors").read_bytes() == server.files["good"]  # fetched again


def test_an_unreadable_file_is_invalid_not_a_server_error(tmp_path):
    if os.geteuid() == 0:
        # root reads any file: make the path something that cannot be opened as a file instead
        root = tmp_path / "root"
        (root / "dir.safetensors").mkdir(parents=True)
        sources = LoraSources(LoraArgs(root=str(root), cache_dir=str(tmp_path / "cache")))
        with pytest.raises(ApiError) as info:
            sources.validate_file(root / "dir.safetensors", label="dir.safetensors")
    else:
        root = tmp_path / "root"
        root.mkdir()
        locked = root / "locked.safetensors"
        locked.write_bytes(b"x" * 64)
        locked.chmod(0)
        sources = LoraSources(LoraArgs(root=str(root), cache_dir=str(tmp_path / "cache")))
        with pytest.raises(ApiError) as info:
            sources.validate_file(locked, label="locked.safetensors")
    assert info.value.code == "LORA_INVALID"
