"""Webhooks (docs/jobs.md): where a `webhook_url` may point, how a delivery is signed, and sending it.

- Policy: the URL rules of docs/loras.md (`net/url_policy.py`, shared with LoRA downloads) with
  the webhooks' own allow-list: a host exactly as spelled in `webhooks.allowed_hosts` (`IP:port`
  entries allow that address and port only, `.domain` its subdomains), and a name that resolves to
  a loopback, private or link-local address refused unless `webhooks.allow_private_addresses`. The
  ingress checks it at submit (400 WEBHOOK_FORBIDDEN); every delivery checks it again, resolves the
  host once and connects to exactly the addresses it checked (`net/pinned.py`, the backend LoRA
  downloads use), so a second DNS answer cannot move it.
- Signatures, made anew for each attempt (its own time):
  - `X-Flux-Signature: t=<unix seconds>,sha256=<hex of HMAC-SHA256(key = the secret's text in UTF-8,
    "<t>." + the exact body bytes)>`;
  - Standard Webhooks: `webhook-id: msg_<request id>` (the same for every attempt of a delivery, and
    after a FluxJobs restart: derived from the stored job), `webhook-timestamp: <unix seconds>`,
    `webhook-signature: v1,<base64 of HMAC-SHA256(key = the Standard Webhooks key, "<id>.<timestamp>."
    + the exact body bytes)>`. The key is what the `standardwebhooks` package's `Webhook(secret)`
    derives from the secret's text: an optional `whsec_` dropped, the rest base64-decoded (padding
    added, characters outside the alphabet skipped). A generated secret is `whsec_` + base64; a secret
    that does not decode to a key is refused at start.
- Delivery: the job's result body is POSTed; a 2xx answer delivers it. Any other answer (redirects
  are never followed), a connection error or a timeout is retried after `backoff_s`, doubling, up
  to `max_attempts` in all; each attempt may take at most `timeout_s`. FluxJobs runs deliveries on
  tasks of their own, never in the generation path; each POST runs on a thread of the sender's own
  pool, so a slow receiver never holds the threads the job store's calls use.

No Ray here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpcore
import httpx

from serve_app import errors
from serve_app.config import WebhookArgs
from serve_app.errors import ApiError
from serve_app.net.pinned import PinnedBackend
from serve_app.net.url_policy import HostPolicy, Target, UrlRefused, split_url
from serve_app.schemas import WebhookStatus

logger = logging.getLogger("ray.serve")

SIGNATURE_HEADER = "X-Flux-Signature"
ID_HEADER, TIMESTAMP_HEADER, STANDARD_SIGNATURE_HEADER = "webhook-id", "webhook-timestamp", "webhook-signature"
SECRET_PREFIX = "whsec_"
SECRET_FORM = "`whsec_` followed by base64, e.g. `whsec_` + the base64 of 32 random bytes (as `make serve` writes)"
SECRET_BYTES = 32
POST_THREADS = 16  # POSTs in flight at once per sender; more wait for a thread (their time starts then)


# ---- the secret and the signature ------------------------------------------------------------------


def write_secret_file(path: str) -> bool:
    """Create `path` with a random secret unless it exists (owner-only); True when it was written.

    The file holds the secret alone, `whsec_` + the base64 of 32 random bytes with no newline, so its
    exact text is what a receiver uses (e.g. `open(path).read()`): the X-Flux-Signature key, and the
    secret `standardwebhooks.Webhook` takes. `load_secret` reads it back by the same rule as any file.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrites one in use
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii"))
    return True


def load_secret(args: WebhookArgs) -> str | None:
    """The signing secret: the environment variable `secret_env`, else the text of `secret_file`.

    One rule for both: the value's surrounding whitespace is stripped (a file saved with a final
    newline, `echo secret > file`, signs as the secret alone); what remains, in UTF-8, is the HMAC
    key of X-Flux-Signature. Whitespace inside the secret is kept. A generated file (`write_secret_file`)
    has none to strip. The Standard Webhooks key is derived from that text (`standard_key`).

    Returns:
        None when webhooks are off (no allowed host).

    Raises:
        RuntimeError: webhooks are on and neither holds a secret, or the secret does not decode to a
            Standard Webhooks key (FluxJobs then fails to start, with this message).
    """
    if not args.enabled:
        return None
    secret, where = os.environ.get(args.secret_env, "").strip(), f"${args.secret_env}"
    if not secret and args.secret_file and Path(args.secret_file).is_file():
        secret, where = Path(args.secret_file).read_text(encoding="utf-8").strip(), args.secret_file
    if not secret:
        where = f"${args.secret_env}" + (f" or {args.secret_file}" if args.secret_file else "")
        raise RuntimeError(f"webhooks are enabled but no signing secret is set ({where})")
    try:
        standard_key(secret)
    except ValueError:
        raise RuntimeError(f"the webhook signing secret in {where} does not decode to a Standard Webhooks key: "
                           f"expected {SECRET_FORM}") from None
    return secret


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks key of a secret, exactly as `standardwebhooks.Webhook(secret)` derives it:
    an optional `whsec_` dropped, the rest base64-decoded with padding added and characters outside the
    base64 alphabet skipped. A 64-hex secret of earlier versions decodes too (hex digits are base64).

    Raises:
        ValueError: the text does not decode (not ASCII, a stray character count) or decodes to nothing.
    """
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    except ValueError:  # binascii.Error is one; so is a character outside ASCII
        key = b""
    if not key:
        raise ValueError(f"not a Standard Webhooks secret: expected {SECRET_FORM}")
    return key


def message_id(request_id: str) -> str:
    """The `webhook-id` of a job's delivery: every attempt of it, before and after a restart, carries it."""
    return f"msg_{request_id}"


