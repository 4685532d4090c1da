"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records what it is sent.

Each POST is answered with the next status of its script (then 200 for good), or with a redirect,
or never (a hung receiver, until the receiver stops).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog (5) drops the SYNs of a burst of POSTs, which the sender's kernel
    # sends again a second later: a receiver's backlog, not the server, would set those deliveries' time.
    request_queue_size = 128
    daemon_threads = True


@dataclass(frozen=True)
class Delivery:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived


class Receiver:
    """Args:
        statuses: the answers to the first POSTs, in order (later ones get 200).
        hang: never answer (each request waits until `stop`).
        redirect_to: answer every request with a 302 to this location.
        port: listen on this port (0: a free one).
    """

    def __init__(self, statuses: tuple[int, ...] = (), hang: bool = False, redirect_to: str | None = None,
                 port: int = 0):
        self.statuses = list(statuses)
        self.hang = hang
        self.redirect_to = redirect_to
        self.deliveries: list[Delivery] = []
        self.stopped = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                receiver._record(self)
                if receiver.hang:
                    receiver.stopped.wait()
                    return
                if receiver.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", receiver.redirect_to)
                else:
                    self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815 (a followed redirect would show up as a GET)

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/flux"

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        self.deliveries.append(Delivery(handler.command, handler.path, dict(handler.headers), body, time.time()))

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[Delivery]:
        deadline = time.time() + timeout_s
        while len(self.deliveries) < count:
            if time.time() > deadline:
                raise TimeoutError(f"{len(self.deliveries)} of {count} deliveries arrived")
            time.sleep(0.02)
        return list(self.deliveries)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
