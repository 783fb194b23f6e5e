"""The web run console: static files served by the gateway under ``/ui/``.

The console is a handful of ES modules and a stylesheet shipped in the package
(``services/gateway/console/``), read once when the application is built. It has no server-side
logic and no private endpoint: the browser works from the same public API as the CLI, carrying
the bearer token on every call. The files themselves hold no data, so they are served without a
token (the page must load to show its login form); every response under ``/ui`` carries a
Content-Security-Policy that forbids inline scripts and styles and any origin but this one.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import PurePosixPath

from aiohttp import web

__all__ = ["CSP", "PREFIX", "add_console", "is_console_asset"]

PREFIX = "/ui"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# Only these kinds of file are served; anything else in the folder stays private.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class _Asset:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _load_assets() -> dict[str, _Asset]:
    """Every servable file of the console, by its path under ``/ui/``."""
    assets: dict[str, _Asset] = {}
    root = resources.files(__package__ or "services.gateway").joinpath("console")

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif (content_type := _CONTENT_TYPES.get(PurePosixPath(entry.name).suffix)) is not None:
                assets[prefix + entry.name] = _Asset(entry.read_bytes(), content_type)

    walk(root, "")
    return assets


def is_console_asset(request: web.Request) -> bool:
    """A GET (or HEAD) for the console's own files, which need no token: they carry no data."""
    path = request.path
    return request.method in ("GET", "HEAD") and (path == PREFIX or path.startswith(PREFIX + "/"))


def add_console(app: web.Application) -> None:
    """Register ``/ui/`` (the console's page and files) and its security headers on ``app``."""
    assets = _load_assets()

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(PREFIX + "/")

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("path", "") or "index.html"
        asset = assets.get(name)
        if asset is None:
            raise web.HTTPNotFound(text=f"no console file {name[:100]!r}")
        headers = {"ETag": asset.etag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == asset.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, headers={**headers, "Content-Type": asset.content_type}
        )

    async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
            response.headers.update(_SECURITY_HEADERS)

    app.router.add_get(PREFIX, redirect)
    app.router.add_get(PREFIX + "/", serve)
    app.router.add_get(PREFIX + "/{path:[A-Za-z0-9_./-]+}", serve)
    app.on_response_prepare.append(security_headers)
