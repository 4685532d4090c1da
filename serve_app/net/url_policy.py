"""Which hosts a LoRA download may reach, and the exact addresses it may connect to (SPEC section 8).

A host is allowed only as it is spelled in `loras.allowed_hosts`: `127.0.0.1:8000` allows that
address and port and no other spelling of it (`2130706433`, `127.0.0.1.`, `localhost`), a leading
`.` allows a domain and its subdomains, a bare name or address allows any port. A checked host is
then resolved once; every address it resolves to must be public unless
`loras.allow_private_addresses` is set, and the connection goes to those addresses only (no second
DNS answer can move it). Redirect hops go through the same check (`safe_fetch`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_CHARS = 8192
# Everything RFC 3986 lets through unescaped in a path or query, plus '%' (existing escapes stay).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_HOST_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_.])?$")


class UrlRefused(Exception):
    """A URL outside the policy; `reason` is our own words, safe to show to the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class UrlParts:
    """A URL split the one way this service reads it: what is checked is exactly what is sent."""

    scheme: str  # "http" or "https"
    host: str  # lower case, as spelled; an IPv6 literal without brackets
    port: int  # the effective port
    explicit_port: bool
    target: str  # path and query, percent-encoded ASCII

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@dataclass(frozen=True)
class Target:
    """A URL that passed the policy, and the addresses its host resolved to when it was checked."""

    parts: UrlParts
    addresses: tuple[str, ...]


def split_url(url: str) -> UrlParts:
    """Split and normalize an http(s) URL; raises UrlRefused for anything we would not send as is.

    Non-ASCII and unsafe characters of the path and query are percent-encoded, so the request line
    is always one we can send; the fragment is dropped. The host is kept as spelled (lower case).
    """
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise UrlRefused("the URL is too long")
    if any(ord(c) < 0x20 or c == "\x7f" or c == "\\" for c in url):
        raise UrlRefused("the URL holds control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port or a malformed IPv6 literal
        raise UrlRefused("malformed URL (host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"scheme {scheme or '(none)'}:// is not supported")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UrlRefused("credentials in the URL are not allowed")
    host = _checked_host(parts.hostname or "", parts.netloc)
    if port is not None and not 0 < port < 65536:
        raise UrlRefused("the port is out of range")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    target = path + ("?" + quote(parts.query, safe=_QUERY_SAFE) if parts.query else "")
    return UrlParts(scheme, host, port or DEFAULT_PORTS[scheme], port is not None, target)


def _checked_host(host: str, netloc: str) -> str:
    if not host:
        raise UrlRefused("the URL has no host")
    if not host.isascii():
        raise UrlRefused("the host must be written in ASCII (use its xn-- form)")
    if "[" in netloc:  # an IPv6 literal: kept as spelled, but it must be one (no zone id)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlRefused("malformed IPv6 address (or one with a zone id)") from None
        return host
    if not _HOST_NAME.match(host):
        raise UrlRefused("the host name holds characters a host name cannot have")
    return host


@dataclass(frozen=True)
class _Entry:
    host: str
    port: int | None  # None: any port
    subdomains: bool


class HostPolicy:
    """The allow-list and the address rule, applied to every URL and every redirect hop.

    Args:
        allowed_hosts: entries as in `loras.allowed_hosts`.
        allow_private: allow loopback, private and link-local addresses (tests, closed networks).
    """

    def __init__(self, allowed_hosts: list[str], allow_private: bool):
        self.entries = tuple(_parse_entry(e) for e in allowed_hosts)
        self.allow_private = allow_private

    def allows(self, parts: UrlParts) -> bool:
        """Is this host (as spelled) and port on the allow-list? No DNS here."""
        for entry in self.entries:
            if entry.subdomains:
                if parts.host == entry.host or parts.host.endswith("." + entry.host):
                    return True
            elif parts.host == entry.host and entry.port in (None, parts.port):
                return True
        return False

    def resolve(self, parts: UrlParts) -> tuple[str, ...]:
        """The addresses to connect to; raises UrlRefused if the host resolves to a refused address.

        Every address of the answer is checked, not just the first, so a mixed answer is refused.
        Raises OSError (socket.gaierror) when the name does not resolve.
        """
        infos = socket.getaddrinfo(parts.host, parts.port, type=socket.SOCK_STREAM)
        addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            self.check_address(address)
        return addresses

    def check_address(self, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified or ip.is_multicast:
            raise UrlRefused("the host resolves to an address the server never connects to")
        if not ip.is_global and not self.allow_private:
            raise UrlRefused(
                "the host resolves to a loopback, private or link-local address (loras.allow_private_addresses is off)"
            )


def _parse_entry(entry: str) -> _Entry:
    text = entry.strip().lower()
    if text.startswith("."):
        return _Entry(text[1:], None, True)
    if text.startswith("["):  # [v6] or [v6]:port
        host, _, rest = text[1:].partition("]")
        return _Entry(host, int(rest[1:]) if rest.startswith(":") else None, False)
    if text.count(":") == 1:
        host, port = text.split(":")
        return _Entry(host, int(port), False)
    if ":" in text:  # a bare IPv6 address
        return _Entry(text, None, False)
    return _Entry(text, None, False)
