"""An ASGI guard in front of the endpoints: body caps, input forms and admission.

It looks at each request before BentoML parses it, on the bytes as they arrive, and answers with
the route's failure body (http_api.errors) when something is wrong:

- 415 unless the body is JSON (or has no Content-Type, which BentoML reads as JSON) or, on the
  native endpoints, multipart/form-data.
- 413 when the body is too large: a declared Content-Length before any byte is read, otherwise
  as soon as the bytes received pass the cap. In multipart bodies the file parts together may
  hold ``max_upload_bytes`` and every other part 1 MiB (Starlette's own limit, which would
  otherwise surface as a 500); JSON bodies may hold ``max_json_bytes``.
- 400 where BentoML would download a URL by itself, bypassing media.fetch's limits and address
  policy: a multipart file field (``video``/``image``) sent as a text part, which
  ``MultipartSerde.ensure_file`` fetches, and a JSON body that is a bare URL string, which
  ``JSONSerde.parse_request`` fetches. A multipart body is parsed with the parser Starlette uses
  (python-multipart) and Starlette's rule (a part is a file iff its Content-Disposition has a
  filename), so the guard sees the parts exactly as BentoML will. Malformed multipart bodies
  (no boundary included: the one rule for them is here) and form values that BentoML's
  ``json.loads`` fails on with more than a JSONDecodeError (bytes in no Unicode encoding, nesting
  too deep), which would be 500s, are answered 400 here.
- 400 for a multipart body with a part of the route (http_api.routes: ``fields``) given twice
  (except ``repeatable`` ones: several ``image`` parts), which BentoML would keep one of
  silently, and for a file part the route does not take
  (``-F file=@clip.mp4``), which BentoML would try to read as JSON; the message names the parts
  the route takes.
- 503 with Retry-After when http_api.admission refuses a request whose body has fully arrived.
- 499 (nginx's "client closed request") instead of BentoML's 500 when the client closes the
  connection before its body is complete: counted and logged as the client's, at INFO.
- 408 for a client too slow to send its body (``body_timeout`` in all, ``body_idle_timeout``
  between pieces), so that a trickling upload holds no connection for long; and a client that
  takes nothing of its answer for ``send_timeout`` (a stream it never reads) is dropped, which
  frees its row of the batch.

The first MiB of a body is inspected before the app starts, so most refusals never reach it.
After a later refusal the app is told that the client disconnected, and its response is dropped.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from http_api.admission import Admission, ServiceBusy
from http_api.errors import Message, Receive, Scope, Send, reply_for
from http_api.limits import GuardLimits
from http_api.routes import Route, route_for
from media.sizes import format_bytes

logger = logging.getLogger("llava_video_service")
MiB = 1024 * 1024
# Starlette's limits for multipart bodies; past them it raises errors that BentoML answers 500.
MAX_FIELD_BYTES = 1 * MiB
MAX_PARTS = 1000
# Room for the non-file parts and the multipart framing in a declared Content-Length.
MULTIPART_OVERHEAD = 2 * MiB
JSON_WHITESPACE = b" \t\r\n"
# Body bytes inspected before the app starts (see _GuardedRequest._read_ahead).
READ_AHEAD_BYTES = 1 * MiB


class Refusal(Exception):
    """A request the guard answers itself."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestGuard:
    """ASGI middleware on the POST requests of the routes http_api.routes marks ``guarded``; the
    route's ``upload`` is the one multipart part BentoML treats as the upload (None: JSON only).
    ``limits`` may be a function that returns them: called when BentoML builds the app in a
    worker, after the settings were checked (service.py passes the settings' guard limits)."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        limits: GuardLimits | Callable[[], GuardLimits],
    ) -> None:
        if callable(limits):
            limits = limits()
        self.app = app
        self.limits = limits
        self.admission = Admission(limits.max_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_for(scope.get("path", ""))
        if scope["type"] != "http" or not route.guarded or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        await _GuardedRequest(self, route, scope, receive, send).run()


class DroppedClientFilter(logging.Filter):
    """On uvicorn's error logger: the incomplete response of a client the guard dropped is the
    client's doing, logged at INFO. (uvicorn says so after the app returned, outside the
    request's context: the guard counts its drops, the filter takes one per message.)"""

    drops = 0  # clients dropped whose closed connection uvicorn has not logged yet

    def filter(self, record: logging.LogRecord) -> bool:
        cls = DroppedClientFilter
        if cls.drops > 0 and record.getMessage().startswith("ASGI callable returned without completing"):
            cls.drops -= 1
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "closed the connection of a client that stopped reading its answer", ()
        return True


def install_dropped_client_filter() -> None:
    """Put :class:`DroppedClientFilter` on uvicorn's error logger (once per process)."""
    uvicorn = logging.getLogger("uvicorn.error")
    if not any(isinstance(each, DroppedClientFilter) for each in uvicorn.filters):
        uvicorn.addFilter(DroppedClientFilter())


