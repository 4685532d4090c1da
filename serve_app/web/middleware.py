"""HTTP plumbing of the ingress: the error envelope, the request body size limit and the error codes answered."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve_app import errors
from serve_app.errors import ApiError, ErrorCode

ENVELOPE_MAX_BYTES = 64 * 1024  # an error envelope's message and details are short; past this, not one


def api_error_response(exc: ApiError, status: int | None = None) -> JSONResponse:
    headers = None
    if exc.code in (errors.OVERLOADED, errors.JOBS_UNAVAILABLE):
        headers = {"Retry-After": str(exc.details.get("retry_after_s", 5))}
    elif exc.code == errors.UNAUTHORIZED:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(exc.to_body(), status_code=status or exc.status_code, headers=headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """422 VALIDATION_ERROR listing each field path and problem (never the raw input: it may be bytes)."""
    problems = [
        {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{'.'.join(p['loc'][1:]) or 'body'}: {p['msg']}" for p in problems[:5])
    return api_error_response(
        ApiError(errors.VALIDATION_ERROR, f"invalid request: {summary}"[:1000], {"errors": problems[:50]})
    )


class BodySizeLimit:
    """ASGI middleware: 413 BODY_TOO_LARGE for a body over the limit, declared or streamed (chunked).

    A declared Content-Length over the limit is refused before reading. Otherwise the body is read
    here, up to the limit, before the app sees it: counting inside the app's own read would not do,
    since FastAPI turns any error while it reads a body into a 400.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send, size)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(
            ApiError(
                errors.BODY_TOO_LARGE,
                f"request body of at least {size} bytes exceeds the limit max_body_bytes={self.max_bytes}",
                {"limit": "max_body_bytes", "max": self.max_bytes, "value": size},
            ).to_body()
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ReplicaHeader:
    """Adds `X-Flux-Replica` to every answer: which ingress replica served it (for debugging)."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-flux-replica", self.replica)]
            await send(message)

        return await self.app(scope, receive, send_with_header)


class ErrorCodes:
    """ASGI middleware: tells `on_error` the code of each error answer, for metrics.

    An error answer (status 400 or more) is the JSON error envelope; its body is read here as it passes,
    and sent on unchanged. Any other answer passes unread. An error whose body is not an envelope counts
    as its status's code (`errors.code_for_status`), and so does an exception that leaves the app.
    """

    def __init__(self, app, on_error: Callable[[ErrorCode], None]):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0
        body = bytearray()

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                if len(body) <= ENVELOPE_MAX_BYTES:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self.on_error(_envelope_code(bytes(body), status))
            await send(message)

        try:
            return await self.app(scope, receive, send_counting)
        except Exception:
            if status == 0:  # nothing answered yet: Starlette answers 500 outside this middleware
                self.on_error(errors.code_for_status(500))
            raise


def _envelope_code(body: bytes, status: int) -> ErrorCode:
    try:
        return ErrorCode(json.loads(body)["error"]["code"])
    except (ValueError, TypeError, KeyError):  # not JSON, not an envelope, or not one of our codes
        return errors.code_for_status(status)
