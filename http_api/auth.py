"""Optional API key: ``Authorization: Bearer <LLAVA_API_KEY>`` on every route but the open ones
of http_api.routes: health, metrics, the web page's static files (``/``, ``/ui/...``: the page
sends the key with its API calls) and the API's description (``/docs``, ``/docs.json``,
``/schema.json``, which BentoML's client reads first).

The OpenAI SDK sends its ``api_key`` in exactly that header, so one key serves curl, BentoML's
client (``bentoml.SyncHTTPClient(url, token=key)``) and OpenAI clients. A request without the
right key gets 401 with the route's failure body and ``WWW-Authenticate: Bearer``, before its
body is read. Keys are compared in constant time, so response timing tells nothing about them.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from http_api.errors import Receive, Scope, Send, reply_for
from http_api.routes import route_for


class ApiKeyAuth:
    """ASGI middleware; without a key, everything passes. ``key`` may be a function that returns it:
    called when BentoML builds the app, like the request guard's limits (service.py passes
    LLAVA_API_KEY)."""

    def __init__(self, app: Any, key: str | Callable[[], str | None] | None) -> None:
        if callable(key):
            key = key()
        self.app = app
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.expected is None or scope["type"] != "http" or not route_for(path).needs_key:
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope.get("headers", []) if name.lower() == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = (
            "wrong API key in the Authorization header"
            if given
            else "this service needs an API key: send the header 'Authorization: Bearer <key>'"
        )
        # The body is not read: close the connection rather than leave it half-read.
        headers = [(b"www-authenticate", b'Bearer realm="llava-video-service"'), (b"connection", b"close")]
        await reply_for(path, 401, message).send(send, headers)