class _GuardedRequest:
    """One request's pass through the guard."""

    def __init__(self, guard: RequestGuard, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        self.guard = guard
        self.route = route
        self.limits = guard.limits
        if route.job_upload and guard.limits.max_job_upload_bytes is not None:
            self.limits = dataclasses.replace(guard.limits, max_upload_bytes=guard.limits.max_job_upload_bytes)
        self.scope = scope
        self.receive = receive
        self.send = send
        self.refused = False
        self.body_complete = False
        self.client_left = False  # the connection closed before the whole body came
        self.responding = False
        self.counted = False
        self.inspector: _JsonInspector | _MultipartInspector | _FormInspector | None = None
        self.early: list[Message] = []
        self.began = time.monotonic()
        self.dropped = asyncio.Event()  # the client took nothing of its answer for send_timeout

    async def _next(self) -> Message:
        """The next message from the client; while the body is still coming, a client too slow to
        send it (LLAVA_BODY_TIMEOUT_S in all, LLAVA_BODY_IDLE_TIMEOUT_S between pieces) is refused
        with 408. Once the body is in, waiting (for a disconnect) is not bounded."""
        if self.body_complete:
            return await self._unless_dropped()
        limits = self.limits
        waits = [limits.body_idle_timeout] if limits.body_idle_timeout else []
        if limits.body_timeout:
            waits.append(self.began + limits.body_timeout - time.monotonic())
        if not waits:
            return await self.receive()
        try:
            return await asyncio.wait_for(self.receive(), max(0.0, min(waits)))
        except TimeoutError:
            raise Refusal(408, self._slow_message()) from None

    async def _unless_dropped(self) -> Message:
        """The client's next message, or a disconnect as soon as the guard drops the client."""
        if self.limits.send_timeout is None:
            return await self.receive()
        if self.dropped.is_set():
            return {"type": "http.disconnect"}
        receiving = asyncio.ensure_future(self.receive())
        dropping = asyncio.ensure_future(self.dropped.wait())
        try:
            await asyncio.wait({receiving, dropping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropping.cancel()
            if not receiving.done():
                receiving.cancel()
        return receiving.result() if receiving.done() and not receiving.cancelled() else {"type": "http.disconnect"}

    def _slow_message(self) -> str:
        limits = self.limits
        if limits.body_timeout and time.monotonic() >= self.began + limits.body_timeout:
            return f"the request's body did not arrive within {limits.body_timeout:g} s (LLAVA_BODY_TIMEOUT_S)"
        return (
            f"the request's body stopped arriving: nothing came for {limits.body_idle_timeout:g} s "
            "(LLAVA_BODY_IDLE_TIMEOUT_S)"
        )

    async def run(self) -> None:
        try:
            try:
                self.inspector = self._inspector()
                early = await self._read_ahead()
            except Refusal as refusal:
                await self._refuse(refusal)
                return
            self.early = early
            await self.guard.app(self.scope, self._receive, self._send)
        finally:
            if self.counted:
                self.guard.admission.release()

    async def _read_ahead(self) -> list[Message]:
        """The body's first messages, inspected before the app starts (up to READ_AHEAD_BYTES).

        Most refusals (bare-URL JSON bodies, URL text parts, small bodies of a busy worker)
        then happen before BentoML starts parsing, so it never logs the request as failed.
        """
        early: list[Message] = []
        size = 0
        while size < READ_AHEAD_BYTES:
            message = await self._inspected(await self._next())
            early.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            size += len(message.get("body", b""))
        return early

    def _inspector(self) -> _JsonInspector | _MultipartInspector | _FormInspector:
        content_type = _first_header(self.scope, b"content-type")
        # BentoML picks its parser from this exact, case-sensitive value; so does the guard.
        media_type = (content_type or "").split(";")[0].strip()
        declared = _first_header(self.scope, b"content-length") or ""
        upload_field = self.route.upload
        if media_type == "application/x-www-form-urlencoded" and upload_field is not None:
            # What BentoML's own client sends for a URL input (no file): parsed as a form.
            cap = self.limits.max_json_bytes
            inspector = _FormInspector(self.limits)
        elif media_type == "multipart/form-data" and upload_field is not None:
            cap = self.limits.max_upload_bytes + MULTIPART_OVERHEAD
            inspector: _JsonInspector | _MultipartInspector | _FormInspector = _MultipartInspector(
                content_type or "", self.limits, self.route
            )
        elif media_type in ("application/json", ""):
            cap = self.limits.max_json_bytes
            inspector = _JsonInspector(self.limits.max_json_bytes)
        elif upload_field is None:
            raise Refusal(415, f"unsupported Content-Type {media_type!r}: send application/json")
        else:
            raise Refusal(
                415,
                f"unsupported Content-Type {media_type!r}: send application/json (a URL) "
                "or multipart/form-data (a file upload); a URL-encoded form works too",
            )
        if declared.isdigit() and int(declared) > cap:
            raise Refusal(413, _too_large_message(media_type, self.limits))
        return inspector

    async def _receive(self) -> Message:
        if self.early:
            return self.early.pop(0)
        if self.refused:
            return {"type": "http.disconnect"}
        try:
            return await self._inspected(await self._next())
        except Refusal as refusal:
            if self.responding:  # too late to answer differently; BentoML never gets here
                raise
            await self._refuse(refusal)
            return {"type": "http.disconnect"}

    async def _inspected(self, message: Message) -> Message:
        """``message`` after checking it; raises Refusal."""
        if message["type"] == "http.disconnect" and not self.body_complete:
            self.client_left = True
        if message["type"] == "http.request":
            more = bool(message.get("more_body", False))
            assert self.inspector is not None
            self.inspector.feed(message.get("body", b""), more)
            if not more:
                self.body_complete = True
                self._admit()
        return message

    def _admit(self) -> None:
        """Count the request as waiting for the model, or refuse it when too many already are."""
        if self.counted:
            return
        try:
            self.guard.admission.admit()
        except ServiceBusy as busy:
            raise Refusal(503, str(busy)) from busy
        self.counted = True

    async def _send(self, message: Message) -> None:
        if self.client_left and message["type"] == "http.response.start" and not self.refused:
            # BentoML answers a body cut off by the client with a 500 (Starlette's ClientDisconnect
            # reaches its catch-all): it is the client's doing, counted and logged as nginx's 499.
            await self._refuse(Refusal(499, "the client closed the connection before its request was complete"))
            return
        if not self.refused:  # after a refusal the client already has its answer
            self.responding = True
            if self.limits.send_timeout is None:
                await self.send(message)
                return
            if self.dropped.is_set():
                return
            try:
                await asyncio.wait_for(self.send(message), self.limits.send_timeout)
            except TimeoutError:
                # A client that takes nothing of its answer (a stream it never reads) holds a row
                # of the batch: the app is told it disconnected (a stream then cancels its
                # request), and uvicorn closes the connection once the app returns.
                logger.info(
                    "the client took nothing of its answer for %g s (LLAVA_SEND_TIMEOUT_S): dropped",
                    self.limits.send_timeout,
                )
                self.dropped.set()
                DroppedClientFilter.drops += 1

    async def _refuse(self, refusal: Refusal) -> None:
        self.refused = True
        # Without the whole body read, the connection is closed rather than left half-read.
        headers = [] if self.body_complete else [(b"connection", b"close")]
        await reply_for(self.scope["path"], refusal.status, refusal.message).send(self.send, headers)


class _JsonInspector:
    """JSON bodies: a size cap, and the first value must be an object (not a bare URL)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.received = 0
        self.checked_start = False

    def feed(self, chunk: bytes, more: bool) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise Refusal(413, f"the JSON body is larger than {format_bytes(self.max_bytes)}")
        if not self.checked_start:
            start = chunk.lstrip(JSON_WHITESPACE)[:1]
            if start and start != b"{":
                raise Refusal(400, 'the JSON body must be an object such as {"video_url": "https://..."}')
            self.checked_start = bool(start)


class _MultipartInspector:
    """Multipart bodies, parsed as Starlette parses them: part kinds, part sizes, framing.

    BentoML hands the endpoint's upload field on as a file and JSON-decodes every other part
    (``json.loads`` on the text, or on the bytes of a file part). It catches only
    JSONDecodeError there, so the guard refuses the values that make ``json.loads`` raise
    anything else (undecodable bytes, nesting too deep), which would be 500s.
    """

    def __init__(self, content_type: str, limits: GuardLimits, route: Route) -> None:
        self.limits = limits
        self.route = route
        self.upload_field = route.upload
        self.seen: set[str] = set()
        _, params = parse_options_header(content_type)
        self.charset = _charset(params)
        boundary = params.get(b"boundary", b"")
        if not boundary:
            raise Refusal(400, "multipart/form-data request without a boundary; let the client set it")
        self.upload_bytes = 0
        self.files = 0
        self.fields = 0
        self.part_is_file = False
        self.part_name = ""
        self.part_data: bytearray | None = None  # kept for parts BentoML JSON-decodes
        self.disposition = b""
        self.header_name = b""
        self.header_value = b""
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        try:
            self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except (FormParserError, ValueError) as exc:
            raise Refusal(400, "the multipart boundary is invalid") from exc

    def feed(self, chunk: bytes, more: bool) -> None:
        try:
            self.parser.write(chunk)
            if not more:
                self.parser.finalize()
        except FormParserError as exc:
            raise Refusal(400, "the multipart/form-data body is malformed") from exc

    def _on_part_begin(self) -> None:
        self.part_is_file = False
        self.part_name = ""
        self.part_data = None
        self.disposition = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value  # the last one wins, as in Starlette
        self.header_name = self.header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise Refusal(400, 'every multipart part needs a Content-Disposition header with a name="..."')
        self.part_name = _user_safe_decode(options[b"name"], self.charset)
        self.part_is_file = b"filename" in options
        if self.part_name in self.route.fields:
            # BentoML would keep one and drop the other silently
            if self.part_name in self.seen and self.part_name not in self.route.repeatable:
                raise Refusal(400, f"the '{self.part_name}' part is given twice; send one")
            self.seen.add(self.part_name)
        elif self.part_is_file:  # e.g. -F file=@clip.mp4: BentoML would JSON-decode the file
            raise Refusal(
                400,
                f"the '{self.part_name}' part is not one {self.route.path} takes: it takes "
                f"{self.route.describe_fields()}, e.g. curl -F '{self.upload_field}=@file'",
            )
        self.files += self.part_is_file
        self.fields += not self.part_is_file
        if max(self.files, self.fields) > MAX_PARTS:
            raise Refusal(400, f"the multipart body has more than {MAX_PARTS} files or fields")
        if not self.part_is_file and self.part_name in self.limits.file_fields:
            raise Refusal(
                400,
                f"the '{self.part_name}' part must be a file upload (curl -F '{self.part_name}=@file'); "
                f'to send a URL, post JSON {{"{self.part_name}_url": "https://..."}}',
            )
        if not (self.part_is_file and self.part_name in self.route.uploads):
            self.part_data = bytearray()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part_is_file:
            self.upload_bytes += end - start
            if self.upload_bytes > self.limits.max_upload_bytes:
                raise Refusal(413, _too_large_message("multipart/form-data", self.limits))
        if self.part_data is not None:
            self.part_data += data[start:end]
            if len(self.part_data) > MAX_FIELD_BYTES:
                raise Refusal(413, f"the '{self.part_name}' part is larger than {format_bytes(MAX_FIELD_BYTES)}")

    def _on_part_end(self) -> None:
        if self.part_data is None:
            return
        data = bytes(self.part_data)
        value = data if self.part_is_file else _user_safe_decode(data, self.charset)
        try:
            json.loads(value)
        except json.JSONDecodeError:
            pass  # BentoML then passes the text on as it is
        except (ValueError, RecursionError) as exc:  # undecodable bytes, nesting too deep
            raise Refusal(400, f"the '{self.part_name}' part is neither text nor JSON that can be read") from exc


class _FormInspector:
    """URL-encoded forms: every field is text, so a file field given here would be a URL that
    BentoML downloads by itself; the values it JSON-decodes must not make ``json.loads`` fail
    with more than a JSONDecodeError. Checked on the whole body (at most ``max_json_bytes``)."""

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.body = bytearray()

    def feed(self, chunk: bytes, more: bool) -> None:
        self.body += chunk
        if len(self.body) > self.limits.max_json_bytes:
            raise Refusal(413, f"the form is larger than {format_bytes(self.limits.max_json_bytes)}")
        if more:
            return
        try:
            fields = parse_qsl(self.body.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError) as exc:
            raise Refusal(400, "the URL-encoded form is not valid UTF-8") from exc
        for name, value in fields:
            if name in self.limits.file_fields:
                raise Refusal(
                    400,
                    f"the '{name}' field must be a file upload (multipart/form-data, curl -F '{name}=@file'); "
                    f"to send a URL, use the '{name}_url' field",
                )
            try:
                json.loads(value)
            except json.JSONDecodeError:
                pass  # BentoML then passes the text on as it is
            except (ValueError, RecursionError) as exc:
                raise Refusal(400, f"the '{name}' field is neither text nor JSON that can be read") from exc


def _too_large_message(media_type: str, limits: GuardLimits) -> str:
    if media_type == "multipart/form-data":
        return f"the upload is larger than the {format_bytes(limits.max_upload_bytes)} limit; send a smaller file"
    return f"the JSON body is larger than {format_bytes(limits.max_json_bytes)}"


def _first_header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header, as Starlette's ``Headers.get`` returns it."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _charset(params: dict[bytes, bytes]) -> str:
    """The charset Starlette decodes part names with."""
    charset = params.get(b"charset", b"utf-8")
    try:
        return codecs.lookup(charset.decode("latin-1")).name
    except LookupError:
        return "latin-1"


def _user_safe_decode(value: bytes, codec: str) -> str:
    try:
        return value.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return value.decode("latin-1")
