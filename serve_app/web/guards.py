"""Guards at the door of the ingress: the API key, the in-flight bound and the request timeout."""

from __future__ import annotations

import hmac
import os
from contextlib import contextmanager
from pathlib import Path

from serve_app import errors
from serve_app.config import AppArgs, AuthArgs
from serve_app.errors import ApiError, validation_error


def load_api_key(auth: AuthArgs) -> str | None:
    """The configured key, or None when auth is off. A configured but missing key fails start."""
    if auth.api_key_file:
        key = Path(auth.api_key_file).read_text().strip()
    elif auth.api_key_env:
        key = os.environ.get(auth.api_key_env, "").strip()
        if not key:
            raise RuntimeError(f"auth.api_key_env names {auth.api_key_env!r}, which is not set or empty")
    else:
        return None
    if not key:
        raise RuntimeError("the configured API key is empty")
    return key


def check_api_key(expected: str | None, authorization: str | None, x_api_key: str | None) -> None:
    """Accept `Authorization: Bearer KEY` or `X-API-Key: KEY`; compare in constant time."""
    if expected is None:
        return
    given = x_api_key or ""
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(errors.UNAUTHORIZED, "a valid API key is required (Authorization: Bearer <key>)")


def request_timeout(args: AppArgs, header: str | None) -> float:
    """The configured timeout, or the client's lower one from the X-Flux-Timeout header."""
    limit = args.jobs.timeout_s
    if header is None:
        return limit
    try:
        asked = float(header)
    except ValueError:
        asked = float("nan")
    if not asked > 0:  # also refuses NaN
        raise validation_error(["header", "x-flux-timeout"], f"must be a positive number of seconds, got {header!r}")
    return min(asked, limit)


def overloaded(what: str, limit_name: str, limit: int, retry_after_s: int) -> ApiError:
    return ApiError(
        errors.OVERLOADED,
        f"the service is at capacity ({what}); retry after {retry_after_s} s",
        {"limit": limit_name, "max": limit, "retry_after_s": retry_after_s},
    )


class InFlight:
    """Counts work items of sync requests in flight in this replica, refusing past a bound."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.count = 0

    @contextmanager
    def hold(self, items: int):
        if self.count + items > self.limit:
            raise overloaded("sync work items in flight", "max_sync_items_per_ingress", self.limit, self.retry_after_s)
        self.count += items
        try:
            yield
        finally:
            self.count -= items
