"""The native endpoints' answers: the JSON body, or server-sent events when metadata asks to stream.

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
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from http_api import request_log
from http_api.analysis import Started
from http_api.errors import CLIENT_ERRORS
from http_api.schemas import Failure, ImageAnswer, Usage, VideoAnswer
from llava_custom.engine import Answer


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
    except CLIENT_ERRORS as error:
        yield _event("error", Failure(error=str(error)).model_dump_json())
    except Exception as error:
        request_log.note_failure(error, "streamed request failed")
        yield _event("error", Failure(error="internal error while answering; see the server log").model_dump_json())
    finally:
        stream.cancel()  # a no-op once finished; stops the generation of a client that left


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"
