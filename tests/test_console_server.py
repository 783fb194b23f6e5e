"""The console's server side, in process: the gateway serves the console's files under /ui/
without a token (they hold no data) and with a strict Content-Security-Policy, while every API
route still needs the token; the files ship in the wheel. (The browser tests are in
test_console.py.)"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.registry import load_registry
from services.gateway import create_app
from services.gateway.console import CSP
from shared.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_DIR = ROOT / "services" / "gateway" / "console"
SECRET = "console-unit-secret"


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    config = load_config(
        environ={
            "XDG_CONFIG_HOME": "/nonexistent",
            "NATS_URL": nats_url,
            "PROVISIONING_GATEWAY_AUTH_TOKEN": SECRET,
            "PROVISIONING_TRACING_UI_URL": "http://jaeger.example:16686",
        }
    )
    app = create_app(config, load_registry())
    async with TestClient(TestServer(app)) as the_client:
        yield the_client


async def test_console_files_need_no_token_and_carry_the_csp(client: TestClient) -> None:  # type: ignore[type-arg]
    for path, content_type in (
        ("/ui/", "text/html"),
        ("/ui/js/app.js", "text/javascript"),
        ("/ui/js/pages/run.js", "text/javascript"),
        ("/ui/console.css", "text/css"),
    ):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.content_type == content_type, path
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    csp = dict(part.strip().split(" ", 1) for part in CSP.split(";"))
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["connect-src"] == "'self'"
    redirect = await client.get("/ui", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/ui/"


async def test_the_api_still_needs_the_token(client: TestClient) -> None:  # type: ignore[type-arg]
    for method, path in (
        ("GET", "/workflows"),
        ("GET", "/executors"),
        ("POST", "/ui/"),  # only reading the console's files is open
        ("GET", "/uix"),
        ("GET", "/ui-workflows"),
    ):
        response = await client.request(method, path)
        assert response.status == 401, (method, path)
    health = await (await client.get("/health")).json()
    assert health["tracing"] == {"ui_url": "http://jaeger.example:16686"}


async def test_unknown_files_and_traversal_are_not_found(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in (
        "/ui/nope.js",
        "/ui/js/../../console.py",
        "/ui/%2e%2e/console.py",
        "/ui/js/",
        "/ui/../app.py",
    ):
        response = await client.get(path)
        # 404 under /ui/; a path that normalises to outside it meets the token check (401)
        assert response.status in (401, 404), path
        assert "import" not in await response.text(), path
    missing = await client.get("/ui/nope.js")
    assert missing.status == 404 and "Content-Security-Policy" in missing.headers


async def test_unchanged_files_answer_304(client: TestClient) -> None:  # type: ignore[type-arg]
    first = await client.get("/ui/js/dag.js")
    etag = first.headers["ETag"]
    again = await client.get("/ui/js/dag.js", headers={"If-None-Match": etag})
    assert again.status == 304


def test_every_console_file_ships_in_the_wheel() -> None:
    """pyproject's package-data globs cover every file of the console."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["services.gateway"]
    shipped = {p for pattern in patterns for p in (ROOT / "services" / "gateway").glob(pattern)}
    files = {p for p in CONSOLE_DIR.rglob("*") if p.is_file()}
    assert files and files <= shipped, sorted(str(p) for p in files - shipped)
