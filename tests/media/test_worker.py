"""DecodeWorker: calls in a child process, a wall-clock limit that really stops them; DecodePool: several at once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from media import (
    DecodePool,
    DecoderStopped,
    DecodeTimeout,
    DecodeWorker,
    SegmentOutsideVideo,
    UndecodableMedia,
    UnsupportedMedia,
    read_image,
    read_video,
)
from media.worker import WorkerFailure
from testing.mediafiles import frame_index_from_pixels, write_image, write_video


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


def test_sampling_controls_reach_the_child(worker: DecodeWorker, tmp_path: Path) -> None:
    # read_video's keyword arguments travel as they are: fps and a segment of 1.0 to 1.8 s.
    clip = write_video(tmp_path / "clip.mp4", frames=20, fps=10)
    options = {"fps": 2.5, "start_time": 1.0, "end_time": 1.8, "frame_size": (32, 32)}

    video = worker.read_video(clip, 8, **options)

    assert video.frame_indices == [10, 18]  # 0.8 s x 2.5 fps = 2 frames, over frames 10 to 18
    expected = read_video(clip, 8, **options)
    np.testing.assert_array_equal(video.frames, expected.frames)
    assert video.info == expected.info
    with pytest.raises(SegmentOutsideVideo, match="past the end"):
        worker.read_video(clip, 8, start_time=2.0)


def test_pool_forwards_sampling_controls(make_pool: Callable[..., DecodePool], tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", frames=20, fps=10)

    video = make_pool(1).read_video(clip, 8, start_time=0.5, end_time=1.5)

    assert video.frame_indices == read_video(clip, 8, start_time=0.5, end_time=1.5).frame_indices
    assert [frame_index_from_pixels(frame) for frame in video.frames] == video.frame_indices


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


def test_a_decoder_that_crashes_twice_on_a_call_is_an_undecodable_file(worker: DecodeWorker, tmp_path: Path) -> None:
    worker.start()
    first = worker.pid
    with pytest.raises(UndecodableMedia, match="crashed on this file twice"):
        worker.run(signal.raise_signal, signal.SIGSEGV)  # dies mid-call as a decoder's segfault would, each time
    assert worker.pid != first

    clip = write_video(tmp_path / "after-crash.mp4", frames=10, fps=10)
    assert worker.read_video(clip, 1).frame_indices == [0]


def kill_when_busy(worker: DecodeWorker, times: int) -> threading.Thread:
    """A thread that kills the worker's child by SIGKILL (as the OOM killer would) once it is
    running a call, ``times`` times, each time the next child."""

    def kill() -> None:
        killed: set[int] = set()
        while len(killed) < times:
            pid = worker.pid
            if pid is not None and pid not in killed:
                time.sleep(0.5)  # the call has reached the child
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_child_killed_from_outside_mid_call_is_retried_once_and_answers(worker: DecodeWorker) -> None:
    worker.start()
    killer = kill_when_busy(worker, times=1)
    assert worker.run(time.sleep, 2) is None  # the retry on a fresh child answered
    killer.join(timeout=10)
    assert worker.run(divmod, 7, 2) == (3, 1)


def test_a_call_whose_child_is_killed_twice_is_the_services_trouble_not_the_files(worker: DecodeWorker) -> None:
    worker.start()
    killer = kill_when_busy(worker, times=2)
    with pytest.raises(DecoderStopped, match="stopped twice"):
        worker.run(time.sleep, 2)
    killer.join(timeout=10)
    assert worker.run(divmod, 7, 2) == (3, 1)  # the next call gets a fresh child


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


# --- DecodePool ---
#
# The function a call runs must be importable in the child, which does not see the tests'
# modules: `sh` run by the child reports the child's pid as its $PPID, after sleeping.


def sleep_then_child_pid(seconds: float) -> list[str]:
    """A command for ``pool.run(subprocess.check_output, ...)``: prints the child's pid."""
    return ["sh", "-c", f"sleep {seconds}; echo $PPID"]


@pytest.fixture
def make_pool() -> Iterator[Callable[..., DecodePool]]:
    pools: list[DecodePool] = []

    def make(workers: int, *, time_limit: float = 20, **options: int) -> DecodePool:
        pool = DecodePool(workers, time_limit=time_limit, **options)
        pools.append(pool)
        pool.start()
        # One overlapping call per worker, so that each child has finished its imports.
        with ThreadPoolExecutor(workers) as threads:
            list(threads.map(lambda _: pool.run(time.sleep, 0.3), range(workers)))
        return pool

    yield make
    for pool in pools:
        pool.close()


