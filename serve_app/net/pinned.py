"""The pinned-address network backend of every outgoing request (LoRA downloads, webhook deliveries).

A URL's host is checked and resolved once (`url_policy.HostPolicy`); httpcore then connects
through `PinnedBackend`, which goes to exactly the addresses that were checked, whatever host name
httpcore asks for, so a second DNS answer cannot move the connection. The name still goes in the
Host header and, for https, in SNI and the certificate check.

One deadline (time.monotonic()) bounds every wait of the connection, so a host that drips bytes
cannot hold it past the deadline, whatever the per-operation timeouts say.

Sync only: downloads run on threads of their own, and webhook deliveries on a pool of their own.
No Ray here.
"""

from __future__ import annotations

import time

import httpcore


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every wait ends at the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float):
        self.stream = stream
        self.deadline = deadline

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise error("the deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> DeadlineStream:
        timeout = self._left(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, timeout), self.deadline)

    def get_extra_info(self, info: str):
        return self.stream.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to the addresses that were checked (in order, the first that answers), whatever host
    name httpcore asks for; every wait ends at `deadline` (time.monotonic())."""

    def __init__(self, addresses: tuple[str, ...], deadline: float):
        self.addresses = addresses
        self.deadline = deadline
        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None) -> DeadlineStream:
        error: Exception = httpcore.ConnectError("the host has no address")
        for address in self.addresses:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise httpcore.ConnectTimeout("the deadline passed")
            wait = left if timeout is None else min(timeout, left)
            try:
                stream = self.inner.connect_tcp(address, port, wait, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return DeadlineStream(stream, self.deadline)
        raise error

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are never used")
