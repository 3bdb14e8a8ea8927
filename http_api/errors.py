"""Every failure the HTTP side answers, in one place: which status an error gets, and its body.

Native endpoints answer ``{"response": "", "status": "failed", "error": "..."}``; the OpenAI routes
(under ``/v1/``) answer OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the same
status, so that the SDK raises its matching exception class. The endpoints, the OpenAI routes,
the request guard and :class:`FailureBodyMiddleware` (errors BentoML raises before an endpoint
runs) all build their bodies with :func:`error_body`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import media
from http_api.schemas import Failure
from jobs.manager import JobNotFinished, TooManyJobs, UnknownJob
from jobs.segments import SegmentPlanError
from llava_custom.errors import (
    EngineBusy,
    EngineClosed,
    InvalidPrompt,
    PromptTooLong,
    RequestCancelled,
    RequestTimeout,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPENAI_PREFIX = "/v1/"
JOBS_PREFIX = "/jobs/"
# Seconds a 503 asks the client to wait before retrying.
RETRY_AFTER_SECONDS = 10


class RequestError(Exception):
    """The request itself is malformed: missing or doubled input, bad metadata or parameters.

    ``param`` names the offending request field where one does (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Most specific classes first: the first match decides the status.
ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (RequestError, 400),
    (SegmentPlanError, 400),
    (UnknownJob, 404),
    (JobNotFinished, 409),
    (InvalidPrompt, 400),
    (media.InvalidSource, 400),
    (media.MediaTooLarge, 413),
    (PromptTooLong, 413),
    (media.UnsupportedMedia, 415),
    (media.UndecodableMedia, 422),
    (media.UpstreamTimeout, 504),
    (media.UpstreamError, 502),
    (EngineBusy, 503),
    (TooManyJobs, 503),
    (RequestTimeout, 503),
    (EngineClosed, 503),
    (RequestCancelled, 499),  # nginx's "client closed request": only the access log sees it
]
# The errors a client can cause or that say the service is busy: answered with their status and
# message, never logged as our fault.
CLIENT_ERRORS: tuple[type[Exception], ...] = tuple(cls for cls, _ in ERROR_STATUS)

# OpenAI's error ``type`` and our ``code`` per status.
_OPENAI_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "undecodable_media"),
    499: ("invalid_request_error", "client_closed_request"),
    502: ("upstream_error", "upstream_error"),
    503: ("service_unavailable_error", "service_unavailable"),
    504: ("upstream_error", "upstream_timeout"),
}


def status_for(error: Exception) -> int:
    return next((status for cls, status in ERROR_STATUS if isinstance(error, cls)), 500)


def status_for_kind(kind: str) -> int:
    """The status of an error known by its kind, its class's name (a failed job records it so):
    as :func:`status_for` answers for that class, found among the mapped classes and their
    subclasses; 500 when no such class is mapped."""
    classes: list[type[BaseException]] = [cls for cls, _ in ERROR_STATUS]
    while classes:
        cls = classes.pop()
        if cls.__name__ == kind:
            return next(status for mapped, status in ERROR_STATUS if issubclass(cls, mapped))
        classes.extend(cls.__subclasses__())
    return 500


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def is_jobs_path(path: str) -> bool:
    return path.startswith(JOBS_PREFIX)


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for ``status``."""
    kind, code = _OPENAI_TYPES.get(status, ("server_error", "internal_error"))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(path: str, status: int, message: str, param: str | None = None) -> bytes:
    """The JSON failure body a request to ``path`` gets."""
    if is_openai_path(path):
        return json.dumps(openai_error(status, message, param)).encode()
    return Failure(error=message).model_dump_json().encode()


def error_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers every failure with ``status`` carries (a 503 says when to retry)."""
    return [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())] if status == 503 else []


async def send_error(
    send: Send, path: str, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with the failure body for ``path`` (``headers`` from the original response are kept)."""
    body = error_body(path, status, message)
    kept = [(k, v) for k, v in headers or [] if k.lower() not in (b"content-length", b"content-type", b"retry-after")]
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    kept += error_headers(status)
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


class FailureBodyMiddleware:
    """Give errors raised before our code runs (by BentoML or Starlette) the service's failure body.

    BentoML validates the request itself (JSON syntax, field types, multipart framing) and answers
    ``{"error": ..., "detail": [...]}``; Starlette answers unknown routes in plain text. Clients
    expect one error shape per API. Successful responses pass straight through; only error
    responses are buffered and rewritten.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.paths = paths or ("/analyze_video", "/analyze_image")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path in self.paths or is_openai_path(path) or is_jobs_path(path)):
            await self.app(scope, receive, send)
            return
        started: Message | None = None
        body = bytearray()

        async def capture(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and message["status"] < 400:
                started = None
                await send(message)
            elif message["type"] == "http.response.start":
                started = message
            elif started is None:
                await send(message)
            else:
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                if _shaped_for(path, bytes(body)):  # our own failure: already the right body
                    await send(started)
                    await send({"type": "http.response.body", "body": bytes(body)})
                else:
                    status = started["status"]
                    await send_error(send, path, status, framework_error_message(bytes(body)), started["headers"])

        await self.app(scope, receive, capture)


def _shaped_for(path: str, body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False
    if is_openai_path(path):
        return isinstance(payload.get("error"), dict)
    return payload.get("status") == "failed"


def framework_error_message(body: bytes) -> str:
    """The message of an error body: ours already, OpenAI's, BentoML's ``{"error", "detail"}``."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "request failed"
    if isinstance(payload, list) and payload:  # BentoML wraps some errors in a 1-tuple
        payload = payload[0]
    if not isinstance(payload, dict):
        return str(payload)
    if payload.get("status") == "failed":
        return str(payload.get("error"))
    if isinstance(payload.get("error"), dict):  # already OpenAI's shape
        return str(payload["error"].get("message"))
    details = payload.get("detail")
    if isinstance(details, list) and details:
        problems, unknown = [], []
        for item in details:
            where = ".".join(str(part) for part in item.get("loc", ())) or "request body"
            if item.get("type") == "extra_forbidden":
                unknown.append(where)
            else:
                problems.append(f"{where}: {item.get('msg', 'invalid')}")
        if unknown:
            problems.append(
                f"{', '.join(unknown)}: not a field of this endpoint; the question and its settings go "
                f'inside metadata, e.g. {{"metadata": {{"{unknown[0]}": ...}}}}'
            )
        return "invalid request: " + "; ".join(problems)
    return str(payload.get("error") or payload.get("detail") or "request failed")
