"""BentoML's request time limit (``traffic.timeout``), without its leak.

BentoML's ``TimeoutMiddleware`` arms a ``loop.call_later(timeout, ...)`` per request and never
cancels it. An armed timer holds the request's context (a copy of its contextvars: the
OpenTelemetry spans, BentoML's request context) and its waiter until the time limit passes, so
at 20 requests/s and our 900 s limit the worker held about 18,000 finished requests' worth
(the soak benchmark saw its RSS grow through the whole run; tracemalloc showed OpenTelemetry
spans and timer handles piling up). This is the same limit, the same 504, with the timer
cancelled once the request is done. service.py puts it in place of BentoML's class (BentoML
imports it by name when it builds its middlewares).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from http_api.errors import reply_for

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ResponseTimeout:
    """ASGI middleware: a request whose answer has not started within ``timeout`` seconds is
    cancelled and answered 504 (as BentoML does); its timer goes when the request ends."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # the answer's first message went out (or the time is up)

        def time_up() -> None:
            if not started.done():
                started.set_exception(asyncio.TimeoutError())

        async def first_send(message: dict[str, Any]) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        timer = loop.call_later(self.timeout, time_up)
        task = asyncio.ensure_future(self.app(scope, receive, first_send))
        # An app that ends without sending anything (it raised) must not wait out the time limit.
        task.add_done_callback(lambda _: started.done() or started.set_result(None))
        try:
            try:
                await started
            except asyncio.TimeoutError:
                if task.cancel():
                    message = f"the service did not start answering within its {self.timeout:g} s time limit"
                    await reply_for(scope.get("path", ""), 504, message).send(send)
                return
            await task
        finally:
            timer.cancel()
            if not task.done():  # our caller was cancelled (the server stops): so is the request
                task.cancel()
