"""Sample frames from a video file the way the official LLaVA-Video example does.

Frames are decoded with decord, uniformly over the whole video, in chunks, so that memory stays
bounded by ``chunk_size`` full-resolution frames plus the sampled (optionally resized) frames,
whatever the video's length or resolution.

Before decord sees a file, PyAV probes it with a demuxer allow-list. That check decides between
"not a supported video" and "damaged video", and it keeps decord away from inputs it mishandles:
decord happily reads a plain text file as a 25 fps video, and FFmpeg demuxers such as HLS or
concat would open other files or URLs named inside the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from decord import DECORDError, VideoReader, cpu
from PIL import Image

from media.errors import UndecodableMedia, UnsupportedMedia

# FFmpeg demuxers we let through (matched against any of a demuxer's comma-separated names).
# These are the containers for which decord 0.6.0 returned the right frames in our tests;
# it returned wrong frames for MPEG-TS, MPEG-PS and some ASF/WMV files, so those are refused.
_ALLOWED_DEMUXERS = "mov,matroska,avi,flv"
_SUPPORTED_CONTAINERS = "MP4/MOV, MKV/WebM, AVI or FLV"
# decord 0.6.0 bundles FFmpeg 4.1, which has no AV1 software decoder.
_UNSUPPORTED_CODECS = frozenset({"av1"})
# Average frame rates outside this range are treated as broken metadata.
_MIN_FPS, _MAX_FPS = 0.01, 1000.0
_FALLBACK_FPS = 1.0


@dataclass(frozen=True)
class VideoInfo:
    """Timing of the sampled frames, as reported to the caller and written into the prompt."""

    frame_count: int  # number of frames sampled
    video_duration: float  # seconds = total_frames / average_fps
    frame_times: list[float]  # seconds of each sampled frame = index / average_fps


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
    chunk_size: int = 8,
    frame_size: tuple[int, int] | None = None,
) -> SampledVideo:
    """Decode ``min(num_frames, total_frames)`` uniformly sampled RGB frames from ``path``.

    ``frame_size=(width, height)`` resizes every frame with Pillow bicubic (what the SigLIP image
    processor does) right after its chunk is decoded. The result is the same for any
    ``chunk_size``. Frame times and duration use decord's average fps; when that is missing or
    absurd (0, NaN, outside 0.01..1000) the container's stated rate is used, else 1.0 fps.

    Raises UnsupportedMedia (not a supported video, no video stream, unsupported codec) or
    UndecodableMedia (empty, damaged or truncated file, no decodable frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if frame_size is not None and min(frame_size) < 1:
        raise ValueError(f"frame_size must be positive (width, height), got {frame_size}")
    container_fps = _probe_video_container(path)
    reader = _open_reader(path)
    total_frames = len(reader)
    if total_frames < 1:
        raise UndecodableMedia("the video has no decodable frames; check that the file plays")
    fps = _average_fps(reader.get_avg_fps(), container_fps)
    indices = sample_frame_indices(total_frames, num_frames)
    frames = _decode_frames(reader, indices, chunk_size, frame_size)
    info = VideoInfo(
        frame_count=len(indices),
        video_duration=total_frames / fps,
        frame_times=[index / fps for index in indices],
    )
    return SampledVideo(
        frames=frames,
        frame_indices=indices,
        total_frames=total_frames,
        average_fps=fps,
        info=info,
    )


def _probe_video_container(path: Path) -> float | None:
    """Check that ``path`` is a supported video; return its stated frame rate, if any."""
    if path.stat().st_size == 0:
        raise UndecodableMedia("the video file is empty (0 bytes); send the complete file")
    try:
        # A file object rather than a path: FFmpeg then opens no protocol of its own.
        with (
            path.open("rb") as file,
            av.open(
                file,
                container_options={"format_whitelist": _ALLOWED_DEMUXERS},
                metadata_errors="ignore",  # odd tag encodings must not fail the probe
            ) as container,
        ):
            return _first_video_stream_rate(container)
    except av.error.FFmpegError as exc:
        if _has_supported_container_signature(path):
            raise UndecodableMedia(
                "the video file is damaged or incomplete (its container could not be read); send the complete file"
            ) from exc
        raise UnsupportedMedia(
            f"the file is not a video in a supported container ({_SUPPORTED_CONTAINERS}); "
            "if it is an image, send it as an image"
        ) from exc


def _first_video_stream_rate(container: av.container.InputContainer) -> float | None:
    if not container.streams:
        # An MP4 cut short loses its index (moov box): the container opens with no streams.
        raise UndecodableMedia(
            "the video file is damaged or incomplete (no stream information found); send the complete file"
        )
    if not container.streams.video:
        raise UnsupportedMedia("the file has no video stream (audio only?); send a video")
    stream = container.streams.video[0]
    codec = stream.codec.canonical_name
    if codec in _UNSUPPORTED_CODECS:
        raise UnsupportedMedia(f"{codec.upper()} video is not supported; re-encode it as H.264, HEVC or VP9")
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def _has_supported_container_signature(path: Path) -> bool:
    """Whether the file starts like one of the allowed containers (so failure means damage)."""
    with path.open("rb") as file:
        head = file.read(12)
    return (
        head[4:8] in {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"}  # MP4/QuickTime
        or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska/WebM (EBML header)
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith(b"FLV\x01")
    )


def _open_reader(path: Path) -> VideoReader:
    try:
        return VideoReader(str(path), ctx=cpu(0), num_threads=1)
    except (DECORDError, RuntimeError) as exc:
        raise UndecodableMedia(
            "the video stream could not be decoded; the file may be damaged, try re-encoding it as H.264 MP4"
        ) from exc


def _average_fps(decoder_fps: float, container_fps: float | None) -> float:
    """decord's average fps if plausible, else the container's stated rate, else 1.0."""
    for fps in (decoder_fps, container_fps):
        if fps is not None and math.isfinite(fps) and _MIN_FPS <= fps <= _MAX_FPS:
            return float(fps)
    return _FALLBACK_FPS


def _decode_frames(
    reader: VideoReader,
    indices: list[int],
    chunk_size: int,
    frame_size: tuple[int, int] | None,
) -> np.ndarray:
    """Decode ``indices`` chunk by chunk into one preallocated (N, H, W, 3) array."""
    frames: np.ndarray | None = None
    for start in range(0, len(indices), chunk_size):
        chunk = _decode_chunk(reader, indices[start : start + chunk_size])
        if frames is None:
            width, height = frame_size or (chunk.shape[2], chunk.shape[1])
            frames = np.empty((len(indices), height, width, 3), np.uint8)
        _store_chunk(frames, start, chunk, frame_size)
        del chunk  # free the full-resolution chunk before the next one is decoded
    assert frames is not None  # sample_frame_indices never returns an empty list
    return frames


def _store_chunk(frames: np.ndarray, start: int, chunk: np.ndarray, frame_size: tuple[int, int] | None) -> None:
    for offset, frame in enumerate(chunk):
        frames[start + offset] = _resize(frame, frame_size) if frame_size else frame


def _decode_chunk(reader: VideoReader, indices: list[int]) -> np.ndarray:
    try:
        return reader.get_batch(indices).asnumpy()
    except (DECORDError, RuntimeError) as exc:
        raise UndecodableMedia(
            "some video frames could not be decoded; the file may be damaged or truncated, send the complete file"
        ) from exc


def _resize(frame: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize(frame_size, Image.Resampling.BICUBIC))
