"""read_video / sample_frame_indices on real files written with PyAV."""

from __future__ import annotations

import tracemalloc
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from mediafiles import (
    frame_index_from_pixels,
    has_encoder,
    truncate_file,
    write_audio_only,
    write_image,
    write_video,
)
from PIL import Image

from media import (
    MediaError,
    UndecodableMedia,
    UnsupportedMedia,
    read_video,
    sample_frame_indices,
)
from media.video import _average_fps

# (file name, codec or None for the suffix's default, frames, fps)
VIDEO_CASES = [
    ("h264.mp4", None, 50, 25.0),
    ("h264.mkv", None, 30, 10.0),
    ("vp9.webm", None, 50, 25.0),
    ("mjpeg.avi", None, 30, 10.0),
    ("mpeg4.avi", "mpeg4", 40, 29.97),
    ("flv1.flv", None, 30, 10.0),
    pytest.param(
        "hevc.mov",
        "libx265",
        30,
        10.0,
        marks=pytest.mark.skipif(not has_encoder("libx265"), reason="no x265 encoder"),
    ),
]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def h264_video(video_dir: Path) -> Path:
    return write_video(video_dir / "main.mp4", frames=50, fps=25)


def recovered_indices(frames: np.ndarray) -> list[int]:
    return [frame_index_from_pixels(frame) for frame in frames]


@pytest.mark.parametrize(
    ("total", "wanted"),
    [(1, 1), (1, 16), (2, 16), (10, 3), (16, 16), (17, 16), (50, 8), (100, 64), (301, 16), (5, 64)],
)
def test_indices_match_llava_video_linspace(total: int, wanted: int) -> None:
    expected = np.linspace(0, total - 1, min(wanted, total), dtype=int).tolist()
    assert sample_frame_indices(total, wanted) == expected


def test_indices_are_distinct_and_span_the_video() -> None:
    for total in range(1, 301):
        for wanted in range(1, 81):
            indices = sample_frame_indices(total, wanted)
            assert len(indices) == min(total, wanted)
            assert indices[0] == 0
            assert all(a < b for a, b in pairwise(indices))
            assert len(indices) == 1 or indices[-1] == total - 1


@pytest.mark.parametrize(("total", "wanted"), [(0, 4), (10, 0), (10, -1)])
def test_indices_reject_empty_requests(total: int, wanted: int) -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(total, wanted)


@pytest.mark.parametrize(("name", "codec", "frames", "fps"), VIDEO_CASES)
def test_returns_the_sampled_source_frames(
    video_dir: Path, name: str, codec: str | None, frames: int, fps: float
) -> None:
    path = write_video(video_dir / name, frames=frames, fps=fps, codec=codec)

    video = read_video(path, 8)

    expected = np.linspace(0, frames - 1, 8, dtype=int).tolist()
    assert video.frame_indices == expected
    assert recovered_indices(video.frames) == expected
    assert video.frames.shape == (8, 48, 64, 3)
    assert video.frames.dtype == np.uint8
    assert video.total_frames == frames
    assert video.average_fps == pytest.approx(fps, rel=1e-3)
    assert video.info.frame_count == 8
    assert video.info.video_duration == pytest.approx(frames / fps, rel=1e-3)
    assert video.info.frame_times == pytest.approx([i / fps for i in expected], rel=1e-3)


def test_short_video_gives_each_frame_once(video_dir: Path) -> None:
    path = write_video(video_dir / "short.mp4", frames=5, fps=10)

    video = read_video(path, 16)

    assert video.frame_indices == [0, 1, 2, 3, 4]
    assert recovered_indices(video.frames) == [0, 1, 2, 3, 4]
    assert video.info.frame_count == 5
    assert video.info.frame_times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("frame_size", [None, (40, 30)])
def test_chunk_size_does_not_change_the_result(h264_video: Path, frame_size: tuple[int, int] | None) -> None:
    results = [read_video(h264_video, 16, chunk_size=size, frame_size=frame_size).frames for size in (1, 3, 8, 64)]
    for frames in results[1:]:
        np.testing.assert_array_equal(frames, results[0])


def test_frame_size_is_pillow_bicubic_of_the_full_frames(h264_video: Path) -> None:
    full = read_video(h264_video, 8).frames

    resized = read_video(h264_video, 8, chunk_size=3, frame_size=(50, 30))

    assert resized.frames.shape == (8, 30, 50, 3)
    expected = [np.asarray(Image.fromarray(f).resize((50, 30), Image.Resampling.BICUBIC)) for f in full]
    np.testing.assert_array_equal(resized.frames, np.stack(expected))
    assert recovered_indices(resized.frames) == resized.frame_indices


