"""From a request's media and question to the engine's token stream, for every route alike.

The native endpoints and the OpenAI routes both come here: the input file (an upload moved
under a name of ours, or a URL / ``data:`` URL fetched through media.fetch's guarded client),
its content hash and the engine's reuse cache (media seen before is not decoded again),
decoding in the media package's child processes, and the engine's queue. Blocking work runs in
worker threads, so the event loop stays free for other requests.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from anyio import to_thread

import media
from http_api import frames as previews
from http_api import request_log
from http_api.answers import Frame, PictureUsage
from http_api.errors import RequestError
from http_api.metrics import Metrics
from http_api.schemas import VideoSampling
from llava_custom import reuse
from llava_custom.engine import (
    Answer,
    Conversation,
    Engine,
    GenerationSettings,
    ImageInput,
    MediaRef,
    Picture,
    TokenStream,
    VideoInput,
)
from llava_custom.errors import PromptTooLong
from media import VideoInfo

if TYPE_CHECKING:  # settings.py imports the packages' limits: a runtime import would be a circle
    from settings import Settings

logger = logging.getLogger("llava_video_service")
Kind = Literal["video", "image"]
# A single question (None: the default one) or a whole conversation about the media.
Question = str | Conversation | None


@dataclass(frozen=True)
class Source:
    """A picture of a request as a local file: an upload, a download or a stored medium (whose
    ``digest`` is known already, so its bytes are not hashed again)."""

    kind: Kind
    path: Path
    digest: str | None = None


@dataclass(frozen=True)
class Started:
    """A request in the engine: its token stream, the video's timing for a video, and the
    pictures the model was given when the request asked for them (``return_frames``)."""

    stream: TokenStream
    video_info: VideoInfo | None = None
    frames: list[Frame] | None = None
    pictures: list[PictureUsage] | None = None  # several pictures: each one's kind and tokens


class Analyzer:
    """Turns validated requests into engine streams; shared by all routes of one worker."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        decoder: media.DecodePool,
        reading: media.VideoReading,
        metrics: Metrics | None = None,
        library: media.MediaLibrary | None = None,
    ) -> None:
        self.settings = settings
        self.library = library  # media sent once and referred to by id (None: no store)
        self.engine = engine
        self.decoder = decoder
        self.reading = reading  # how videos are decoded, for requests and jobs alike
        self.defaults = settings.request_defaults()  # what requests get for the fields they leave out
        self.metrics = metrics
        self.fetch_limits = settings.fetch_limits()
        self.job_fetch_limits = settings.fetch_limits(max_bytes=settings.max_job_bytes)
        self.model_id = settings.model_id

    def source_file(
        self,
        kind: Kind,
        upload: Path | None,
        url: str | None,
        workdir: Path,
        *,
        job: bool = False,
        name: str = "upload",
    ) -> Path:
        """The local file to read: the upload (moved to ``workdir / name``), or the URL downloaded
        into ``workdir`` (blocking); a ``job``'s video may be as large as LLAVA_MAX_JOB_BYTES."""
        if upload is not None and url:
            raise RequestError(f"send either a '{kind}' file or a '{kind}_url', not both")
        if upload is not None:
            # Under a name of our own: BentoML names the file after the client's file name, and
            # decoders must judge the bytes, not an extension. The caller removes ``workdir``
            # after the request, whatever happens.
            source = workdir / name
            if upload != source:
                shutil.move(upload, source)
            size, limit = source.stat().st_size, self.settings.max_job_bytes if job else self.settings.max_upload_bytes
            if size == 0:
                raise media.InvalidSource(f"the uploaded {kind} file is empty")
            if size > limit:
                raise media.MediaTooLarge(
                    f"the uploaded {kind} is {media.format_bytes(size)}, over the {media.format_bytes(limit)} limit"
                )
            return source
        if url:
            return media.download_to_file(url, workdir, self.job_fetch_limits if job else self.fetch_limits)
        raise RequestError(
            f"no {kind} given: upload it as the multipart field '{kind}' "
            f'or send {{"{kind}_url": "https://..."}} as JSON'
        )

    def read_source(
        self,
        kind: Kind,
        upload: Path | None,
        url: str | None,
        media_id: str | None,
        workdir: Path,
        *,
        job: bool = False,
        name: str = "upload",
        id_field: str = "media_id",
    ) -> Source:
        """:meth:`source_file`, or the stored medium ``media_id`` (read from the store, neither
        uploaded nor downloaded); ``id_field`` is the request's name for the id, for messages."""
        if media_id is None:
            return Source(kind, self.source_file(kind, upload, url, workdir, job=job, name=name))
        if upload is not None or url:
            raise RequestError(f"send either a '{kind}' file, a '{kind}_url' or a '{id_field}', not two of them")
        return self.stored_source(media_id, workdir, kind, job=job)

    def stored_source(self, media_id: str, workdir: Path, kind: Kind | None = None, *, job: bool = False) -> Source:
        """The stored medium ``media_id`` linked into ``workdir`` (blocking); of ``kind`` when given,
        else of the kind it was found to be at upload. A video for a request, not a job, must be
        within LLAVA_MAX_UPLOAD_BYTES as an upload would."""
        if self.library is None:
            raise media.UnknownMedia(f"no file {media_id!r}: this service keeps no media store")
        record, path = self.library.use(media_id, workdir, kind)
        limit = self.settings.max_job_bytes if job else self.settings.max_upload_bytes
        if record.bytes > limit:
            raise media.MediaTooLarge(
                f"the file {media_id!r} is {media.format_bytes(record.bytes)}, over the "
                f"{media.format_bytes(limit)} a request may read; analyse it as a job (/jobs/submit with its file_id)"
            )
        return Source(record.kind, path, record.digest)

    async def start_video(
        self,
        source: Path,
        sampling: VideoSampling,
        question: Question,
        generation: GenerationSettings,
        return_frames: bool = False,
        digest: str | None = None,
    ) -> Started:
        """Decode the video's frames (unless seen before) and queue the question; ``sampling`` as
        a request's ``sampling(defaults)`` returns it (with its frame count). With
        ``return_frames`` the frames are decoded even when the video's features are recalled (the
        cache keeps features, not pixels): decoding is deterministic, so they are the frames the
        features were made from."""
        num_frames = sampling.num_frames
        if not num_frames:
            raise ValueError("start_video takes a request's sampling(defaults), with its frame count")
        span = {"fps": sampling.fps, "start_time": sampling.start_time, "end_time": sampling.end_time}
        key = reuse.video_key(digest or await to_thread.run_sync(media.file_digest, source), num_frames, **span)
        recalled = self.engine.recall(key)
        sampled = None
        if recalled is None or return_frames:
            sampled = await self._read_video(source, num_frames, span)
        shown = None
        if return_frames and sampled is not None:
            shown = await to_thread.run_sync(previews.video_frames, sampled.frames, sampled.info.frame_times)
        if recalled is not None:  # the model gets the recalled features; decoded frames are only shown
            frames, info, ref = None, recalled.info, recalled
        else:
            assert sampled is not None  # nothing recalled: decoded above
            frames, info, ref = sampled.frames, sampled.info, MediaRef(key, sampled.info)
        stream = await to_thread.run_sync(
            self.engine.submit_video, frames, info.video_duration, info.frame_times, question, generation, ref
        )
        return self._started(stream, info, shown)

    async def _read_video(self, source: Path, num_frames: int, span: dict[str, float | None]) -> media.SampledVideo:
        began = time.monotonic()
        sampled = await to_thread.run_sync(
            lambda: self.decoder.read_video(source, num_frames, **self.reading.options(), **span)
        )
        self._decoded("video", began, sampled.info.frame_count)
        return sampled

    def check_pictures(self, kinds: Sequence[Kind], sampling: VideoSampling, generation: GenerationSettings) -> None:
        """Refuse, before anything is downloaded or decoded, more pictures than the limits allow,
        or several whose visual tokens alone (images as padded tiles, videos at ``sampling``'s
        frame count) and the answer could never fit the context or the KV budget."""
        images, videos = kinds.count("image"), kinds.count("video")
        if images > self.defaults.max_images:
            raise RequestError(
                f"{images} images in one request; at most {self.defaults.max_images} (LLAVA_MAX_IMAGES_PER_REQUEST)",
                "messages",
            )
        if videos > self.defaults.max_videos:
            raise RequestError(
                f"{videos} videos in one request; at most {self.defaults.max_videos} (LLAVA_MAX_VIDEOS_PER_REQUEST)",
                "messages",
            )
        if len(kinds) < 2:
            return  # one picture: its tokens are known once it is read (the engine checks them)
        model = self.engine.model
        visual = images * model.image_layout.padded_tokens
        visual += videos * model.video_layout.num_video_tokens(sampling.num_frames or self.defaults.num_frames)
        room = min(self.engine.context_length, self.engine.scheduler.limits.kv_cache_tokens)
        if visual + generation.max_new_tokens > room:
            raise PromptTooLong(
                f"the prompt is too long: {images} images and {videos} videos take {visual} visual tokens, "
                f"which with max_new_tokens={generation.max_new_tokens} is more than the {room} tokens a request "
                "may hold; send fewer pictures, fewer frames or ask for a shorter answer"
            )

    async def start_pictures(
        self,
        sources: Sequence[Source],
        sampling: VideoSampling,
        question: Question,
        generation: GenerationSettings,
        return_frames: bool = False,
    ) -> Started:
        """Read every picture (those seen before are recalled) and queue the question about all of
        them, in order; one picture goes the way of start_video / start_image. ``video_info`` is
        the first video's; ``return_frames`` shows every picture's, in order."""
        if len(sources) == 1:
            only = sources[0]
            if only.kind == "image":
                return await self.start_image(only.path, question, generation, return_frames, only.digest)
            return await self.start_video(only.path, sampling, question, generation, return_frames, only.digest)
        pictures: list[Picture] = []
        shown: list[Frame] | None = [] if return_frames else None
        info = None
        for each in sources:
            kind, source = each.kind, each.path
            digest = each.digest or await to_thread.run_sync(media.file_digest, source)
            if kind == "video":
                video, frames = await self._video_input(source, digest, sampling, return_frames)
                info = info or video.media.info
                pictures.append(video)
            else:
                image, frames = await self._image_input(source, reuse.image_key(digest, padded=True), return_frames)
                pictures.append(image)
            if shown is not None:
                shown.extend(frames)
        engine = self.engine
        prepared = await to_thread.run_sync(engine.prepare, question, pictures, generation)
        stream = await to_thread.run_sync(engine.submit, prepared)
        usage = [
            PictureUsage(
                kind="video" if isinstance(picture, VideoInput) else "image",
                visual_tokens=item.tokens,
                video_info=picture.media.info if isinstance(picture, VideoInput) else None,
            )
            for picture, item in zip(pictures, prepared.items, strict=True)
        ]
        return self._started(stream, info, shown, usage)

    async def _video_input(
        self, source: Path, digest: str, sampling: VideoSampling, return_frames: bool
    ) -> tuple[VideoInput, list[Frame]]:
        num_frames = sampling.num_frames or self.defaults.num_frames
        span = {"fps": sampling.fps, "start_time": sampling.start_time, "end_time": sampling.end_time}
        key = reuse.video_key(digest, num_frames, **span)
        recalled = self.engine.recall(key)
        sampled = None
        if recalled is None or return_frames:
            sampled = await self._read_video(source, num_frames, span)
        shown: list[Frame] = []
        if return_frames and sampled is not None:
            shown = await to_thread.run_sync(previews.video_frames, sampled.frames, sampled.info.frame_times)
        if recalled is not None:
            return VideoInput(None, recalled.info.video_duration, recalled.info.frame_times, recalled), shown
        assert sampled is not None  # nothing recalled: decoded above
        info = sampled.info
        return VideoInput(sampled.frames, info.video_duration, info.frame_times, MediaRef(key, info)), shown

    async def _image_input(self, source: Path, key: str, return_frames: bool) -> tuple[ImageInput, list[Frame]]:
        recalled = self.engine.recall(key)
        image = None
        if recalled is None or return_frames:
            began = time.monotonic()
            image = await to_thread.run_sync(
                lambda: self.decoder.read_image(source, max_pixels=self.settings.max_image_pixels)
            )
            self._decoded("image", began)
        shown = await to_thread.run_sync(previews.image_frame, image) if return_frames else []
        if recalled is not None:
            return ImageInput(None, recalled), shown
        return ImageInput(image, MediaRef(key)), shown

    async def start_image(
        self,
        source: Path,
        question: Question,
        generation: GenerationSettings,
        return_frames: bool = False,
        digest: str | None = None,
    ) -> Started:
        """Read the image (unless seen before, or ``return_frames`` asks for it) and queue the question."""
        key = reuse.image_key(digest or await to_thread.run_sync(media.file_digest, source))
        recalled = self.engine.recall(key)
        image = shown = None
        if recalled is None or return_frames:
            began = time.monotonic()
            image = await to_thread.run_sync(
                lambda: self.decoder.read_image(source, max_pixels=self.settings.max_image_pixels)
            )
            self._decoded("image", began)
        if return_frames:
            shown = await to_thread.run_sync(previews.image_frame, image)
        if recalled is not None:
            image, ref = None, recalled  # the model gets the recalled features
        else:
            ref = MediaRef(key)
        stream = await to_thread.run_sync(self.engine.submit_image, image, question, generation, ref)
        return self._started(stream, frames=shown)

    async def start_text(self, conversation: Conversation, generation: GenerationSettings) -> Started:
        """Queue a conversation about no media (the language model alone)."""
        return self._started(await to_thread.run_sync(self.engine.submit_text, conversation, generation))

    def _decoded(self, kind: str, began: float, frames: int = 0) -> None:
        seconds = time.monotonic() - began
        request_log.note_decode(seconds)
        if self.metrics is not None:
            self.metrics.decoded(kind, seconds, frames)

    def _started(
        self,
        stream: TokenStream,
        info: VideoInfo | None = None,
        frames: list[Frame] | None = None,
        pictures: list[PictureUsage] | None = None,
    ) -> Started:
        request_log.note_stream(stream)
        if self.metrics is not None:
            stream.on_answer(self.metrics.answered)  # however the answer is read: whole or streamed
        return Started(stream, info, frames, pictures)


# How often a request waiting for its answer checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


async def until_answered(stream: TokenStream, is_disconnected: Callable[[], Awaitable[bool]]) -> Answer:
    """The stream's whole answer; if the client disconnects first, the request is cancelled."""

    async def cancel_on_disconnect() -> None:
        while not await is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        logger.info("client disconnected; cancelling its request")
        stream.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        return await stream.result_async()
    finally:
        watcher.cancel()
        stream.cancel()  # a no-op once finished; frees the batch row if this task was cancelled
