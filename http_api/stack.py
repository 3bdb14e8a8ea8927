"""The service's ASGI middlewares, in the one order that works, and why.

BentoML wraps its app in the middlewares in the order they are added: the first added runs
outermost (sees the request first and the response last). Each of them looks the request's path
up in the route table (http_api.routes). service.py adds them as :func:`middlewares` lists them;
BentoML installs each as a Starlette ``Middleware`` entry of its app.

They are plain ASGI classes rather than Starlette's ``BaseHTTPMiddleware``: that one runs the app
in a task of its own and hands the response over through a stream, which changes what a
streamed answer and a client's disconnect look like to the app (the guard must answer before the
body is read, the gate and the key check without reading it, the request log must see every
byte of a server-sent stream as it goes out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from http_api.auth import ApiKeyAuth
from http_api.errors import FailureBodyMiddleware
from http_api.files_api import MountRoot
from http_api.guard import GuardLimits, RequestGuard
from http_api.lifecycle import Lifecycle, LifecycleGate
from http_api.metrics import RequestMetrics
from http_api.openapi import OpenAPIDocs
from http_api.request_log import RequestLog
from http_api.web_ui import PageRoutes


def middlewares(
    lifecycle: Lifecycle, api_key: Callable[[], str | None], guard_limits: Callable[[], GuardLimits]
) -> list[tuple[type, dict[str, Any]]]:
    """(middleware class, its options), outermost first; ``api_key`` and ``guard_limits`` are
    called when the middleware is built."""
    return [
        # Outermost of ours: it sees every answer, refusals included, and gives each its request id.
        (RequestLog, {}),
        # Then count every request, refusals included, by its route.
        (RequestMetrics, {}),
        # Refuse a missing API key before anything else looks at the request (its body unread).
        (ApiKeyAuth, {"key": api_key}),
        # Inside the key check: / (open) redirects to the page, /docs shows BentoML's page (its /).
        (PageRoutes, {}),
        (OpenAPIDocs, {}),
        # Errors BentoML and Starlette answer by themselves get our failure body; what runs inside
        # it answers with that body already.
        (FailureBodyMiddleware, {}),
        # The gate before the guard: a loading or draining worker refuses before the body is read.
        (LifecycleGate, {"lifecycle": lifecycle}),
        (RequestGuard, {"limits": guard_limits}),
        # Innermost: every middleware above sees POST /media as sent.
        (MountRoot, {}),
    ]
