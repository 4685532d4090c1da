"""Which hosts a LoRA download or a webhook may reach, and the exact addresses it may connect to (docs/loras.md).

A host is allowed only as it is spelled in an allow-list (`loras.allowed_hosts`,
`webhooks.allowed_hosts`): `127.0.0.1:8000` allows that address and port and no other spelling of
it (`2130706433`, `127.0.0.1.`, `localhost`), a leading `.` allows a domain and its subdomains, a
bare name or address allows any port. Both lists take exactly the entries `parse_host_entry`
accepts (config.py validates them with it). A checked host is then resolved once; every address it
resolves to must be public unless the section's `allow_private_addresses` is set, and the
connection goes to those addresses only (`net.pinned`: no second DNS answer can move it). Redirect
hops of a download go through the same check (`net.fetch`).
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
class HostEntry:
    """One allow-list entry, parsed."""

    host: str  # lower case; an IPv6 address without brackets
    port: int | None  # None: any port
    subdomains: bool  # a `.domain` entry: the domain and its subdomains


def parse_host_entry(entry: str) -> HostEntry:
    """Parse an allow-list entry: `name`, `IPv4`, `name:port`, `IPv4:port`, `.domain`, `[IPv6]`,
    `[IPv6]:port` or a bare IPv6 address (surrounding spaces and case do not matter).

    The one validator of every `allowed_hosts` list: what it refuses, no list takes.

    Raises:
        ValueError: not such an entry (a host name a URL cannot have, a port outside 1-65535, ...).
    """
    text = entry.strip().lower() if isinstance(entry, str) else ""
    if not text:
        raise ValueError("an empty entry")
    if text.startswith("."):
        domain = text[1:]
        if ":" in domain:
            raise ValueError(f"{entry!r}: a .domain entry takes no port")
        return HostEntry(_entry_name(domain, entry), None, True)
    if text.startswith("["):  # [v6] or [v6]:port
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: not [IPv6] or [IPv6]:port")
        return HostEntry(_entry_ipv6(host, entry), _entry_port(rest[1:], entry) if rest else None, False)
    if text.count(":") > 1:  # a bare IPv6 address
        return HostEntry(_entry_ipv6(text, entry), None, False)
    host, colon, port = text.partition(":")
    return HostEntry(_entry_name(host, entry), _entry_port(port, entry) if colon else None, False)


def _entry_name(host: str, entry: str) -> str:
    if not _HOST_NAME.match(host):
        raise ValueError(f"{entry!r}: not a host name or IPv4 address")
    return host


def _entry_ipv6(host: str, entry: str) -> str:
    try:
        if "%" in host:
            raise ValueError(host)
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{entry!r}: not an IPv6 address (zone ids are not taken)") from None
    return host


def _entry_port(port: str, entry: str) -> int:
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(port)


def check_host_entry(entry: str) -> str:
    """`parse_host_entry` as a pydantic validator (config.py's `HostEntry` type): the entry, unchanged."""
    parse_host_entry(entry)
    return entry


class HostPolicy:
    """The allow-list and the address rule, applied to every URL and every redirect hop.

    Args:
        allowed_hosts: entries as `parse_host_entry` takes them (ValueError otherwise).
        allow_private: allow loopback, private and link-local addresses (tests, closed networks).
        section: the config section the list and the switch belong to (`loras`, `webhooks`), named by
            the reasons a URL is refused.
    """

    def __init__(self, allowed_hosts: list[str], allow_private: bool, section: str = "loras"):
        self.entries = tuple(parse_host_entry(e) for e in allowed_hosts)
        self.allow_private = allow_private
        self.section = section

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
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))  # AF_INET(6): already a str
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
                "the host resolves to a loopback, private or link-local address "
                f"({self.section}.allow_private_addresses is off)"
            )
