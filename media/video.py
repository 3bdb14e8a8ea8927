"""Sample frames from a video file the way the official LLaVA-Video example does.

Frames are decoded uniformly over the whole video (or over a segment of it, optionally at a given
rate: see :func:`read_video`), one at a time, and each is turned upright and resized as soon as it
is decoded, by a small thread pool while the decoder goes on with the next frame. At most
``chunk_bytes`` of full-resolution frames are held at once (always at least one), so this
module's memory stays bounded by that budget and the sampled (resized) frames, whatever the
video's length or resolution: a 64 MiB budget is 2 frames at 2160p, 10 at 1080p, 97 at 360p.

Before any decoder sees a file, :mod:`media.container` probes it with PyAV under a demuxer
allow-list. That check decides between "not a supported video" and "damaged video", keeps
decord away from inputs it mishandles (it reads a plain text file as a 25 fps video; FFmpeg
demuxers such as HLS or concat would open other files or URLs named inside the input), and
chooses the decoder. PyAV decodes every stream whose frames it returns exactly as decord's
``get_batch`` (8-bit YUV, which is nearly every video) and every stream decord gets wrong (open
GOPs, AV1, rotated videos, timestamps that are not presentation times): it decodes one frame at a
time, so the decoder's own memory stays bounded too. decord, as the LLaVA-Video example uses, keeps
the rest (10-bit 4:2:0, where the two convert colour edges differently, and formats never
compared); its reader queues the compressed stream ahead, up to the rest of the file, and its
thread decodes and converts frames ahead (see docs/BENCHMARKS.md). Either way the frame count and
average fps are the ones decord reports, so frame times do not depend on the decoder.
Frames come out upright as a player shows them (the stream's display matrix is applied).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from decord import DECORDError, VideoReader, cpu
from PIL import Image

from media.container import Orientation, VideoProbe, decode_frames, probe_video
from media.errors import SegmentOutsideVideo, UndecodableMedia

# Average frame rates outside this range are treated as broken metadata.
_MIN_FPS, _MAX_FPS = 0.01, 1000.0
_FALLBACK_FPS = 1.0
# Full-resolution frames held at once while decoding: 2 frames at 2160p, 10 at 1080p, 97 at 360p.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
_UNDECODABLE_FRAMES = (
    "some video frames could not be decoded; the file may be damaged or truncated, send the complete file"
)


@dataclass(frozen=True)
class VideoInfo:
    """Timing of the sampled frames, as reported to the caller and written into the prompt."""

    frame_count: int  # number of frames sampled
    video_duration: float  # seconds = total_frames / average_fps
    frame_times: list[float]  # seconds of each sampled frame = index / average_fps


@dataclass(frozen=True)
class VideoReading:
    """How this server decodes a video, for a request's frames and a job's segments alike: the
    size frames are resized to (the vision tower's), the pixel limit and the memory budget."""

    frame_size: tuple[int, int] | None = None
    max_pixels: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def options(self) -> dict[str, object]:
        """:func:`read_video`'s keyword arguments."""
        return {"frame_size": self.frame_size, "max_pixels": self.max_pixels, "chunk_bytes": self.chunk_bytes}


@dataclass(frozen=True)
class SampledVideo:
    """Frames sampled from one video plus what is needed to describe them."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB, resized to frame_size if given
    frame_indices: list[int]
    total_frames: int
    average_fps: float
    info: VideoInfo


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Indices of ``min(num_frames, total_frames)`` frames spread uniformly over the whole video.

    Same as the LLaVA-Video example (``np.linspace(0, total_frames - 1, N, dtype=int)``), except
    that N is capped at ``total_frames``: a video shorter than ``num_frames`` gives each of its
    frames once instead of duplicates.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    count = min(num_frames, total_frames)
    return np.linspace(0, total_frames - 1, count, dtype=int).tolist()


def read_video(
    path: Path,
    num_frames: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    frame_size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    threads: int | None = None,
    fps: float | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
) -> SampledVideo:
    """Decode up to ``num_frames`` uniformly sampled RGB frames from ``path``.

    Without ``fps``, ``start_time`` and ``end_time`` this samples ``min(num_frames,
    total_frames)`` frames over the whole video, as the LLaVA-Video example does. ``start_time``
    and ``end_time`` (seconds) narrow the analysed span to the frames whose time (index /
    average fps) lies in [start_time, end_time]; the frames are spread over them by the same
    rule (see :func:`segment_frame_indices`). ``fps`` samples at that rate over the span instead:
    ``min(num_frames, max(1, floor(span_seconds * fps)))`` frames, the span being the video's
    duration cut to [start_time, end_time]. Frame times and the duration stay those of the whole
    video.

    ``frame_size=(width, height)`` resizes every frame with Pillow bicubic (what the SigLIP image
    processor does) right after it is decoded and turned upright. At most ``chunk_bytes`` of
    full-resolution frames (at least one frame) are held at once; ``threads`` resize them while
    the next frame decodes (default: one fewer than the CPUs, at least one; 0 resizes in the
    decoding thread). The result is the same for any ``chunk_bytes`` and ``threads``. Frame times
    and duration use the average fps; when that is missing or absurd (0, NaN, outside
    0.01..1000) the container's stated rate is used, else 1.0 fps.

    Raises ValueError for bad arguments (negative or non-finite times, ``end_time <=
    start_time``, ``fps <= 0``), UnsupportedMedia (not a supported video, no video stream),
    MediaTooLarge (frames over ``max_pixels`` pixels), SegmentOutsideVideo (``start_time`` at or
    past the end of the video, or no frame between ``start_time`` and ``end_time``) or
    UndecodableMedia (empty, damaged or truncated file, no decodable frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if frame_size is not None and min(frame_size) < 1:
        raise ValueError(f"frame_size must be positive (width, height), got {frame_size}")
    _check_sampling(fps, start_time, end_time)
    probe, reader, total_frames, average_fps = _timing(path, max_pixels)
    if fps is None and start_time is None and end_time is None:
        indices = sample_frame_indices(total_frames, num_frames)
    else:
        indices = segment_frame_indices(total_frames, average_fps, num_frames, fps, start_time, end_time)
    decoded = _decord_frames(reader, indices) if reader is not None else decode_frames(path, probe, indices)
    reader = None  # the generator closes it after the last frame
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) - 1)  # the decoder keeps one CPU busy
    frames = _collect(decoded, len(indices), probe.orientation, frame_size, chunk_bytes, threads)
    info = VideoInfo(
        frame_count=len(indices),
        video_duration=total_frames / average_fps,
        frame_times=[index / average_fps for index in indices],
    )
    return SampledVideo(
        frames=frames,
        frame_indices=indices,
        total_frames=total_frames,
        average_fps=average_fps,
        info=info,
    )


