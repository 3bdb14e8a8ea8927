"""The faults of real machines and clients, each against a served instance (issue 29): slow
clients dropped after their timeouts (settings), a request that outlasts LLAVA_REQUEST_TIMEOUT,
a burst far above capacity, a decode process killed mid-request. Each has its clear outcome, and
the service keeps answering afterwards."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import service_env

from testing.mediafiles import write_image, write_minutes_video, write_video
from testing.served import free_port, kill_tree, running_service

pytestmark = pytest.mark.served
BODY_TIMEOUT, BODY_IDLE_TIMEOUT, REQUEST_TIMEOUT = 6, 2, 3
LONG_ANSWER = 32000  # tokens (the tiny model's whole context): far longer than REQUEST_TIMEOUT allows


@dataclass
class Faulty:
    base: str
    port: int
    root: int  # the pid of `bentoml serve`
    log: Path
    folder: Path  # its TMPDIR is folder / "tmp", its media store folder / "media"
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log.read_text()

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.base}/metrics", timeout=30).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        raise AssertionError(f"{name} is not on /metrics")

    def server_processes(self) -> list[psutil.Process]:
        """The server's processes: `bentoml serve`, its worker (in a session of its own) and the
        worker's decode processes."""
        root = psutil.Process(self.root)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        total = 0
        for process in self.server_processes():
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def decoders(self) -> list[psutil.Process]:
        return [p for p in self.server_processes() if "media.worker" in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def faulty(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    folder = tmp_path_factory.mktemp("faults")
    (folder / "tmp").mkdir()
    port = free_port()
    env = (
        os.environ
        | service_env(tiny_checkpoint)
        | {
            # Its own temp folder, job records and media store: the SIGKILL test looks in them.
            "TMPDIR": str(folder / "tmp"),
            "LLAVA_JOB_DIR": str(folder / "jobs"),
            "LLAVA_MEDIA_DIR": str(folder / "media"),
            "LLAVA_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
            "LLAVA_BODY_IDLE_TIMEOUT_S": str(BODY_IDLE_TIMEOUT),
            "LLAVA_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
            "LLAVA_MAX_NEW_TOKENS_LIMIT": str(LONG_ANSWER),
            "LLAVA_MAX_FRAMES": "16",
            "LLAVA_KV_CACHE_TOKENS": "65536",
            "LLAVA_DECODE_WORKERS": "1",
            "LLAVA_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        }
    )
    command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]
    log = folder / "serve.log"
    with running_service(command, env, port, log) as base:
        root = next(p for p in psutil.process_iter() if str(port) in _cmdline(p) and "serve" in _cmdline(p))
        yield Faulty(base, port, root.pid, log, folder, env)


def quick_answer(faulty: Faulty) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4}
    return httpx.post(f"{faulty.base}/v1/chat/completions", json=body, timeout=60)


def multipart_head(boundary: str, total: int, host: str) -> bytes:
    return (
        f"POST /analyze_image HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {total}\r\n\r\n--{boundary}\r\n"
        'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()


def status_of_reply(connection: socket.socket, limit: float) -> tuple[int, bytes]:
    """The status line's code and what came, read until the server closes (or ``limit`` s)."""
    connection.settimeout(limit)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1") else 0, received


def test_an_upload_trickling_in_is_refused_after_the_body_timeout_and_others_are_answered(faulty):
    host = f"127.0.0.1:{faulty.port}"
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", faulty.port)) as connection:
        connection.sendall(multipart_head("trickle", 10_000, host))
        answered_meanwhile = []
        while time.monotonic() - began < BODY_TIMEOUT + 3:
            try:
                connection.sendall(b"x")  # one byte a second: never idle for BODY_IDLE_TIMEOUT
            except OSError:
                break  # the server closed the connection
            if not answered_meanwhile:
                answered_meanwhile.append(quick_answer(faulty).status_code)
            time.sleep(1)
        status, received = status_of_reply(connection, 10)
    took = time.monotonic() - began
    assert status == 408, received[:500]
    assert b"LLAVA_BODY_TIMEOUT_S" in received and BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 5
    assert answered_meanwhile == [200]


def test_an_upload_that_stops_arriving_is_refused_after_the_idle_timeout(faulty):
    host = f"127.0.0.1:{faulty.port}"
    with socket.create_connection(("127.0.0.1", faulty.port)) as connection:
        began = time.monotonic()
        connection.sendall(multipart_head("stalled", 10_000, host) + b"\x89PNG" + b"y" * 1000)
        status, received = status_of_reply(connection, BODY_TIMEOUT + 5)
    took = time.monotonic() - began
    assert status == 408 and b"LLAVA_BODY_IDLE_TIMEOUT_S" in received, received[:500]
    assert BODY_IDLE_TIMEOUT - 0.5 < took < BODY_TIMEOUT, took
    assert b"connection: close" in received.lower()


def test_a_stream_nobody_reads_is_dropped_and_its_generation_stopped(caplog):
    """The guard in front of a real Starlette stream, through ASGI: a client whose socket takes
    nothing (its ``send`` never returns, as uvicorn's does once the buffers are full) is dropped
    after the send timeout, the stream's generator is closed (the engine's request cancelled, in
    the service) and the app returns. (On a served instance the socket buffers hold megabytes of
    answer first, too many for a test to fill in a bounded time on a slow machine.)"""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from http_api.guard import DroppedClientFilter, GuardLimits, RequestGuard

    closed = asyncio.Event()

    async def tokens():
        try:
            while True:
                yield "data: token\n\n"
                await asyncio.sleep(0.001)
        finally:
            closed.set()  # the service's stream cancels its request here

    async def chat(request):
        return StreamingResponse(tokens(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    limits = GuardLimits(max_upload_bytes=1024, max_json_bytes=1024, max_in_flight=4, send_timeout=0.3)
    guarded = RequestGuard(app, limits)
    body = b'{"messages": []}'
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    sent: list[dict] = []

    async def run() -> float:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        forever = asyncio.Event()

        async def receive():
            if messages:
                return messages.pop(0)
            await forever.wait()  # the client says nothing more, and does not leave

        async def send(message):
            if len(sent) >= 3:  # the client's buffers are full: nothing more is taken
                await forever.wait()
            sent.append(message)

        began = time.monotonic()
        await asyncio.wait_for(guarded(scope, receive, send), 10)
        return time.monotonic() - began

    drops = DroppedClientFilter.drops
    with caplog.at_level("INFO", logger="llava_video_service"):
        took = asyncio.run(run())
    assert closed.is_set() and 0.3 <= took < 5
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200 and len(sent) == 3
    assert "LLAVA_SEND_TIMEOUT_S" in caplog.text
    assert DroppedClientFilter.drops == drops + 1  # uvicorn's "returned without completing" is then INFO


def test_a_request_past_the_request_timeout_ends_with_503_and_the_engine_serves_on(faulty):
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": LONG_ANSWER, "ignore_eos": True}
    began = time.monotonic()
    response = httpx.post(f"{faulty.base}/v1/chat/completions", json=body, timeout=120)
    took = time.monotonic() - began
    assert response.status_code == 503, response.text
    assert "LLAVA_REQUEST_TIMEOUT" in response.json()["error"]["message"] and response.headers["retry-after"]
    assert REQUEST_TIMEOUT <= took < REQUEST_TIMEOUT + 15
    assert quick_answer(faulty).status_code == 200
    assert faulty.metric("llava_requests_running") == 0


def test_a_burst_far_above_capacity_gets_200_or_503_each_and_memory_stays_bounded(faulty, media_dir):
    photo = "data:image/jpeg;base64," + base64.b64encode((media_dir / "photo.jpg").read_bytes()).decode()
    body = {"image_url": photo, "metadata": {"prompt": "What is it?", "max_new_tokens": 4}}
    before = faulty.rss()
    answers: list[httpx.Response | Exception] = []
    start = threading.Barrier(50)

    def client(count: int) -> None:
        start.wait()
        with httpx.Client(timeout=120) as http:
            for _ in range(count):
                try:
                    answers.append(http.post(f"{faulty.base}/analyze_image", json=body))
                except Exception as error:  # a request lost without an answer fails the test below
                    answers.append(error)

    threads = [threading.Thread(target=client, args=(4,)) for _ in range(50)]  # 200 requests, 50 at a time
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = [answer for answer in answers if isinstance(answer, Exception)]
    assert len(answers) == 200 and lost == []
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 6, statuses
    assert all(a.headers.get("retry-after") and a.json()["status"] == "failed" for a in answers if a.status_code == 503)
    assert all(a.json()["status"] == "success" for a in answers if a.status_code == 200)
    assert faulty.rss() - before < 400 * 1024 * 1024
    assert httpx.get(f"{faulty.base}/readyz", timeout=10).status_code == 200
    assert quick_answer(faulty).status_code == 200


def test_a_decode_process_killed_mid_request_is_retried_and_the_pool_refills(faulty, tmp_path):
    video = write_video(tmp_path / "big.mp4", frames=240, fps=24, size=(1920, 1080))
    write_image(tmp_path / "unused.png")
    metadata = json.dumps({"prompt": "What happens?", "num_frames": 16, "max_new_tokens": 4})
    for _attempt in range(5):
        retries = faulty.log_text().count("retrying on a fresh one")
        (decoder,) = faulty.decoders()
        busy_before = sum(decoder.cpu_times()[:2])
        answer: dict[str, httpx.Response] = {}

        def ask(answer: dict[str, httpx.Response] = answer) -> None:
            with video.open("rb") as file:
                answer["r"] = httpx.post(
                    f"{faulty.base}/analyze_video", files={"video": file}, data={"metadata": metadata}, timeout=120
                )

        thread = threading.Thread(target=ask)
        thread.start()
        while sum(decoder.cpu_times()[:2]) - busy_before < 0.05 and thread.is_alive():  # it is decoding
            time.sleep(0.005)
        os.kill(decoder.pid, signal.SIGKILL)
        thread.join(timeout=120)
        assert answer["r"].status_code == 200, answer["r"].text
        if faulty.log_text().count("retrying on a fresh one") > retries:
            break  # killed mid-call, and answered by the fresh process
    else:
        pytest.fail("the decode process was never caught mid-call")
    deadline = time.monotonic() + 30
    while not (faulty.decoders() and faulty.decoders()[0].pid != decoder.pid):
        assert time.monotonic() < deadline, "the pool did not refill"
        time.sleep(0.1)
    assert quick_answer(faulty).status_code == 200
    with video.open("rb") as file:
        again = httpx.post(
            f"{faulty.base}/analyze_video", files={"video": file}, data={"metadata": metadata}, timeout=120
        )
    assert again.status_code == 200 and again.json()["response"] == answer["r"].json()["response"]


def test_a_server_killed_mid_upload_and_mid_job_leaves_nothing_once_restarted(faulty, tmp_path):
    """Runs last: it kills the module's server."""
    host = f"127.0.0.1:{faulty.port}"
    uploads = []
    for path, route in (("/jobs/submit", "video"), ("/v1/files", "file")):  # bodies half sent, then left
        connection = socket.create_connection(("127.0.0.1", faulty.port))
        head = multipart_head("killed", 4_000_000, host).replace(b"/analyze_image", path.encode())
        # Past the guard's first MiB, so that the route has started receiving the file.
        connection.sendall(head.replace(b'name="image"', f'name="{route}"'.encode()) + b"z" * 2_000_000)
        uploads.append(connection)
    video = write_minutes_video(tmp_path / "twenty.mp4", 20, size=(64, 48), noise=False)
    submitted = httpx.post(
        f"{faulty.base}/jobs/submit",
        files={"video": video.open("rb")},
        data={"metadata": json.dumps({"segment_seconds": 10, "frames_per_segment": 8})},
        timeout=60,
    )
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    tmp, incoming = faulty.folder / "tmp", faulty.folder / "media" / "incoming"
    deadline = time.monotonic() + 60
    while True:  # mid-job (a segment captioned, not all), both uploads being received
        status = httpx.get(f"{faulty.base}/jobs/status", params={"task_id": task_id}, timeout=30).json()
        receiving = list(tmp.glob("llava-job-*")) and list(incoming.iterdir())
        if status["progress"]["segments_captioned"] >= 1 and receiving:
            break
        assert status["ended_at"] is None and time.monotonic() < deadline, (status, receiving)
        time.sleep(0.05)
    left_before = {path.name for path in tmp.glob("llava-*")}
    kill_tree(faulty.port)
    for connection in uploads:
        connection.close()
    assert any(name.startswith("llava-job-") for name in left_before)

    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]
    with running_service(command, faulty.env, port, faulty.folder / "restarted.log") as base:
        left = {path.name for path in tmp.glob("llava-*")}
        assert not left & left_before, left  # what the killed server left is gone
        assert list(incoming.iterdir()) == []
        status = httpx.get(f"{base}/jobs/status", params={"task_id": task_id}, timeout=30).json()
        assert status["status"] == "failed" and "submit it again" in status["error"], status
        assert httpx.get(f"{base}/v1/files", timeout=30).json()["data"] == []


# --- a full disk: every file the server writes is capped (RLIMIT_FSIZE), so large writes fail --

DISK_BYTES = 3_000_000


@pytest.fixture(scope="module")
def full_disk(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("full-disk")
    (folder / "tmp").mkdir()
    port = free_port()
    env = (
        os.environ
        | service_env(tiny_checkpoint)
        | {
            "TMPDIR": str(folder / "tmp"),
            "LLAVA_JOB_DIR": str(folder / "jobs"),
            "LLAVA_MEDIA_DIR": str(folder / "media"),
            "LLAVA_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
            "LLAVA_DECODE_WORKERS": "1",
        }
    )
    command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]
    with running_service(command, env, port, folder / "serve.log", max_file_bytes=DISK_BYTES) as base:
        yield base, folder


def test_a_full_disk_is_a_507_on_every_upload_route_nothing_is_left_and_small_files_still_work(
    full_disk, media_dir, tmp_path
):
    base, folder = full_disk
    big = write_minutes_video(tmp_path / "big.mp4", 0.1, size=(1280, 720))
    assert big.stat().st_size > DISK_BYTES
    for route, part in (
        ("/analyze_video", "video"),
        ("/v1/files", "file"),
        ("/media", "file"),
        ("/jobs/submit", "video"),
    ):
        with big.open("rb") as file:
            response = httpx.post(f"{base}{route}", files={part: file}, timeout=120)
        assert response.status_code == 507, (route, response.text)
        assert response.headers["retry-after"]
        message = response.json()["error"]["message"] if route.startswith("/v1/") else response.json()["error"]
        assert "no room left" in message, (route, message)
    # Nothing half-written is left, and nothing was stored.
    assert [path.name for path in (folder / "tmp").iterdir() if path.name.startswith("llava-")] == []
    assert list((folder / "media" / "incoming").iterdir()) == [] and list((folder / "media" / "blobs").iterdir()) == []
    assert httpx.get(f"{base}/v1/files", timeout=30).json()["data"] == []
    log = (folder / "serve.log").read_text()
    assert "Traceback" not in log and " 507 " in log
    # Files that fit are answered as ever: the failures broke nothing.
    with (media_dir / "clip.mp4").open("rb") as file:
        small = httpx.post(f"{base}/analyze_video", files={"video": file}, timeout=120)
    assert small.status_code == 200, small.text
    with (media_dir / "photo.jpg").open("rb") as file:
        stored = httpx.post(f"{base}/v1/files", files={"file": file}, data={"purpose": "vision"}, timeout=120)
    assert stored.status_code == 200 and stored.json()["kind"] == "image"


# --- BentoML's request time limit, without its leak -------------------------------------------


def _armed_timers() -> int:
    import gc

    # type(), not isinstance(): a dead weakref.proxy among the objects raises on isinstance.
    return sum(1 for thing in gc.get_objects() if type(thing) is asyncio.TimerHandle and not thing.cancelled())


def test_finished_requests_leave_no_timer_armed(client):
    """BentoML's time limit armed a timer per request and left it for the whole limit (900 s),
    holding each finished request's context (its spans, BentoML's request context): the worker's
    memory grew through a soak run. Finished requests leave none (http_api.response_timeout)."""
    client.get("/v1/models")
    before = _armed_timers()
    for _ in range(40):
        assert client.get("/v1/models").status_code == 200
        assert client.post("/analyze_video", json={"video_url": "ftp://x"}).status_code == 400
    assert _armed_timers() - before < 10


def test_an_answer_not_started_within_the_time_limit_is_a_504_in_the_failure_body():
    from http_api.response_timeout import ResponseTimeout

    async def slow(scope, receive, send):
        await asyncio.sleep(30)

    async def broken(scope, receive, send):
        raise RuntimeError("no answer")

    scope = {"type": "http", "path": "/analyze_video", "method": "POST", "headers": []}

    async def call(app, timeout: float) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await ResponseTimeout(app, timeout)(scope, receive, send)
        return sent

    began = time.monotonic()
    sent = asyncio.run(call(slow, 0.3))
    assert time.monotonic() - began < 5
    assert sent[0]["status"] == 504
    body = json.loads(b"".join(message.get("body", b"") for message in sent[1:]))
    assert "0.3 s time limit" in body["error"]
    # An app that fails without answering fails at once, not once the time limit is over.
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="no answer"):
        asyncio.run(call(broken, 30))
    assert time.monotonic() - began < 5
