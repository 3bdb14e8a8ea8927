"""Running in production: start-up that fails fast, health routes, request ids and logs, SIGTERM.

Each test starts real `bentoml serve` (or `make demo`) processes on the tiny checkpoint. The
failures end within seconds, before or right after the worker starts; the grace period is shown on
a server of its own; one healthy server, loaded offline from a Hugging Face cache, serves the other
tests and is stopped with SIGTERM by the last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from testing.served import REPO, cpu_env, free_port, own_home, serve_command

pytestmark = pytest.mark.served

HUB_ID = "llava-tiny/tiny-llava-video"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


# Answers long enough to be in flight when a SIGTERM has passed through (tens of thousands of
# tokens: the tiny model decodes about a thousand a second here), and the KV cache to hold them.
LONG_ANSWERS = {"LLAVA_MAX_NEW_TOKENS_LIMIT": "30000", "LLAVA_KV_CACHE_TOKENS": "49152"}
# Twice what the drain needs to start on a quiet machine: in full runs the worker was seen to
# answer nothing for ~8 s after SIGTERM (most likely the real-time scheduling the AV1 encoder
# left on pytest's thread, fixed in testing.write_video; the answer itself was right), and the
# request must still be in flight when its drain begins.
IN_FLIGHT_TOKENS = 24000


def tiny_env(model: Path | str, **extra: str) -> dict[str, str]:
    # A BENTOML_HOME of its own: a `bentoml serve` start empties its home's metrics folder, which
    # the session's served instances use.
    home = own_home(Path(tempfile.mkdtemp(prefix="llava-test-serve-")))
    return os.environ | cpu_env(model) | home | {"LLAVA_MAX_NEW_TOKENS": "6", **extra}


def run_to_exit(command: list[str], env: dict[str, str], limit: float = 120) -> tuple[int, str, float]:
    """Run ``command`` in its own process group; its exit status, output and seconds taken. A
    process still running after ``limit`` seconds (a restart loop) fails the test."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} still ran after {limit} s:\n{output[-3000:]}")
    return process.returncode, output, time.monotonic() - started


def status_of(url: str) -> int:
    """The status a GET of ``url`` gets, 0 when nothing answers."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def put_in_hub_cache(checkpoint: Path, cache: Path, repo_id: str) -> None:
    """The checkpoint's files where `hf download repo_id` leaves them in a Hugging Face cache."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "1" * 40
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


# --- start-up that fails --------------------------------------------------------------------------


def test_an_invalid_setting_ends_make_demo_at_once_with_one_line(tiny_checkpoint):
    command = ["make", "demo", f"PORT={free_port()}", f"DEMO_MODEL={tiny_checkpoint}", f"VENV={sys.prefix}"]
    status, output, seconds = run_to_exit(command, os.environ | {"LLAVA_NUM_FRAMES": "100"})
    assert status != 0, output
    assert seconds < 60
    failures = [line for line in output.splitlines() if "cannot start" in line]
    assert len(failures) == 1, output
    assert "LLAVA_NUM_FRAMES=100" in failures[0] and "LLAVA_MAX_FRAMES" in failures[0]
    assert "Traceback" not in output and "listening" not in output


@pytest.mark.parametrize("where", ["local directory", "hub id offline"])
def test_a_missing_model_ends_the_server_before_any_worker_starts(where, tmp_path):
    if where == "local directory":
        model, extra, expected = tmp_path / "nowhere", {}, "does not exist"
    else:
        empty_cache = tmp_path / "hub"
        empty_cache.mkdir()
        model, extra = "llava-tiny/never-downloaded", {"HF_HUB_CACHE": str(empty_cache), "HF_HUB_OFFLINE": "1"}
        expected = "hf download llava-tiny/never-downloaded"
    status, output, seconds = run_to_exit(serve_command(free_port()), tiny_env(model, **extra))
    assert status == 2, output
    failures = [line for line in output.splitlines() if "cannot start" in line]
    assert len(failures) == 1 and expected in failures[0], output
    assert "huggingface-cli" not in output
    assert "Traceback" not in output and "listening" not in output


def test_a_misspelt_setting_is_named_in_the_start_up_log_with_the_closest_one(tmp_path):
    """LLAVA_MAX_FRAMS would otherwise be ignored without a word (here the missing model then ends
    the server at once, after the settings were read)."""
    status, output, _ = run_to_exit(serve_command(free_port()), tiny_env(tmp_path / "nowhere", LLAVA_MAX_FRAMS="8"))
    assert status == 2, output
    warnings = [line for line in output.splitlines() if "LLAVA_MAX_FRAMS " in line]
    assert len(warnings) == 1 and "did you mean LLAVA_MAX_FRAMES?" in warnings[0], output


