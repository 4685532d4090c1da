"""The API page (/docs) works offline: Swagger UI's files come from the package, nothing from another site."""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serve_app.config import AppArgs
from serve_app.web import apidocs
from serve_app.web.routes import build_api

ROOT = Path(__file__).resolve().parents[3]
KEY = "test-key"
TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class NoService:
    """The routes under test never reach the ingress service."""

    def __getattr__(self, name):
        raise AssertionError(f"the API page called the service's {name}")


@pytest.fixture(scope="module")
def client():
    with TestClient(build_api(NoService(), AppArgs(), KEY, "replica-0")) as client:
        yield client


def links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', page)


def test_the_page_names_only_local_files_that_the_app_serves(client):
    answer = client.get("/docs")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert "//" not in page  # no http://, https:// or protocol-relative URL anywhere, script included
    assert sorted(links(page)) == sorted(f"/docs/assets/{name}" for name in apidocs.ASSETS)
    for path in links(page):
        asset = client.get(path)
        assert asset.status_code == 200, path
        assert asset.headers["content-type"].startswith(TYPES[Path(path).suffix]), path
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert len(asset.content) > 100, path
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text


def test_the_page_and_its_schema_need_no_key_while_the_api_does(client):
    assert client.get("/v1/models").status_code == 401
    page = client.get("/docs").text
    assert "url: '/openapi.json'" in page
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "flux-serve"
    assert "/docs" not in schema.json()["paths"]  # the page and its files stay out of the schema
    assert not any(path.startswith("/docs") for path in schema.json()["paths"])


def test_the_page_allows_only_its_own_inline_script(client):
    answer = client.get("/docs")
    policy = answer.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", answer.text, re.DOTALL)
    assert len(scripts) == 1 and "SwaggerUIBundle(" in scripts[0]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe" not in policy and "http" not in policy
    assert answer.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("name", [
    "redoc.standalone.js",  # in the library's folder, but the page does not use it
    "index.html",
    "swagger-ui-bundle.js.map",
    "..%2f__init__.py",
    "%2e%2e%2fcore.py",
    "..%2f..%2fplayground.py",
    "%2fetc%2fpasswd",
    "",
])
def test_other_names_are_refused(client, name):
    answer = client.get(f"/docs/assets/{name}")
    assert answer.status_code == 404
    if name:
        assert answer.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("path", ["/redoc", "/docs/oauth2-redirect", "/docs/assets/../../routes.py"])
def test_the_cdn_pages_are_gone(client, path):
    assert client.get(path).status_code == 404


def test_an_unchanged_file_is_not_sent_again(client):
    first = client.get("/docs/assets/swagger-ui-bundle.js")
    again = client.get("/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert first.headers["cache-control"] == "no-cache"


def test_behind_a_route_prefix_the_page_names_prefixed_paths():
    with TestClient(build_api(NoService(), AppArgs(), None, "replica-0"), root_path="/flux") as client:
        page = client.get("/docs").text
    assert sorted(links(page)) == sorted(f"/flux/docs/assets/{name}" for name in apidocs.ASSETS)
    assert "url: '/flux/openapi.json'" in page


def test_the_library_is_a_declared_and_pinned_dependency():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"fastapi-offline\b", spec) for spec in declared)
    assert re.search(r"^fastapi-offline==", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
