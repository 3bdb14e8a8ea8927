"""Write real media files (PyAV, Pillow) for tests, benchmarks and tools.

Video frames carry their own index: frame ``i`` is a 4x3 grid of black/white blocks spelling ``i``
in binary (12 bits, so indices up to 4095). Large binary blocks survive lossy codecs, chroma
subsampling and resizing, so :func:`frame_index_from_pixels` recovers ``i`` from any decoded,
possibly resized, frame. This is how tests check that a sampler returned the right source frames.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

GRID_COLS, GRID_ROWS = 4, 3
MAX_FRAME_INDEX = 2 ** (GRID_COLS * GRID_ROWS) - 1

# Default codec per container suffix: each one is a codec that container can hold.
_CODEC_FOR_SUFFIX = {
    ".mp4": "libx264",
    ".mov": "libx264",
    ".mkv": "libx264",
    ".webm": "libvpx-vp9",
    ".avi": "mjpeg",
    ".flv": "flv1",
    ".ts": "libx264",
}
# Quality/GOP settings: high quality so blocks stay clean, short GOP so seeking crosses keyframes.
_CODEC_OPTIONS = {
    "libx264": {"crf": "12", "g": "12"},
    # Closed GOPs by default; OPEN_GOP_OPTIONS below give x265's and x264's open-GOP streams.
    "libx265": {"crf": "12", "g": "12", "x265-params": "open-gop=0:log-level=error"},
    "libsvtav1": {"crf": "30", "g": "12"},
    "libvpx-vp9": {"crf": "20", "b": "0", "g": "12"},
    "libvpx": {"crf": "10", "b": "1M", "g": "12"},
}
_PIX_FMT_FOR_CODEC = {"mjpeg": "yuvj420p"}
# Open GOPs (x265's default, x264's open-gop): leading B-frames reference the previous GOP.
# decord 0.6.0 returns wrong frames after seeking in such streams; media.container routes them.
OPEN_GOP_OPTIONS = {
    "libx265": {"crf": "12", "g": "12", "x265-params": "log-level=error"},
    "libx264": {"crf": "12", "g": "12", "x264-params": "open-gop=1"},
}


def has_encoder(codec: str) -> bool:
    """Whether the bundled FFmpeg can encode ``codec`` (x265, VP9 etc. are optional builds)."""
    try:
        av.Codec(codec, "w")
    except (av.error.FFmpegError, ValueError):
        return False
    return True


def coded_frame(index: int, size: tuple[int, int], *, colour: bool = False) -> np.ndarray:
    """RGB frame (H, W, 3) whose block grid spells ``index`` in binary, bit 0 top-left.

    Blocks are black and white, or with ``colour`` light and dark colours (each channel at least
    160 or at most 95, changing from block to block and frame to frame), so that the colour
    conversion of decoders can be compared while the index still reads back.
    """
    if not 0 <= index <= MAX_FRAME_INDEX:
        raise ValueError(f"frame index {index} does not fit the {GRID_COLS}x{GRID_ROWS} grid")
    width, height = size
    blocks = GRID_COLS * GRID_ROWS
    bits = np.array([(index >> b) & 1 for b in range(blocks)], np.uint8)
    if colour:
        shades = np.random.default_rng(index).integers(0, 96, (blocks, 3), dtype=np.uint8)
        grid = (np.where(bits[:, None], 255 - shades, shades)).reshape(GRID_ROWS, GRID_COLS, 3)
    else:
        grid = np.repeat((bits * 255).reshape(GRID_ROWS, GRID_COLS, 1), 3, axis=2)
    rows = np.arange(height) * GRID_ROWS // height
    cols = np.arange(width) * GRID_COLS // width
    return np.ascontiguousarray(grid[rows][:, cols])


def frame_index_from_pixels(frame: np.ndarray) -> int:
    """Recover the index written by :func:`coded_frame` from a decoded (maybe resized) frame."""
    grey = np.asarray(frame, np.float32).mean(axis=2)
    height, width = grey.shape
    index = 0
    for bit in range(GRID_COLS * GRID_ROWS):
        row, col = divmod(bit, GRID_COLS)
        block = grey[_middle_half(row, GRID_ROWS, height), _middle_half(col, GRID_COLS, width)]
        if block.mean() > 127:
            index |= 1 << bit
    return index


def _middle_half(block: int, blocks: int, length: int) -> slice:
    """Middle half of block ``block`` of ``blocks`` along ``length`` pixels: edges blur under
    compression and resizing, the middle keeps its level."""
    start = (4 * block + 1) * length // (4 * blocks)
    stop = (4 * block + 3) * length // (4 * blocks)
    return slice(start, max(stop, start + 1))


@contextlib.contextmanager
def _scheduling_kept() -> Iterator[None]:
    """Put the calling thread's scheduling policy back afterwards.

    SVT-AV1's encoder, run as root, makes the thread that opens it real-time (SCHED_FIFO 99), and
    every thread and process started from it afterwards inherits that: in a test run, torch's
    OpenMP workers spinning at real-time priority then starved everything else on two cores (a
    CI run stalled for an hour, pytest-timeout's own thread among the starved).
    """
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, param)


def write_video(
    path: Path,
    *,
    frames: int,
    fps: float | Fraction,
    size: tuple[int, int] = (64, 48),
    codec: str | None = None,
    pix_fmt: str | None = None,
    frame_times: Sequence[float] | None = None,
    options: dict[str, str] | None = None,
    rotation: tuple[int, bool, bool] | None = None,
    colour: bool = False,
) -> Path:
    """Write ``frames`` coded frames at constant ``fps``; the container comes from the suffix.

    ``codec`` defaults to one the container holds (mp4/mkv: libx264, webm: VP9, avi: MJPEG).
    ``frame_times`` (seconds, increasing) gives a variable-frame-rate video instead; ``fps`` is
    then only the nominal rate stored in the stream header. ``options`` replace the codec's
    default options. ``rotation=(degrees, hflip, vflip)`` stores a display matrix: a player
    shows each frame turned ``degrees`` counter-clockwise, then mirrored (see :func:`upright`).
    ``colour`` writes :func:`coded_frame`'s coloured blocks.
    """
    path = Path(path)
    codec = codec or _CODEC_FOR_SUFFIX[path.suffix.lower()]
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if frame_times is not None else 1 / rate
    with _scheduling_kept(), av.open(str(path), "w") as container:
        default_options = _CODEC_OPTIONS.get(codec, {})
        stream = container.add_stream(codec, rate=rate, options=dict(options or default_options))
        stream.width, stream.height = size
        if rotation is not None:
            degrees, hflip, vflip = rotation
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        stream.pix_fmt = pix_fmt or _PIX_FMT_FOR_CODEC.get(codec, "yuv420p")
        stream.codec_context.time_base = time_base
        if codec not in _CODEC_OPTIONS and options is None:
            stream.bit_rate = 2_000_000  # codecs without a CRF mode: plenty for 64x48 blocks
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(coded_frame(i, size, colour=colour), format="rgb24")
            frame.pts = round(frame_times[i] * 1000) if frame_times is not None else i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def upright(frame: np.ndarray, rotation: tuple[int, bool, bool]) -> np.ndarray:
    """What a player shows for a stored ``frame`` under ``rotation`` (as in :func:`write_video`)."""
    degrees, hflip, vflip = rotation
    shown = np.rot90(frame, k=degrees // 90)  # counter-clockwise, as the display matrix says
    if hflip:
        shown = shown[:, ::-1]
    if vflip:
        shown = shown[::-1]
    return shown


def corrupt_file(path: Path, *, start: float = 0.4, length: float = 0.2, seed: int = 0) -> Path:
    """Overwrite ``length`` of ``path``'s bytes from ``start`` (fractions) with random bytes."""
    data = bytearray(Path(path).read_bytes())
    first, count = int(len(data) * start), max(1, int(len(data) * length))
    data[first : first + count] = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    return Path(path)


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """Write a file with one audio stream and no video stream (e.g. ``.m4a`` / ``.mka``)."""
    rate = 16_000
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = np.zeros((1, int(seconds * rate)), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_color(index: int) -> tuple[int, int, int]:
    """Solid colour of frame ``index`` in images from :func:`write_image` (far apart per frame)."""
    palette = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 200, 30)]
    return palette[index % len(palette)]


