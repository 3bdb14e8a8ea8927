"""Replicas sharing one job folder (a Kubernetes volume): each reads the others' progress and
results, and a cancel sent to one stops the job another runs. Real engine and decode processes."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from conftest import engine_with

import media
from jobs.manager import JobLimits, JobManager, JobNotFinished, JobParameters
from jobs.store import JobStore
from llava_custom.engine import GenerationSettings
from testing.mediafiles import write_minutes_video

LIMITS = JobLimits(max_video_seconds=3600, max_segments=100, max_frames=64)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_minutes_video(tmp_path_factory.mktemp("shared") / "ten.mp4", 10, size=(64, 48))


def submit(manager: JobManager, video: Path, tmp_path: Path, tokens: int) -> str:
    folder = tmp_path / f"job-{time.monotonic_ns()}"
    folder.mkdir()
    source = folder / "upload"
    source.write_bytes(video.read_bytes())
    parameters = JobParameters(
        GenerationSettings(max_new_tokens=tokens, ignore_eos=True), segment_seconds=30, frames_per_segment=2
    )
    return manager.submit(source, folder, parameters)["task_id"]


def wait_for(condition, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_replica_on_the_same_folder_sees_progress_and_results_and_can_cancel(loaded, video, tmp_path) -> None:
    store_dir = tmp_path / "jobs"
    decoder = media.DecodePool(1, time_limit=60)
    with engine_with(loaded, max_batch_size=2) as engine, contextlib.closing(decoder):
        runner = JobManager(engine, decoder, JobStore(store_dir, 3600), LIMITS)
        other = JobManager(engine, decoder, JobStore(store_dir, 3600), LIMITS)  # never runs these jobs
        try:
            done = submit(runner, video, tmp_path, tokens=2)
            wait_for(lambda: other.status(done)["status"] == "completed")
            assert other.result(done) == runner.result(done)
            assert other.status(done) == runner.status(done)

            task_id = submit(runner, video, tmp_path, tokens=12)
            wait_for(lambda: other.status(task_id)["progress"]["segments_captioned"] >= 2)
            seen = other.status(task_id)
            assert seen["status"] == "in_progress" and len(seen["segments"]) == seen["progress"]["segments_captioned"]
            with pytest.raises(JobNotFinished):
                other.result(task_id)
            assert other.cancel(task_id) == {"task_id": task_id, "status": "canceled"}
            wait_for(lambda: runner.status(task_id)["ended_at"] is not None, limit=30)
            ended = other.status(task_id)
            assert ended["status"] == "canceled" and ended["progress"]["segments_captioned"] < 20
        finally:
            runner.close()
            other.close()
