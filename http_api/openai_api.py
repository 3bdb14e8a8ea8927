"""OpenAI-compatible routes, mounted under ``/v1``: chat completions (streamed or not) and models.

Requests are what the ``openai`` SDK and vLLM clients send: ``messages`` with string content or
content parts ``text``, ``image_url`` and ``video_url`` (vLLM's part for videos), each URL an
http(s) URL fetched through media.fetch's guarded client or a base64 ``data:`` URL. Answers and
stream chunks are the ``openai`` package's own pydantic types, so they are what the SDK parses.
LLaVA's own controls travel in the body beside OpenAI's parameters, as vLLM does it
(``num_frames``, ``fps``, ``start_time``, ``end_time``, ``top_k``, ``ignore_eos``); from the SDK, in
``extra_body``. Errors are OpenAI's error object with the status the native endpoints give.

Any user turn may hold images and videos, in order, up to LLAVA_MAX_IMAGES_PER_REQUEST and
LLAVA_MAX_VIDEOS_PER_REQUEST over the conversation; each turn's pictures open its text as the
original code lays them out (docs/ENGINE.md). Earlier turns and answers are kept as the
conversation's history (and a follow-up about the same media reuses the work done for the earlier
turns: llava_custom/reuse.py). Conversations without a picture go to the language model alone.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from anyio import to_thread
from openai.types import CompletionUsage, Model
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
)
from openai.types.chat import chat_completion as completion
from openai.types.chat import chat_completion_chunk as chunk
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import media
from http_api import files_api
from http_api.analysis import Analyzer, Source, Started, until_answered
from http_api.errors import ErrorReply, RequestError, translate
from http_api.routes import Shape
from http_api.schemas import ChatMessage, ChatRequest, VideoSampling
from llava_custom.engine import Answer, Conversation, GenerationSettings, TokenLogprob, Turn
from media import MediaLibrary, workdirs

logger = logging.getLogger("llava_video_service")
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


@dataclass(frozen=True)
class Picture:
    """An image, video or file part of the conversation, in order (its turn is the one it came
    in): a URL, a stored file's id (its kind known once it is looked up), or vLLM's ``uuid``
    with the URL (the medium is kept under it) or without (the medium kept)."""

    kind: Literal["image", "video"] | None
    url: str | None = None
    uuid: str | None = None
    file_id: str | None = None

    @property
    def uuid_key(self) -> str:
        """The store's id of the medium a client named ``uuid`` (per kind, as vLLM's are)."""
        return f"uuid:{self.kind}:{self.uuid}"


def create_app(analyzer: Callable[[], Analyzer], library: Callable[[], MediaLibrary] | None = None) -> Starlette:
    """The ``/v1`` app; ``analyzer`` returns the worker's Analyzer (it exists once the model
    loaded), ``library`` its media store, for the files API (http_api.files_api)."""

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON")
        try:
            return await _chat(analyzer(), request, body)
        except Exception as error:  # a bug or a device failure is logged; the caller gets no internals
            return translate(error, Shape.OPENAI).response()

    async def models(request: Request) -> Response:
        served = Model(id=analyzer().model_id, created=0, object="model", owned_by="llava-video-service")
        return JSONResponse({"object": "list", "data": [served.model_dump()]})

    return Starlette(
        routes=[
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
            *(files_api.routes(library, Shape.OPENAI, "/files") if library is not None else []),
        ]
    )


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return ErrorReply(status, message, Shape.OPENAI, param).response()


async def _chat(analyzer: Analyzer, request: Request, body: Any) -> Response:
    chat = parse_request(body)
    if chat.model is not None and chat.model != analyzer.model_id:
        return _error(
            404, f"the model {chat.model!r} does not exist; this service serves {analyzer.model_id!r}", "model"
        )
    conversation, pictures = conversation_from(chat.messages)
    generation = chat.generation(analyzer.defaults)
    sampling = chat.sampling(analyzer.defaults)
    with workdirs.request_folder() as workdir:
        started = await _start(analyzer, conversation, pictures, sampling, generation, Path(workdir))
    logprobs = _LogprobsWriter(analyzer) if chat.logprobs else None
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if chat.stream:
        include_usage = bool((chat.stream_options or {}).get("include_usage"))
        events = _events(started, response_id, created, analyzer.model_id, include_usage, logprobs)
        return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    answer = await until_answered(started.stream, request.is_disconnected)
    reply = ChatCompletion(
        id=response_id,
        object="chat.completion",
        created=created,
        model=analyzer.model_id,
        choices=[
            completion.Choice(
                index=0,
                message=ChatCompletionMessage(role="assistant", content=answer.text),
                finish_reason=answer.finish_reason,
                logprobs=logprobs.choice(answer.logprobs or ()) if logprobs else None,
            )
        ],
        usage=usage(answer),
    )
    return JSONResponse(reply.model_dump(exclude_unset=True))


def parse_request(body: Any) -> ChatRequest:
    """The validated request; RequestError names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with 'model' and 'messages'")
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as exc:
        where, message = _first_problem(exc)
        if not where:  # a rule across fields
            raise RequestError(f"invalid request: {message.removeprefix('Value error, ')}") from exc
        raise RequestError(f"invalid request: {where}: {message}", where) from exc
    if chat.n != 1:
        raise RequestError("n must be 1: this service returns one choice per request; send it again for another", "n")
    if chat.tools:
        raise RequestError("tools (function calling) are not supported by this model", "tools")
    if chat.response_format and chat.response_format.get("type") not in (None, "text"):
        raise RequestError("only text responses are supported (response_format type 'text')", "response_format")
    stops = [chat.stop] if isinstance(chat.stop, str) else chat.stop or []
    if len(stops) > MAX_STOP_SEQUENCES or any(not stop for stop in stops):
        raise RequestError(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    if chat.top_logprobs is not None and not chat.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return chat


def _first_problem(exc: ValidationError) -> tuple[str, str]:
    """The deepest problem, its location without pydantic's union branch names (``str``,
    ``list[...]``), and a hint for a content part that is not an object."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not (isinstance(part, str) and (part in _BRANCHES or "[" in part))]
        problems.append((len(loc), ".".join(loc), error["msg"]))
    _, where, message = max(problems, key=lambda problem: problem[0])
    parts = where.split(".")
    if len(parts) == 4 and parts[0] == "messages" and parts[2] == "content" and "dictionary" in message:
        message = 'each content part must be an object such as {"type": "text", "text": "..."}'
    return where, message


_BRANCHES = {"str", "int", "float", "bool", "none", "list"}


def conversation_from(messages: list[ChatMessage]) -> tuple[Conversation, list[Picture]]:
    """The conversation as the prompt takes it (each user turn opened by its pictures) and its
    pictures in order; RequestError when the model could not take the messages."""
    system: list[str] = []
    turns: list[Turn] = []
    pictures: list[Picture] = []
    for number, message in enumerate(messages):
        where = f"messages.{number}"
        if message.tool_calls:
            raise RequestError("tool calls are not supported by this model", f"{where}.tool_calls")
        count = 0
        if isinstance(message.content, str) or message.content is None:
            text = message.content or ""
        else:
            texts = []
            for part in message.content:
                if part["type"] == "text":
                    texts.append(part["text"])
                    continue
                if message.role != "user":
                    raise RequestError(f"only user messages may hold an image or a video ({where})", where)
                pictures.append(_picture(part, f"{where}.content.{len(texts) + count}"))
                count += 1
            text = "\n".join(texts)
        if message.role in ("system", "developer"):
            if turns:
                raise RequestError("system messages must come before the conversation's turns", where)
            system.append(text)
        else:
            turns.append(Turn(message.role, text, count))
    if not turns or turns[-1].role != "user":
        raise RequestError("the last message must be the user's", "messages")
    return Conversation(tuple(turns), "\n".join(system) if system else None), pictures


def _picture(part: dict[str, Any], where: str) -> Picture:
    """The picture of an ``image_url``, ``video_url`` or ``file`` content part."""
    if part["type"] == "file":
        file = part["file"]
        if not file.get("file_id"):
            raise RequestError(
                "a file part takes the 'file_id' of a stored file (POST /v1/files); send inline media as an "
                "image_url or video_url part",
                f"{where}.file.file_id",
            )
        return Picture(None, file_id=file["file_id"])
    kind: Literal["image", "video"] = "image" if part["type"] == "image_url" else "video"
    link = part[part["type"]]
    uuid = part.get("uuid")
    if link is None and not uuid:
        raise RequestError(
            f"the {part['type']} part has no URL: send one, or the 'uuid' of a medium sent before", where
        )
    return Picture(kind, url=None if link is None else link["url"], uuid=uuid or None)


async def _start(
    analyzer: Analyzer,
    conversation: Conversation,
    pictures: list[Picture],
    sampling: VideoSampling,
    generation: GenerationSettings,
    workdir: Path,
) -> Started:
    if not pictures:
        return await analyzer.start_text(conversation, generation)
    pictures = [await _with_kind(analyzer, picture) for picture in pictures]
    analyzer.check_pictures([picture.kind or "image" for picture in pictures], sampling, generation)
    sources = [await to_thread.run_sync(_source, analyzer, picture, workdir) for picture in pictures]  # in order
    started = await analyzer.start_pictures(sources, sampling, conversation, generation)
    for picture, source in zip(pictures, sources, strict=True):
        if picture.uuid and picture.url is not None and analyzer.library is not None:
            await to_thread.run_sync(_remember, analyzer.library, picture, source)
    return started


async def _with_kind(analyzer: Analyzer, picture: Picture) -> Picture:
    """A file part's picture with the kind its stored file was found to be at upload."""
    if picture.file_id is None:
        return picture
    if analyzer.library is None:
        raise media.UnknownMedia(f"no file {picture.file_id!r}: this service keeps no media store")
    record = await to_thread.run_sync(analyzer.library.store.get, picture.file_id)
    return Picture(record.kind, file_id=picture.file_id)


def _source(analyzer: Analyzer, picture: Picture, workdir: Path) -> Source:
    """The picture's file in the request's folder: fetched, or read from the store (blocking)."""
    assert picture.kind is not None  # file parts have theirs from _with_kind
    if picture.file_id is not None:
        return analyzer.stored_source(picture.file_id, workdir, picture.kind)
    if picture.url is None:  # vLLM's uuid alone: the medium sent with it before
        try:
            return analyzer.stored_source(picture.uuid_key, workdir, picture.kind)
        except media.UnknownMedia as error:
            raise media.UnknownMedia(
                f"no {picture.kind} with uuid {picture.uuid!r} is held here (never sent with its data, expired "
                f"or evicted): send it again with its {picture.kind}_url"
            ) from error
    path = analyzer.source_file(picture.kind, None, picture.url, workdir)
    return Source(picture.kind, path, media.file_digest(path) if picture.uuid else None)


def _remember(library: MediaLibrary, picture: Picture, source: Source) -> None:
    """Keep a medium sent with a uuid, so that a later request may send the uuid alone."""
    assert picture.kind is not None and source.digest is not None
    try:
        library.remember(source.path, picture.kind, source.digest, picture.uuid_key)
    except media.MediaError as error:  # e.g. larger than the store: answered anyway, not kept
        logger.warning("the %s with uuid %r is not kept: %s", picture.kind, picture.uuid, error)


class _LogprobsWriter:
    """OpenAI's logprobs of generated tokens: text, exact bytes, log-probability, alternatives."""

    def __init__(self, analyzer: Analyzer) -> None:
        self.token_text = analyzer.engine.token_text

    def choice(self, logprobs: Sequence[TokenLogprob]) -> completion.ChoiceLogprobs:
        return completion.ChoiceLogprobs(content=[self._token(item) for item in logprobs])

    def chunk(self, logprobs: Sequence[TokenLogprob]) -> chunk.ChoiceLogprobs:
        return chunk.ChoiceLogprobs(content=[self._token(item) for item in logprobs])

    def _token(self, item: TokenLogprob) -> ChatCompletionTokenLogprob:
        text, raw = self.token_text(item.token_id)
        top = [TopLogprob(token=t, bytes=list(b), logprob=lp) for t, b, lp in self._alternatives(item)]
        return ChatCompletionTokenLogprob(token=text, bytes=list(raw), logprob=item.logprob, top_logprobs=top)

    def _alternatives(self, item: TokenLogprob) -> list[tuple[str, bytes, float]]:
        return [(*self.token_text(token_id), logprob) for token_id, logprob in item.top]


def usage(answer: Answer) -> CompletionUsage:
    """OpenAI's usage, plus the prompt's visual tokens as an extra field."""
    return CompletionUsage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        total_tokens=answer.prompt_tokens + answer.completion_tokens,
        visual_tokens=answer.visual_tokens,
    )