def test_memory_is_bounded_by_the_chunk_not_the_video(video_dir: Path) -> None:
    path = write_video(video_dir / "vga.mp4", frames=48, fps=24, size=(640, 480))
    full_frame_bytes = 640 * 480 * 3

    tracemalloc.start()  # numpy allocations are traced; decord's own buffers are not
    try:
        read_video(path, 32, chunk_size=4, frame_size=(32, 24))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # One decoded chunk of 4 full-resolution frames plus small change, not 32 full frames.
    assert peak < 5 * full_frame_bytes


def test_variable_frame_rate_video(video_dir: Path) -> None:
    # 10 frames 50 ms apart, then 10 frames 200 ms apart: 2.4 s in all.
    times = [i * 0.05 for i in range(10)] + [0.5 + i * 0.2 for i in range(10)]
    path = write_video(video_dir / "vfr.mp4", frames=20, fps=10, frame_times=times)

    video = read_video(path, 6)

    assert recovered_indices(video.frames) == video.frame_indices
    # Times come from the average rate (as in the LLaVA-Video example), not from timestamps.
    assert video.info.video_duration == pytest.approx(20 / video.average_fps)
    assert video.info.frame_times == pytest.approx([i / video.average_fps for i in video.frame_indices])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: _write_text(d / "notes.txt", "hello\n" * 200), id="text"),
        pytest.param(lambda d: write_image(d / "still.png"), id="png"),
        pytest.param(lambda d: write_image(d / "still.jpg"), id="jpeg"),
        pytest.param(lambda d: write_image(d / "anim.gif", mode="P", frames=3), id="gif"),
        pytest.param(lambda d: write_audio_only(d / "sound.m4a"), id="audio-only"),
        pytest.param(lambda d: write_video(d / "refused.ts", frames=20, fps=10), id="mpegts"),
        pytest.param(
            lambda d: _write_text(d / "list.m3u8", "#EXTM3U\n#EXTINF:1,\nfile:///etc/hostname\n"),
            id="hls-playlist",
        ),
    ],
)
def test_non_videos_are_unsupported(video_dir: Path, make) -> None:
    with pytest.raises(UnsupportedMedia):
        read_video(make(video_dir), 8)


@pytest.mark.skipif(not has_encoder("libsvtav1"), reason="no AV1 encoder")
def test_av1_is_unsupported(video_dir: Path) -> None:
    path = write_video(video_dir / "av1.mkv", frames=10, fps=10, codec="libsvtav1")

    with pytest.raises(UnsupportedMedia, match="AV1"):
        read_video(path, 4)


@pytest.mark.parametrize("name", ["cut.mp4", "cut.avi", "cut.mov"])
def test_truncated_video_is_undecodable(video_dir: Path, name: str) -> None:
    path = truncate_file(write_video(video_dir / name, frames=50, fps=25), keep=0.5)

    with pytest.raises(UndecodableMedia):
        read_video(path, 8)


def test_truncated_webm_gives_media_error_or_frames(video_dir: Path) -> None:
    # Matroska without its tail still plays up to the cut: either outcome is fine, a raw
    # decord/FFmpeg exception is not.
    path = truncate_file(write_video(video_dir / "cut.webm", frames=50, fps=25), keep=0.3)

    try:
        video = read_video(path, 8)
    except MediaError:
        return
    assert 0 < video.total_frames < 50


def test_empty_file_is_undecodable(video_dir: Path) -> None:
    path = video_dir / "empty.mp4"
    path.write_bytes(b"")

    with pytest.raises(UndecodableMedia, match="empty"):
        read_video(path, 8)


def test_bad_arguments_raise_value_error(h264_video: Path) -> None:
    with pytest.raises(ValueError):
        read_video(h264_video, 0)
    with pytest.raises(ValueError):
        read_video(h264_video, 8, chunk_size=0)
    with pytest.raises(ValueError):
        read_video(h264_video, 8, frame_size=(0, 10))


@pytest.mark.parametrize(
    ("decoder_fps", "container_fps", "expected"),
    [
        (25.0, 30.0, 25.0),
        (float("nan"), 30.0, 30.0),
        (0.0, 24.0, 24.0),
        (1e9, 24.0, 24.0),
        (0.0, None, 1.0),
        (float("nan"), float("inf"), 1.0),
    ],
)
def test_average_fps_falls_back_when_metadata_is_broken(
    decoder_fps: float, container_fps: float | None, expected: float
) -> None:
    assert _average_fps(decoder_fps, container_fps) == expected


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