def video_duration(path: Path, *, max_pixels: int | None = None) -> float:
    """The video's length in seconds as :func:`read_video` reports it (``video_duration``),
    without decoding frames; raises as read_video does for files it cannot read."""
    _, _, total_frames, average_fps = _timing(path, max_pixels)
    return total_frames / average_fps


def _timing(path: Path, max_pixels: int | None) -> tuple[VideoProbe, VideoReader | None, int, float]:
    """The probe, decord's reader when decord decodes this stream, the frame count and average fps."""
    probe = probe_video(path, max_pixels=max_pixels)
    if probe.decoder == "decord":
        reader = _open_reader(path)
        total_frames = len(reader)
        decoder_fps = reader.get_avg_fps()
    else:
        reader = None
        total_frames = probe.frame_count
        decoder_fps = probe.average_fps
    if total_frames < 1:
        raise UndecodableMedia("the video has no decodable frames; check that the file plays")
    return probe, reader, total_frames, _average_fps(decoder_fps, probe.stated_fps)


def segment_frame_indices(
    total_frames: int,
    average_fps: float,
    num_frames: int,
    fps: float | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
) -> list[int]:
    """Indices of the frames to sample from the span [start_time, end_time] (seconds).

    The span's frames are those whose time ``index / average_fps`` lies in it. Of them,
    ``min(num_frames, max(1, floor(span_seconds * fps)))`` (or ``num_frames`` without ``fps``)
    are spread uniformly with :func:`sample_frame_indices`' rule, so that without a segment and
    fps the result is exactly :func:`sample_frame_indices`. ``span_seconds`` is the duration
    ``total_frames / average_fps`` cut to [start_time, end_time].

    Raises SegmentOutsideVideo when ``start_time`` is at or past the end, or no frame lies in the span.
    """
    _check_sampling(fps, start_time, end_time)
    duration = total_frames / average_fps
    start = 0.0 if start_time is None else start_time
    end = duration if end_time is None else min(end_time, duration)
    if start >= duration:
        raise SegmentOutsideVideo(
            f"start_time {start:g} s is at or past the end of the video ({duration:.3f} s long); "
            "choose a start_time inside the video"
        )
    first = _first_frame_at_or_after(start, average_fps)
    last = min(total_frames - 1, _last_frame_at_or_before(end, average_fps))
    if first > last:
        raise SegmentOutsideVideo(
            f"no frame of the video lies between {start:g} s and {end:g} s (it has a frame every "
            f"{1 / average_fps:.3f} s); widen the segment"
        )
    count = num_frames
    if fps is not None:
        # The epsilon keeps (2.3 - 2.0) s x 10 fps = 2.99999... from flooring to 2 frames.
        count = min(num_frames, max(1, math.floor((end - start) * fps + 1e-9)))
    return [first + offset for offset in sample_frame_indices(last - first + 1, count)]


