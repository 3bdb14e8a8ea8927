"""LLaVA-Video as a BentoML service: ask questions about videos and images over HTTP.

    bentoml serve service:LLaVAVideoService

The only module that imports bentoml. Endpoints parse the request, hand plain values to the media
package (files, URLs, frames) and to llava_custom (prompt, generation), and map every failure to
``{"response": "", "status": "failed", "error": ...}`` with a fitting HTTP status. Before BentoML
parses a request, request_guard.RequestGuard checks its size and form and whether the worker is
busy; media decoding runs in child processes under a time limit (media.DecodePool), several
requests at once.

Endpoints are coroutines: blocking work (downloads, decoding, input preparation) runs in worker
threads and the answer is awaited from the engine's stream, so every request in flight can be in
the engine's batch at once, and a client that disconnects is noticed and its request cancelled.
Media is identified by a hash of its bytes: media seen before is not decoded again (the engine
keeps its features and prompt KV cache, llava_custom/reuse.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bentoml
from anyio import to_thread
from pydantic import BaseModel, ValidationError

import media
from llava_custom import reuse
from llava_custom.builder import load_pretrained_model
from llava_custom.engine import Answer, Engine, EngineLimits, GenerationSettings, MediaRef, ReuseCache, TokenStream
from llava_custom.errors import (
    EngineBusy,
    EngineClosed,
    InvalidPrompt,
    LlavaError,
    PromptTooLong,
    RequestCancelled,
    RequestTimeout,
)
from request_guard import RETRY_AFTER_SECONDS, RequestGuard
from schemas import Failure, ImageAnswer, Metadata, Usage, VideoAnswer
from settings import Settings

logger = logging.getLogger("llava_video_service")


class RequestError(Exception):
    """The request itself is malformed: missing or doubled input, bad metadata."""


# Most specific classes first: the first match decides the status.
ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (RequestError, 400),
    (InvalidPrompt, 400),
    (media.InvalidSource, 400),
    (media.MediaTooLarge, 413),
    (PromptTooLong, 413),
    (media.UnsupportedMedia, 415),
    (media.UndecodableMedia, 422),
    (media.UpstreamTimeout, 504),
    (media.UpstreamError, 502),
    (EngineBusy, 503),
    (RequestTimeout, 503),
    (EngineClosed, 503),
    (RequestCancelled, 499),  # nginx's "client closed request": only the access log sees it
]
# How often a request waiting for its answer checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


def status_for(error: Exception) -> int:
    return next((status for cls, status in ERROR_STATUS if isinstance(error, cls)), 500)


@bentoml.service(name="llava_video_service", traffic={"timeout": 900})
class LLaVAVideoService:
    """Loads the model once per worker and answers /analyze_video and /analyze_image."""

    def __init__(self) -> None:
        self.settings = Settings()
        s = self.settings
        # BentoML's server logging shows WARNING and up from other loggers; ours say more.
        for name in (logger.name, "llava_custom", "media"):
            logging.getLogger(name).setLevel(s.log_level)
        logger.info("loading %s (4-bit=%s, device=%s)", s.model, s.load_4bit, s.device)
        loaded = load_pretrained_model(s.model, load_4bit=s.load_4bit, device=s.device, dtype=s.dtype, attn=s.attn)
        limits = EngineLimits(
            max_batch_size=s.max_batch_size,
            max_waiting=s.max_pending_requests,
            kv_cache_tokens=s.kv_cache_tokens,
            prefill_chunk_tokens=s.prefill_chunk_tokens,
            request_timeout=s.request_timeout,
            vision_chunk_frames=s.vision_chunk_frames,
        )
        self.engine = Engine(loaded, limits, ReuseCache(s.feature_cache_bytes, s.prefix_cache_bytes))
        self.engine.check_capacity(s.max_frames, s.max_new_tokens_limit)
        self.fetch_limits = media.FetchLimits(
            max_bytes=s.max_download_bytes,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            total_timeout=s.download_timeout,
            max_redirects=s.max_redirects,
            max_data_url_bytes=s.max_data_url_bytes,
            policy=media.AddressPolicy.from_allowlist(s.url_allowlist),
        )
        self.decoder = media.DecodePool(s.decode_workers, time_limit=s.decode_timeout)
        self.decoder.start()  # their imports overlap the rest of start-up

    @bentoml.on_shutdown
    def close(self) -> None:
        self.decoder.close()
        self.engine.close()

    @bentoml.api(route="/analyze_video")
    async def analyze_video(
        self,
        ctx: bentoml.Context,
        video: Path = None,  # BentoML 1.4 needs this form for an optional upload (not Optional[Path])
        video_url: str = None,
        metadata: Any = None,
    ) -> dict[str, Any]:
        """Answer a question about a video: multipart ``video`` upload or JSON ``video_url``."""
        return await self._respond(ctx, "video", video, video_url, metadata, self._start_video)

    @bentoml.api(route="/analyze_image")
    async def analyze_image(
        self,
        ctx: bentoml.Context,
        image: Path = None,
        image_url: str = None,
        metadata: Any = None,
    ) -> dict[str, Any]:
        """Answer a question about an image: multipart ``image`` upload or JSON ``image_url``."""
        return await self._respond(ctx, "image", image, image_url, metadata, self._start_image)

    async def _respond(
        self,
        ctx: bentoml.Context,
        kind: str,
        upload: Path | None,
        url: str | None,
        metadata: Any,
        start: Callable[[Path, Metadata], Awaitable[tuple[TokenStream, Callable[[Answer], BaseModel]]]],
    ) -> dict[str, Any]:
        """Run one request; every failure becomes the documented error body and status."""
        try:
            meta = parse_metadata(metadata)
            # The input file is gone once decoded, before the answer is generated.
            with tempfile.TemporaryDirectory(prefix="llava-request-") as workdir:
                source = await to_thread.run_sync(self._source_file, kind, upload, url, Path(workdir))
                stream, shape = await start(source, meta)
            return shape(await until_answered(ctx, stream)).model_dump()
        except (RequestError, media.MediaError, LlavaError) as error:
            ctx.response.status_code = status_for(error)
            if ctx.response.status_code == 503:
                ctx.response.headers["retry-after"] = str(RETRY_AFTER_SECONDS)
            return Failure(error=str(error)).model_dump()
        except Exception:  # a bug or a device failure: log it, tell the caller without internals
            logger.exception("%s request failed", kind)
            ctx.response.status_code = 500
            return Failure(error=f"internal error while analysing the {kind}; see the server log").model_dump()

    def _source_file(self, kind: str, upload: Path | None, url: str | None, workdir: Path) -> Path:
        """The local file to read: the upload, or the URL downloaded into ``workdir``."""
        if upload is not None and url:
            raise RequestError(f"send either a '{kind}' file or a '{kind}_url', not both")
        if upload is not None:
            # Under a name of our own: BentoML names the file after the client's file name, and
            # decoders must judge the bytes, not an extension. Our work directory is removed
            # after the request, whatever happens.
            source = workdir / "upload"
            shutil.move(upload, source)
            size = source.stat().st_size
            if size == 0:
                raise media.InvalidSource(f"the uploaded {kind} file is empty")
            if size > self.settings.max_upload_bytes:
                raise media.MediaTooLarge(
                    f"the uploaded {kind} is {size} bytes, over the {self.settings.max_upload_bytes}-byte limit"
                )
            return source
        if url:
            return media.download_to_file(url, workdir, self.fetch_limits)
        raise RequestError(
            f"no {kind} given: upload it as the multipart field '{kind}' "
            f'or send {{"{kind}_url": "https://..."}} as JSON'
        )

    def _generation(self, meta: Metadata) -> GenerationSettings:
        s = self.settings
        max_new_tokens = meta.max_new_tokens or s.max_new_tokens
        if max_new_tokens > s.max_new_tokens_limit:
            raise RequestError(f"max_new_tokens may be at most {s.max_new_tokens_limit}")
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=meta.temperature or 0.0,
            top_p=meta.top_p or 1.0,
            seed=meta.seed,
            ignore_eos=meta.ignore_eos,
        )

    async def _start_video(self, source: Path, meta: Metadata) -> tuple[TokenStream, Callable[[Answer], VideoAnswer]]:
        """Decode the video (unless seen before) and queue the question; returns the stream and
        how to shape its answer."""
        num_frames = meta.num_frames or self.settings.num_frames
        if num_frames > self.settings.max_frames:
            raise RequestError(f"num_frames may be at most {self.settings.max_frames}")
        generation = self._generation(meta)
        key = reuse.video_key(await to_thread.run_sync(media.file_digest, source), num_frames)
        recalled = self.engine.recall(key)
        if recalled is not None:
            frames, info, ref = None, recalled.info, recalled
        else:
            sampled = await to_thread.run_sync(
                lambda: self.decoder.read_video(
                    source,
                    num_frames,
                    chunk_bytes=self.settings.decode_chunk_bytes,
                    frame_size=self.engine.frame_size,
                    max_pixels=self.settings.max_video_pixels,
                )
            )
            frames, info, ref = sampled.frames, sampled.info, MediaRef(key, sampled.info)
        stream = await to_thread.run_sync(
            self.engine.submit_video, frames, info.video_duration, info.frame_times, meta.prompt, generation, ref
        )
        return stream, lambda answer: VideoAnswer(response=answer.text, video_info=info, usage=usage(answer))

    async def _start_image(self, source: Path, meta: Metadata) -> tuple[TokenStream, Callable[[Answer], ImageAnswer]]:
        """Read the image (unless seen before) and queue the question; returns the stream and how
        to shape its answer."""
        generation = self._generation(meta)
        key = reuse.image_key(await to_thread.run_sync(media.file_digest, source))
        ref = self.engine.recall(key)
        image = None
        if ref is None:
            image = await to_thread.run_sync(
                lambda: self.decoder.read_image(source, max_pixels=self.settings.max_image_pixels)
            )
            ref = MediaRef(key)
        stream = await to_thread.run_sync(self.engine.submit_image, image, meta.prompt, generation, ref)
        return stream, lambda answer: ImageAnswer(response=answer.text, usage=usage(answer))


async def until_answered(ctx: bentoml.Context, stream: TokenStream) -> Answer:
    """The stream's whole answer; if the client disconnects first, the request is cancelled."""

    async def cancel_on_disconnect() -> None:
        while not await ctx.request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        logger.info("client disconnected; cancelling its request")
        stream.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        return await stream.result_async()
    finally:
        watcher.cancel()
        stream.cancel()  # a no-op once finished; frees the batch row if this task was cancelled


