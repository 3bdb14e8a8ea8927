"""The web page to try the service (``/ui``): static files from ``ui/``, no build step.

The page (ui/index.html, app.js, jobs.js, api.js, style.css) calls the same HTTP API as any
client, so it needs nothing from the server but its files. :func:`create_app` serves them;
service.py mounts it at :data:`PAGE_PREFIX`. :class:`PageRoutes` sends ``/`` to the page and keeps
BentoML's OpenAPI page (which BentoML serves at ``/``) reachable at :data:`API_DOCS_PATH`.
The page's paths, and the OpenAPI page, are open without an API key (http_api.routes): they hold
no data, and a browser cannot add a header when it opens a URL; the page sends the key with each
API call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from http_api.errors import Receive, Scope, Send

PAGE_PREFIX = "/ui"
PAGE_DIRECTORY = Path(__file__).resolve().parents[1] / "ui"
# Where BentoML's own OpenAPI (Swagger) page moves to. Its links are relative (./docs.json,
# ./static_content/...), and from /docs they still resolve to the root, where BentoML serves them.
API_DOCS_PATH = "/docs"


def create_app(directory: Path = PAGE_DIRECTORY) -> Starlette:
    """The page's files; ``/ui/`` answers index.html."""
    return Starlette(routes=[Mount("/", StaticFiles(directory=directory, html=True))])


class PageRoutes:
    """ASGI middleware: ``GET /`` and ``GET /ui`` redirect to ``/ui/``; ``/docs`` shows BentoML's
    OpenAPI page (its ``/``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            if path in ("/", PAGE_PREFIX):
                headers = [(b"location", f"{PAGE_PREFIX}/".encode()), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 307, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
            if path == API_DOCS_PATH:
                scope = {**scope, "path": "/", "raw_path": b"/"}
        await self.app(scope, receive, send)