def _check_sampling(fps: float | None, start_time: float | None, end_time: float | None) -> None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    for name, value in (("start_time", start_time), ("end_time", end_time)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value}")
    if start_time is not None and end_time is not None and end_time <= start_time:
        raise ValueError(f"end_time ({end_time}) must be after start_time ({start_time})")


def _first_frame_at_or_after(seconds: float, average_fps: float) -> int:
    """The smallest index whose time ``index / average_fps`` is >= ``seconds``."""
    index = math.ceil(seconds * average_fps)
    # seconds * fps may round across a whole number: check against the times themselves.
    if index > 0 and (index - 1) / average_fps >= seconds:
        index -= 1
    elif index / average_fps < seconds:
        index += 1
    return index


def _last_frame_at_or_before(seconds: float, average_fps: float) -> int:
    """The largest index whose time ``index / average_fps`` is <= ``seconds``."""
    index = math.floor(seconds * average_fps)
    if (index + 1) / average_fps <= seconds:
        index += 1
    elif index / average_fps > seconds:
        index -= 1
    return index


def _open_reader(path: Path) -> VideoReader:
    try:
        return VideoReader(str(path), ctx=cpu(0), num_threads=1)
    except (DECORDError, RuntimeError) as exc:
        raise UndecodableMedia(
            "the video stream could not be decoded; the file may be damaged, try re-encoding it as H.264 MP4"
        ) from exc


def _average_fps(decoder_fps: float | None, container_fps: float | None) -> float:
    """The decoder's average fps if plausible, else the container's stated rate, else 1.0."""
    for fps in (decoder_fps, container_fps):
        if fps is not None and math.isfinite(fps) and _MIN_FPS <= fps <= _MAX_FPS:
            return float(fps)
    return _FALLBACK_FPS


