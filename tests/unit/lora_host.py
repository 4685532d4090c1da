"""A real HTTP server on 127.0.0.1 that tests script path by path: the LoRA host, a redirect target, a Hub.

Each path answers through a function of the request handler; the server counts requests per path
and keeps the headers of the last request to each, so tests can prove what was (not) sent where.
Only loopback addresses are ever used.
"""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

Answer = Callable[["Handler"], None]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        host = self.server.host
        path = urlsplit(self.path).path
        with host.lock:
            host.counts[path] += 1
            host.headers[path] = {k.lower(): v for k, v in self.headers.items()}
        answer = host.routes.get(path) or host.fallback
        try:
            answer(self)
        except OSError:  # the client hung up on purpose (oversize, timeout, refused redirect)
            pass
        self.close_connection = True

    def send(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "application/octet-stream",
        length: bool = True,
        **headers: str,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    host: LoraHost


class LoraHost:
    """A scripted HTTP server (see module docstring); `close()` when done."""

    def __init__(self, tls: tuple[str, str] | None = None):
        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.host = self
        self.scheme = "http"
        if tls is not None:  # (certificate file, key file): serve https
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.routes: dict[str, Answer] = {}
        self.counts: Counter = Counter()
        self.headers: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()
        self.fallback: Answer = lambda h: h.send(404, b"no such file", "text/plain")
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def route(self, path: str, answer: Answer) -> str:
        """Script `path`; returns its URL."""
        self.routes[path] = answer
        return self.base + path

    def file(self, path: str, body: bytes, **headers: str) -> str:
        return self.route(path, lambda h: h.send(200, body, **headers))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- answers that misbehave, as hosts on the internet do -----------------------------------------


def redirect(location: str, status: int = 302) -> Answer:
    return lambda h: h.send(status, b"", Location=location)


def drip(body: bytes, every_s: float) -> Answer:
    """A byte at a time, each well within a read timeout: only a deadline on the whole download stops it."""

    def answer(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()
            time.sleep(every_s)

    return answer


def slow(body: bytes, delay_s: float) -> Answer:
    def answer(h: Handler) -> None:
        time.sleep(delay_s)
        h.send(200, body)

    return answer


def raw(data: bytes) -> Answer:
    """Bytes written as they are: a broken or lying HTTP answer."""

    def answer(h: Handler) -> None:
        h.wfile.write(data)
        h.wfile.flush()

    return answer


def stream_without_length(chunk: bytes, count: int) -> Answer:
    def answer(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        for _ in range(count):
            h.wfile.write(chunk)

    return answer


def flaky(body: bytes, failures: int, status: int = 500) -> Answer:
    """`failures` answers of `status`, then the file."""
    state = {"n": 0}

    def answer(h: Handler) -> None:
        state["n"] += 1
        if state["n"] <= failures:
            h.send(status, b"oops")
        else:
            h.send(200, body)

    return answer
