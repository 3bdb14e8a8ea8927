"""What is known about the request being answered, filled in by whoever learns it.

The request log (http_api.request_log) opens a :class:`RequestRecord` for each request and writes
its line from it; the code answering the request adds the decoding time, the token stream and
the exception behind a 500. A module of its own so that the error translator (http_api.errors)
can note a fault without importing the request log, which imports it.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger("llava_video_service.request")


class Timed(Protocol):
    """What the log reads from a request's token stream (llava_custom.streaming.TokenStream)."""

    @property
    def queue_seconds(self) -> float | None: ...


@dataclass
class RequestRecord:
    """What is known about the request being answered, filled in by whoever learns it."""

    request_id: str
    decode_seconds: float | None = None
    stream: Timed | None = None
    failure: BaseException | None = None
    durations: dict[str, float] = field(default_factory=dict)


current_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("llava_request", default=None)


def current() -> RequestRecord | None:
    """The record of the request this code runs for (None outside a request)."""
    return current_record.get()


def note_decode(seconds: float) -> None:
    """Time spent reading the media (download excluded): decoding in a child, or recalling it."""
    if (record := current_record.get()) is not None:
        record.decode_seconds = (record.decode_seconds or 0.0) + seconds


def note_stream(stream: Timed) -> None:
    """The request's token stream, whose queue time the line reports."""
    if (record := current_record.get()) is not None:
        record.stream = stream


def note_failure(error: BaseException, what: str) -> None:
    """The exception behind a 500 (or a stream that broke off): the request's line carries its
    traceback; outside a request it is logged at once, as ``what``."""
    if (record := current_record.get()) is not None:
        record.failure = error
    else:
        logger.error(what, exc_info=error)
