"""A real `make demo` (bentoml serve on the tiny checkpoint) answering the README's curl commands."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from testing.mediafiles import write_video

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.served
PADDED_IMAGE_TOKENS = 27 * 27 + 1  # an image among several: one 384-pixel tile of 14-pixel patches, a newline


def readme_curl_commands() -> list[str]:
    """Every `curl` command in README's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in re.split(r"\n(?=\S)", block.replace("\\\n", " ")):
            if command.strip().startswith("curl"):
                commands.append(command.strip())
    return commands


def readme_job_commands() -> list[str]:
    """The job API's curl commands (README, Long videos), in their order."""
    return [command for command in readme_curl_commands() if "/jobs/" in command]


def readme_media_commands() -> list[str]:
    """Upload once, ask many (README): the upload, questions by id, the file object, its deletion."""
    return [
        command
        for command in readme_curl_commands()
        if ("/media" in command or "$FILE" in command) and "/v1/" not in command
    ]


def readme_openai_file_commands() -> list[str]:
    """The files API by curl (README, OpenAI-compatible API): upload, a chat naming it, deletion."""
    return [
        command
        for command in readme_curl_commands()
        if "/v1/files" in command or ("$FILE" in command and "/v1/" in command)
    ]


def readme_request_commands() -> list[str]:
    stored = readme_media_commands() + readme_openai_file_commands()
    return [command for command in readme_curl_commands() if "/jobs/" not in command and command not in stored]


def test_readme_has_the_four_curl_forms_two_image_comparisons_and_chat_completions():
    commands = readme_request_commands()
    assert len(commands) == 8
    chats = [c for c in commands if "/v1/chat/completions" in c]
    assert len(chats) == 2 and sum("after.jpg" in c for c in chats) == 1
    native = [c for c in commands if c not in chats]
    assert sum("-F" in c and "/analyze_video" in c for c in native) == 1
    assert sum("video_url" in c and "/analyze_video" in c for c in native) == 1
    assert sum("-F" in c and "/analyze_image" in c for c in native) == 2
    assert sum("image_url" in c for c in native) == 2
    assert sum("after.jpg" in c for c in native) == 2  # the two-image comparison, both forms


