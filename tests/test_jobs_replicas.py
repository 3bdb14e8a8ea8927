"""Two served replicas sharing jobs through a real redis-server (issue 27's faults): a job
submitted to one is answered by the other and captioned by both, an upload stays with its
replica unless LLAVA_JOB_DIR is declared shared, a cancel on one stops the job everywhere, Redis
down is a 503 within seconds and the replicas recover, a job resumes when Redis restarts with
its append-only file, and a replica killed mid-job has its segments taken over by the other.

A does not declare its job folder shared, B does (both are on one machine, so it is). The two
replicas start once for the module; the kill test comes last, since it ends A.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import QuietFileHandler, running_service, service_env

from testing.mediafiles import write_minutes_video
from testing.served import free_port, kill_tree, server_pids

pytestmark = pytest.mark.served

CLAIM_SECONDS = 2
# Captions of a few tokens, one per minute of video, two frames each: jobs of seconds.
METADATA = {"segment_seconds": 60, "frames_per_segment": 2, "max_new_tokens": 2}


@dataclass
class Replica:
    name: str
    base: str
    port: int
    client: httpx.Client

    def submit(self, **body: Any) -> httpx.Response:
        return self.client.post(f"{self.base}/jobs/submit", json=body)

    def upload(self, video: Path, **metadata: Any) -> httpx.Response:
        import json

        with video.open("rb") as file:
            files = {"video": (video.name, file, "video/mp4")}
            return self.client.post(f"{self.base}/jobs/submit", files=files, data={"metadata": json.dumps(metadata)})

    def get(self, route: str, task_id: str) -> httpx.Response:
        return self.client.get(f"{self.base}/jobs/{route}", params={"task_id": task_id})

    def status(self, task_id: str) -> dict[str, Any]:
        response = self.get("status", task_id)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, task_id: str, limit: float = 60, until=lambda status: status["ended_at"] is not None) -> list[dict]:
        """Every status seen until ``until`` holds, polled often."""
        seen = [self.status(task_id)]
        deadline = time.monotonic() + limit
        while not until(seen[-1]):
            assert time.monotonic() < deadline, f"job still {seen[-1]['status']} after {limit} s: {seen[-1]}"
            time.sleep(0.1)
            seen.append(self.status(task_id))
        return seen

    def owns(self, replica_id: str) -> bool:
        """Whether the replica id (host:pid:suffix) names a process of this server."""
        return int(replica_id.split(":")[1]) in server_pids(self.port)


@dataclass
class Pair:
    a: Replica
    b: Replica
    url: str  # of the 12-minute video on the tests' file server
    video: Path
    jobs: Path  # LLAVA_JOB_DIR of both


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("replicas")
    video = write_minutes_video(folder / "twelve.mp4", 12, fps=1, size=(64, 48), noise=False)
    handler = functools.partial(QuietFileHandler, directory=str(folder))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    common = {
        "LLAVA_REDIS_URL": redis_server.url,
        "LLAVA_JOB_CLAIM_TIMEOUT_S": str(CLAIM_SECONDS),
        "LLAVA_JOB_DIR": str(folder / "jobs"),
        # One media store: the folder on "shared storage", its records in Redis.
        "LLAVA_MEDIA_DIR": str(folder / "media"),
        "LLAVA_DECODE_WORKERS": "1",
        "LLAVA_LOG_LEVEL": "INFO",
        # Their own temp folder: the replica killed below leaves its downloads behind, as a
        # machine that failed does, and other tests check that jobs leave none in the system's.
        "TMPDIR": str(folder / "tmp"),
    }
    (folder / "tmp").mkdir()
    stack = contextlib.ExitStack()
    started: dict[str, Replica] = {}

    def start(name: str, shared: bool) -> None:
        port = free_port()
        env = os.environ | service_env(tiny_checkpoint) | common | {"LLAVA_JOB_DIR_SHARED": str(shared).lower()}
        command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]
        served = running_service(command, env, port, folder / f"{name}.log")
        base = served.__enter__()
        stack.push(served.__exit__)
        started[name] = Replica(name, base, port, httpx.Client(timeout=60))

    # Both at once: each `bentoml serve` takes tens of seconds to be ready.
    threads = [threading.Thread(target=start, args=(name, shared)) for name, shared in (("a", False), ("b", True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with stack:
        assert set(started) == {"a", "b"}, "a replica did not start (see its log)"
        url = f"http://127.0.0.1:{files.server_port}/{video.name}"
        yield Pair(started["a"], started["b"], url, video, folder / "jobs")
    files.shutdown()


def assert_every_segment_once_in_order(result: dict[str, Any], count: int, seconds: float = 60) -> None:
    segments = result["segments"]
    assert [s["start"] for s in segments] == [seconds * i for i in range(count)]
    assert all(s["caption"] is not None and s["captioned_by"] for s in segments)
    assert result["status"] == "success" and result["answer"]


def assert_forward(seen: list[dict[str, Any]]) -> None:
    captioned = [status["progress"]["segments_captioned"] for status in seen]
    assert captioned == sorted(captioned), "the job's progress went back"


def test_a_job_submitted_to_one_replica_is_answered_by_the_other_and_captioned_by_both(pair: Pair) -> None:
    submitted = pair.a.submit(video_url=pair.url, metadata=METADATA)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    seen = pair.b.wait(task_id)
    assert seen[-1]["status"] == "completed"
    assert_forward(seen)
    result = pair.b.get("get", task_id)
    assert result.status_code == 200 and result.json() == pair.a.get("get", task_id).json()
    assert_every_segment_once_in_order(result.json(), 12)
    by = {s["captioned_by"] for s in result.json()["segments"]}
    assert len(by) == 2 and any(map(pair.a.owns, by)) and any(map(pair.b.owns, by)), by
    asked = pair.b.client.post(f"{pair.b.base}/jobs/ask", json={"task_id": task_id, "question": "Then?"})
    assert asked.status_code == 200 and asked.json()["response"], asked.text


def test_a_file_stored_on_one_replica_is_answered_and_deleted_on_the_other(pair: Pair, media_dir: Path) -> None:
    clip = media_dir / "clip.mp4"
    with clip.open("rb") as file:
        stored = pair.a.client.post(f"{pair.a.base}/v1/files", files={"file": file}, data={"purpose": "vision"})
    assert stored.status_code == 200, stored.text
    file_id = stored.json()["id"]
    assert pair.b.client.get(f"{pair.b.base}/v1/files/{file_id}").json() == stored.json()
    store = pair.jobs.parent / "media"
    assert (store / "blobs").is_dir() and not (store / "records").exists()  # the records are in Redis
    question = {"prompt": "What happens?", "max_new_tokens": 4}
    by_id = pair.b.client.post(f"{pair.b.base}/analyze_video", json={"media_id": file_id, "metadata": question})
    with clip.open("rb") as file:
        uploaded = pair.a.client.post(
            f"{pair.a.base}/analyze_video", files={"video": file}, data={"metadata": json.dumps(question)}
        )
    assert by_id.status_code == uploaded.status_code == 200, by_id.text
    assert by_id.json() == uploaded.json()
    assert pair.b.client.delete(f"{pair.b.base}/v1/files/{file_id}").json()["deleted"] is True
    gone = pair.a.client.post(f"{pair.a.base}/analyze_video", json={"media_id": file_id})
    assert gone.status_code == 404 and file_id in gone.json()["error"]


def test_an_upload_stays_with_its_replica_unless_the_job_folder_is_shared(pair: Pair) -> None:
    # One job at a time: with both in flight A is busy with its own segments (only A can read
    # them) and, on a loaded machine, B could caption all of the shared job's before A had room.
    results, responses = {}, {}
    for name, replica in (("shared", pair.b), ("local", pair.a)):
        # B's folder is declared shared (A reads it there too); A's is its own.
        response = responses[name] = replica.upload(pair.video, **METADATA)
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        assert pair.a.wait(task_id)[-1]["status"] == "completed"
        results[name] = pair.b.get("get", task_id).json()
        assert_every_segment_once_in_order(results[name], 12)
    assert all(pair.a.owns(s["captioned_by"]) for s in results["local"]["segments"])
    by = {s["captioned_by"] for s in results["shared"]["segments"]}
    assert any(map(pair.a.owns, by)), by
    kept = pair.jobs / "videos" / responses["shared"].json()["task_id"]
    deadline = time.monotonic() + 10
    while kept.exists():  # the shared folder's copy goes once the job has ended
        assert time.monotonic() < deadline, f"{kept} is still there"
        time.sleep(0.2)


def test_a_cancel_on_one_replica_stops_the_job_on_both(pair: Pair) -> None:
    metadata = METADATA | {"segment_seconds": 20, "max_new_tokens": 24, "ignore_eos": True}  # 36 slower captions
    task_id = pair.a.submit(video_url=pair.url, metadata=metadata).json()["task_id"]
    pair.a.wait(task_id, until=lambda status: status["progress"]["segments_captioned"] >= 2)
    assert pair.b.client.post(f"{pair.b.base}/jobs/cancel", params={"task_id": task_id}).json() == {
        "task_id": task_id,
        "status": "canceled",
    }
    assert pair.a.status(task_id)["status"] == "canceled"
    stopped = pair.a.status(task_id)["progress"]["segments_captioned"]
    time.sleep(1.5)  # several segments' time: nobody records another caption
    later = pair.b.status(task_id)
    assert later["status"] == "canceled" and later["progress"]["segments_captioned"] <= stopped + 1
    assert later["progress"]["segments_captioned"] < 36
    assert pair.b.get("get", task_id).status_code == 409


def test_redis_down_is_a_503_within_seconds_and_the_replicas_recover(pair: Pair, redis_server) -> None:
    redis_server.stop()
    try:
        started = time.monotonic()
        refused = pair.a.submit(video_url=pair.url, metadata=METADATA)
        status = pair.b.get("status", "f" * 32)
        assert time.monotonic() - started < 15
        for response in (refused, status):
            assert response.status_code == 503 and response.headers["retry-after"], response.text
            body = response.json()
            assert body["status"] == "failed" and "Redis" in body["error"] and "unavailable" in body["error"]
    finally:
        redis_server.start()  # empty: it keeps nothing on disk
    time.sleep(1)  # the replicas' next reads find the group gone and make it again
    submitted = pair.b.submit(video_url=pair.url, metadata=METADATA)
    assert submitted.status_code == 202, submitted.text
    seen = pair.a.wait(submitted.json()["task_id"])
    assert seen[-1]["status"] == "completed"


def test_a_job_resumes_when_redis_restarts_with_its_append_only_file(pair: Pair, redis_server) -> None:
    redis_server.stop()
    redis_server.start(appendonly=True)  # from here on it keeps what it is told on disk
    metadata = METADATA | {"segment_seconds": 30, "max_new_tokens": 16, "ignore_eos": True}  # 24 segments
    submitted = pair.a.submit(video_url=pair.url, metadata=metadata)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    before = pair.b.wait(task_id, until=lambda status: status["progress"]["segments_captioned"] >= 3)
    redis_server.stop()  # mid-job: the replicas' captions in flight cannot be recorded
    assert before[-1]["ended_at"] is None
    time.sleep(1)
    redis_server.start(appendonly=True)
    after = pair.b.wait(task_id)
    assert after[-1]["status"] == "completed"
    assert_forward(before + after)
    assert_every_segment_once_in_order(pair.a.get("get", task_id).json(), 24, seconds=30)


def test_a_replica_killed_mid_job_has_its_segments_taken_over(pair: Pair, redis_server) -> None:
    # Captions long next to recording one, so that A dies in the middle of one.
    metadata = METADATA | {"segment_seconds": 30, "max_new_tokens": 48, "ignore_eos": True}  # 24 segments
    task_id = pair.a.submit(video_url=pair.url, metadata=metadata).json()["task_id"]
    client = redis_server.client()
    a_pids = server_pids(pair.a.port)

    def of_a() -> list[dict]:
        pending = client.xpending_range("llava:segments", "captioners", "-", "+", 10)
        return [entry for entry in pending if int(entry["consumer"].split(":")[1]) in a_pids]

    def cut_off() -> list[int]:
        """The segments A holds and has not recorded: those it is working on."""
        recorded = {segment["start"] for segment in pair.b.status(task_id)["segments"]}
        held = [int(client.xrange("llava:segments", e["message_id"], e["message_id"])[0][1]["index"]) for e in of_a()]
        return [index for index in held if 30.0 * index not in recorded]

    before = pair.b.wait(task_id, until=lambda status: status["progress"]["segments_captioned"] >= 2)
    # Frozen first, so that what it holds cannot change; killed once it is caught mid-segment.
    for _ in range(50):
        kill_tree(pair.a.port, signal.SIGSTOP)
        if working_on := cut_off():
            break
        kill_tree(pair.a.port, signal.SIGCONT)
        time.sleep(0.02)
    kill_tree(pair.a.port)
    assert working_on, "A was never caught captioning"
    after = pair.b.wait(task_id, limit=120)
    assert after[-1]["status"] == "completed"
    assert_forward(before + after)
    result = pair.b.get("get", task_id).json()
    assert_every_segment_once_in_order(result, 24, seconds=30)
    assert all(pair.b.owns(result["segments"][index]["captioned_by"]) for index in working_on)  # taken over