class FailureBodyMiddleware:
    """Give errors that BentoML raises before our endpoint runs the service's failure body.

    BentoML validates the request itself (JSON syntax, field types, multipart framing) and answers
    ``{"error": ..., "detail": [...]}``; clients of this API expect one error shape everywhere.
    Successful responses pass straight through; only error responses are buffered and rewritten.
    """

    def __init__(self, app: Any, paths: tuple[str, ...] = ("/analyze_video", "/analyze_image")) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if content_type.startswith("multipart/form-data") and "boundary=" not in content_type:
            # Starlette's form parser fails on this with an exception BentoML turns into a 500.
            await send_failure(send, 400, "multipart/form-data request without a boundary; let the client set it")
            return
        started: dict | None = None
        body = bytearray()

        async def capture(message: dict) -> None:
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
                if not message.get("more_body", False):
                    await send_failure(send, started["status"], framework_error_message(bytes(body)), started)

        await self.app(scope, receive, capture)


def framework_error_message(body: bytes) -> str:
    """The message of an error body, ours already or BentoML's ``{"error", "detail"}``."""
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
    details = payload.get("detail")
    if isinstance(details, list) and details:
        problems = []
        for item in details:
            where = ".".join(str(part) for part in item.get("loc", ())) or "request body"
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return "invalid request: " + "; ".join(problems)
    return str(payload.get("error") or "request failed")


async def send_failure(send: Any, status: int, message: str, start: dict | None = None) -> None:
    body = Failure(error=message).model_dump_json().encode()
    headers = [
        (k, v) for k, v in (start or {}).get("headers", []) if k.lower() not in (b"content-length", b"content-type")
    ]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LLaVAVideoService.add_asgi_middleware(FailureBodyMiddleware)
# Added second, so it runs inside FailureBodyMiddleware (its answers already have our body).
LLaVAVideoService.add_asgi_middleware(RequestGuard)


def parse_metadata(raw: Any) -> Metadata:
    """``metadata`` as an object, a JSON string of one, or absent."""
    if raw is None or raw == "":
        return Metadata()
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestError(f"metadata is not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(raw, dict):
        raise RequestError('metadata must be a JSON object such as {"prompt": "..."}')
    try:
        return Metadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors())
        raise RequestError(f"invalid metadata: {problems}") from exc


def usage(answer: Answer) -> Usage:
    return Usage(
        prompt_tokens=answer.prompt_tokens,
        visual_tokens=answer.visual_tokens,
        completion_tokens=answer.completion_tokens,
    )