def test_a_model_that_fails_to_load_in_the_worker_stops_the_server(tiny_checkpoint, tmp_path):
    """Damaged weights pass the main process's checks (the files are there); the worker's load
    fails, and the server ends with status 3 instead of restarting the worker."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    status, output, seconds = run_to_exit(serve_command(free_port()), tiny_env(broken))
    assert status == 3, output
    failures = [line for line in output.splitlines() if "cannot start" in line]
    assert len(failures) == 1 and f"LLAVA_MODEL={broken}" in failures[0], output
    assert output.count(f"loading {broken}") == 1, "the worker was started again"
    assert "Traceback" not in output


def test_a_request_longer_than_the_grace_period_is_stopped_with_503(tiny_checkpoint, media_dir, tmp_path):
    """LLAVA_SHUTDOWN_GRACE_SECONDS bounds the drain: the generation still running then is
    stopped, its client gets a 503, and the server exits soon after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # Longer than any machine takes to pass SIGTERM on and wait out the grace period.
    env = tiny_env(tiny_checkpoint, LLAVA_SHUTDOWN_GRACE_SECONDS="1", **LONG_ANSWERS)
    with log.open("w") as output:
        process = subprocess.Popen(
            serve_command(port), cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while status_of(f"{base}/readyz") != 200:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        answer: dict[str, httpx.Response] = {}

        def endless() -> None:
            with (media_dir / "photo.jpg").open("rb") as image:
                metadata = json.dumps({"max_new_tokens": 25000, "ignore_eos": True})
                answer["long"] = httpx.post(
                    f"{base}/analyze_image", files={"image": image}, data={"metadata": metadata}, timeout=120
                )

        thread = threading.Thread(target=endless)
        thread.start()
        while "reuse image/" not in log.read_text():
            assert thread.is_alive(), answer
            time.sleep(0.05)
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        thread.join(timeout=60)
        assert answer["long"].status_code == 503, answer["long"].text
        assert process.wait(timeout=60) == 0
        # Well before the 25000 tokens would have ended on their own (~35 s here), with room for
        # the seconds a loaded machine was seen to take passing SIGTERM on.
        assert time.monotonic() - signalled < 30
        assert "grace period over: stopping the generation of the 1 requests" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


# --- one healthy server, loaded offline from a Hugging Face cache ---------------------------------


@dataclass
class Served:
    base: str
    process: subprocess.Popen
    log: Path
    probes: list[tuple[int, int]] = field(default_factory=list)  # (readyz, livez) from the very start

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture(scope="module")
def hub_served(tiny_checkpoint, tmp_path_factory) -> Iterator[Served]:
    """`bentoml serve` of LLAVA_MODEL=<hub id> with HF_HUB_OFFLINE=1, the checkpoint in the cache;
    /readyz and /livez polled from the moment the process starts."""
    folder = tmp_path_factory.mktemp("hub-served")
    cache = folder / "hub"
    put_in_hub_cache(tiny_checkpoint, cache, HUB_ID)
    port = free_port()
    # A temp folder of its own, holding what a process killed earlier left behind (its pid no
    # longer runs) and a folder of a process that still runs (this one).
    temp = folder / "tmp"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for name in (f"llava-request-{ended.pid}-abc", f"llava-job-{ended.pid}-def", f"llava-request-{os.getpid()}-ghi"):
        (temp / name).mkdir(parents=True)
        (temp / name / "upload").write_bytes(b"half an upload")
    # A 64-frame warm-up (seconds on this CPU) keeps the server answering but not ready for long
    # enough to be seen, however loaded the machine is.
    env = tiny_env(
        HUB_ID,
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        LLAVA_SHUTDOWN_GRACE_SECONDS="240",
        LLAVA_WARMUP_FRAMES="64",
        **LONG_ANSWERS,
        TMPDIR=str(temp),
    )
    log = folder / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            serve_command(port), cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 240
        while not served.probes or served.probes[-1][0] != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            served.probes.append((status_of(f"{served.base}/readyz"), status_of(f"{served.base}/livez")))
            time.sleep(0.05)
        yield served
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_livez_answers_while_the_model_loads_and_readyz_only_once_warmed_up(hub_served):
    answered = [probe for probe in hub_served.probes if probe != (0, 0)]
    assert (503, 200) in answered, "no moment where the process answered but was not ready"
    assert answered[-1] == (200, 200)
    first_ready = answered.index((200, 200))
    assert all(readyz in (0, 503) and livez in (0, 200) for readyz, livez in answered[:first_ready])
    log = hub_served.log.read_text()
    assert log.index("warm-up generation: 2 tokens") < log.index("ready after")


def test_start_up_removes_what_stopped_processes_left_in_the_temp_folder(hub_served):
    """A request or job folder whose process no longer runs goes at start-up; one of a process
    that runs stays (workers and replicas may share a temp folder)."""
    temp = hub_served.log.parent / "tmp"
    left = sorted(path.name for path in temp.iterdir() if path.name.startswith("llava-"))
    assert left == [f"llava-request-{os.getpid()}-ghi"]
    assert "removed 2 folders left by processes that stopped" in hub_served.log.read_text()


def test_the_start_up_log_says_what_was_loaded(hub_served):
    log = hub_served.log.read_text()
    model = next(line for line in hub_served.log_lines() if f"model {HUB_ID} from " in line)
    assert "/snapshots/" in model and "(transformers layout)" in model
    assert "language model float32" in model and "attention sdpa" in model and "device cpu" in model
    assert "limits: frames 16 by default, at most 64" in log and "shutdown grace 240 s" in log


def request_lines(served: Served, request_id: str) -> list[str]:
    return [line for line in served.log_lines() if f"request {request_id} " in line]


def wait_for_line(served: Served, request_id: str) -> str:
    """The request's log line (written when its response has ended)."""
    deadline = time.monotonic() + 10
    while not (lines := request_lines(served, request_id)):
        assert time.monotonic() < deadline, f"no log line for {request_id}"
        time.sleep(0.05)
    return lines[0]


def test_request_ids_are_echoed_or_generated_on_every_route_and_answer(hub_served, media_dir):
    base = hub_served.base
    with (media_dir / "photo.jpg").open("rb") as photo:
        native_ok = httpx.post(
            f"{base}/analyze_image", files={"image": photo}, headers={"X-Request-ID": "client-1"}, timeout=120
        )
    native_bad = httpx.post(f"{base}/analyze_image", content=b'{"image_url": ', timeout=30)
    chat = {"model": HUB_ID, "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 3}
    v1_ok = httpx.post(f"{base}/v1/chat/completions", json=chat, headers={"X-Request-ID": "chat.2:b"}, timeout=120)
    unknown_model = chat | {"model": "other"}
    v1_bad = httpx.post(
        f"{base}/v1/chat/completions", json=unknown_model, headers={"X-Request-ID": "not sane"}, timeout=30
    )
    livez = httpx.get(f"{base}/livez", headers={"X-Request-ID": "x" * 200}, timeout=10)

    assert native_ok.status_code == 200 and native_ok.headers["x-request-id"] == "client-1"
    assert native_bad.status_code == 400 and GENERATED_ID.fullmatch(native_bad.headers["x-request-id"])
    assert v1_ok.status_code == 200 and v1_ok.headers["x-request-id"] == "chat.2:b"
    assert v1_bad.status_code == 404 and GENERATED_ID.fullmatch(v1_bad.headers["x-request-id"])
    assert livez.status_code == 200 and GENERATED_ID.fullmatch(livez.headers["x-request-id"])

    line = wait_for_line(hub_served, "client-1")
    assert "POST /analyze_image 200 total=" in line and "decode=" in line and "queue=" in line
    assert "POST /v1/chat/completions 200" in wait_for_line(hub_served, "chat.2:b")
    assert "POST /v1/chat/completions 404" in wait_for_line(hub_served, v1_bad.headers["x-request-id"])


def test_client_errors_are_one_info_line_each_without_traceback(hub_served):
    base = hub_served.base
    before = len(hub_served.log_lines())
    sent = {
        "bad-json": httpx.post(
            f"{base}/analyze_video", content=b'{"video_url": "x', headers={"X-Request-ID": "bad-json"}, timeout=30
        ),
        "wrong-type": httpx.post(
            f"{base}/analyze_image", json={"image_url": 5}, headers={"X-Request-ID": "wrong-type"}, timeout=30
        ),
        "unknown-field": httpx.post(
            f"{base}/analyze_image", json={"prompt": "hi"}, headers={"X-Request-ID": "unknown-field"}, timeout=30
        ),
    }
    for request_id, response in sent.items():
        assert response.status_code == 400, response.text
        line = wait_for_line(hub_served, request_id)
        assert len(request_lines(hub_served, request_id)) == 1
        assert "[INFO]" in line and " 400 " in line and "error=" in line
    new = hub_served.log_lines()[before:]
    assert not [line for line in new if "Traceback" in line or "Exception on" in line or "[ERROR]" in line], new
    assert len(new) == len(sent), new  # nothing but the three request lines


def _signal_state(pid: int) -> str:
    """The signal masks of each thread of ``pid`` (pending, blocked, caught), for a failure message."""
    states = []
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        states.append(
            f"{fields.get('Name', '?').strip()}: pnd={fields.get('SigPnd', '').strip()} "
            f"shd={fields.get('ShdPnd', '').strip()} blk={fields.get('SigBlk', '').strip()}"
        )
    return f"worker {pid} threads: " + "; ".join(states)


def test_sigterm_lets_the_request_in_flight_finish_then_the_server_exits(hub_served, media_dir):
    """Must run last in this module: it stops the shared server."""
    process = hub_served.process
    worker_tree = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    decoders = [pid for pid in worker_tree if "media.worker" in " ".join(psutil.Process(pid).cmdline())]
    assert decoders, worker_tree
    reuse_lines = sum("reuse image/" in line for line in hub_served.log_lines())
    answer: dict[str, httpx.Response] = {}

    def long_request() -> None:
        with (media_dir / "wide.png").open("rb") as image:
            # Still generating when the drain starts (SIGTERM takes seconds to pass through
            # BentoML's arbiter), done well within the grace period.
            metadata = json.dumps({"max_new_tokens": IN_FLIGHT_TOKENS, "ignore_eos": True})
            try:
                answer["long"] = httpx.post(
                    f"{hub_served.base}/analyze_image", files={"image": image}, data={"metadata": metadata}, timeout=300
                )
            except httpx.TransportError as error:
                answer["error"] = error  # type: ignore[assignment]  # named in the failure message

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while sum("reuse image/" in line for line in hub_served.log_lines()) == reuse_lines:  # prefilled: generating
        assert time.monotonic() < deadline and thread.is_alive(), answer
        time.sleep(0.05)
    workers = [pid for pid in worker_tree if "_bentoml_impl.worker" in " ".join(psutil.Process(pid).cmdline())]
    os.kill(process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    seen: list[str] = []  # what the client saw, for the failure message of an intermittent fault
    time.sleep(1)
    seen += [_signal_state(pid) for pid in workers]  # where the worker's SIGTERM is after a second
    try:
        # The signal reaches the worker through BentoML's arbiter: wait until it says it drains.
        draining_by = time.monotonic() + 15
        while (ready := httpx.get(f"{hub_served.base}/readyz", timeout=10)).status_code != 503:
            seen.append(f"{time.monotonic() - signalled:.2f}s readyz {ready.status_code}")
            assert time.monotonic() < draining_by, "the worker did not start draining"
            time.sleep(0.05)
        seen.append(f"{time.monotonic() - signalled:.2f}s readyz 503")
        late = httpx.post(f"{hub_served.base}/analyze_image", json={"image_url": "http://127.0.0.1/x"}, timeout=10)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        assert late.headers["retry-after"] and late.headers["x-request-id"]
    except httpx.TransportError as error:  # the server has already closed its socket: refused, as a stopped server is
        seen.append(f"{time.monotonic() - signalled:.2f}s {type(error).__name__}: {error}")
    thread.join(timeout=300)
    drain_lines = [line for line in hub_served.log.read_text().splitlines() if "SIGTERM" in line or "drain" in line]
    why = f"client saw {seen}; the server logged {drain_lines}; answer {answer}"
    assert "long" in answer, why
    assert answer["long"].status_code == 200, (answer["long"].text, why)
    assert answer["long"].json()["usage"]["completion_tokens"] == IN_FLIGHT_TOKENS, why
    assert process.wait(timeout=60) == 0, why
    time.sleep(0.5)
    left = [pid for pid in worker_tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert left == [], "processes of the server outlived it"
    log = hub_served.log.read_text()
    assert "SIGTERM: refusing new requests, 1 in flight" in log, why