async def _events(
    started: Started,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
    logprobs: _LogprobsWriter | None,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the role first, the text as it comes, the
    finish reason once, usage when asked, then ``[DONE]``. A client that goes away cancels the
    generation (Starlette stops iterating, ``finally`` cancels the stream)."""

    def event(choices: list[chunk.Choice], answer: Answer | None = None) -> str:
        piece = ChatCompletionChunk(
            id=response_id, object="chat.completion.chunk", created=created, model=model, choices=choices
        )
        if answer is not None:
            piece.usage = usage(answer)
        return f"data: {piece.model_dump_json(exclude_unset=True)}\n\n"

    stream = started.stream
    try:
        yield event([chunk.Choice(index=0, delta=chunk.ChoiceDelta(role="assistant", content=""))])
        answer: Answer | None = None
        async for delta in stream:
            if delta.text or (logprobs and delta.logprobs):
                # With logprobs, every token gets its chunk, even one whose text is still incomplete.
                choice_logprobs = logprobs.chunk(delta.logprobs) if logprobs else None
                content = chunk.ChoiceDelta(content=delta.text)
                yield event([chunk.Choice(index=0, delta=content, logprobs=choice_logprobs)])
            if delta.finish_reason is not None:
                answer = delta.answer
                yield event([chunk.Choice(index=0, delta=chunk.ChoiceDelta(), finish_reason=delta.finish_reason)])
        if include_usage and answer is not None:
            yield event([], answer)
    except Exception as error:  # the headers are sent: the error goes into the stream
        yield translate(error, Shape.OPENAI).event()
    finally:
        stream.cancel()  # a no-op once finished
    yield "data: [DONE]\n\n"
