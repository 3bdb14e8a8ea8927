"""Sample frames from a video file the way the official LLaVA-Video example does.

Frames are decoded uniformly over the whole video, in chunks, so that memory stays bounded by
``chunk_size`` full-resolution frames plus the sampled (optionally resized) frames, whatever the
video's length or resolution.

Before any decoder sees a file, :mod:`media.container` probes it with PyAV under a demuxer
allow-list. That check decides between "not a supported video" and "damaged video", keeps
decord away from inputs it mishandles (it reads a plain text file as a 25 fps video; FFmpeg
demuxers such as HLS or concat would open other files or URLs named inside the input), and
tells which decoder returns the right frames: decord, as the LLaVA-Video example uses, for most
streams; PyAV for open-GOP streams, AV1 and streams whose timestamps are not presentation times.
Frames come out upright as a player shows them (the stream's display matrix is applied).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from decord import DECORDError, VideoReader, cpu
from PIL import Image

from media.container import Orientation, VideoProbe, decode_frames, probe_video
from media.errors import UndecodableMedia

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
    max_pixels: int | None = None,
) -> SampledVideo:
    """Decode ``min(num_frames, total_frames)`` uniformly sampled RGB frames from ``path``.

    ``frame_size=(width, height)`` resizes every frame with Pillow bicubic (what the SigLIP image
    processor does) right after its chunk is decoded and turned upright. The result is the same
    for any ``chunk_size``. Frame times and duration use the average fps; when that is missing or
    absurd (0, NaN, outside 0.01..1000) the container's stated rate is used, else 1.0 fps.

    Raises UnsupportedMedia (not a supported video, no video stream), MediaTooLarge (frames over
    ``max_pixels`` pixels) or UndecodableMedia (empty, damaged or truncated file, no decodable
    frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if frame_size is not None and min(frame_size) < 1:
        raise ValueError(f"frame_size must be positive (width, height), got {frame_size}")
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
    fps = _average_fps(decoder_fps, probe.stated_fps)
    indices = sample_frame_indices(total_frames, num_frames)
    chunks = _decord_chunks(reader, indices, chunk_size) if reader is not None else _pyav_chunks(path, probe, indices)
    frames = _collect(chunks, len(indices), probe.orientation, frame_size)
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
    chunks: Iterable[np.ndarray],
    count: int,
    orientation: Orientation,
    frame_size: tuple[int, int] | None,
) -> np.ndarray:
    """Turn each chunk upright, resize it and store it into one preallocated (N, H, W, 3) array."""
    frames: np.ndarray | None = None
    stored = 0
    for chunk in chunks:
        if frames is None:
            height, width = _upright_shape(chunk.shape[1:3], orientation)
            width, height = frame_size or (width, height)
            frames = np.empty((count, height, width, 3), np.uint8)
        stored += _store_chunk(frames, stored, chunk, orientation, frame_size)
        del chunk  # free the full-resolution chunk before the next one is decoded
    if frames is None or stored != count:
        raise UndecodableMedia(
            "some video frames could not be decoded; the file may be damaged or truncated, send the complete file"
        )
    return frames


def _upright_shape(shape: tuple[int, int], orientation: Orientation) -> tuple[int, int]:
    return (shape[1], shape[0]) if orientation.transpose else shape


def _store_chunk(
    frames: np.ndarray,
    start: int,
    chunk: np.ndarray,
    orientation: Orientation,
    frame_size: tuple[int, int] | None,
) -> int:
    # A function of its own so that no frame of the chunk stays referenced after it returns.
    for offset, frame in enumerate(chunk):
        upright = frame if orientation.is_identity else orientation.apply(frame)
        frames[start + offset] = _resize(upright, frame_size) if frame_size else upright
    return len(chunk)


def _decord_chunks(reader: VideoReader, indices: list[int], chunk_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), chunk_size):
        try:
            yield reader.get_batch(indices[start : start + chunk_size]).asnumpy()
        except (DECORDError, RuntimeError) as exc:
            raise UndecodableMedia(
                "some video frames could not be decoded; the file may be damaged or truncated, send the complete file"
            ) from exc


def _pyav_chunks(path: Path, probe: VideoProbe, indices: list[int]) -> Iterator[np.ndarray]:
    # PyAV yields one frame at a time: chunks of one keep memory at a single full frame.
    for frame in decode_frames(path, probe, indices):
        yield frame[np.newaxis]


def _resize(frame: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize(frame_size, Image.Resampling.BICUBIC))
