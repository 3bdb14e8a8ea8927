"""Soak benchmark of the served demo: a steady mix of real traffic, bounded in time and in count.

    python -m bench.soak [--minutes 10] [--clients 4] [--sample-seconds 5] [--max-requests N]
                         [--out results.json] [--log serve.log]

Starts one `bentoml serve` of a tiny checkpoint (CPU, loopback only) with a TMPDIR, a media store
and a job folder of its own in a temporary folder, and a file server on 127.0.0.1 for the URL
requests (LLAVA_URL_ALLOWLIST=127.0.0.1). ``--clients`` threads then send requests until
``--minutes`` have passed (or ``--max-requests`` were sent), each taking the next kind of request
round-robin over :data:`KINDS`: native uploads, URLs, images, streams, OpenAI chats (sync,
streamed, text only, a follow-up, a stored file), a question by ``media_id``, a short job, a
client that goes away mid-stream, and hostile inputs that must get their 4xx. Every HTTP call has
a client timeout (:data:`TIMEOUT`); one that runs out without an answer is a hang.

Every ``--sample-seconds`` it samples the server: resident memory, open file descriptors and
threads of its whole process tree (`bentoml serve`, its worker, which runs in a session of its
own, and the decode children), the ``llava-request-*`` and ``llava-job-*`` folders in its TMPDIR,
the files in the media store's ``incoming/``, ``llava_requests_running`` /
``llava_requests_waiting`` and the number of series on /metrics (one per label set: a label
taken from a request's id or path makes it grow with the traffic); once the traffic stopped and
the service is idle, once more. It reports, as Markdown (and JSON with ``--out``), per kind the count, statuses seen and
p50/p99 latency, the unexpected statuses, 5xx and hangs (targets: none), and each resource's
median over the first quarter of the samples against the last quarter (targets: RSS growth at
most 50 MB, the others flat). Each request carries an ``X-Request-ID`` naming its kind, so the
server log lines of anything unexpected are quoted in the report.

Exit status 1 when any request got a 5xx it should not, hung, got another status than its kind
expects, or when folders or uploads are left behind once the service is idle: usable as a check.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import itertools
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil

from bench.machine import machine
from testing.served import cpu_env, free_port, running_service, serve_command

TIMEOUT = 120  # seconds: every HTTP call; a job must end within it too
TOKENS = 8  # new tokens per ordinary answer
# Distinct videos, each asked with 2, 4 or 8 frames: more than the reuse caches hold (CACHE_BYTES
# each, about 0.4 MB of features and 1 MB of prompt KV per 4-frame video on the tiny model), so
# requests keep decoding, computing features and evicting, and the caches are full early on.
VIDEOS = 24
FRAMES = (2, 4, 8)
CACHE_BYTES = 16 * 1024 * 1024
MAX_DATA_URL_BYTES = 256 * 1024
RSS_GROWTH_TARGET_MB = 50
QUESTIONS = (
    "What happens in this video?",
    "What colour is the biggest object?",
    "Describe it in one sentence.",
    "Is anything moving?",
    "What is in the top left corner?",
)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Inputs:
    """The files the requests send, all in ``folder`` (served by the file server)."""

    folder: Path
    videos: list[Path]
    images: list[Path]
    text: Path
    truncated: Path
    job_video: Path
    too_large: bytes  # more bytes than LLAVA_MAX_DATA_URL_BYTES


def write_inputs(folder: Path) -> Inputs:
    from testing.mediafiles import truncate_file, write_image, write_minutes_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    videos = [write_video(folder / "clip.webm", frames=24, fps=8, size=(96, 72))]
    sizes = ((96, 72), (160, 90), (128, 96))
    videos += [
        write_video(folder / f"clip{i}.mp4", frames=20 + i, fps=10, size=sizes[i % len(sizes)])
        for i in range(VIDEOS - 1)
    ]
    images = [
        write_image(folder / "photo.jpg", size=(160, 120), mode="RGB", fmt="JPEG"),
        write_image(folder / "wide.png", size=(300, 100), mode="RGBA", fmt="PNG"),
    ]
    text = folder / "notes.txt"
    text.write_text("this is not a video\n" * 20)
    # The first third of a 3 s clip: tests/test_files_api.py's 422.
    truncated = truncate_file(write_video(folder / "truncated.mp4", frames=30, fps=10, size=(96, 72)), keep=1 / 3)
    job_video = write_minutes_video(folder / "job.mp4", 1.0, fps=2, size=(96, 72), noise=False)
    too_large = random.Random(0).randbytes(MAX_DATA_URL_BYTES + 64 * 1024)
    return Inputs(folder, videos, images, text, truncated, job_video, too_large)


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class Failed(Exception):
    """A step of a request that went wrong in a way a status code does not say (a stream cut short)."""


@dataclass
class Outcome:
    kind: str
    statuses: str  # the statuses of the request's HTTP calls, joined by "/"; "hang" or "error ..."
    seconds: float
    at: float  # seconds since the traffic started
    request_id: str
    detail: str = ""


@dataclass
class Context:
    """What every request needs: where the service and the file server are, the inputs, ids."""

    base: str
    files: str  # the file server's base URL
    inputs: Inputs
    model: str
    media_id: str  # a video stored in POST /media at set-up
    dead_url: str  # a port nothing listens on


class Request:
    """One request of one kind: its HTTP calls, each status recorded, under one X-Request-ID."""

    def __init__(self, client: httpx.Client, context: Context, rng: random.Random, request_id: str) -> None:
        self.client, self.context, self.rng, self.request_id = client, context, rng, request_id
        self.statuses: list[int] = []
        self.headers = {"X-Request-ID": request_id}

    def url(self, path: Path) -> str:
        return f"{self.context.files}/{path.name}"

    def question(self) -> str:
        return self.rng.choice(QUESTIONS)

    def metadata(self, **more: object) -> dict:
        return {"prompt": self.question(), "num_frames": self.rng.choice(FRAMES), "max_new_tokens": TOKENS} | more

    def call(self, method: str, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        headers = self.headers | (headers or {})
        response = self.client.request(method, f"{self.context.base}{path}", headers=headers, **kwargs)
        self.statuses.append(response.status_code)
        return response

    def upload(self, path: str, parts: list[tuple[str, Path]], **metadata: object) -> httpx.Response:
        files = [(name, (file.name, file.read_bytes())) for name, file in parts]
        return self.call("POST", path, files=files, data={"metadata": json.dumps(self.metadata(**metadata))})

    def chat(self, messages: list[dict], **more: object) -> httpx.Response:
        frames = self.rng.choice(FRAMES)
        body = {"model": self.context.model, "messages": messages, "max_tokens": TOKENS, "num_frames": frames} | more
        return self.call("POST", "/v1/chat/completions", json=body)

    def user(self, *parts: dict) -> dict:
        return {"role": "user", "content": [*parts, {"type": "text", "text": self.question()}]}

    def stream(self, method: str, path: str, events: int | None = None, **kwargs) -> list[str]:
        """The SSE ``event:``/``data:`` lines of a streamed answer; with ``events``, only that many
        lines, then the connection is closed (a client going away)."""
        lines: list[str] = []
        with self.client.stream(method, f"{self.context.base}{path}", headers=self.headers, **kwargs) as response:
            self.statuses.append(response.status_code)
            if response.status_code != 200:
                response.read()
                return lines
            for line in response.iter_lines():
                if line.startswith(("event:", "data:")):
                    lines.append(line)
                if events is not None and len(lines) >= events:
                    break
        return lines


# -- the kinds of request ----------------------------------------------------------------------


def video_upload(r: Request) -> None:
    r.upload("/analyze_video", [("video", r.rng.choice(r.context.inputs.videos))])


def video_url(r: Request) -> None:
    video = r.rng.choice(r.context.inputs.videos)
    r.call("POST", "/analyze_video", json={"video_url": r.url(video), "metadata": r.metadata()})


def video_and_image(r: Request) -> None:
    inputs = r.context.inputs
    r.upload("/analyze_video", [("video", inputs.videos[0]), ("image", inputs.images[0])])


def image_upload(r: Request) -> None:
    r.upload("/analyze_image", [("image", r.rng.choice(r.context.inputs.images))])


def image_url(r: Request) -> None:
    image = r.rng.choice(r.context.inputs.images)
    r.call("POST", "/analyze_image", json={"image_url": r.url(image), "metadata": r.metadata()})


def two_images(r: Request) -> None:
    r.upload("/analyze_image", [("image", image) for image in r.context.inputs.images])


def video_stream(r: Request) -> None:
    video = r.rng.choice(r.context.inputs.videos)
    body = {"video_url": r.url(video), "metadata": r.metadata(stream=True)}
    lines = r.stream("POST", "/analyze_video", json=body)
    if r.statuses[-1] == 200 and "event: answer" not in lines:
        raise Failed(f"stream without an answer event: {lines[-2:]}")


def media_id(r: Request) -> None:
    r.call("POST", "/analyze_video", json={"media_id": r.context.media_id, "metadata": r.metadata()})


def chat_video_data_url(r: Request) -> None:
    video = r.rng.choice(r.context.inputs.videos)
    part = {"type": "video_url", "video_url": {"url": data_url(video.read_bytes(), "video/mp4")}}
    r.chat([r.user(part)])


def chat_image_stream(r: Request) -> None:
    image = r.rng.choice(r.context.inputs.images)
    part = {"type": "image_url", "image_url": {"url": r.url(image)}}
    body = {"model": r.context.model, "messages": [r.user(part)], "max_tokens": TOKENS, "stream": True}
    lines = r.stream("POST", "/v1/chat/completions", json=body)
    if r.statuses[-1] == 200 and "data: [DONE]" not in lines:
        raise Failed(f"stream without [DONE]: {lines[-2:]}")


def chat_text(r: Request) -> None:
    r.chat([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": r.question()}])


def chat_follow_up(r: Request) -> None:
    part = {"type": "video_url", "video_url": {"url": r.url(r.context.inputs.videos[0])}}
    first = r.user(part)
    answer = r.chat([first])
    if answer.status_code != 200:
        return
    said = answer.json()["choices"][0]["message"]["content"]
    r.chat([first, {"role": "assistant", "content": said}, {"role": "user", "content": r.question()}])


def files_chat(r: Request) -> None:
    video = r.rng.choice(r.context.inputs.videos)
    stored = r.call("POST", "/v1/files", files={"file": (video.name, video.read_bytes())}, data={"purpose": "vision"})
    if stored.status_code != 200:
        return
    file_id = stored.json()["id"]
    try:
        r.chat([r.user({"type": "file", "file": {"file_id": file_id}})])
    finally:
        r.call("DELETE", f"/v1/files/{file_id}")


def job(r: Request) -> None:
    """A 1-minute video as a job of 2 segments (2 frames each); polled until it ends."""
    video = r.context.inputs.job_video
    metadata = {"question": r.question(), "segment_seconds": 30, "frames_per_segment": 2, "max_new_tokens": TOKENS}
    submitted = r.call(
        "POST",
        "/jobs/submit",
        files={"video": (video.name, video.read_bytes())},
        data={"metadata": json.dumps(metadata)},
    )
    if submitted.status_code != 202:
        return
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = r.client.get(f"{r.context.base}/jobs/status", params={"task_id": task_id}, headers=r.headers)
        if status.status_code != 200:
            r.statuses.append(status.status_code)
            return
        if status.json()["ended_at"] is not None:
            break
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout(f"job {task_id} still {status.json()['status']} after {TIMEOUT} s")
        time.sleep(0.5)
    r.call("GET", "/jobs/get", params={"task_id": task_id})


def disconnect_mid_stream(r: Request) -> None:
    """A long streamed answer (256 tokens), closed after its first few events."""
    video = r.rng.choice(r.context.inputs.videos)
    body = {"video_url": r.url(video), "metadata": r.metadata(stream=True, max_new_tokens=256, ignore_eos=True)}
    r.stream("POST", "/analyze_video", events=4, json=body)


def text_as_video(r: Request) -> None:
    r.upload("/analyze_video", [("video", r.context.inputs.text)])


def truncated_video(r: Request) -> None:
    r.upload("/analyze_video", [("video", r.context.inputs.truncated)])


def unknown_media_id(r: Request) -> None:
    unknown = f"file-{r.rng.getrandbits(128):032x}"
    r.call("POST", "/analyze_video", json={"media_id": unknown, "metadata": r.metadata()})


def unreachable_url(r: Request) -> None:
    r.call("POST", "/analyze_video", json={"video_url": r.context.dead_url, "metadata": r.metadata()})


def refused_address(r: Request) -> None:
    r.call("POST", "/analyze_video", json={"video_url": "http://10.0.0.1/x.mp4", "metadata": r.metadata()})


def malformed_json(r: Request) -> None:
    body = b'{"video_url": "http://127.0.0.1/x.mp4", "metadata": {"prompt": '
    r.call("POST", "/analyze_video", content=body, headers={"Content-Type": "application/json"})


def too_many_frames(r: Request) -> None:
    video = r.context.inputs.videos[0]
    r.call("POST", "/analyze_video", json={"video_url": r.url(video), "metadata": r.metadata(num_frames=1000)})


def too_large_data_url(r: Request) -> None:
    part = {"type": "video_url", "video_url": {"url": data_url(r.context.inputs.too_large, "video/mp4")}}
    r.chat([r.user(part)])


# name -> (what each of its HTTP calls must answer, joined by "/"; the request)
KINDS: dict[str, tuple[str, Callable[[Request], None]]] = {
    "video upload": ("200", video_upload),
    "video by URL": ("200", video_url),
    "video and image upload": ("200", video_and_image),
    "image upload": ("200", image_upload),
    "image by URL": ("200", image_url),
    "two images": ("200", two_images),
    "video streamed (SSE)": ("200", video_stream),
    "video by media_id": ("200", media_id),
    "chat: video data: URL": ("200", chat_video_data_url),
    "chat: image streamed": ("200", chat_image_stream),
    "chat: text only": ("200", chat_text),
    "chat: follow-up": ("200/200", chat_follow_up),
    "chat: /v1/files, file part, delete": ("200/200/200", files_chat),
    "job (1 min, 2 segments)": ("202/200", job),
    "disconnect mid-stream": ("200", disconnect_mid_stream),
    "bad: text file as video": ("415", text_as_video),
    "bad: truncated video": ("422", truncated_video),
    "bad: unknown media_id": ("404", unknown_media_id),
    "bad: URL to a closed port": ("502", unreachable_url),
    "bad: refused address 10.0.0.1": ("400", refused_address),
    "bad: malformed JSON": ("400", malformed_json),
    "bad: num_frames 1000": ("400", too_many_frames),
    "bad: data: URL over the limit": ("413", too_large_data_url),
}


def run_request(client: httpx.Client, context: Context, rng: random.Random, kind: str, index: int, start: float):
    expected, send = KINDS[kind]
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    request = Request(client, context, rng, f"soak-{index}-{slug}"[:128])
    began = time.monotonic()
    detail = ""
    try:
        send(request)
        statuses = "/".join(map(str, request.statuses))
    except httpx.TimeoutException as error:
        statuses, detail = "hang", f"{type(error).__name__}: {error}"
    except Exception as error:  # a connection cut, a stream cut short, an answer that is no JSON
        done = "/".join(map(str, request.statuses))
        statuses = f"{done}/error" if done else "error"
        detail = f"{type(error).__name__}: {error}"
    return Outcome(kind, statuses, time.monotonic() - began, began - start, request.request_id, detail)


# -- the server's resources --------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the traffic started
    rss_mb: float
    rss_serve_mb: float  # `bentoml serve` itself
    rss_worker_mb: float  # the worker (model, engine, caches)
    rss_decoders_mb: float  # the decode children
    fds: int
    threads: int
    processes: int
    request_dirs: int
    job_dirs: int
    incoming: int
    running: float
    waiting: float
    series: int = 0  # time series on /metrics: one per label set, so flat once every kind has run


RESOURCES = {  # name in Sample -> (label, how much growth is still flat, per client)
    "rss_mb": ("server RSS, MB (whole process tree)", None),
    "rss_serve_mb": ("- of it `bentoml serve`", None),
    "rss_worker_mb": ("- of it the worker", None),
    "rss_decoders_mb": ("- of it the decode children", None),
    "fds": ("open file descriptors", 4),
    "threads": ("threads", 2),
    "processes": ("processes", 0),
    "request_dirs": ("llava-request-* folders", 1),
    "job_dirs": ("llava-job-* folders", 1),
    "incoming": ("media store incoming/ files", 1),
    "running": ("llava_requests_running", 1),
    "waiting": ("llava_requests_waiting", 1),
    "series": ("series on /metrics", 0),
}


class Server:
    """The served instance's process tree, TMPDIR, media store and /metrics."""

    def __init__(self, base: str, tmpdir: Path, media_dir: Path) -> None:
        self.base, self.tmpdir, self.media_dir = base, tmpdir, media_dir
        port = base.rsplit(":", 1)[1]
        # `bentoml serve` is this process's child (testing.served starts it).
        self.root = next(
            child
            for child in psutil.Process().children()
            if "serve" in (command := child.cmdline()) and port in command
        )

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def metric(self, text: str, name: str) -> float:
        values = [float(line.split()[-1]) for line in text.splitlines() if re.match(rf"{name}(\{{| )", line)]
        return sum(values)

    def sample(self, at: float) -> Sample:
        rss = {"serve": 0, "worker": 0, "decoder": 0}
        fds = threads = count = 0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                with process.oneshot():
                    role = "serve" if process == self.root else "worker"
                    if "media.worker" in " ".join(process.cmdline()):
                        role = "decoder"
                    rss[role] += process.memory_info().rss
                    fds += process.num_fds()
                    threads += process.num_threads()
                count += 1
        try:
            metrics = httpx.get(f"{self.base}/metrics", timeout=30).text
        except httpx.HTTPError:
            metrics = ""
        incoming = self.media_dir / "incoming"
        return Sample(
            at=round(at, 2),
            rss_mb=round(sum(rss.values()) / 1e6, 1),
            rss_serve_mb=round(rss["serve"] / 1e6, 1),
            rss_worker_mb=round(rss["worker"] / 1e6, 1),
            rss_decoders_mb=round(rss["decoder"] / 1e6, 1),
            fds=fds,
            threads=threads,
            processes=count,
            request_dirs=len(list(self.tmpdir.glob("llava-request-*"))),
            job_dirs=len(list(self.tmpdir.glob("llava-job-*"))),
            incoming=len(list(incoming.iterdir())) if incoming.is_dir() else 0,
            running=self.metric(metrics, "llava_requests_running"),
            waiting=self.metric(metrics, "llava_requests_waiting"),
            series=sum(1 for line in metrics.splitlines() if line and not line.startswith("#")),
        )

    def idle(self, at: Callable[[], float], seconds: float = 15) -> Sample:
        """A sample once nothing runs, waits or is left in the temp folders (or after ``seconds``)."""
        deadline = time.monotonic() + seconds
        while True:
            sample = self.sample(at())
            busy = sample.running + sample.waiting + sample.request_dirs + sample.job_dirs + sample.incoming
            if not busy or time.monotonic() > deadline:
                return sample
            time.sleep(0.5)


