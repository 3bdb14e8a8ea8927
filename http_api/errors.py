"""Every failure the HTTP side answers, in one place: which status an error gets, and its body.

:data:`ERROR_STATUS` maps each error class a client can cause (or that says the service is busy)
to its status; :func:`status_for` picks the most specific mapped class of an error by its class
hierarchy (its MRO, as httpx's ``map_exceptions`` does), not by the table's order; anything
unmapped is a fault of the service: 500, logged with its traceback, its message not shown.

:func:`translate` is the one way from an error to what the client gets, for every route and
middleware: an :class:`ErrorReply` in the route's shape (http_api.routes.Shape), sent whole
(:meth:`ErrorReply.response`, :meth:`ErrorReply.send` from ASGI middleware) or as the last event
of a stream whose status is already sent (:meth:`ErrorReply.event`). Native routes and /jobs
answer ``{"response": "", "status": "failed", "error": "..."}``; the OpenAI routes (``/v1/``)
answer OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the same status, so
that the SDK raises its matching exception class. :class:`FailureBodyMiddleware` gives errors
BentoML and Starlette answer by themselves (validation, unknown routes) the same bodies.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

import media
from http_api import record
from http_api.answers import Failure
from http_api.routes import Route, Shape, route_for
from jobs.errors import JobNotFinished, JobRunsElsewhere, JobStoreUnavailable, TooManyJobs, UnknownJob
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

# Seconds a 503 asks the client to wait before retrying.
RETRY_AFTER_SECONDS = 10


class RequestError(Exception):
    """The request itself is malformed: missing or doubled input, bad metadata or parameters.

    ``param`` names the offending request field where one does (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InsufficientStorage(Exception):
    """The disk holding uploads, downloads or the media store is full (or a file-size limit was
    hit): nothing was kept, and the service answers again once there is room."""


# What a write that ran out of room raises (OSError's errno): no space, over quota, file too large.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NO_SPACE_MESSAGE = (
    "the server has no room left to store this request's files (its disk is full); nothing was kept, "
    "try again later or send a smaller file"
)


def no_space(error: BaseException | None) -> bool:
    """Whether ``error`` is a write that ran out of room."""
    return isinstance(error, InsufficientStorage) or (isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS)


# The status of each mapped error class; a subclass gets its nearest mapped ancestor's status
# (media.RefusedAddress is an InvalidSource: 400; media.UpstreamTimeout, an UpstreamError, has
# its own: 504).
ERROR_STATUS: dict[type[Exception], int] = {
    RequestError: 400,
    SegmentPlanError: 400,
    UnknownJob: 404,
    media.UnknownMedia: 404,
    JobNotFinished: 409,
    JobRunsElsewhere: 409,
    InvalidPrompt: 400,
    media.InvalidSource: 400,
    media.MediaTooLarge: 413,
    PromptTooLong: 413,
    media.UnsupportedMedia: 415,
    media.UndecodableMedia: 422,
    media.DecoderStopped: 503,
    media.UpstreamError: 502,
    media.UpstreamTimeout: 504,
    EngineBusy: 503,
    TooManyJobs: 503,
    JobStoreUnavailable: 503,  # Redis down or unreachable: nothing was done, try again
    media.StoreUnavailable: 503,
    RequestTimeout: 503,
    EngineClosed: 503,
    RequestCancelled: 499,  # nginx's "client closed request": only the access log sees it
    InsufficientStorage: 507,  # WebDAV's "Insufficient Storage": the disk is full
}
# The errors a client can cause or that say the service is busy: answered with their status and
# message, never logged as our fault.
CLIENT_ERRORS: tuple[type[Exception], ...] = tuple(ERROR_STATUS)

# OpenAI's error ``type`` and our ``code`` per status.
_OPENAI_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "undecodable_media"),
    499: ("invalid_request_error", "client_closed_request"),
    502: ("upstream_error", "upstream_error"),
    503: ("service_unavailable_error", "service_unavailable"),
    504: ("upstream_error", "upstream_timeout"),
    507: ("server_error", "insufficient_storage"),
}


def status_for(error: BaseException) -> int:
    """The status of the most specific mapped class ``error`` is an instance of (a write that ran
    out of room: 507); 500 if none."""
    if no_space(error):
        return 507
    return _status_of_class(type(error))


def _status_of_class(cls: type) -> int:
    return next((ERROR_STATUS[each] for each in cls.__mro__ if each in ERROR_STATUS), 500)


