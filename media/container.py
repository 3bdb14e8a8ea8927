"""What PyAV reads from a video file: stream facts, the frame index, and which decoder to use.

:func:`probe_video` demuxes the whole file once (packets only, plus the first frame) under a
demuxer allow-list. Besides the checks (supported container and codec, frame size), the packet
scan and the first frame decide the decoder. PyAV decodes one frame at a time, so its memory stays
bounded whatever the length of the video, where decord 0.6.0 reads the compressed stream ahead (up
to the rest of the file) and decodes ahead; so PyAV decodes every stream it gets right:

- streams whose frames' pixel format is one PyAV turns into RGB exactly as decord does: 8-bit
  YUV 4:2:0, 4:2:2, 4:4:4 and 4:1:1 (limited or full range), grey, planar RGB and 10-bit 4:4:4,
  bit-identical to decord's ``get_batch`` (tests/media/test_corpus.py checks every codec and
  container of the corpus);
- streams decord gets wrong whatever their format: open GOPs (x265's default, x264
  ``open-gop``: after a seek decord counts frames from the wrong place, off by one to nine),
  streams with a display matrix (rotated phone videos: decord half-applies it and fails), and
  codecs decord's bundled FFmpeg 4.1 cannot decode (AV1).

PyAV finds frame N by seeking to the keyframe at or before it and matching presentation
timestamps; where timestamps cannot be trusted (missing, shared by several frames as in a 5000 fps
stream in Matroska's millisecond clock, or decode times as in AVI with B-frames) it decodes from
the start and counts frames in presentation order. decord is kept, as the LLaVA-Video example
uses it, only for the other pixel formats (10-bit 4:2:0 and 4:2:2 and 4:1:0, where the two differ;
12-bit, alpha, palette ... never compared), and only where its seeks are right.
The frame count (video packets) and average frame rate are the ones
decord reports, whichever decoder runs: frame times go into the prompt.
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np

from media.errors import MediaTooLarge, UndecodableMedia, UnsupportedMedia

# FFmpeg demuxers we let through (matched against any of a demuxer's comma-separated names).
# decord returned wrong frames for MPEG-TS, MPEG-PS and some ASF/WMV files, so those are refused;
# playlist and concat demuxers would open other files or URLs named inside the input.
ALLOWED_DEMUXERS = "mov,matroska,avi,flv"
SUPPORTED_CONTAINERS = "MP4/MOV, MKV/WebM, AVI or FLV"
# Codecs that decord's FFmpeg 4.1 cannot decode but PyAV's FFmpeg can.
_PYAV_ONLY_CODECS = frozenset({"av1"})
# Decoded pixel formats that PyAV's to_ndarray("rgb24") turns into decord's RGB bit for bit
# (checked by tests/media/test_corpus.py). 10-bit 4:2:0 and 4:2:2 differ at colour edges (up to
# ~130 levels; decord puts the chroma of a horizontal edge one row low, PyAV blends it over two
# rows and columns; neither is closer to the source picture overall), 4:1:0 differs too, and
# 12-bit, alpha or palette formats were never compared: decord keeps those, as the reference.
_PYAV_PIXEL_FORMATS = frozenset(
    {
        "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv411p", "gray", "gbrp",
        "yuv444p10le",
    }
)  # fmt: skip
# Demux errors tolerated at the end of a file that was cut short; the frames before still count.
_DEMUX_ERRORS = (av.error.FFmpegError, EOFError)

Decoder = Literal["decord", "pyav-seek", "pyav-sequential"]


@dataclass(frozen=True)
class Orientation:
    """How to turn stored frames upright, from the stream's display matrix (as players do)."""

    transpose: bool = False
    flip_rows: bool = False  # upside down: reverse the row order (after transposing)
    flip_cols: bool = False  # mirrored: reverse the column order (after transposing)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """The (H, W, C) frame as a player shows it."""
        if self.transpose:
            frame = frame.transpose(1, 0, 2)
        if self.flip_rows:
            frame = frame[::-1]
        if self.flip_cols:
            frame = frame[:, ::-1]
        return np.ascontiguousarray(frame)

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)


@dataclass(frozen=True)
class VideoProbe:
    """Facts about the first video stream, from its packets and its first frame."""

    average_fps: float | None  # the stream's average frame rate (decord reports the same)
    stated_fps: float | None  # the container's guessed rate, a fallback
    frame_count: int  # video packets, i.e. frames in presentation order
    frame_pts: list[int]  # presentation timestamps, sorted; empty when not all packets have one
    keyframe_pts: list[int]  # sorted
    decoder: Decoder
    orientation: Orientation


