"""Processes sharing one job folder: each reads the others' progress and results, but only the
process running a job cancels it (replicas pass cancels on through Redis: test_jobs_replicas);
a failed job's result answers the
status of the error that ended it, as the same error outside a job. Real engine and decode processes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import engine_with
from starlette.testclient import TestClient

import media
from http_api import jobs_api
from http_api.errors import status_for
from jobs.errors import JobRunsElsewhere
from jobs.manager import JobLimits, JobManager, JobNotFinished, JobParameters, job_ending
from jobs.records import JobRecord, JobStatus, VideoInfo
from jobs.store import JobStore
from llava_custom.engine import GenerationSettings
from llava_custom.errors import PromptTooLong, RequestCancelled
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


def test_a_process_on_the_same_folder_sees_progress_and_results_but_cancels_only_its_own(
    loaded, video, tmp_path
) -> None:
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
            answer, (prompt_tokens, completion_tokens) = other.ask(
                done, "And then?", GenerationSettings(max_new_tokens=2)
            )
            assert isinstance(answer, str) and prompt_tokens > 0 and 0 < completion_tokens <= 2  # from the captions

            task_id = submit(runner, video, tmp_path, tokens=12)
            wait_for(lambda: other.status(task_id)["progress"]["segments_captioned"] >= 2)
            seen = other.status(task_id)
            assert seen["status"] == "in_progress" and len(seen["segments"]) == seen["progress"]["segments_captioned"]
            with pytest.raises(JobNotFinished):
                other.result(task_id)
            with pytest.raises(JobRunsElsewhere, match="LLAVA_REDIS_URL"):
                other.cancel(task_id)  # no file passes it on any more
            assert status_for(JobRunsElsewhere("x")) == 409
            assert runner.cancel(task_id) == {"task_id": task_id, "status": "canceled"}
            wait_for(lambda: runner.status(task_id)["ended_at"] is not None, limit=30)
            ended = other.status(task_id)
            assert ended["status"] == "canceled" and ended["progress"]["segments_captioned"] < 20
        finally:
            runner.close()
            other.close()


TASK = "0123456789abcdef0123456789abcdef"
INFO = VideoInfo(video_duration=60.0, start_time=0.0, end_time=60.0, segment_count=2, frames_per_segment=4)


@pytest.fixture
def served_jobs(loaded, tmp_path) -> Iterator[tuple[JobStore, Callable[[], TestClient]]]:
    """The /jobs routes over a manager of a store in ``tmp_path``; the client starts the manager,
    so that records put in the store first are there when it starts (as after a restart)."""
    store = JobStore(tmp_path / "jobs", 3600)
    decoder = media.DecodePool(1, time_limit=60)
    with engine_with(loaded) as engine, contextlib.closing(decoder), contextlib.ExitStack() as stack:

        def client() -> TestClient:
            manager = JobManager(engine, decoder, store, LIMITS)
            stack.callback(manager.close)
            app = jobs_api.create_app(lambda: manager, lambda: None)
            return stack.enter_context(TestClient(app))

        yield store, client


def pending(owner: str = "elsewhere:1") -> JobRecord:
    return JobRecord(
        task_id=TASK, owner=owner, folder=None, status=JobStatus.PENDING, created_at=time.time(), video_info=INFO
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (media.MediaTooLarge("the segment's frames are larger than the memory budget"), 413),
        (media.UnsupportedMedia("the codec is not supported"), 415),
        (media.UndecodableMedia("the video is damaged"), 422),
        (media.DecodeTimeout("decoding took too long"), 422),
        (media.SegmentOutsideVideo("no frame in that span"), 400),
    ],
)
def test_a_job_ended_by_a_media_error_answers_the_tables_status_for_it(served_jobs, error, status) -> None:
    store, client = served_jobs
    ended, failure = job_ending(error, closed=False)
    record = pending()
    record.end(ended, failure)
    store.save(record)
    response = client().get("/get", params={"task_id": TASK})
    assert status_for(error) == status  # the table's status for the error outside a job
    assert response.status_code == status and response.json() == {
        "response": "",
        "status": "failed",
        "error": str(error),
    }
    assert store.load(TASK).error_kind == type(error).__name__  # the kind, never a status


def test_a_job_cut_off_by_a_restart_or_a_bug_answers_503_or_500(served_jobs) -> None:
    store, client = served_jobs
    store.save(pending(owner=f"{socket.gethostname()}:{os.getpid()}"))  # this process's, unfinished
    jobs = client()  # the manager starts: the job was cut off
    response = jobs.get("/get", params={"task_id": TASK})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "submit it again" in response.json()["error"]
    assert jobs.get("/status", params={"task_id": TASK}).json()["status"] == "failed"
    assert store.load(TASK).error_kind == "JobInterrupted"
    for error, closed, status in (
        (RuntimeError("a bug"), False, 500),
        (PromptTooLong("the captions' prompt is too long"), False, 500),  # not the caller's: internal
        (RequestCancelled("the decoder closed"), True, 503),  # the server stopped under the job
    ):
        record = pending()
        record.end(*job_ending(error, closed=closed))
        store.save(record)
        answered = jobs.get("/get", params={"task_id": TASK})
        assert answered.status_code == status, answered.text
        if status == 500:
            assert "internal error while running the job" in answered.json()["error"]
    assert job_ending(RequestCancelled("stop"), closed=False) == (JobStatus.CANCELED, None)


def test_a_failed_job_recorded_before_kinds_answers_as_it_did(served_jobs) -> None:
    store, client = served_jobs
    jobs = client()
    for status in (503, 422, 500):
        record = pending()
        record.end(JobStatus.FAILED)
        written = record.model_dump(mode="json") | {"error": "it failed", "error_status": status}
        (store.directory / f"{TASK}.json").write_text(json.dumps(written))
        assert jobs.get("/get", params={"task_id": TASK}).status_code == status
