"""Long videos as jobs over HTTP, on a served demo (`bentoml serve`, tiny model, real videos).

The videos change content every minute (testing/mediafiles.write_minutes_video: the top of each
frame has its minute's colour, the rest is noise, so files grow with their length like real
recordings). Captions are gibberish (random weights): the tests check what the service controls,
the segments, the frames each caption saw, progress, cancel, failures, limits and memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import QuietFileHandler, running_service, service_env

from testing.mediafiles import write_minutes_video
from testing.served import free_port

pytestmark = pytest.mark.served

TOKENS = 4
MiB = 1024 * 1024


class JobService:
    """A served demo for jobs, restartable on the same job folder."""

    def __init__(self, checkpoint: Path, folder: Path) -> None:
        self.checkpoint = checkpoint
        self.folder = folder
        self.stack = contextlib.ExitStack()
        self.base = ""
        self.port = 0
        self.client = httpx.Client(timeout=120)

    def start(self) -> None:
        self.port = free_port()
        env = (
            os.environ
            | service_env(self.checkpoint)
            | {
                "LLAVA_JOB_DIR": str(self.folder / "jobs"),
                "LLAVA_MAX_NEW_TOKENS": str(TOKENS),
                "LLAVA_MAX_JOB_VIDEO_SECONDS": "1500",
                "LLAVA_MAX_JOB_SEGMENTS": "60",
                "LLAVA_MAX_PENDING_JOBS": "1",
                "LLAVA_DECODE_WORKERS": "1",
            }
        )
        command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(self.port)]
        log = self.folder / f"serve-{self.port}.log"
        self.base = self.stack.enter_context(running_service(command, env, self.port, log))

    def stop(self) -> None:
        self.stack.close()

    def submit(self, video: Path, **metadata: Any) -> httpx.Response:
        with video.open("rb") as file:
            return self.client.post(
                f"{self.base}/jobs/submit",
                files={"video": (video.name, file, "video/mp4")},
                data={"metadata": json.dumps(metadata)},
            )

    def submitted(self, video: Path, **metadata: Any) -> str:
        response = self.submit(video, **metadata)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    def status(self, task_id: str) -> dict[str, Any]:
        response = self.client.get(f"{self.base}/jobs/status", params={"task_id": task_id})
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, task_id: str, limit: float = 180) -> list[dict[str, Any]]:
        """Every status seen until the job ended (a cancelled one too), polled often."""
        seen = [self.status(task_id)]
        deadline = time.monotonic() + limit
        while seen[-1]["ended_at"] is None:
            assert time.monotonic() < deadline, f"job still {seen[-1]['status']} after {limit} s"
            time.sleep(0.1)
            seen.append(self.status(task_id))
        return seen

    def memory(self) -> int:
        """Resident bytes of the whole server: its main process, the worker, decode children."""
        root = next(
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "serve" in p.info["cmdline"] and str(self.port) in p.info["cmdline"]
        )
        total = 0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total


def job_folders() -> set[str]:
    """The folders the service keeps job videos in while they run (under the system temp dir)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("llava-job-*")}


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobService]:
    running = JobService(tiny_checkpoint, tmp_path_factory.mktemp("jobs-served"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("long-videos")
    made = {
        "five": write_minutes_video(folder / "five.mp4", 5),
        "twenty": write_minutes_video(folder / "twenty.mp4", 20),
        "too_long": write_minutes_video(folder / "too_long.mp4", 26, fps=1, size=(64, 48), noise=False),
    }
    # Three minutes whose middle third of bytes is zeroed: the second minute cannot be decoded.
    damaged = write_minutes_video(folder / "damaged.mp4", 3, size=(96, 72))
    data = bytearray(damaged.read_bytes())
    data[len(data) * 45 // 100 : len(data) * 55 // 100] = bytes(len(data) * 55 // 100 - len(data) * 45 // 100)
    damaged.write_bytes(bytes(data))
    made["damaged"] = damaged
    (folder / "notes.txt").write_text("not a video\n" * 10)
    made["text"] = folder / "notes.txt"
    return made


@pytest.fixture(scope="module")
def finished(service: JobService, videos: dict[str, Path]) -> dict[str, Any]:
    """A job over minutes 0:30 to 4:30 of the 5-minute video: 60 s segments overlapping 10 s."""
    task_id = service.submitted(
        videos["five"], segment_seconds=60, overlap_seconds=10, frames_per_segment=4, start_time=30, end_time=270
    )
    service.wait(task_id)
    response = service.client.get(f"{service.base}/jobs/get", params={"task_id": task_id})
    assert response.status_code == 200, response.text
    return {"task_id": task_id, "result": response.json()}


def test_segments_cover_the_span_without_gaps_and_each_caption_saw_its_own_frames(finished) -> None:
    result = finished["result"]
    segments = result["segments"]
    assert result["status"] == "success" and result["answer"]
    assert segments[0]["start"] == 30 and segments[-1]["end"] == 270
    for before, after in zip(segments, segments[1:], strict=False):
        assert after["start"] == pytest.approx(before["end"] - 10)  # the overlap asked for, no gap
    for segment in segments:
        times = segment["frame_times"]
        assert segment["caption"] and segment["error"] is None
        assert len(times) == 4 and times == sorted(times)
        # At 2 fps: inside the segment, spread over it, and a frame at the end opens the next one.
        assert segment["start"] <= times[0] <= segment["start"] + 0.5
        assert times[-1] < segment["end"] or segment is segments[-1]
        assert times[-1] >= segment["end"] - (segment["end"] - segment["start"]) / 4
    info = result["video_info"]
    assert info["video_duration"] == pytest.approx(300) and info["segment_count"] == len(segments) == 5
    assert result["usage"]["completion_tokens"] >= TOKENS * len(segments)


def test_a_url_job_gives_the_same_segments_as_an_upload(service, videos, finished) -> None:
    handler = functools.partial(QuietFileHandler, directory=str(videos["five"].parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/five.mp4"
    metadata = {
        "segment_seconds": 60,
        "overlap_seconds": 10,
        "frames_per_segment": 4,
        "start_time": 30,
        "end_time": 270,
    }
    response = service.client.post(f"{service.base}/jobs/submit", json={"video_url": url, "metadata": metadata})
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    service.wait(task_id)
    result = service.client.get(f"{service.base}/jobs/get", params={"task_id": task_id}).json()
    server.shutdown()
    server.server_close()
    strip = [{k: s[k] for k in ("start", "end", "frame_times")} for s in result["segments"]]
    assert strip == [{k: s[k] for k in ("start", "end", "frame_times")} for s in finished["result"]["segments"]]


def test_questions_afterwards_are_answered_from_the_captions(service, finished) -> None:
    task_id = finished["task_id"]
    ask = f"{service.base}/jobs/ask"
    response = service.client.post(ask, json={"task_id": task_id, "question": "When does it turn red?"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success" and body["response"]
    # Text only: the prompt holds the captions, not the video's visual tokens.
    assert 0 < body["usage"]["prompt_tokens"] < finished["result"]["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == TOKENS or body["usage"]["completion_tokens"] < TOKENS
    for payload, status in (({"question": ""}, 400), ({"question": "x", "frames": 3}, 400), ({}, 400)):
        assert service.client.post(ask, json={"task_id": task_id, **payload}).status_code == status
    assert service.client.post(ask, json={"question": "x"}).status_code == 400  # no task_id
    unknown = service.client.post(ask, json={"task_id": "0" * 32, "question": "x"})
    assert unknown.status_code == 404 and unknown.json()["status"] == "failed"


def sample_memory(service: JobService, samples: list[int], done: threading.Event) -> None:
    while not done.is_set():
        samples.append(service.memory())
        time.sleep(0.05)


def test_progress_only_moves_forward_and_memory_stays_flat_from_5_to_20_minutes(service, videos) -> None:
    peaks = {}
    statuses = {}
    for name in ("five", "twenty"):
        samples: list[int] = []
        done = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(service, samples, done))
        sampler.start()
        try:
            task_id = service.submitted(videos[name], segment_seconds=30, frames_per_segment=4)
            statuses[name] = service.wait(task_id)
        finally:
            done.set()
            sampler.join()
        peaks[name] = max(samples)
    seen = statuses["twenty"]
    assert seen[-1]["status"] == "completed"
    counts = [
        (s["progress"]["segments_decoded"], s["progress"]["segments_captioned"], s["progress"]["generated_tokens"])
        for s in seen
    ]
    for column in zip(*counts, strict=True):  # decoded, captioned, tokens: each only grows
        assert list(column) == sorted(column)
    assert seen[-1]["progress"]["segments_captioned"] == seen[-1]["progress"]["segments_total"] == 40
    # Captions are readable before the end, in order.
    partial = [s for s in seen if 0 < len(s["segments"]) < 40]
    assert partial and all(
        [x["start"] for x in s["segments"]] == sorted(x["start"] for x in s["segments"]) for s in partial
    )
    assert any(s["progress"]["remaining_seconds"] for s in partial)
    # Four times the video (its file: 28 -> 110 MB) without more memory: segments are decoded one
    # at a time and uploads go to disk. (The service has run jobs before: allocators are warm.)
    growth = peaks["twenty"] - peaks["five"]
    assert growth < 40 * MiB, f"peak memory grew by {growth / MiB:.0f} MiB from a 5- to a 20-minute video"


def test_a_damaged_middle_segment_is_reported_in_its_place_and_the_job_completes(service, videos) -> None:
    task_id = service.submitted(videos["damaged"], segment_seconds=60, frames_per_segment=4)
    assert service.wait(task_id)[-1]["status"] == "completed"
    segments = service.client.get(f"{service.base}/jobs/get", params={"task_id": task_id}).json()["segments"]
    assert [s["error"] is None for s in segments] == [True, False, True]
    assert segments[1]["caption"] is None and "damaged" in segments[1]["error"]
    assert segments[0]["caption"] and segments[2]["caption"]


def test_interactive_requests_keep_their_place_and_cancel_stops_a_running_and_a_waiting_job(
    service, videos, media_dir
) -> None:
    running = service.submitted(videos["twenty"], segment_seconds=30, frames_per_segment=4, max_new_tokens=24)
    with (media_dir / "clip.mp4").open("rb") as clip:  # a question about another video meanwhile
        answer = service.client.post(f"{service.base}/analyze_video", files={"video": ("clip.mp4", clip, "video/mp4")})
    assert answer.status_code == 200 and service.status(running)["status"] == "in_progress"
    waiting = service.submitted(videos["five"], segment_seconds=30)
    assert service.status(waiting)["status"] == "pending"
    full = service.submit(videos["five"])  # one waiting job is the limit here
    assert full.status_code == 503 and full.headers["retry-after"] and "waiting" in full.json()["error"]
    deadline = time.monotonic() + 60
    while service.status(running)["progress"]["segments_captioned"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for task_id in (waiting, running):
        response = service.client.post(f"{service.base}/jobs/cancel", params={"task_id": task_id})
        assert response.json() == {"task_id": task_id, "status": "canceled"}
    ended = service.wait(running, limit=15)[-1]
    assert ended["status"] == "canceled" and ended["progress"]["segments_captioned"] < 40
    time.sleep(1)
    assert service.status(running) == ended  # nothing more was done
    never = service.wait(waiting, limit=15)[-1]
    assert never["status"] == "canceled" and never["progress"]["segments_decoded"] == 0
    assert job_folders() == set()  # each job's copy of its video is gone with it
    result = service.client.get(f"{service.base}/jobs/get", params={"task_id": running})
    assert result.status_code == 409 and "cancelled" in result.json()["error"]


def test_bad_submissions_get_clear_errors(service, videos) -> None:
    def error(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        assert response.json()["status"] == "failed"
        return response.json()["error"]

    assert "1500-second limit" in error(service.submit(videos["too_long"]), 413)
    assert "over the limit of 60" in error(service.submit(videos["twenty"], segment_seconds=10), 400)
    assert "outside the video" in error(service.submit(videos["five"], start_time=400), 400)
    assert "at most 64" in error(service.submit(videos["five"], frames_per_segment=65), 400)
    assert "shorter than segment_seconds" in error(service.submit(videos["five"], overlap_seconds=30), 400)
    assert error(service.submit(videos["text"]), 415)
    post = service.client.post
    assert "no video" in error(post(f"{service.base}/jobs/submit", json={"metadata": {}}), 400)
    assert "metadata" in error(post(f"{service.base}/jobs/submit", json={"video_url": "x", "question": "?"}), 400)
    assert error(post(f"{service.base}/jobs/submit", json={"video_url": "http://169.254.169.254/v.mp4"}), 400)
    # A job may upload what /analyze_video refuses (LLAVA_MAX_UPLOAD_BYTES is 2 MiB here).
    with videos["five"].open("rb") as file:
        refused = post(f"{service.base}/analyze_video", files={"video": ("five.mp4", file, "video/mp4")})
    assert refused.status_code == 413
    assert "expired" in error(service.client.get(f"{service.base}/jobs/status", params={"task_id": "f" * 32}), 404)
    assert "not a task id" in error(service.client.get(f"{service.base}/jobs/get?task_id=../../etc"), 404)
    assert "task_id is required" in error(service.client.get(f"{service.base}/jobs/get"), 400)
    assert error(service.client.get(f"{service.base}/jobs/nothing-here"), 404)  # our body, not Starlette's
    assert job_folders() == set()  # refused submissions leave no file behind


def test_finished_results_survive_a_restart_and_a_job_cut_off_says_so(service, videos, finished) -> None:
    cut_off = service.submitted(videos["twenty"], segment_seconds=30, frames_per_segment=4)
    service.stop()
    service.start()
    result = service.client.get(f"{service.base}/jobs/get", params={"task_id": finished["task_id"]})
    assert result.status_code == 200 and result.json() == finished["result"]
    question = {"task_id": finished["task_id"], "question": "And then?"}
    asked = service.client.post(f"{service.base}/jobs/ask", json=question)
    assert asked.status_code == 200 and asked.json()["response"]
    status = service.status(cut_off)
    assert status["status"] == "failed" and "submit it again" in status["error"]
    cut = service.client.get(f"{service.base}/jobs/get", params={"task_id": cut_off})  # as the service stopping
    assert cut.status_code == 503 and cut.headers["retry-after"] and cut.json()["error"] == status["error"]
