"""A corpus of real files, intact and damaged, decoded the way the service does (in the worker).

Every codec in every container that holds it, every image format; then damaged copies of each:
empty, cut to a stub, cut in half, header overwritten, middle or tail overwritten. Each file
either decodes to the right frames (intact) or to a consistent result (damaged: concealed
errors may leave garbage pixels), or fails with its documented error; never anything else.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from decord import VideoReader, cpu
from PIL import Image

from media import DecodeWorker, MediaError, UndecodableMedia, UnsupportedMedia, read_video
from media.container import probe_video
from testing.mediafiles import (
    corrupt_file,
    frame_index_from_pixels,
    has_encoder,
    truncate_file,
    write_image,
    write_video,
)

FRAMES, FPS, SAMPLED = 24, 12, 6
ENCODERS = {
    "h264": "libx264",
    "hevc": "libx265",
    "vp9": "libvpx-vp9",
    "av1": "libsvtav1",
    "mpeg4": "mpeg4",
    "mjpeg": "mjpeg",
}
# Which codecs each container holds (what FFmpeg's muxers accept).
CONTAINERS = {
    "mp4": ["h264", "hevc", "vp9", "av1", "mpeg4", "mjpeg"],
    "mkv": ["h264", "hevc", "vp9", "av1", "mpeg4", "mjpeg"],
    "webm": ["vp9", "av1"],
    "avi": ["h264", "vp9", "av1", "mpeg4", "mjpeg"],
    "mov": ["h264", "hevc", "mpeg4", "mjpeg"],
}


def _video_param(codec: str, container: str):  # -> a pytest ParameterSet
    encoder = ENCODERS[codec]
    marks = [] if has_encoder(encoder) else [pytest.mark.skip(reason=f"no {encoder} encoder")]
    return pytest.param(codec, container, id=f"{codec}.{container}", marks=marks)


VIDEOS = [_video_param(codec, container) for container, codecs in CONTAINERS.items() for codec in codecs]
# Streams whose frames PyAV must return exactly as decord's get_batch: the grid above, less AV1
# (decord cannot decode it) and H.264 in AVI (B-frames: decord returns wrong frames), plus VP8,
# FLV, every pixel format PyAV takes over (media.container._PYAV_PIXEL_FORMATS) and sizes
# that are not multiples of 16. name -> write_video options; each is written with coloured blocks.
COMPARED = {
    f"{codec}.{container}": {"codec": ENCODERS[codec]}
    for container, codecs in CONTAINERS.items()
    for codec in codecs
    if codec != "av1" and (codec, container) != ("h264", "avi")
}
COMPARED |= {
    "vp8.mkv": {"codec": "libvpx"},
    "vp8.webm": {"codec": "libvpx"},
    "flv1.flv": {"codec": "flv1"},
    "h264.flv": {"codec": "libx264"},
    "h264-yuvj420p.mp4": {"codec": "libx264", "pix_fmt": "yuvj420p"},
    "h264-yuv422p.mp4": {"codec": "libx264", "pix_fmt": "yuv422p"},
    "h264-yuv444p.mkv": {"codec": "libx264", "pix_fmt": "yuv444p"},
    "h264-bt709-full.mp4": {"codec": "libx264", "options": {"x264-params": "colormatrix=bt709:fullrange=on"}},
    "mjpeg-yuvj422p.avi": {"codec": "mjpeg", "pix_fmt": "yuvj422p"},
    "mjpeg-yuvj444p.mkv": {"codec": "mjpeg", "pix_fmt": "yuvj444p"},
    "vp9-yuv444p.webm": {"codec": "libvpx-vp9", "pix_fmt": "yuv444p"},
    "h264-yuv444p10le.mkv": {"codec": "libx264", "pix_fmt": "yuv444p10le"},
    "ffv1-gray.mkv": {"codec": "ffv1", "pix_fmt": "gray"},
    "ffv1-yuv411p.mkv": {"codec": "ffv1", "pix_fmt": "yuv411p"},
    "vp9-gbrp.mkv": {"codec": "libvpx-vp9", "pix_fmt": "gbrp"},
    "h264-1000x562.mp4": {"codec": "libx264", "size": (1000, 562)},
    "h264-90x50.mkv": {"codec": "libx264", "size": (90, 50)},
}
IMAGES = [
    ("png", "RGB"),
    ("png", "RGBA"),
    ("png", "I;16"),
    ("jpeg", "RGB"),
    ("jpeg", "CMYK"),
    ("webp", "RGB"),
    ("gif", "P"),
    ("tiff", "RGB"),
    ("bmp", "RGB"),
]

Damage = Callable[[Path], Path]


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


# damage -> the errors allowed, and whether decoding may succeed instead
VIDEO_DAMAGE: dict[str, tuple[Damage, tuple[type[MediaError], ...], bool]] = {
    "empty": (_empty, (UndecodableMedia,), False),
    "stub": (lambda p: truncate_file(p, keep=0.02), (UndecodableMedia,), False),
    "header-overwritten": (lambda p: corrupt_file(p, start=0.0, length=0.05), (UnsupportedMedia,), False),
    "cut-in-half": (lambda p: truncate_file(p, keep=0.5), (UndecodableMedia,), True),
    "middle-overwritten": (lambda p: corrupt_file(p, start=0.4, length=0.2), (UndecodableMedia,), True),
    "tail-overwritten": (lambda p: corrupt_file(p, start=0.9, length=0.1), (UndecodableMedia,), True),
}
IMAGE_DAMAGE: dict[str, tuple[Damage, tuple[type[MediaError], ...], bool]] = {
    "empty": (_empty, (UndecodableMedia,), False),
    "stub": (lambda p: truncate_file(p, keep=0.05), (UndecodableMedia, UnsupportedMedia), False),
    "header-overwritten": (lambda p: corrupt_file(p, start=0.0, length=0.05), (UnsupportedMedia,), False),
    "cut-in-half": (lambda p: truncate_file(p, keep=0.5), (UndecodableMedia,), False),
    "middle-overwritten": (lambda p: corrupt_file(p, start=0.4, length=0.2), (UndecodableMedia,), True),
}


@pytest.fixture(scope="module")
def worker() -> Iterator[DecodeWorker]:
    decoder = DecodeWorker(time_limit=30)
    yield decoder
    decoder.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``corpus(name)``: the intact file ``name`` (written on first use), e.g. 'h264.mkv', 'rgb.png'."""
    folder = tmp_path_factory.mktemp("corpus")

    def get(name: str) -> Path:
        path = folder / name
        if not path.exists():
            stem, suffix = name.split(".")
            if stem in ENCODERS:
                write_video(path, frames=FRAMES, fps=FPS, codec=ENCODERS[stem])
            else:
                mode = next(m for f, m in IMAGES if _image_name(f, m) == name)
                write_image(path, size=(96, 72), mode=mode, fmt=suffix.upper())
        return path

    return get