# -- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def file_server(folder: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def server_settings(folder: Path) -> dict[str, str]:
    return {
        "LLAVA_URL_ALLOWLIST": "127.0.0.1",
        "LLAVA_MEDIA_DIR": str(folder / "media"),
        "LLAVA_JOB_DIR": str(folder / "jobs"),
        "LLAVA_MAX_NEW_TOKENS": str(TOKENS),
        "LLAVA_MAX_DATA_URL_BYTES": str(MAX_DATA_URL_BYTES),
        "LLAVA_FEATURE_CACHE_BYTES": str(CACHE_BYTES),
        "LLAVA_PREFIX_CACHE_BYTES": str(CACHE_BYTES),
        "LLAVA_MAX_PENDING_REQUESTS": "32",
        "LLAVA_CONNECT_TIMEOUT": "5",
        "LLAVA_READ_TIMEOUT": "10",
        "LLAVA_DOWNLOAD_TIMEOUT": "30",
        "LLAVA_DECODE_TIMEOUT": "60",
        "LLAVA_LOG_LEVEL": "INFO",  # one line per request, under its X-Request-ID
    }


@contextlib.contextmanager
def serve(checkpoint: Path, folder: Path, log: Path) -> Iterator[tuple[str, Path]]:
    """`bentoml serve` of ``checkpoint``, its output in ``log``, with a TMPDIR of its own (and
    the media store and job folder) under ``folder``: (base URL, TMPDIR)."""
    tmpdir = folder / "server-tmp"
    tmpdir.mkdir()
    port = free_port()
    env = os.environ | cpu_env(checkpoint) | server_settings(folder) | {"TMPDIR": str(tmpdir)}
    with running_service(serve_command(port), env, port, log, start_seconds=300) as base:
        yield base, tmpdir