def probe_video(path: Path, *, max_pixels: int | None = None) -> VideoProbe:
    """Check that ``path`` is a supported, decodable video and describe its first video stream.

    Raises UnsupportedMedia (not a supported container, no video stream), MediaTooLarge (frames
    larger than ``max_pixels``) or UndecodableMedia (empty, damaged, no decodable frame).

    The last few probes are remembered per process, keyed by the file's identity and size and
    modification time: a long-video job reads one file segment by segment, and scanning the
    packets of an hour at 30 fps takes about a second each time (docs/BENCHMARKS.md).
    """
    stat = path.stat()
    return _probe(path, (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns), max_pixels)


@functools.lru_cache(maxsize=2)
def _probe(path: Path, identity: tuple[str, int, int, int], max_pixels: int | None) -> VideoProbe:
    """:func:`probe_video`'s work; ``identity`` keys the cache (failures are not cached)."""
    if path.stat().st_size == 0:
        raise UndecodableMedia("the video file is empty (0 bytes); send the complete file")
    try:
        with _open(path) as container:
            stream = _first_video_stream(container)
            _check_frame_size(stream, max_pixels)
            return _scan(container, stream)
    except av.error.FFmpegError as exc:
        if _has_supported_container_signature(path):
            raise UndecodableMedia(
                "the video file is damaged or incomplete (its container could not be read); send the complete file"
            ) from exc
        raise UnsupportedMedia(
            f"the file is not a video in a supported container ({SUPPORTED_CONTAINERS}); "
            "if it is an image, send it as an image"
        ) from exc


def decode_frames(path: Path, probe: VideoProbe, indices: list[int]) -> Iterator[np.ndarray]:
    """Yield the RGB frames at ``indices`` (sorted, presentation order), decoded with PyAV.

    Frames are not yet turned upright. Raises UndecodableMedia when a frame cannot be decoded.
    """
    done = 0
    try:
        if probe.decoder == "pyav-seek":
            try:
                for frame in _decode_by_timestamp(path, probe, indices):
                    yield frame
                    del frame  # not held here while the next frame decodes
                    done += 1
                return
            except _TimestampMiss:
                pass  # the timestamps lied after all: count frames from the start for the rest
        yield from _decode_by_counting(path, indices[done:])
    except av.error.FFmpegError as exc:
        raise UndecodableMedia(
            "some video frames could not be decoded; the file may be damaged or truncated, send the complete file"
        ) from exc


class _TimestampMiss(Exception):
    """No decoded frame had the presentation timestamp the index promised."""


@contextmanager
def _open(path: Path) -> Iterator[av.container.InputContainer]:
    # A file object rather than a path: FFmpeg then opens no protocol of its own.
    with (
        path.open("rb") as file,
        av.open(
            file,
            container_options={"format_whitelist": ALLOWED_DEMUXERS},
            metadata_errors="ignore",  # odd tag encodings must not fail the probe
        ) as container,
    ):
        yield container


def _first_video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams:
        # An MP4 cut short loses its index (moov box): the container opens with no streams.
        raise UndecodableMedia(
            "the video file is damaged or incomplete (no stream information found); send the complete file"
        )
    if not container.streams.video:
        if container.streams.audio:
            raise UnsupportedMedia("the file has no video stream (audio only?); send a video")
        # Only data streams: what FFmpeg makes of an MP4 whose index was cut off mid-box.
        raise UndecodableMedia(
            "the video file is damaged or incomplete (no video stream found); send the complete file"
        )
    return container.streams.video[0]


def _check_frame_size(stream: av.video.stream.VideoStream, max_pixels: int | None) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLarge(
            f"the video frames are {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}; downscale the video and retry"
        )