def write_image(
    path: Path,
    size: tuple[int, int] = (64, 48),
    mode: str = "RGB",
    fmt: str | None = None,
    *,
    frames: int = 1,
) -> Path:
    """Write an image in ``mode``; ``fmt`` defaults to the suffix (png/jpeg/webp/gif/tiff/bmp).

    Frame ``k`` is filled with :func:`frame_color` ``(k)``; in modes with alpha (RGBA, LA)
    the right half of every frame is fully transparent. ``frames > 1`` writes an animation
    (gif/webp/png/tiff). ``I;16`` images hold the frame's grey level scaled to 16 bits.
    """
    images = [_image_in_mode(frame_color(k), size, mode) for k in range(frames)]
    extra = {"save_all": True, "append_images": images[1:], "duration": 100} if frames > 1 else {}
    images[0].save(path, format=fmt, **extra)
    return Path(path)


def _image_in_mode(color: tuple[int, int, int], size: tuple[int, int], mode: str) -> Image.Image:
    rgba = Image.new("RGBA", size, (*color, 255))
    rgba.paste((*color, 0), (size[0] // 2, 0, size[0], size[1]))
    if mode == "I;16":
        grey = np.asarray(rgba.convert("L"), np.uint16) * 257
        return Image.fromarray(grey)  # uint16 array -> mode I;16
    if mode in ("RGBA", "LA"):
        return rgba.convert(mode)
    rgb = rgba.convert("RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def write_exif_rotated_jpeg(path: Path, size: tuple[int, int] = (64, 48), orientation: int = 6) -> Path:
    """Write a ``size`` JPEG whose EXIF Orientation tag says to rotate it (6: 90 degrees clockwise).

    The stored top-left quarter is red and the rest blue, so tests can check which way it turned.
    """
    image = Image.new("RGB", size, (40, 40, 220))
    image.paste((220, 40, 40), (0, 0, size[0] // 2, size[1] // 2))
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    image.save(path, format="JPEG", quality=95, exif=exif)
    return Path(path)


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to the first ``keep`` fraction of its bytes (a download that stopped early)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_minutes_video(
    path: Path, minutes: float, *, fps: int = 2, size: tuple[int, int] = (288, 216), noise: bool = True
) -> Path:
    """A recording whose content changes every minute: the top quarter of every frame has the
    colour of its minute (:func:`frame_color`), the rest is noise (so that, as in a real
    recording, the file grows with its length: about 45 KB a frame at the default size)."""
    width, height = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(10 * fps)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(minutes * 60 * fps)):
            frame = np.empty((height, width, 3), np.uint8)
            frame[: height // 4] = frame_color(index // (60 * fps))
            frame[height // 4 :] = rng.integers(0, 256, (height - height // 4, width, 3), np.uint8) if noise else 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