class Traffic:
    """``clients`` threads sending the kinds round-robin until the time or the count is up."""

    def __init__(self, context: Context, clients: int, seconds: float, max_requests: int | None, seed: int) -> None:
        self.context, self.clients, self.seed = context, clients, seed
        self.max_requests = max_requests
        self.kinds = list(KINDS)
        self.counter = itertools.count()
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def next_index(self) -> int | None:
        with self.lock:
            index = next(self.counter)
        if time.monotonic() >= self.deadline or (self.max_requests is not None and index >= self.max_requests):
            return None
        return index

    def client(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        with httpx.Client(timeout=TIMEOUT) as client:
            while (index := self.next_index()) is not None:
                kind = self.kinds[index % len(self.kinds)]
                outcome = run_request(client, self.context, rng, kind, index, self.start)
                with self.lock:
                    self.outcomes.append(outcome)

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def sampling(server: Server, traffic: Traffic, every: float, samples: list[Sample], stop: threading.Event) -> None:
    while not stop.wait(every):
        samples.append(server.sample(time.monotonic() - traffic.start))


def soak(
    minutes: float = 10,
    clients: int = 4,
    sample_seconds: float = 5,
    max_requests: int | None = None,
    *,
    checkpoint: Path | None = None,
    log_copy: Path | None = None,
    seed: int = 29,
) -> dict:
    """Serve, send the traffic, sample the server; the results (see :func:`report`)."""
    from testing.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="llava-soak-") as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder / "files")
        checkpoint = checkpoint or write_tiny_checkpoint(folder / "tiny-llava-video")
        log = folder / "serve.log"
        try:
            with file_server(inputs.folder) as files, serve(checkpoint, folder, log) as (base, tmpdir):
                server = Server(base, tmpdir, folder / "media")
                with httpx.Client(timeout=TIMEOUT) as client:
                    model = client.get(f"{base}/v1/models").json()["data"][0]["id"]
                    video = inputs.videos[0]
                    stored = client.post(f"{base}/media", files={"file": (video.name, video.read_bytes())})
                    stored.raise_for_status()
                context = Context(
                    base, files, inputs, model, stored.json()["id"], f"http://127.0.0.1:{free_port()}/x.mp4"
                )
                before = server.sample(0)
                traffic = Traffic(context, clients, minutes * 60, max_requests, seed)
                samples: list[Sample] = []
                stop = threading.Event()
                sampler = threading.Thread(target=sampling, args=(server, traffic, sample_seconds, samples, stop))
                sampler.start()
                try:
                    traffic.run()
                finally:
                    stop.set()
                    sampler.join()
                duration = time.monotonic() - traffic.start
                idle = server.idle(lambda: time.monotonic() - traffic.start)
        finally:
            if log_copy and log.exists():
                shutil.copy(log, log_copy)
        log_text = log.read_text(errors="replace")
    results = {
        "machine": machine(),
        "workload": (
            f"{clients} clients for {minutes:g} min{f' (at most {max_requests} requests)' if max_requests else ''}, "
            f"{len(KINDS)} kinds round-robin, {TOKENS} new tokens per answer, {VIDEOS} different small videos "
            f"at {'/'.join(map(str, FRAMES))} frames, reuse caches {CACHE_BYTES >> 20} MiB each, "
            f"client timeout {TIMEOUT} s; tiny checkpoint on CPU, `bentoml serve`, loopback"
        ),
        "duration_s": round(duration, 1),
        "sample_seconds": sample_seconds,
        "clients": clients,
        "outcomes": [asdict(outcome) for outcome in traffic.outcomes],
        "before": asdict(before),
        "samples": [asdict(sample) for sample in samples],
        "idle": asdict(idle),
        "generations_stopped": log_text.count("request cancelled after"),
    }
    results |= summarise(results)
    results["server_log"] = log_lines(log_text, results["unexpected_request_ids"])
    return results


