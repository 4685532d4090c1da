"""The playground (docs/api.md): `GET /` and the page's own script and style sheet.

Exactly three files, named here and read once from the package (`static/`, package data), so there
is no directory to list and no path to walk out of. They need no API key (the page asks for one
and sends it with its API calls) and go out with headers that keep the page to its own origin:
no inline code, no outside fetches, no framing.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from serve_app import errors
from serve_app.errors import ApiError

STATIC = files("serve_app.web") / "static"
PAGE = "index.html"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

SECURITY_HEADERS = {
    # docs/api.md's policy, plus the clickjacking and <base> guards that default-src does not cover.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: always revalidate, so a server upgrade never runs an old script against a new API.
    "Cache-Control": "no-cache",
}

_CONTENT = {name: (STATIC / name).read_bytes() for name in (PAGE, *ASSETS)}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> Response:
    return Response(_CONTENT[PAGE], media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(errors.NOT_FOUND, f"no playground file {name!r}", {"available": sorted(ASSETS)})
    return Response(_CONTENT[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)
