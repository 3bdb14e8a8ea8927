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

import functools
import json
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
from http_api.schemas import Metadata, VideoSampling
from llava_custom.engine import Answer
from media import workdirs


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
    images: list[Path] | None = None,
    image_urls: str | list[str] | None = None,
    media_id: str | list[str] | None = None,
) -> dict[str, Any] | Response:
    """Run one native request; every failure becomes the documented failure body and status.

    ``upload`` / ``url`` are the video's on /analyze_video; ``images`` / ``image_urls`` the
    images in the order sent (on /analyze_video, after the video); ``media_id`` (or
    ``metadata.media_id``) names stored media instead: on /analyze_video the video, then any
    images beside it (one id or a list); on /analyze_image the images."""
    try:
        try:
            meta = Metadata.parse(metadata)
        except ValueError as error:
            raise RequestError(str(error), "metadata") from error
        if media_id is not None and meta.media_id is not None:
            raise RequestError("send 'media_id' either beside metadata or inside it, not both", "media_id")
        ids = _ids(media_id if media_id is not None else meta.media_id)
        pictures = _pictures(kind, upload, url, images, image_urls, ids)
        current = analyzer()
        generation = meta.generation(current.defaults)
        kinds = [picture[0] for picture in pictures]
        # Frame sampling applies (and is checked) only when a video is there.
        sampling = meta.sampling(current.defaults) if "video" in kinds else VideoSampling()
        current.check_pictures(kinds, sampling, generation)
        # The input files are gone once decoded, before the answer is generated.
        with workdirs.request_folder() as workdir:
            sources = []
            for number, (picture_kind, picture_upload, picture_url, picture_id) in enumerate(pictures):
                read = functools.partial(current.read_source, name=f"upload-{number}")
                sources.append(
                    await to_thread.run_sync(read, picture_kind, picture_upload, picture_url, picture_id, Path(workdir))
                )
            started = await current.start_pictures(sources, sampling, meta.prompt, generation, meta.return_frames)
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


Picture = tuple[Kind, Path | None, str | None, str | None]  # kind, upload, URL, stored media id


def _ids(media_id: str | list[str] | None) -> list[str]:
    """The stored media a request names, in order: on /analyze_video the video, then any images
    beside it; on /analyze_image the images."""
    return [media_id] if isinstance(media_id, str) else list(media_id or [])


def _pictures(
    kind: Kind,
    upload: Path | None,
    url: str | None,
    images: list[Path] | None,
    image_urls: str | list[str] | None,
    ids: list[str] = (),  # type: ignore[assignment]
) -> list[Picture]:
    """The request's pictures in order, each (kind, upload, URL, id) with one of them; a missing
    or doubled one is left to Analyzer.read_source, whose message names the fields."""
    uploads = list(images or [])
    urls = [image_urls] if isinstance(image_urls, str) else list(image_urls or [])
    if kind == "video":
        images_given: list[Picture] = [("image", path, None, None) for path in uploads]
        images_given += [("image", None, link, None) for link in urls]
        images_given += [("image", None, None, media_id) for media_id in ids[1:]]
        if sum(map(bool, (uploads, urls, ids[1:]))) > 1:
            raise RequestError(
                "send the images either as 'image' files, as 'image_url's or as 'media_id's, not two of these"
            )
        return [("video", upload, url, ids[0] if ids else None), *images_given]
    if ids:
        if uploads or urls:
            raise RequestError("send the images either as files, as 'image_url's or as 'media_id's, not two of these")
        return [("image", None, None, media_id) for media_id in ids]
    if len(uploads) + len(urls) == 2 and len(uploads) == 1:
        return [("image", uploads[0], urls[0], None)]  # one of each: read_source says which to send
    if uploads and urls:
        raise RequestError("send the images either as 'image' files or as 'image_url's, not both")
    given: list[Picture] = [("image", path, None, None) for path in uploads]
    given += [("image", None, link, None) for link in urls]
    return given or [("image", None, None, None)]


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
        return ImageAnswer(response=answer.text, usage=usage, frames=started.frames, pictures=started.pictures)
    return VideoAnswer(
        response=answer.text,
        video_info=started.video_info,
        usage=usage,
        frames=started.frames,
        pictures=started.pictures,
    )


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