def slope(samples: list[Sample], name: str) -> float:
    """Least-squares change of ``name`` per second over ``samples`` (0 for fewer than two)."""
    if len(samples) < 2:
        return 0.0
    times = [sample.at for sample in samples]
    values = [getattr(sample, name) for sample in samples]
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    return sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / spread if spread else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def is_fault(status: str, expected: str) -> bool:
    """A 5xx among a request's statuses that its kind does not expect at that step."""
    wanted = expected.split("/")
    return any(
        got.isdigit() and got.startswith("5") and (step >= len(wanted) or got != wanted[step])
        for step, got in enumerate(status.split("/"))
    )


@dataclass
class KindSummary:
    expected: str
    count: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0


def summarise(results: dict) -> dict:
    outcomes = [Outcome(**outcome) for outcome in results["outcomes"]]
    kinds = {}
    for kind, (expected, _) in KINDS.items():
        mine = [o for o in outcomes if o.kind == kind]
        summary = KindSummary(expected, len(mine), dict(Counter(o.statuses for o in mine).most_common()))
        summary.unexpected = sum(o.statuses != expected for o in mine)
        if mine:
            summary.p50_s = round(statistics.median(o.seconds for o in mine), 3)
            summary.p99_s = round(percentile([o.seconds for o in mine], 0.99), 3)
        kinds[kind] = asdict(summary)
    unexpected = [o for o in outcomes if o.statuses != KINDS[o.kind][0]]
    samples = [Sample(**sample) for sample in results["samples"]]
    quarter = max(1, len(samples) // 4)
    resources = {}
    for name, (label, per_client) in RESOURCES.items():
        values = [getattr(sample, name) for sample in samples] or [results["idle"][name]]
        first, last = statistics.median(values[:quarter]), statistics.median(values[-quarter:])
        growth = last - first
        floor = min(values[-quarter:]) - min(values[:quarter])
        if name != "rss_mb" and name.startswith("rss_"):
            target, met = "-", True  # a breakdown of the total, which has the target
        elif per_client is None:
            target, met = f"<= {RSS_GROWTH_TARGET_MB} MB", growth <= RSS_GROWTH_TARGET_MB
        else:
            allowed = per_client * results["clients"]
            target, met = (f"flat (<= +{allowed})" if allowed else "flat"), growth <= allowed
        resources[name] = {
            "label": label,
            "before": results["before"][name],
            "first_quarter": first,
            "last_quarter": last,
            "growth": round(growth, 1),
            "floor_growth": round(floor, 1),
            "second_half_per_min": round(slope(samples[len(samples) // 2 :], name) * 60, 1),
            "target": target,
            "met": met,
            "max": max(values),
            "idle": results["idle"][name],
        }
    leftovers = {name: results["idle"][name] for name in ("request_dirs", "job_dirs", "incoming", "running", "waiting")}
    return {
        "requests": len(outcomes),
        "kinds": kinds,
        "faults_5xx": sum(is_fault(o.statuses, KINDS[o.kind][0]) for o in outcomes),
        "hangs": sum(o.statuses == "hang" for o in outcomes),
        "unexpected": len(unexpected),
        "unexpected_details": [asdict(o) for o in unexpected[:50]],
        "unexpected_request_ids": [o.request_id for o in unexpected],
        "resources": resources,
        "left_when_idle": {name: count for name, count in leftovers.items() if count},
    }


def log_lines(text: str, request_ids: list[str], most: int = 80) -> list[str]:
    """The log lines of the unexpected requests, and every ERROR line and traceback."""
    wanted = set(request_ids)
    lines = []
    in_traceback = False
    for line in text.splitlines():
        named = any(request_id in line for request_id in wanted) if wanted else False
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line and not line.startswith((" ", "\t")):
            in_traceback = "Error" in line or "Exception" in line  # the traceback's last line, kept
            if in_traceback:
                lines.append(line)
                in_traceback = False
                continue
        if named or in_traceback or " ERROR " in line or "ERROR:" in line:
            lines.append(line)
    return lines[:most]


def failures(results: dict) -> list[str]:
    """Why the run fails as a check (empty: it passes)."""
    found = []
    if results["faults_5xx"]:
        found.append(f"{results['faults_5xx']} requests got a 5xx")
    if results["hangs"]:
        found.append(f"{results['hangs']} requests hung (no answer within {TIMEOUT} s)")
    if results["unexpected"]:
        found.append(f"{results['unexpected']} requests got another status than their kind expects")
    if results["left_when_idle"]:
        found.append(f"left behind once idle: {results['left_when_idle']}")
    return found


def report(results: dict) -> str:
    duration = results["duration_s"]
    lines = [
        f"Machine: {results['machine']}",
        f"Workload: {results['workload']}",
        f"Duration: {duration:.0f} s of traffic, {results['requests']} requests "
        f"({results['requests'] / duration:.2f} requests/s); {len(results['samples'])} samples every "
        f"{results['sample_seconds']:g} s",
        "",
        "| kind | expected | count | statuses seen | unexpected | p50 s | p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, summary in results["kinds"].items():
        seen = ", ".join(f"{status} x{count}" for status, count in summary["statuses"].items()) or "-"
        lines.append(
            f"| {kind} | {summary['expected']} | {summary['count']} | {seen} | {summary['unexpected']} | "
            f"{summary['p50_s']:.2f} | {summary['p99_s']:.2f} |"
        )
    lines += [
        "",
        f"5xx (other than the 502 a closed port must get): {results['faults_5xx']} (target 0). "
        f"Hangs (no answer within {TIMEOUT} s): {results['hangs']} (target 0). "
        f"Unexpected statuses: {results['unexpected']} (target 0).",
        "",
        f"A client that went away mid-stream: {results['kinds']['disconnect mid-stream']['count']} times; "
        f"generations the server stopped (its log's 'request cancelled'): {results['generations_stopped']}.",
        "",
        "Server resources before the traffic; the median of the first quarter of the samples against the last "
        "quarter (growth; flat: within what the clients' requests in flight may hold); floor growth: the lowest "
        "sample of the last quarter against the first's; trend: least-squares slope over the second half; "
        "and once idle after the traffic:",
        "",
        "| resource | before | first quarter | last quarter | growth | target | met | floor growth | trend, 2nd half "
        "| max | idle after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for resource in results["resources"].values():
        met = "-" if resource["target"] == "-" else "yes" if resource["met"] else "NO"
        lines.append(
            f"| {resource['label']} | {resource['before']:g} | {resource['first_quarter']:g} | "
            f"{resource['last_quarter']:g} | {resource['growth']:+g} | {resource['target']} | {met} | "
            f"{resource['floor_growth']:+g} | {resource['second_half_per_min']:+g}/min | {resource['max']:g} | "
            f"{resource['idle']:g} |"
        )
    if results["unexpected_details"]:
        lines += ["", "Unexpected (first 50):", ""]
        for outcome in results["unexpected_details"]:
            detail = f": {outcome['detail']}" if outcome["detail"] else ""
            lines.append(
                f"- {outcome['kind']} ({outcome['request_id']}, at {outcome['at']:.0f} s, "
                f"{outcome['seconds']:.2f} s): {outcome['statuses']}{detail}"
            )
    if results["server_log"]:
        lines += ["", "Server log (the unexpected requests' lines, errors, tracebacks):", "", "```"]
        lines += results["server_log"]
        lines.append("```")
    problems = failures(results)
    lines += ["", f"Result: {'FAIL: ' + '; '.join(problems) if problems else 'PASS'}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long the traffic lasts")
    parser.add_argument("--clients", type=int, default=4, help="client threads, each one request at a time")
    parser.add_argument("--sample-seconds", type=float, default=5, help="seconds between samples of the server")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests, even before --minutes")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    args = parser.parse_args()
    results = soak(args.minutes, args.clients, args.sample_seconds, args.max_requests, log_copy=args.log)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    raise SystemExit(1 if failures(results) else 0)


if __name__ == "__main__":
    main()
