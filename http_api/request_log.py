"""One log line per request, with a request id that the client sees too.

:class:`RequestLog` is the outermost of the service's ASGI middlewares. Each request gets an id:
the client's ``X-Request-ID`` when it is a sane token (letters, digits and ``-._:``, at most 128
characters), otherwise a new one; every response carries it back as ``X-Request-ID``, failures
included, on the native routes, /v1 and BentoML's own. When the response has ended one line is
logged, e.g.::

    request 7f3c2a9e0b1d4e6f POST /analyze_video 200 total=1.84s decode=0.21s queue=0.00s
    request client-42 POST /analyze_image 400 total=0.01s error="invalid request: image_url: ..."

Client mistakes and refusals are logged at INFO without a traceback, and so are 502/503/504 (the
URL's server failed, the service is busy or stopping: conditions, not faults). Faults of the
service (500) are logged at ERROR with the traceback of what failed, which the code that answered
500 hands over with :func:`note_failure` (http_api.record). Quiet routes (health and metrics,
http_api.routes) are logged at DEBUG only (probes would drown the rest; /readyz says 503 all the
while the model loads).

BentoML logs its own validation errors (malformed JSON, a field of the wrong type: 400s) at ERROR
with a full traceback; :class:`FrameworkErrorFilter` takes those records over: inside a request
their exception goes to the request's line (so a 400 stays one INFO line), outside one a client
error is lowered to INFO without its traceback.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from http_api.errors import Message, Receive, Scope, Send, framework_error_message, reply_for
from http_api.record import RequestRecord, Timed, current, current_record, note_decode, note_failure, note_stream
from http_api.routes import route_for

# The request's record is kept in http_api.record; its notes are offered here too.
__all__ = [
    "FrameworkErrorFilter",
    "RequestLog",
    "RequestRecord",
    "Timed",
    "current",
    "install_framework_filter",
    "note_decode",
    "note_failure",
    "note_stream",
    "request_id_from",
]

logger = logging.getLogger("llava_video_service.request")
HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The logger BentoML's api_endpoint_wrapper logs "Exception on <path> [<method>]" to.
FRAMEWORK_LOGGER = "bentoml._internal.server.http_app"
# Largest error body read for the message in the log line.
_MAX_ERROR_BODY = 64 * 1024


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID if it is sane, else a new id (32 hex digits)."""
    for name, value in scope.get("headers", []):
        if name.lower() == HEADER.encode():
            text = value.decode("latin-1").strip()
            if _SANE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestLog:
    """ASGI middleware: request id in and out, one log line per request (see the module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        record = RequestRecord(request_id_from(scope))
        header = (HEADER.encode(), record.request_id.encode())
        status = 0
        error_body = bytearray()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, header]}
            elif message["type"] == "http.response.body" and status >= 400 and len(error_body) < _MAX_ERROR_BODY:
                error_body.extend(message.get("body", b"")[: _MAX_ERROR_BODY - len(error_body)])
            await send(message)

        token = current_record.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:  # escaped every handler: answer 500 here, log it once below
            record.failure = error
            if status == 0:
                await reply_for(scope.get("path", ""), 500, "internal error; see the server log").send(send_with_id)
            else:
                status = 500  # the response broke off; the client sees a truncated answer
        finally:
            current_record.reset(token)
            _log(scope, record, status, time.monotonic() - started, bytes(error_body))


def _log(scope: Scope, record: RequestRecord, status: int, total: float, error_body: bytes) -> None:
    path = scope.get("path", "")
    parts = [f"request {record.request_id} {scope.get('method', '')} {path} {status or '-'} total={total:.3f}s"]
    if record.decode_seconds is not None:
        parts.append(f"decode={record.decode_seconds:.3f}s")
    if record.stream is not None and (queue := record.stream.queue_seconds) is not None:
        parts.append(f"queue={queue:.3f}s")
    if status >= 400:
        parts.append("error=" + json.dumps(_error_message(error_body, path) if error_body else "-"))
    line = " ".join(parts)
    if status == 500 or record.failure is not None:
        logger.error(line, exc_info=record.failure)
    elif status == 507:  # the disk is full: the operator's to fix, not the client's
        logger.warning(line)
    elif route_for(path).quiet:  # probes; a 503 of /readyz while loading or draining is expected too
        logger.debug(line)
    else:
        logger.info(line)


def _error_message(body: bytes, path: str) -> str:
    message = framework_error_message(body, route_for(path))
    return message if len(message) <= 300 else message[:297] + "..."


class FrameworkErrorFilter(logging.Filter):
    """On BentoML's endpoint logger: its "Exception on ..." records become part of the request's
    line (client errors at INFO, no traceback; see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        error = record.exc_info[1]
        request = current_record.get()
        if request is not None:
            if not _is_client_error(error):
                request.failure = error
            return False  # the request's own line says it, once
        if _is_client_error(error):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.getMessage()}: {' '.join(str(error).split())}"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def _is_client_error(error: BaseException) -> bool:
    """Errors BentoML answers with a status below 500: validation errors and 4xx exceptions;
    and a client that left mid-body (the guard answers it 499)."""
    from pydantic import ValidationError
    from starlette.requests import ClientDisconnect

    if isinstance(error, (ValidationError, ClientDisconnect)):
        return True
    code: Any = getattr(getattr(error, "error_code", None), "value", None)
    return isinstance(code, int) and code < 500


def install_framework_filter() -> None:
    """Put :class:`FrameworkErrorFilter` on BentoML's endpoint logger (once per process)."""
    framework = logging.getLogger(FRAMEWORK_LOGGER)
    if not any(isinstance(each, FrameworkErrorFilter) for each in framework.filters):
        framework.addFilter(FrameworkErrorFilter())
