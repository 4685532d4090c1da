"""The API page (docs/api.md): `GET /docs`, Swagger UI served from the package, so it works offline.

FastAPI's own page loads Swagger UI from a CDN, and is blank on a machine without the internet. This one
takes Swagger UI's files from `fastapi-offline` (they ship as its package data) and serves exactly the three
the page names, read once, so there is no directory to list and no path to walk out of. Like /openapi.json,
which it reads, it needs no API key ("Try it out" sends one as the routes' `X-API-Key` parameter). The page
goes out with the playground's headers; its one inline script (Swagger UI's start-up, from FastAPI's
`get_swagger_ui_html`) is allowed by its hash, so the policy still forbids every other inline script.
/redoc and /docs/oauth2-redirect are not served: the API declares no OAuth2 scheme.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.web.playground import SECURITY_HEADERS

STATIC = files("fastapi_offline") / "static"
ASSET_PATH = "/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}

_CONTENT = {name: (STATIC / name).read_bytes() for name in ASSETS}
_ETAGS = {name: f'"{hashlib.sha256(data).hexdigest()[:32]}"' for name, data in _CONTENT.items()}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
# Swagger UI's defaults, plus no online validator (its badge would call validator.swagger.io).
_PARAMETERS = {"validatorUrl": None}

router = APIRouter(include_in_schema=False)


def _policy(html: bytes) -> str:
    """The playground's policy, with the page's own inline scripts allowed by hash (CSP level 2)."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (f"default-src 'self'; script-src 'self' {hashes}; img-src 'self' data:; frame-ancestors 'none'; "
            "base-uri 'none'")


@router.get("/docs")
async def page(request: Request) -> Response:
    root = request.scope.get("root_path", "").rstrip("/")  # as FastAPI's own page: behind a route prefix too
    html = get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSET_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSET_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSET_PATH}/favicon.png",
        swagger_ui_parameters=_PARAMETERS,
    ).body
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": _policy(bytes(html))}
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


@router.get(ASSET_PATH + "/{name}")
async def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise ApiError(errors.NOT_FOUND, f"no API page file {name!r}", {"available": sorted(ASSETS)})
    # no-cache as the playground's files, with an ETag so the 1.5 MB script is revalidated, not fetched again
    headers = {**SECURITY_HEADERS, "ETag": _ETAGS[name]}
    if request.headers.get("if-none-match") == _ETAGS[name]:
        return Response(status_code=304, headers=headers)
    return Response(_CONTENT[name], media_type=ASSETS[name], headers=headers)