def _collect(
    decoded: Iterable[np.ndarray],
    count: int,
    orientation: Orientation,
    frame_size: tuple[int, int] | None,
    chunk_bytes: int,
    threads: int,
) -> np.ndarray:
    """Store each decoded frame, upright and resized, into one preallocated (N, H, W, 3) array.

    With ``threads``, a frame goes to the pool as soon as it is decoded, and the next one is
    decoded only once it fits in ``chunk_bytes`` with the frames still waiting or resizing.
    """
    frames: np.ndarray | None = None
    held = 1  # full-resolution frames allowed at once, set from the first frame's size
    stored = 0
    pending: deque[Future[None]] = deque()  # frames handed to the pool, oldest first
    with ThreadPoolExecutor(threads) if threads else nullcontext() as pool:
        for frame in decoded:
            if frames is None:
                height, width = _upright_shape(frame.shape[:2], orientation)
                width, height = frame_size or (width, height)
                frames = np.empty((count, height, width, 3), np.uint8)
                held = max(1, chunk_bytes // frame.nbytes)
            if pool is None:
                _store(frames, stored, frame, orientation, frame_size)
            else:
                pending.append(pool.submit(_store, frames, stored, frame, orientation, frame_size))
            stored += 1
            del frame  # only the pool may hold it while the next one decodes
            while len(pending) >= held:  # make room for the frame decoded next
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    if frames is None or stored != count:
        raise UndecodableMedia(_UNDECODABLE_FRAMES)
    return frames


def _upright_shape(shape: tuple[int, int], orientation: Orientation) -> tuple[int, int]:
    return (shape[1], shape[0]) if orientation.transpose else shape


def _store(
    frames: np.ndarray,
    position: int,
    frame: np.ndarray,
    orientation: Orientation,
    frame_size: tuple[int, int] | None,
) -> None:
    upright = frame if orientation.is_identity else orientation.apply(frame)
    frames[position] = _resize(upright, frame_size) if frame_size else upright


def _decord_frames(reader: VideoReader, indices: list[int]) -> Iterator[np.ndarray]:
    # No local variable holds a yielded frame while the next one decodes. The reader is closed
    # as soon as the last frame is out: decord's thread would otherwise go on decoding (and
    # converting to RGB) the rest of the file while the last frames are resized.
    *firsts, last = indices
    for index in firsts:
        yield _decord_frame(reader, index)
    frame = _decord_frame(reader, last)
    del reader
    yield frame


def _decord_frame(reader: VideoReader, index: int) -> np.ndarray:
    """Frame ``index`` without copies: what get_batch([index]) returns, before its batch copy."""
    try:
        # get_batch does exactly this for each index, then copies the frame into its batch
        # array; asnumpy() would copy it once more.
        reader.seek_accurate(index)
        frame = np.from_dlpack(_DLPackFrame(reader.next()))
    except (DECORDError, RuntimeError, StopIteration) as exc:  # next() stops at the end of a cut file
        raise UndecodableMedia(_UNDECODABLE_FRAMES) from exc
    if frame.ndim != 3 or frame.shape[2] != 3:  # get_batch fails on such frames too
        raise UndecodableMedia(_UNDECODABLE_FRAMES)
    return frame


class _DLPackFrame:
    """A decord NDArray as numpy's ``from_dlpack`` takes it: the array shares decord's memory.

    decord 0.6.0's NDArray has ``to_dlpack()`` but not the ``__dlpack__`` protocol numpy asks for.
    The capsule keeps the NDArray alive for as long as the numpy array lives.
    """

    def __init__(self, array: object) -> None:
        self._array = array

    def __dlpack__(self, **_: object) -> object:
        return self._array.to_dlpack()  # type: ignore[attr-defined]

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: decord decodes on the CPU here


def _resize(frame: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    # Pillow copies the frame into its own 4-bytes-per-pixel image and releases the GIL while
    # resizing, so pool threads resize in parallel with decoding.
    return np.asarray(Image.fromarray(frame).resize(frame_size, Image.Resampling.BICUBIC))