def sign_standard(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for `body` sent as message `msg_id` at `timestamp` (unix seconds)."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Flux-Signature value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},sha256={digest}"


def verify(secret: str, header: str, body: bytes, max_age_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver checks: the signature matches the body, and it is recent (against replays)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header.strip())


# ---- the policy ------------------------------------------------------------------------------------


def forbidden(reason: str) -> ApiError:
    return ApiError(errors.WEBHOOK_FORBIDDEN, f"webhook_url refused: {reason}", {"field": "webhook_url"})


class WebhookPolicy:
    """Which webhook URLs the server sends to (module docstring)."""

    def __init__(self, args: WebhookArgs):
        self.enabled = args.enabled
        self.hosts = HostPolicy(args.allowed_hosts, args.allow_private_addresses, section="webhooks")

    def check(self, url: str) -> Target:
        """Check a URL and resolve its host (blocking: DNS).

        Returns:
            The URL's parts and the addresses it may be sent to.

        Raises:
            ApiError: WEBHOOK_FORBIDDEN for a URL outside the policy.
            OSError: the host name does not resolve (now).
        """
        if not self.enabled:
            raise forbidden("this server sends no webhooks (webhooks.allowed_hosts is empty)")
        try:
            parts = split_url(url)
        except UrlRefused as exc:
            raise forbidden(exc.reason) from None
        if not self.hosts.allows(parts):
            raise forbidden(f"host {parts.netloc} is not in {self.hosts.section}.allowed_hosts")
        try:
            return Target(parts, self.hosts.resolve(parts))
        except UrlRefused as exc:
            raise forbidden(exc.reason) from None


# ---- delivery ----------------------------------------------------------------------------------------


class _Refused(Exception):
    """An attempt the policy refused: not retried."""


class WebhookSender:
    """Delivers signed result bodies (module docstring).

    Args:
        args: the webhooks args (policy, attempts, backoff, timeout).
        secret: the signing secret (`load_secret`).

    Raises:
        ValueError: the secret does not decode to a Standard Webhooks key (`standard_key`).
    """

    def __init__(self, args: WebhookArgs, secret: str):
        self.args = args
        self.policy = WebhookPolicy(args)
        self._secret = secret
        self._key = standard_key(secret)
        self._ssl = httpx.create_ssl_context()
        self._threads = ThreadPoolExecutor(POST_THREADS, thread_name_prefix="webhook")

    def backoff_s(self, attempts_done: int) -> float:
        """The wait before the next attempt, after `attempts_done` failed ones."""
        return self.args.backoff_s * 2 ** max(attempts_done - 1, 0) if attempts_done else 0.0

    async def deliver(
        self, url: str, body: bytes, state: WebhookStatus, on_attempt: Callable[[WebhookStatus], Awaitable[None]],
        msg_id: str,
    ) -> WebhookStatus:
        """Send `body` until it is delivered, refused by the policy, or `max_attempts` are spent.

        Args:
            url: the job's webhook_url.
            body: the exact bytes to POST (the job's result JSON).
            msg_id: the `webhook-id` of every attempt (`message_id` of the job's request id).
            state: the delivery so far (a restarted FluxJobs resumes one).
            on_attempt: told the new state after each attempt (FluxJobs stores it).

        Returns:
            The final state.
        """
        while not state.delivered and state.attempts < self.args.max_attempts:
            await asyncio.sleep(self.backoff_s(state.attempts))
            try:
                error = await self.attempt(url, body, msg_id)
            except _Refused as exc:
                state = WebhookStatus(delivered=False, attempts=state.attempts + 1, last_error=str(exc))
                await on_attempt(state)
                break
            state = WebhookStatus(delivered=error is None, attempts=state.attempts + 1, last_error=error)
            await on_attempt(state)
        return state

    async def attempt(self, url: str, body: bytes, msg_id: str) -> str | None:
        """One POST. Returns None when delivered, else why not (retried); raises _Refused (not retried)."""
        try:
            target = await asyncio.to_thread(self.policy.check, url)
        except ApiError as exc:
            raise _Refused(exc.message) from None
        except OSError:
            return "the host name does not resolve"
        try:
            status = await asyncio.get_running_loop().run_in_executor(self._threads, self._post, target, body, msg_id)
        except (TimeoutError, httpcore.TimeoutException):
            return f"no answer within {self.args.timeout_s:g} s"
        except httpcore.ConnectError:
            return "cannot connect"
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:  # reset, cut short, broken framing
            return f"the connection broke off ({type(exc).__name__})"
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"HTTP {status} (redirects are not followed)"
        return f"HTTP {status}"

    def _post(self, target: Target, body: bytes, msg_id: str) -> int:
        """One POST (blocking); the pinned backend ends every wait `timeout_s` after it starts."""
        deadline = time.monotonic() + self.args.timeout_s
        parts = target.parts
        now = int(time.time())
        headers = [
            (b"Host", parts.netloc.encode()),
            (b"User-Agent", b"flux-serve"),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (SIGNATURE_HEADER.encode(), sign(self._secret, body, now).encode()),
            (ID_HEADER.encode(), msg_id.encode()),
            (TIMESTAMP_HEADER.encode(), str(now).encode()),
            (STANDARD_SIGNATURE_HEADER.encode(), sign_standard(self._key, msg_id, now, body).encode()),
        ]
        url = httpcore.URL(scheme=parts.scheme, host=parts.host, port=parts.port, target=parts.target)
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self.args.timeout_s)
        backend = PinnedBackend(target.addresses, deadline)
        with (
            httpcore.ConnectionPool(ssl_context=self._ssl, network_backend=backend, retries=0) as pool,
            pool.stream("POST", url, headers=headers, content=body, extensions={"timeout": timeouts}) as response,
        ):
            return response.status  # the body is never read: a receiver's answer is its status
