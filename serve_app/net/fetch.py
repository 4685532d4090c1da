"""One LoRA download: pinned addresses, redirects checked hop by hop, one deadline, retries.

httpcore does the HTTP (framing, chunked bodies, TLS with the URL's host for SNI and certificate
checks); this module decides where it may go. Each hop's URL is split once (`url_policy`), checked
against the allow-list and the address rule, and the connection goes to the addresses that were
checked, through a network backend that ignores any other name (`net.pinned`, shared with webhooks).
Redirects are never followed by the HTTP client: each Location becomes a new hop with the same
checks, an https -> http hop is refused, and an Authorization header only ever goes to the origin it
belongs to.

One deadline bounds the whole download, retries included: every connect and read waits at most
what is left of it, so a host that drips bytes cannot hold a download longer. Bodies are read raw
(`Accept-Encoding: identity`; an encoded answer is refused), so no decoder can fail on them. The
attempt loop and the size cap (`retrying`, `expect_size`, `receive`) are the s3:// downloads' too
(`loras.s3`), so every remote source has one deadline, one retry rule and one cap.

Messages follow docs/loras.md: the first hop is the host the client named, so its status ("HTTP
404") may be echoed; nothing about a redirect target (its address, status, whether it answers) is.
The detail goes to the server's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import urljoin

import httpcore
import httpx

from serve_app.errors import ApiError
from serve_app.loras.errors import display_source, download_failed, forbidden
from serve_app.loras.files import looks_like_html
from serve_app.loras.hub import HfToken
from serve_app.net.pinned import PinnedBackend
from serve_app.net.url_policy import HostPolicy, Target, UrlParts, UrlRefused, split_url

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

MAX_REDIRECTS = 5
BACKOFF_S = 0.2  # the first retry waits this long; each next one twice as long
GRACE_S = 1.0  # the deadline is "about" timeout x attempts + backoff: this much slack on top
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 429}  # retried like 5xx
_HEAD_BYTES = 64  # enough to tell an HTML page from a safetensors header
DEADLINE_PASSED = "timed out: the download did not finish in the time it may take"
REDIRECT_FAILED = "the host it redirects to did not deliver the file"
REDIRECT_REFUSED = "it redirects to a host or URL the server does not follow"


def http_status_reason(status: int, error_code: str | None) -> str:
    """How a refusal of the host the client named is reported: its own status, nothing else."""
    return f"HTTP {status}"


class Sink(Protocol):
    """Where the body goes (`download_cache.PartFile`)."""

    size: int

    def expect(self, total: int) -> None: ...

    def write(self, chunk: bytes) -> None: ...

    def restart(self) -> None: ...


@dataclass(frozen=True)
class FetchRequest:
    """One file to download.

    Attributes:
        url: the first URL (already canonical).
        label: how messages name the source (as the client gave it, credentials masked).
        log_id: what log lines name it by (request id and label).
        trusted_origin: an origin allowed besides `allowed_hosts` (the Hub's, for hf:// sources).
        token: sent as Authorization to `trusted_origin` only.
        describe_status: the first hop's refusal in our words (status, X-Error-Code).
    """

    url: str
    label: str
    log_id: str
    trusted_origin: tuple[str, str, int] | None = None
    token: HfToken | None = None
    describe_status: Callable[[int, str | None], str] = http_status_reason


class Failure(Exception):
    """A failed attempt: the error to raise, and whether another attempt may succeed (`Fetcher.retrying`)."""

    def __init__(self, error: ApiError, transient: bool = False):
        super().__init__(error.message)
        self.error = error
        self.transient = transient


class Fetcher:
    """Downloads files under a host policy (see module docstring).

    Args:
        policy: the allow-list and address rule.
        timeout_s: the longest wait for a connection or for the next bytes (`loras.download_timeout_s`).
        attempts: attempts in all (`loras.download_retries`).
        max_bytes: the largest file accepted.
    """

    def __init__(self, policy: HostPolicy, timeout_s: float, attempts: int, max_bytes: int):
        self.policy = policy
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.max_bytes = max_bytes
        self._ssl = httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE / SSL_CERT_DIR as httpx reads them

    @property
    def budget_s(self) -> float:
        """The most one download may take, retries and backoff included."""
        backoff = sum(BACKOFF_S * 2**i for i in range(self.attempts - 1))
        return self.timeout_s * self.attempts + backoff + GRACE_S

    def download(self, request: FetchRequest, sink: Sink, deadline: float) -> int:
        """Download `request.url` into `sink` before `deadline` (time.monotonic()); return its size.

        Raises:
            ApiError: LORA_SOURCE_FORBIDDEN for a hop outside the policy, else LORA_DOWNLOAD_FAILED.
        """

        def attempt() -> int:
            sink.restart()
            return self._follow(request, sink, deadline)

        return self.retrying(request.label, attempt, deadline)

    def retrying(self, label: str, attempt: Callable[[], T], deadline: float) -> T:
        """Run `attempt` (one try, raising `Failure`) up to `attempts` times, with backoff, before `deadline`
        (time.monotonic()); return what it returns. Every remote source's requests go through this loop:
        URLs here, s3:// objects' HEAD and GET in `loras.s3`.

        Raises:
            ApiError: the last attempt's error; LORA_DOWNLOAD_FAILED once the deadline passes.
        """
        last: ApiError | None = None
        for number in range(self.attempts):
            if number:
                time.sleep(max(0.0, min(BACKOFF_S * 2 ** (number - 1), deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            try:
                return attempt()
            except Failure as failure:
                if not failure.transient:
                    raise failure.error from None
                last = failure.error
        if last is None or time.monotonic() >= deadline:
            raise download_failed(label, DEADLINE_PASSED)
        raise last

    def expect_size(self, label: str, sink: Sink, total: int) -> None:
        """The size an answer announced: refused over `max_bytes`, else reserved in the cache (CacheFull)."""
        if total > self.max_bytes:
            raise Failure(download_failed(label, f"larger than {self.max_bytes} bytes"))
        sink.expect(total)

    def receive(self, label: str, sink: Sink, chunk: bytes) -> None:
        """The next bytes of a body, refused once the body passes `max_bytes` whatever it announced."""
        if sink.size + len(chunk) > self.max_bytes:
            raise Failure(download_failed(label, f"larger than {self.max_bytes} bytes"))
        sink.write(chunk)

    def _follow(self, request: FetchRequest, sink: Sink, deadline: float) -> int:
        url, previous = request.url, None
        for hop in range(MAX_REDIRECTS + 1):
            target = self._check_hop(request, url, hop, previous)
            location = self._get(request, target, hop, sink, deadline)
            if location is None:
                return sink.size
            url, previous = urljoin(target.parts.url, location), target.parts
        raise Failure(download_failed(request.label, f"redirected more than {MAX_REDIRECTS} times"))

    # ---- one hop: policy, then one GET ---------------------------------------------------------

    def _check_hop(self, request: FetchRequest, url: str, hop: int, previous: UrlParts | None) -> Target:
        try:
            parts = split_url(url)
        except UrlRefused as exc:
            raise self._refused(
                request, hop, exc.reason, f"malformed URL {display_source(url)!r}: {exc.reason}"
            ) from None
        if previous is not None and previous.scheme == "https" and parts.scheme == "http":
            raise self._refused(request, hop, "", f"https -> http redirect to {display_source(parts.url)}")
        if not (self.policy.allows(parts) or parts.origin == request.trusted_origin):
            why = f"host {parts.netloc} is not in {self.policy.section}.allowed_hosts"
            raise self._refused(request, hop, why, f"{display_source(parts.url)}: {why}")
        try:
            return Target(parts, self.policy.resolve(parts))
        except UrlRefused as exc:
            raise self._refused(request, hop, exc.reason, f"{display_source(parts.url)}: {exc.reason}") from None
        except OSError as exc:  # the name does not resolve (now)
            detail = f"{display_source(parts.url)} does not resolve: {exc!r}"
            raise self._failed(request, hop, "the host name does not resolve", detail, transient=True) from None

    def _get(self, request: FetchRequest, target: Target, hop: int, sink: Sink, deadline: float) -> str | None:
        """One GET: the Location of a redirect, or None once the body is in `sink`."""
        parts = target.parts
        headers = [
            (b"Host", parts.netloc.encode()),
            (b"User-Agent", b"flux-serve"),
            (b"Accept", b"*/*"),
            (b"Accept-Encoding", b"identity"),
        ]
        if request.token is not None and parts.origin == request.trusted_origin:
            headers.append((b"Authorization", request.token.header))
        url = httpcore.URL(scheme=parts.scheme, host=parts.host, port=parts.port, target=parts.target)
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self.timeout_s)
        backend = PinnedBackend(target.addresses, deadline)
        try:
            with (
                httpcore.ConnectionPool(ssl_context=self._ssl, network_backend=backend, retries=0) as pool,
                pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response,
            ):
                location = self._check_answer(request, hop, response, sink)
                if location is None:
                    self._read_body(request, response.iter_stream(), sink)
                return location
        except httpcore.TimeoutException:
            if time.monotonic() >= deadline:
                raise Failure(download_failed(request.label, DEADLINE_PASSED)) from None
            reason = f"timed out after {self.timeout_s:g} s without data"
            raise self._failed(request, hop, reason, f"{display_source(parts.url)}: {reason}", transient=True) from None
        except httpcore.ConnectError as exc:
            refused = isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc).lower()
            reason = "connection refused" if refused else "cannot connect"
            detail = f"cannot connect to {display_source(parts.url)} at {target.addresses}: {exc!r}"
            raise self._failed(request, hop, reason, detail, transient=True) from None
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:  # reset, cut short, broken framing
            detail = f"transfer from {display_source(parts.url)} broke off: {exc!r}"
            raise self._failed(request, hop, "the connection broke off", detail, transient=True) from None
        except httpcore.ProtocolError as exc:  # we could not send the request (LocalProtocolError)
            raise self._failed(
                request, hop, "the URL cannot be requested", f"{display_source(parts.url)}: {exc!r}"
            ) from None

    def _check_answer(self, request: FetchRequest, hop: int, response: httpcore.Response, sink: Sink) -> str | None:
        """Refuse a bad answer from its status and headers, before reading the body."""
        status = response.status
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        if status in _REDIRECTS:
            location = headers.get("location", "").strip()
            if not location:
                raise self._failed(request, hop, "a redirect without a target", f"{status} without Location")
            return location
        if not 200 <= status < 300:
            reason = request.describe_status(status, headers.get("x-error-code"))
            transient = status >= 500 or status in _TRANSIENT_STATUS
            raise self._failed(request, hop, reason, f"answered {status}", transient=transient)
        if headers.get("content-type", "").lower().startswith("text/html"):
            raise Failure(download_failed(request.label, "got an HTML page, not a file"))
        if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            raise Failure(download_failed(request.label, "the host sent an encoded (compressed) body"))
        length = headers.get("content-length", "").strip()
        if length.isdigit():
            self.expect_size(request.label, sink, int(length))  # counted against the cache cap from now on
        return None

    def _failed(self, request: FetchRequest, hop: int, reason: str, detail: str, transient: bool = False) -> Failure:
        """A failed hop: `reason` for the host the client named; for a redirect target one reason, whatever
        happened (closed port, error status, timeout), so its answers and open ports do not show."""
        self._log(request, hop, detail)
        return Failure(download_failed(request.label, reason if hop == 0 else REDIRECT_FAILED), transient)

    def _refused(self, request: FetchRequest, hop: int, reason: str, detail: str) -> Failure:
        """A hop outside the policy; for a redirect, one reason whatever the rule it broke."""
        self._log(request, hop, detail)
        return Failure(forbidden(request.label, reason if hop == 0 else REDIRECT_REFUSED))

    def _read_body(self, request: FetchRequest, chunks: Iterator[bytes], sink: Sink) -> None:
        head = b""
        for chunk in chunks:
            if len(head) < _HEAD_BYTES:
                head += chunk[: _HEAD_BYTES - len(head)]
            self.receive(request.label, sink, chunk)
        if looks_like_html(head):
            raise Failure(download_failed(request.label, "got an HTML page, not a file"))

    def _log(self, request: FetchRequest, hop: int, detail: str) -> None:
        """The detail, for the server's log only (signed query values masked all the same)."""
        logger.warning("LoRA download %s, hop %d: %s", request.log_id, hop, detail)