def _scan(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> VideoProbe:
    """Read every packet of ``stream`` (no decoding except the first frame) and classify it."""
    pts: list[int | None] = []
    keyframes: list[int] = []
    open_gop = False
    first_frame: av.VideoFrame | None = None
    key_pts: int | None = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the end-of-stream marker
                continue
            pts.append(packet.pts)
            if packet.is_keyframe and packet.pts is not None:
                key_pts = packet.pts
                keyframes.append(packet.pts)
            elif key_pts is not None and packet.pts is not None and packet.pts < key_pts:
                open_gop = True  # a leading picture: decoded after its keyframe, shown before it
            if first_frame is None:
                first_frame = _first_decoded(stream, packet)
    except _DEMUX_ERRORS:
        pass  # a damaged tail: keep the packets read so far, decoding will tell the rest
    if first_frame is None:
        first_frame = _first_decoded(stream, None)
    if not pts or first_frame is None:
        raise UndecodableMedia("the video has no decodable frames; check that the file plays")
    codec = stream.codec.canonical_name
    orientation = _orientation(first_frame)
    # Only AVI stores decode times in place of presentation times (it has no composition
    # offsets); MP4, Matroska and FLV streams whose B-frames happen to keep decode order are fine.
    reorders = bool(stream.codec_context.has_b_frames) and "avi" in container.format.name.split(",")
    return VideoProbe(
        average_fps=float(stream.average_rate) if stream.average_rate else None,
        stated_fps=float(stream.guessed_rate) if stream.guessed_rate else None,
        frame_count=len(pts),
        frame_pts=sorted(pts) if None not in pts else [],  # type: ignore[type-var]
        keyframe_pts=sorted(set(keyframes)),
        decoder=_choose_decoder(codec, first_frame.format.name, pts, open_gop, reorders, orientation),
        orientation=orientation,
    )


def _first_decoded(stream: av.video.stream.VideoStream, packet: av.Packet | None) -> av.VideoFrame | None:
    """The first frame the decoder returns for ``packet`` (None flushes); decode errors skip it."""
    try:
        frames = stream.codec_context.decode(packet)
    except av.error.FFmpegError:
        return None
    return frames[0] if frames else None


def _choose_decoder(
    codec: str,
    pixel_format: str,
    pts: list[int | None],
    open_gop: bool,
    reorders: bool,
    orientation: Orientation,
) -> Decoder:
    """PyAV wherever its frames are decord's (or decord's are wrong); see the module docstring."""
    if not _timestamps_usable(pts, reorders):
        return "pyav-sequential"  # only counting decoded frames finds frame N
    if pixel_format in _PYAV_PIXEL_FORMATS:
        return "pyav-seek"  # same frames as decord, one at a time: bounded memory
    if open_gop or codec in _PYAV_ONLY_CODECS or not orientation.is_identity:
        return "pyav-seek"  # decord would return wrong frames or fail
    return "decord"


def _timestamps_usable(pts: list[int | None], reorders: bool) -> bool:
    """Whether frame N can be found by its presentation timestamp."""
    if None in pts or len(set(pts)) != len(pts):
        return False  # missing, or shared by several frames
    # Reordered frames (B-frames) whose timestamps never decrease in decode order: the
    # timestamps are decode times (AVI), not presentation times.
    in_decode_order = all(a <= b for a, b in zip(pts, pts[1:], strict=False))  # type: ignore[operator]
    return not (reorders and len(pts) > 1 and in_decode_order)


def _orientation(frame: av.VideoFrame) -> Orientation:
    """The display matrix side data as transpose + flips (FFmpeg's matrix layout, 16.16 fixed)."""
    matrix = frame.side_data.get("DISPLAYMATRIX")
    if matrix is None:
        return Orientation()
    a, b, _, c, d, *_ = struct.unpack("<9i", bytes(matrix))
    # A stored pixel at (col, row) is shown at (a*col + c*row, b*col + d*row), up to a shift.
    # Rotations other than multiples of 90 degrees are snapped to the nearest one.
    if abs(a) + abs(d) >= abs(b) + abs(c):
        return Orientation(transpose=False, flip_rows=d < 0, flip_cols=a < 0)
    return Orientation(transpose=True, flip_rows=b < 0, flip_cols=c < 0)


def _decode_by_timestamp(path: Path, probe: VideoProbe, indices: list[int]) -> Iterator[np.ndarray]:
    """Seek to the keyframe at or before each wanted frame; take the frame with its timestamp."""
    with _open(path) as container:
        stream = container.streams.video[0]
        frames: Iterator[av.VideoFrame] | None = None
        last_pts: int | None = None  # the last frame decoded since the latest seek
        for index in indices:
            target = probe.frame_pts[index]
            keyframe = _keyframe_at_or_before(probe.keyframe_pts, target)
            if frames is None or last_pts is None or last_pts >= target or keyframe > last_pts:
                # Decoding on would pass the frame or take longer than seeking there.
                container.seek(keyframe, backward=True, any_frame=False, stream=stream)
                frames = container.decode(stream)
            frame = None
            for frame in frames:
                last_pts = frame.pts
                if frame.pts is None or frame.pts >= target:
                    break
            if frame is None or frame.pts != target:
                raise _TimestampMiss
            yield frame.to_ndarray(format="rgb24")


def _keyframe_at_or_before(keyframes: list[int], target: int) -> int:
    position = bisect.bisect_right(keyframes, target)
    return keyframes[position - 1] if position else (keyframes[0] if keyframes else target)


def _decode_by_counting(path: Path, indices: list[int]) -> Iterator[np.ndarray]:
    """Decode from the start; frame N is the N-th frame the decoder outputs."""
    wanted = iter(indices)
    next_index = next(wanted, None)
    decoded = 0
    with _open(path) as container:
        for frame in container.decode(container.streams.video[0]):
            while next_index == decoded:
                yield frame.to_ndarray(format="rgb24")
                next_index = next(wanted, None)
            if next_index is None:
                return
            decoded += 1
    raise UndecodableMedia(
        f"only {decoded} frames of the video could be decoded, fewer than its index lists; "
        "the file may be damaged, send the complete file"
    )


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