def _image_name(fmt: str, mode: str) -> str:
    return f"{mode.lower().replace(';', '')}.{fmt}"


def damaged_copy(original: Path, damage: Damage, name: str) -> Path:
    copy = original.with_name(f"{name}-{original.name}")
    shutil.copy(original, copy)
    return damage(copy)


@pytest.mark.parametrize(("codec", "container"), VIDEOS)
def test_intact_video_gives_the_right_frames(corpus, worker: DecodeWorker, codec: str, container: str) -> None:
    video = worker.read_video(corpus(f"{codec}.{container}"), SAMPLED, frame_size=(48, 36))

    assert video.total_frames == FRAMES
    assert video.frame_indices == np.linspace(0, FRAMES - 1, SAMPLED, dtype=int).tolist()
    assert [frame_index_from_pixels(frame) for frame in video.frames] == video.frame_indices
    assert video.average_fps == pytest.approx(FPS)


@pytest.mark.parametrize("damage", VIDEO_DAMAGE)
@pytest.mark.parametrize(("codec", "container"), VIDEOS)
def test_damaged_video_decodes_consistently_or_gets_its_error(
    corpus, worker: DecodeWorker, codec: str, container: str, damage: str
) -> None:
    make_damage, errors, may_decode = VIDEO_DAMAGE[damage]
    path = damaged_copy(corpus(f"{codec}.{container}"), make_damage, damage)

    try:
        video = worker.read_video(path, SAMPLED, frame_size=(48, 36))
    except errors:
        return
    assert may_decode, f"{damage} {codec}.{container} decoded"
    count = min(SAMPLED, video.total_frames)
    assert 1 <= video.total_frames <= FRAMES
    assert video.frames.shape == (count, 36, 48, 3)
    assert video.info.frame_count == len(video.info.frame_times) == count


def _compared_param(name: str):  # -> a pytest ParameterSet
    encoder = COMPARED[name]["codec"]
    marks = [] if has_encoder(encoder) else [pytest.mark.skip(reason=f"no {encoder} encoder")]
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", [_compared_param(name) for name in COMPARED])
def test_pyav_frames_are_decords_get_batch(tmp_path: Path, name: str) -> None:
    # PyAV decodes these streams (one frame at a time, bounded memory) because its frames are
    # decord's bit for bit; the frame count and fps go into the prompt, so they must be decord's too.
    path = write_video(tmp_path / name, frames=FRAMES, fps=FPS, colour=True, **COMPARED[name])
    reader = VideoReader(str(path), ctx=cpu(0), num_threads=1)

    video = read_video(path, SAMPLED)

    assert probe_video(path).decoder == "pyav-seek"
    assert video.total_frames == len(reader) == FRAMES
    assert video.average_fps == reader.get_avg_fps()
    assert [frame_index_from_pixels(frame) for frame in video.frames] == video.frame_indices
    np.testing.assert_array_equal(video.frames, reader.get_batch(video.frame_indices).asnumpy())


@pytest.mark.parametrize(("fmt", "mode"), IMAGES)
def test_intact_image_becomes_rgb(corpus, worker: DecodeWorker, fmt: str, mode: str) -> None:
    image = worker.read_image(corpus(_image_name(fmt, mode)), max_pixels=10**6)

    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (96, 72)


@pytest.mark.parametrize("damage", IMAGE_DAMAGE)
@pytest.mark.parametrize(("fmt", "mode"), IMAGES)
def test_damaged_image_decodes_or_gets_its_error(
    corpus, worker: DecodeWorker, fmt: str, mode: str, damage: str
) -> None:
    make_damage, errors, may_decode = IMAGE_DAMAGE[damage]
    path = damaged_copy(corpus(_image_name(fmt, mode)), make_damage, damage)

    try:
        image = worker.read_image(path, max_pixels=10**6)
    except errors:
        return
    assert may_decode, f"{damage} {fmt} decoded"
    assert image.mode == "RGB" and image.size == (96, 72)
