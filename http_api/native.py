"""The native endpoints (/analyze_video, /analyze_image): the request run through the Analyzer,
answered with the JSON body, or server-sent events when metadata asks to stream.

service.py declares the endpoints (BentoML parses the upload, the URL and ``metadata``) and hands
them to :func:`analyze`; every failure becomes the route's failure body and status
(http_api.errors.translate).

A streamed answer is a sequence of events::

    event: delta
    data: {"text": "A man"}

    event: answer
    data: {"response": "A man walks...", "status": "success", "video_info": {...}, "usage": {...}}

The ``delta`` texts join to the answer's ``response``; ``answer`` is exactly the body the request
gets without streaming. With ``metadata.return_frames`` a ``frames`` event (``{"frames": [...]}``)
comes first, before any ``delta``, so a page can show the frames while the answer is generated;
the ``answer`` event then leaves them out rather than send them twice. A failure after the stream
started (the status is already 200) ends it with ``event: error`` and the failure body.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from http_api.analysis import Analyzer, Kind, Started, until_answered
from http_api.answers import ImageAnswer, Usage, VideoAnswer
from http_api.errors import RequestError, translate
from http_api.routes import Shape
from http_api.schemas import Metadata
from llava_custom.engine import Answer


class Context(Protocol):
    """What :func:`analyze` uses of ``bentoml.Context``: the request, and the response's status
    and headers (BentoML sets them on whatever the endpoint returns)."""

    @property
    def request(self) -> Request: ...

    @property
    def response(self) -> Any: ...


async def analyze(
    analyzer: Callable[[], Analyzer],
    kind: Kind,
    upload: Path | None,
    url: str | None,
    metadata: Any,
    ctx: Context,
) -> dict[str, Any] | Response:
    """Run one native request; every failure becomes the documented failure body and status."""
    try:
        try:
            meta = Metadata.parse(metadata)
        except ValueError as error:
            raise RequestError(str(error), "metadata") from error
        # The input file is gone once decoded, before the answer is generated.
        with tempfile.TemporaryDirectory(prefix="llava-request-") as workdir:
            source = await to_thread.run_sync(analyzer().source_file, kind, upload, url, Path(workdir))
            started = await _start(analyzer(), kind, source, meta)
        if meta.stream:
            return event_stream(started)
        answer = await until_answered(started.stream, ctx.request.is_disconnected)
        return answer_body(answer, started).model_dump()
    except Exception as error:
        reply = translate(error, Shape.NATIVE, f"analysing the {kind}")
        ctx.response.status_code = reply.status
        for name, value in reply.headers():
            ctx.response.headers[name] = value
        return reply.body()


async def _start(analyzer: Analyzer, kind: Kind, source: Path, meta: Metadata) -> Started:
    generation = meta.generation(analyzer.defaults)
    if kind == "image":
        return await analyzer.start_image(source, meta.prompt, generation, meta.return_frames)
    sampling = meta.sampling(analyzer.defaults)
    return await analyzer.start_video(source, sampling, meta.prompt, generation, meta.return_frames)


def refuse_unknown_fields(spec: type) -> type:
    """The endpoint's input model (a BentoML IODescriptor, a pydantic model), refusing fields it
    does not have (BentoML ignores them): a top-level ``prompt`` or form field ``num_frames``
    must not be dropped silently. The failure body then points to ``metadata``
    (http_api.errors.framework_error_message)."""
    return type(spec.__name__, (spec,), {"__module__": spec.__module__, "model_config": {"extra": "forbid"}})


def answer_body(answer: Answer, started: Started) -> ImageAnswer | VideoAnswer:
    """The success body of a native endpoint."""
    usage = Usage(
        prompt_tokens=answer.prompt_tokens,
        visual_tokens=answer.visual_tokens,
        completion_tokens=answer.completion_tokens,
    )
    if started.video_info is None:
        return ImageAnswer(response=answer.text, usage=usage, frames=started.frames)
    return VideoAnswer(response=answer.text, video_info=started.video_info, usage=usage, frames=started.frames)


def event_stream(started: Started) -> StreamingResponse:
    """The answer as server-sent events; a client that goes away cancels the generation."""
    return StreamingResponse(_events(started), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def _events(started: Started) -> AsyncIterator[str]:
    stream = started.stream
    try:
        if started.frames is not None:
            frames = [frame.model_dump() for frame in started.frames]
            yield _event("frames", json.dumps({"frames": frames}))
        async for delta in stream:
            if delta.text:
                yield _event("delta", json.dumps({"text": delta.text}))
            if delta.answer is not None:
                body = answer_body(delta.answer, started).model_dump_json(exclude={"frames"})
                yield _event("answer", body)
    except Exception as error:  # the 200 is sent: the failure is the stream's last event
        yield translate(error, Shape.NATIVE, "answering").event()
    finally:
        stream.cancel()  # a no-op once finished; stops the generation of a client that left


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"