def test_pool_calls_run_in_parallel_in_different_children(make_pool: Callable[..., DecodePool]) -> None:
    pool = make_pool(3)
    started = time.monotonic()

    with ThreadPoolExecutor(3) as threads:
        outputs = list(threads.map(lambda _: pool.run(subprocess.check_output, sleep_then_child_pid(1.0)), range(3)))

    assert time.monotonic() - started < 2.5  # one after the other would take 3 s
    assert sorted(int(output) for output in outputs) == sorted(pool.pids)
    assert len(set(pool.pids)) == pool.size == 3


def test_pool_a_timeout_does_not_disturb_a_concurrent_call(
    make_pool: Callable[..., DecodePool], tmp_path: Path
) -> None:
    pool = make_pool(2)
    clip = write_video(tmp_path / "clip.mp4", frames=20, fps=10)
    before = pool.pids
    decoded = threading.Event()

    def stuck() -> None:
        with pytest.raises(DecodeTimeout):
            pool.run(time.sleep, 30, time_limit=0.5)
        assert decoded.is_set()  # the other call finished while this one was still stuck

    with ThreadPoolExecutor(2) as threads:
        stuck_call = threads.submit(stuck)
        time.sleep(0.1)  # the stuck call holds its worker: the decode gets the other one
        video = threads.submit(pool.read_video, clip, 4).result()
        decoded.set()
        stuck_call.result()

    assert [frame_index_from_pixels(frame) for frame in video.frames] == video.frame_indices == [0, 6, 12, 19]
    after = pool.pids
    assert len(after) == 2 and len(set(before) & set(after)) == 1  # only the stuck child was replaced
    (killed,) = set(before) - set(after)
    assert not alive(killed)
    assert all(alive(pid) for pid in after)


def test_pool_a_crash_costs_only_its_own_call(make_pool: Callable[..., DecodePool], tmp_path: Path) -> None:
    pool = make_pool(2)
    clip = write_video(tmp_path / "clip.mp4", frames=10, fps=10)
    before = pool.pids

    with ThreadPoolExecutor(2) as threads:
        # SIGSEGV raised by the child on itself, as a decoder's segfault would end it.
        crash = threads.submit(pool.run, signal.raise_signal, signal.SIGSEGV)
        decode = threads.submit(pool.read_video, clip, 2)
        with pytest.raises(UndecodableMedia, match="crashed on this file twice"):
            crash.result()
        assert decode.result().frame_indices == [0, 9]

    after = pool.pids
    assert len(after) == pool.size == 2 and all(alive(pid) for pid in after)
    assert len(set(before) & set(after)) == 1
    # Both workers still decode.
    with ThreadPoolExecutor(2) as threads:
        videos = list(threads.map(lambda _: pool.read_video(clip, 1), range(2)))
    assert [video.frame_indices for video in videos] == [[0], [0]]


def test_pool_more_calls_than_workers_wait_and_all_complete(make_pool: Callable[..., DecodePool]) -> None:
    pool = make_pool(2)
    started = time.monotonic()

    with ThreadPoolExecutor(6) as threads:
        outputs = list(threads.map(lambda _: pool.run(subprocess.check_output, sleep_then_child_pid(0.3)), range(6)))

    # Six calls, two at a time: at least three rounds of 0.3 s.
    assert time.monotonic() - started >= 0.9
    assert {int(output) for output in outputs} == set(pool.pids)


def test_pool_close_stops_the_children_and_refuses_calls(make_pool: Callable[..., DecodePool]) -> None:
    pool = make_pool(2)
    pids = pool.pids
    pool.close()

    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(divmod, 1, 1)
    with pytest.raises(RuntimeError, match="closed"):
        pool.start()
    assert pool.pids == []


def test_pool_close_waits_for_calls_in_flight_and_wakes_waiting_ones(
    make_pool: Callable[..., DecodePool],
) -> None:
    pool = make_pool(1)
    (pid,) = pool.pids

    with ThreadPoolExecutor(2) as threads:
        busy = threads.submit(pool.run, time.sleep, 0.5)
        time.sleep(0.1)
        waiting = threads.submit(pool.run, divmod, 1, 1)  # no idle worker: waits
        time.sleep(0.1)
        pool.close()
        assert busy.done() and busy.exception() is None  # close() let it finish
        with pytest.raises(RuntimeError, match="closed"):
            waiting.result(timeout=5)
    assert not alive(pid)


def test_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="workers"):
        DecodePool(0, time_limit=10)
