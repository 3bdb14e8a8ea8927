"""DecodeWorker: calls in a child process, a wall-clock limit that really stops them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mediafiles import write_image, write_video

from media import DecodeTimeout, DecodeWorker, UndecodableMedia, UnsupportedMedia, read_image, read_video
from media.worker import WorkerFailure


@pytest.fixture
def worker() -> Iterator[DecodeWorker]:
    decoder = DecodeWorker(time_limit=20)
    yield decoder
    decoder.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_results_equal_decoding_in_process(worker: DecodeWorker, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", frames=20, fps=10)
    photo = write_image(tmp_path / "photo.png", size=(40, 30), mode="RGBA")

    video = worker.read_video(clip, 5, frame_size=(32, 32))
    image = worker.read_image(photo, max_pixels=10_000)

    expected = read_video(clip, 5, frame_size=(32, 32))
    np.testing.assert_array_equal(video.frames, expected.frames)
    assert video.info == expected.info
    np.testing.assert_array_equal(np.asarray(image), np.asarray(read_image(photo, max_pixels=10_000)))
    assert worker.pid != os.getpid()


def test_media_errors_keep_their_class_and_message(worker: DecodeWorker, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n" * 50)

    with pytest.raises(UnsupportedMedia, match="not a video"):
        worker.read_video(notes, 4)
    with pytest.raises(UnsupportedMedia, match="not an image"):
        worker.read_image(notes, max_pixels=100)


def test_a_stuck_call_is_killed_at_the_time_limit(worker: DecodeWorker, tmp_path: Path) -> None:
    worker.start()
    stuck = worker.pid
    started = time.monotonic()

    with pytest.raises(DecodeTimeout, match="0.5 s"):
        worker.run(time.sleep, 30, time_limit=0.5)

    assert time.monotonic() - started < 3
    assert stuck is not None and not alive(stuck)  # killed and reaped, nothing left running
    # The replacement answers the next call.
    clip = write_video(tmp_path / "after.mp4", frames=10, fps=10)
    assert worker.read_video(clip, 2).frame_indices == [0, 9]
    assert worker.pid != stuck


def test_real_decoding_over_the_limit_times_out(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "big.mp4", frames=120, fps=30, size=(640, 480))
    decoder = DecodeWorker(time_limit=0.01)
    decoder.start()
    try:
        with pytest.raises(DecodeTimeout):
            decoder.read_video(clip, 64)
    finally:
        decoder.close()


def test_a_crashing_decoder_is_an_undecodable_file(worker: DecodeWorker, tmp_path: Path) -> None:
    worker.start()
    with pytest.raises(UndecodableMedia, match="stopped unexpectedly"):
        worker.run(os.kill, worker.pid, signal.SIGKILL)  # dies mid-call, as a segfault would

    clip = write_video(tmp_path / "after-crash.mp4", frames=10, fps=10)
    assert worker.read_video(clip, 1).frame_indices == [0]


def test_other_exceptions_are_worker_failures_with_the_childs_traceback(worker: DecodeWorker) -> None:
    with pytest.raises(WorkerFailure, match="ZeroDivisionError"):
        worker.run(divmod, 1, 0)
    assert worker.run(divmod, 7, 2) == (3, 1)


def test_a_child_that_died_while_idle_is_replaced(worker: DecodeWorker) -> None:
    worker.start()
    first = worker.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    time.sleep(0.1)

    assert worker.run(divmod, 9, 4) == (2, 1)
    assert worker.pid != first


def test_children_are_recycled_after_max_jobs() -> None:
    decoder = DecodeWorker(time_limit=10, max_jobs=2)
    try:
        decoder.start()
        first = decoder.pid
        decoder.run(divmod, 1, 1)
        decoder.run(divmod, 1, 1)
        assert decoder.pid != first
        assert first is not None and not alive(first)
    finally:
        decoder.close()


def test_close_stops_the_child() -> None:
    decoder = DecodeWorker(time_limit=10)
    decoder.start()
    pid = decoder.pid
    decoder.close()

    assert pid is not None and not alive(pid)
    assert decoder.pid is None


def test_time_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DecodeWorker(time_limit=0)
