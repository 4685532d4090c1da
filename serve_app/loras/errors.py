"""The coded errors of LoRA sources, and the form of a source that messages may show.

Every message names the source as the client gave it (minus anything that looks like a credential)
and a reason in our own words: never upstream bytes, the status or address of a host the client did
not name, a server path, a pid or a traceback (docs/loras.md). The detail goes to the server's log.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from serve_app import errors
from serve_app.errors import ApiError

# Query parameters that commonly carry a secret (signed CDN links, API keys, tokens).
_SECRET_PARAM = re.compile(r"token|key|sig|secret|pass|auth|cred|session|^x-amz-|^x-goog-", re.IGNORECASE)
_MAX_SHOWN = 300  # a source longer than this is cut in messages


def display_source(source: str) -> str:
    """The source as messages and logs may show it: query values that look secret are masked."""
    shown = str(source)
    if shown.lower().startswith(("http://", "https://", "s3://")) and "?" in shown:
        try:
            parts = urlsplit(shown)
            pairs = parse_qsl(parts.query, keep_blank_values=True)
            if any(_SECRET_PARAM.search(k) for k, _ in pairs):
                query = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
                shown = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        except ValueError:  # not even a URL: show no query at all
            shown = shown.split("?", 1)[0] + "?***"
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "…"


def forbidden(source: str, why: str) -> ApiError:
    shown = display_source(source)
    return ApiError(errors.LORA_SOURCE_FORBIDDEN, f"LoRA source {shown!r} is not allowed: {why}", {"path": shown})


def not_found(where: str, why: str = "not found") -> ApiError:
    shown = display_source(where)
    return ApiError(errors.LORA_NOT_FOUND, f"LoRA file {shown!r} {why}", {"path": shown})


def invalid(where: str, why: str) -> ApiError:
    shown = display_source(where)
    return ApiError(errors.LORA_INVALID, f"LoRA file {shown} is invalid: {why}", {"path": shown, "reason": why})


def download_failed(source: str, reason: str) -> ApiError:
    shown = display_source(source)
    return ApiError(
        errors.LORA_DOWNLOAD_FAILED, f"Downloading LoRA {shown} failed: {reason}", {"url": shown, "reason": reason}
    )


def copy_error(error: ApiError) -> ApiError:
    """A fresh instance, so one remembered error can be raised by many threads at once."""
    return ApiError(error.code, error.message, dict(error.details))