@pytest.mark.parametrize("index", range(8))
def test_readme_curl_command(served, media_dir, file_server, index):
    command = readme_request_commands()[index]
    two_images = "after.jpg" in command  # the two-image comparisons
    for placeholder, real in {
        "http://localhost:3000": served,
        "./path/to/your/video.mp4": str(media_dir / "clip.mp4"),
        "./path/to/your/image.jpg": str(media_dir / "photo.jpg"),
        "https://example.com/video.mp4": f"{file_server}/clip.mp4",
        "https://example.com/image.jpg": f"{file_server}/photo.jpg",
        "https://example.com/before.jpg": f"{file_server}/photo.jpg",
        "https://example.com/after.jpg": f"{file_server}/wide.png",
        "@before.jpg": f"@{media_dir / 'photo.jpg'}",
        "@after.jpg": f"@{media_dir / 'wide.png'}",
    }.items():
        command = command.replace(placeholder, real)
    result = subprocess.run(
        ["bash", "-c", command + " --silent --show-error"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    if "/v1/chat/completions" in command:  # the README names the real model; the demo serves "tiny"
        assert body["error"]["code"] == "not_found" and "'tiny'" in body["error"]["message"]
        command = command.replace("lmms-lab/LLaVA-Video-7B-Qwen2", "tiny")
        result = subprocess.run(["bash", "-c", command + " --silent --show-error"], capture_output=True, text=True)
        chat = json.loads(result.stdout)
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"], chat
        assert chat["usage"]["visual_tokens"] == (2 * PADDED_IMAGE_TOKENS if two_images else 16 * 210)
        return
    assert body["status"] == "success", body
    assert body["error"] is None
    if two_images:  # each image one padded tile
        assert body["usage"]["visual_tokens"] == 2 * PADDED_IMAGE_TOKENS
    if "analyze_video" in command:
        assert body["video_info"]["frame_count"] == 16
        assert body["video_info"]["video_duration"] == pytest.approx(3.0)
    else:
        assert "video_info" not in body


def test_readme_job_commands_submit_follow_ask_and_cancel(served, media_dir):
    submit, status, result, ask, cancel = readme_job_commands()
    assert "/jobs/submit" in submit and "-X POST" in cancel and all("$TASK" in c for c in (status, result, ask, cancel))

    def run(command: str, task: str = "") -> dict:
        command = command.split("  #")[0].replace("http://localhost:3000", served).replace("$TASK", task)
        command = command.replace("./path/to/your/video.mp4", str(media_dir / "clip.mp4"))
        done = subprocess.run(["bash", "-c", command + " --show-error"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    submitted = run(submit)
    task = submitted["task_id"]
    assert submitted["video_info"]["segment_count"] == 1  # a 3-second clip in 30 s segments
    deadline = time.monotonic() + 120
    while (state := run(status, task))["ended_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state["status"] == "completed" and state["progress"]["segments_captioned"] == 1
    answer = run(result, task)
    assert answer["status"] == "success" and answer["answer"] and answer["segments"][0]["caption"]
    assert answer["segments"][0]["frame_times"] == state["segments"][0]["frame_times"]
    asked = run(ask, task)
    assert asked["status"] == "success" and asked["response"]
    assert run(cancel, task) == {"task_id": task, "status": "completed"}  # an ended job stays as it ended


def test_readme_media_commands_upload_once_then_ask_by_id(served, media_dir):
    upload, *questions, retrieve, delete = readme_media_commands()
    assert "-F" in upload and len(questions) == 2 and "-X DELETE" in delete

    def run(command: str, file_id: str = "") -> dict:
        command = command.split("  #")[0].replace("http://localhost:3000", served).replace("$FILE", file_id)
        command = command.replace("./path/to/your/video.mp4", str(media_dir / "clip.mp4"))
        done = subprocess.run(
            ["bash", "-c", command + " --silent --show-error"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    stored = run(upload)
    assert stored["object"] == "file" and stored["kind"] == "video" and stored["id"].startswith("file-")
    with (media_dir / "clip.mp4").open("rb") as video:
        for command in questions:
            prompt = json.loads(command.split("-d '")[1].replace("'$FILE'", "x").rstrip("'"))["metadata"]["prompt"]
            uploaded = httpx.post(
                f"{served}/analyze_video", files={"video": video}, data={"metadata": json.dumps({"prompt": prompt})}
            )
            video.seek(0)
            assert run(command, stored["id"]) == uploaded.json()  # the same answer as the upload's
    assert run(retrieve, stored["id"]) == stored
    assert run(delete, stored["id"])["deleted"] is True
    assert httpx.get(f"{served}/media/{stored['id']}", timeout=30).status_code == 404


def test_readme_files_api_commands_upload_chat_by_file_part_and_delete(served, media_dir):
    upload, chat, delete = readme_openai_file_commands()
    assert "/v1/files" in upload and '"type": "file"' in chat and "-X DELETE" in delete

    def run(command: str, file_id: str = "") -> dict:
        command = command.split("  #")[0].replace("http://localhost:3000", served).replace("$FILE", file_id)
        command = command.replace("./path/to/your/video.mp4", str(media_dir / "clip.mp4"))
        command = command.replace("lmms-lab/LLaVA-Video-7B-Qwen2", "tiny")  # the model the demo serves
        done = subprocess.run(
            ["bash", "-c", command + " --silent --show-error"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    stored = run(upload)
    assert stored["object"] == "file" and stored["purpose"] == "vision" and stored["id"].startswith("file-")
    answer = run(chat, stored["id"])
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"], answer
    assert answer["usage"]["visual_tokens"] == 16 * 210  # the stored clip's frames
    assert run(delete, stored["id"])["deleted"] is True
    assert httpx.get(f"{served}/v1/files/{stored['id']}", timeout=30).status_code == 404


def test_readme_follow_up_script_uploads_once_and_asks_three_questions_by_id(served, media_dir):
    (script,) = [
        block
        for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
        if "FILE=$(curl" in block
    ]
    script = script.replace("http://localhost:3000", served).replace(
        "./path/to/your/video.mp4", str(media_dir / "clip.mp4")
    )
    done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(answers) == 3 and all(a["status"] == "success" and a["response"] for a in answers), answers
    assert {a["video_info"]["frame_count"] for a in answers} == {16}


def test_bad_request_gets_the_failure_body(served, media_dir):
    upload = f"video=@{media_dir / 'notes.txt'}"
    command = ["curl", "-sS", "-w", "\n%{http_code}", "-X", "POST", f"{served}/analyze_video", "-F", upload]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    body, status = result.stdout.rsplit("\n", 1)
    payload = json.loads(body)
    assert status == "415"
    assert set(payload) == {"response", "status", "error"}
    assert payload["status"] == "failed" and payload["response"] == ""
    assert "not a video" in payload["error"]
    assert httpx.post(f"{served}/analyze_image", json={}, timeout=30).json()["status"] == "failed"


def test_url_in_a_file_field_is_refused_without_fetching(served):
    """`curl -F video=https://...` sends a text part, which BentoML would download by itself."""
    from test_request_guard import RecordingServer

    recorder = RecordingServer()
    thread = threading.Thread(target=recorder.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        for field, endpoint in (("video", "analyze_video"), ("image", "analyze_image")):
            command = ["curl", "-sS", "-w", "\n%{http_code}", f"{served}/{endpoint}", "-F", f"{field}={recorder.url}/x"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            body, status = result.stdout.rsplit("\n", 1)
            assert status == "400", body
            assert "must be a file upload" in json.loads(body)["error"]
        assert recorder.hits == []
    finally:
        recorder.shutdown()
        recorder.server_close()


def post_upload(base: str, path: Path, metadata: dict, timeout: httpx.Timeout | float = 120) -> httpx.Response:
    endpoint, field = ("analyze_image", "image") if path.suffix in (".jpg", ".png") else ("analyze_video", "video")
    with path.open("rb") as file:
        return httpx.post(
            f"{base}/{endpoint}",
            files={field: (path.name, file)},
            data={"metadata": json.dumps(metadata)},
            timeout=timeout,
        )


def test_concurrent_clients_get_the_answers_they_get_alone(served, media_dir):
    """Eight clients at once share the batch of the served process; each gets its own answer."""
    requests = [
        (media_dir / name, {"prompt": f"Question {i}?", "max_new_tokens": 16 + i, **extra})
        for i, (name, extra) in enumerate(
            [("clip.mp4", {"num_frames": 2}), ("clip.webm", {"num_frames": 4}), ("photo.jpg", {}), ("wide.png", {})] * 2
        )
    ]
    alone = [post_upload(served, path, metadata).json() for path, metadata in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = [response.json() for response in pool.map(lambda r: post_upload(served, *r), requests)]
    assert all(body["status"] == "success" for body in alone)
    assert together == alone


def test_a_follow_up_by_url_reuses_the_uploaded_video(served, served_folder, media_dir, file_server):
    """The served process recognises the same bytes by URL: no decoding, no vision tower, the
    prompt's KV reused; its answer is the one the first request's question gets again."""
    name = "served-follow-up.mp4"
    write_video(media_dir / name, frames=14, fps=7, size=(96, 64))
    digest = hashlib.sha256((media_dir / name).read_bytes()).hexdigest()
    first = post_upload(served, media_dir / name, {"prompt": "What is it?", "num_frames": 4}).json()
    by_url = {"video_url": f"{file_server}/{name}", "metadata": {"prompt": "What is it?", "num_frames": 4}}
    again = httpx.post(f"{served}/analyze_video", json=by_url, timeout=120).json()
    assert again == first and first["status"] == "success"
    lines = [
        line for line in (served_folder / "serve.log").read_text().splitlines() if f"reuse video/4/{digest}" in line
    ]
    assert len(lines) == 2, lines
    assert "features computed, KV of 0 of" in lines[0]
    assert "features recalled" in lines[1] and "KV of 0 of" not in lines[1]


def test_a_client_that_disconnects_has_its_request_cancelled(served, served_folder, media_dir):
    metadata = {"num_frames": 2, "max_new_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        post_upload(served, media_dir / "clip.mp4", metadata, timeout=httpx.Timeout(30, read=1.5))
    log = served_folder / "serve.log"
    deadline = time.monotonic() + 15
    while not (found := re.search(r"request cancelled after (\d+) new tokens", log.read_text())):
        assert time.monotonic() < deadline, "the service did not cancel the abandoned request"
        time.sleep(0.2)
    assert 0 < int(found.group(1)) < 4000
    answer = post_upload(served, media_dir / "clip.mp4", {"num_frames": 2})
    assert answer.status_code == 200, answer.text


# schemathesis: cases generated from the service's own OpenAPI schema, over real HTTP. (Its
# pytest integration, schemathesis.pytest.from_fixture, fails on pytest 9; the strategies are
# used with hypothesis directly instead.)


def fetches_elsewhere(case: schemathesis.Case) -> bool:
    """Whether a case would make the service fetch a URL (anything with a ':' could be one)."""
    body = case.body if isinstance(case.body, dict) else {}
    return any(isinstance(body.get(key), str) and ":" in body[key] for key in ("video_url", "image_url"))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schema_cases_never_get_a_server_error(served, mode):
    schema = schemathesis.openapi.from_url(f"{served}/docs.json").include(path_regex="^/analyze_")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} == {"/analyze_video", "/analyze_image"}
    for operation in operations:

        @settings(
            max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            if fetches_elsewhere(case):
                reject()  # only loopback traffic in tests
            response = case.call(base_url=served, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                assert response.json()["status"] == "failed"

        check()


def test_after_the_fuzzing_the_service_answers_and_left_no_files(served, media_dir):
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    assert not [p for d in tmp.glob("bentoml-request-*") for p in d.iterdir()]
    assert not list(tmp.glob("llava-request-*"))
    with (media_dir / "clip.mp4").open("rb") as clip:
        response = httpx.post(f"{served}/analyze_video", files={"video": ("clip.mp4", clip)}, timeout=60)
    assert response.status_code == 200, response.text


def test_bentoml_client_uploads_and_sends_urls(served, media_dir, file_server):
    """BentoML's own Python client: a file upload (multipart) and a URL (a URL-encoded form)."""
    import bentoml

    metadata = {"prompt": "What is it?", "num_frames": 3, "max_new_tokens": 5}
    with bentoml.SyncHTTPClient(served, timeout=120) as client:
        uploaded = client.analyze_video(video=media_dir / "clip.mp4", metadata=metadata)
        by_url = client.analyze_video(video_url=f"{file_server}/clip.mp4", metadata=metadata)
        image = client.analyze_image(image_url=f"{file_server}/photo.jpg", metadata={"prompt": "What is it?"})
    assert uploaded["status"] == "success" and uploaded["video_info"]["frame_count"] == 3
    assert by_url == uploaded
    assert image["status"] == "success" and image["response"]


@pytest.mark.parametrize(
    ("form", "files", "json_body"),
    [
        (None, None, {"video_url": "http://127.0.0.1:9/x.mp4", "prompt": "Why?"}),
        ({"num_frames": "4"}, {"video": ("clip.mp4", b"")}, None),
        ({"video_url": "http://127.0.0.1:9/x.mp4", "num_frames": "4"}, None, None),
    ],
    ids=["json-top-level-prompt", "multipart-form-field", "urlencoded-form-field"],
)
def test_fields_outside_metadata_are_refused(served, media_dir, form, files, json_body):
    if files:
        files = {"video": ("clip.mp4", (media_dir / "clip.mp4").read_bytes())}
    response = httpx.post(f"{served}/analyze_video", data=form, files=files, json=json_body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "metadata" in error and ("prompt" in error or "num_frames" in error)


def test_a_client_that_leaves_mid_upload_is_its_own_499_not_a_server_error(served, served_folder, media_dir) -> None:
    """Headers, half the multipart body, then the connection closed: logged at INFO as a 499 (the
    client's), no traceback, counted under 499 in /metrics; the service answers the next request."""
    import socket
    from urllib.parse import urlsplit

    def count_499() -> float:
        text = httpx.get(f"{served}/metrics", timeout=30).text
        found = re.search(r'llava_requests_total\{route="/analyze_video",status="499"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    before = count_499()
    log = served_folder / "serve.log"
    lines_before = len(log.read_text().splitlines())
    data = (media_dir / "clip.mp4").read_bytes()
    boundary = "cutoffboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="clip.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    address = urlsplit(served)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(
            (
                f"POST /analyze_video HTTP/1.1\r\nHost: {address.netloc}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and count_499() == before:
        time.sleep(0.2)
    assert count_499() == before + 1
    new_lines = log.read_text().splitlines()[lines_before:]
    cut = [line for line in new_lines if "POST /analyze_video 499" in line]
    assert cut and "INFO" in cut[0] and "closed the connection" in cut[0], new_lines
    assert not any("Traceback" in line or "ClientDisconnect" in line or " 500 " in line for line in new_lines)
    assert httpx.get(f"{served}/readyz", timeout=30).status_code == 200