def status_for_kind(kind: str) -> int:
    """The status of the error class named ``kind`` (its ``__name__``, as a failed job records
    it): the class's own mapping or its nearest mapped ancestor's; 500 if no mapped class or
    subclass of one has that name."""
    pending: list[type] = list(ERROR_STATUS)
    seen: set[type] = set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.__name__ == kind:
            return _status_of_class(cls)
        pending.extend(cls.__subclasses__())
    return 500


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for ``status``."""
    kind, code = _OPENAI_TYPES.get(status, ("server_error", "internal_error"))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ErrorReply:
    """A failure as the client gets it: status, message, and the route's shape of body."""

    status: int
    message: str
    shape: Shape = Shape.NATIVE
    param: str | None = None

    def body(self) -> dict[str, Any]:
        if self.shape is Shape.OPENAI:
            return openai_error(self.status, self.message, self.param)
        return Failure(error=self.message).model_dump()

    def json(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> list[tuple[str, str]]:
        """Headers every failure with this status carries (a 503 or 507 says when to retry)."""
        return [("retry-after", str(RETRY_AFTER_SECONDS))] if self.status in (503, 507) else []

    def response(self) -> JSONResponse:
        """The whole answer, for a Starlette route."""
        return JSONResponse(self.body(), status_code=self.status, headers=dict(self.headers()))

    def event(self) -> str:
        """The last server-sent event of a stream that fails after its 200 was sent."""
        if self.shape is Shape.OPENAI:
            return f"data: {json.dumps(openai_error(self.status, self.message))}\n\n"
        return f"event: error\ndata: {Failure(error=self.message).model_dump_json()}\n\n"

    async def send(self, send: Send, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Answer from ASGI middleware; ``headers`` (e.g. from the original response) are kept
        but for those the body sets."""
        body = self.json()
        own = (b"content-length", b"content-type", b"retry-after")
        kept = [(k, v) for k, v in headers if k.lower() not in own]
        kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        kept += [(name.encode(), value.encode()) for name, value in self.headers()]
        await send({"type": "http.response.start", "status": self.status, "headers": kept})
        await send({"type": "http.response.body", "body": body})


def translate(error: BaseException, shape: Shape, doing: str = "answering") -> ErrorReply:
    """What the client gets for ``error``: a mapped error's status and message, or a 500 that
    tells no internals (the error goes to the request's log line with its traceback)."""
    status = status_for(error)
    if status == 507:
        return ErrorReply(507, NO_SPACE_MESSAGE, shape)
    if status == 500:
        record.note_failure(error, f"failed while {doing}")
        return ErrorReply(500, f"internal error while {doing}; see the server log", shape)
    return ErrorReply(status, str(error), shape, getattr(error, "param", None))


def reply_for(path: str, status: int, message: str) -> ErrorReply:
    """A failure the HTTP side decides itself (guard, key, lifecycle), in ``path``'s shape."""
    return ErrorReply(status, message, route_for(path).shape or Shape.NATIVE)


class FailureBodyMiddleware:
    """Give errors raised before our code runs (by BentoML or Starlette) the service's failure body.

    BentoML validates the request itself (JSON syntax, field types, multipart framing) and answers
    ``{"error": ..., "detail": [...]}``; Starlette answers unknown routes in plain text. Clients
    expect one error shape per API. Successful responses pass straight through; only error
    responses are buffered and rewritten, on every route with a failure shape (http_api.routes).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_for(scope.get("path", ""))
        shape = route.shape
        if scope["type"] != "http" or shape is None:
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
                request = record.current()
                if started["status"] == 500 and request is not None and no_space(request.failure):
                    # BentoML's parsing of the upload ran out of disk: not a fault of the code
                    request.failure = None
                    await ErrorReply(507, NO_SPACE_MESSAGE, shape).send(send, started["headers"])
                elif _shaped_for(shape, bytes(body)):  # our own failure: already the right body
                    await send(started)
                    await send({"type": "http.response.body", "body": bytes(body)})
                else:
                    reply = ErrorReply(started["status"], framework_error_message(bytes(body), route), shape)
                    await reply.send(send, started["headers"])

        await self.app(scope, receive, capture)


def _shaped_for(shape: Shape, body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False
    if shape is Shape.OPENAI:
        return isinstance(payload.get("error"), dict)
    return payload.get("status") == "failed"


def framework_error_message(body: bytes, route: Route | None = None) -> str:
    """The message of an error body: ours already, OpenAI's, BentoML's ``{"error", "detail"}``;
    a field the route does not take is named with the one it meant where that is clear."""
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
        urls = [name for name in unknown if route is not None and route.url_field and name.endswith("url")]
        unknown = [name for name in unknown if name not in urls]
        for name in urls:
            assert route is not None and route.url_field is not None
            problems.append(
                f"{name}: not a field of {route.path}; send the {route.upload}'s URL as '{route.url_field}', "
                f'e.g. {{"{route.url_field}": "https://..."}}'
            )
        if unknown:
            problems.append(
                f"{', '.join(unknown)}: not a field of this endpoint; the question and its settings go "
                f'inside metadata, e.g. {{"metadata": {{"{unknown[0]}": ...}}}}'
            )
        return "invalid request: " + "; ".join(problems)
    return str(payload.get("error") or payload.get("detail") or "request failed")
