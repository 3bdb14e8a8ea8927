"""http_api.guard in the real app (in-process): body caps, forms that would make BentoML fetch
URLs by itself, malformed multipart bodies, data: URLs, and the busy answer (503).

The caps come from conftest.service_env: 2 MiB uploads, 256 KiB data: URLs (so JSON bodies up
to 256 KiB * 4/3 + 1 MiB), 1 request answered + 2 waiting.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import TEST_MAX_BATCH_SIZE, TEST_MAX_PENDING_REQUESTS, request_temp_dirs
from test_service import assert_failed, upload

MiB = 1024 * 1024
MAX_UPLOAD = 2 * MiB
MAX_JSON = 256 * 1024 * 4 // 3 + MiB


class RecordingHandler(BaseHTTPRequestHandler):
    """Records every request; /gate waits until the test opens it, then answers 404."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/gate"):
            self.server.gate.wait(timeout=10)  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.hits: list[str] = []
        self.gate = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.gate.set()
    server.shutdown()
    server.server_close()


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"guard-test-boundary") -> tuple[bytes, dict]:
    """A multipart body from (part headers, part content) pairs, and its Content-Type header."""
    body = b"".join(
        b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n" for headers, content in parts
    )
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=" + boundary.decode()}


def file_part(name: str, content: bytes, filename: str = "clip.mp4") -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'.encode(), content


def text_part(name: str, content: bytes) -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"'.encode(), content


# BentoML would download these URLs itself, past media.fetch's caps and address policy.


@pytest.mark.parametrize(("endpoint", "field"), [("/analyze_video", "video"), ("/analyze_image", "image")])
@pytest.mark.parametrize("quote", ["", '"'])
def test_file_field_sent_as_text_is_refused_without_fetching(client, recorder, endpoint, field, quote) -> None:
    url = f"{quote}{recorder.url}/{field}.bin{quote}".encode()
    files = {field: (None, url), "metadata": (None, b'{"prompt": "x"}')}

    response = client.post(endpoint, files=files)

    assert_failed(response, 400, f"'{field}' part must be a file upload", f"{field}_url")
    assert recorder.hits == []


def test_file_field_as_text_with_a_name_in_another_charset_is_refused(client, recorder) -> None:
    # Starlette decodes part names with the body's charset, and so does the guard.
    disposition = b'Content-Disposition: form-data; name="' + "video".encode("utf-16-le") + b'"'
    body, headers = multipart([(disposition, recorder.url.encode())])
    headers["content-type"] += "; charset=utf-16-le"

    response = client.post("/analyze_video", content=body, headers=headers)

    assert_failed(response, 400, "must be a file upload")
    assert recorder.hits == []


@pytest.mark.parametrize("prefix", [b"", b"  \n", b"\x00", b"\x01 ", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("content_type", ["application/json", None])
def test_json_body_that_is_a_bare_url_is_refused_without_fetching(client, recorder, prefix, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}

    response = client.post("/analyze_video", content=prefix + f"{recorder.url}/clip.mp4".encode(), headers=headers)

    assert_failed(response, 400, "must be an object")
    assert recorder.hits == []


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "Multipart/Form-Data; boundary=x", "application/xml"],
)
def test_other_content_types_are_unsupported(client, recorder, content_type) -> None:
    response = client.post(
        "/analyze_video", content=f"video={recorder.url}/clip.mp4".encode(), headers={"content-type": content_type}
    )

    assert_failed(response, 415, "Content-Type")
    assert recorder.hits == []


def test_a_file_field_in_a_url_encoded_form_is_refused_unfetched(client, recorder) -> None:
    """BentoML's client sends URL inputs as a URL-encoded form, which BentoML parses; a file field
    there is text, which BentoML would download by itself."""
    response = client.post("/analyze_video", data={"video": f"{recorder.url}/clip.mp4"})

    assert_failed(response, 400, "must be a file upload")
    assert recorder.hits == []


def test_a_url_encoded_form_value_json_cannot_read_is_refused(client) -> None:
    response = client.post("/analyze_video", data={"metadata": "[" * 100_000})

    assert_failed(response, 400, "neither text nor JSON")


# Caps on the bytes received, before BentoML buffers the body.


def test_declared_content_length_over_the_cap_is_refused_unread(client) -> None:
    body, headers = multipart([file_part("video", b"x" * 100)])
    headers["content-length"] = str(MAX_UPLOAD + 3 * MiB)

    assert_failed(client.post("/analyze_video", content=body, headers=headers), 413, "2 MiB")


def test_upload_bytes_are_counted_without_content_length(client, media_dir) -> None:
    at_cap, headers = multipart([file_part("video", b"\0" * MAX_UPLOAD)])
    over_cap, _ = multipart([file_part("video", b"\0" * (MAX_UPLOAD + 1))])

    def chunked(body: bytes) -> Iterator[bytes]:  # a generator body is sent without Content-Length
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    # Exactly the cap passes the guard (and then fails as the junk it is).
    assert_failed(client.post("/analyze_video", content=chunked(at_cap), headers=headers), 415)
    assert_failed(client.post("/analyze_video", content=chunked(over_cap), headers=headers), 413, "upload is larger")
    # Several file parts count together (metadata may come as a file too).
    two, headers = multipart([file_part("video", b"\0" * MiB), file_part("metadata", b"\0" * (MiB + 1))])
    assert_failed(client.post("/analyze_video", content=chunked(two), headers=headers), 413, "upload is larger")


def test_oversized_text_part_is_too_large_not_a_server_error(client) -> None:
    body, headers = multipart([text_part("metadata", b'{"prompt": "' + b"a" * MiB + b'"}')])

    assert_failed(client.post("/analyze_video", content=body, headers=headers), 413, "'metadata' part")


def test_json_body_over_the_cap_is_too_large(client) -> None:
    body = json.dumps({"video_url": "data:;base64," + "A" * MAX_JSON}).encode()

    assert_failed(client.post("/analyze_video", content=body, headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"--guard-test-boundary\r\nthis is not a part header\r\n\r\nx", "malformed"),
        (b"--guard-test-boundary\r\nContent-Disposition: form-data\r\n\r\nx\r\n--guard-test-boundary--\r\n", "name"),
        (b"no boundary anywhere", "malformed"),
        (b"--guard-test-boundary\r\n" + b"X-A: b\r\n" * 20 + b"\r\nx\r\n--guard-test-boundary--\r\n", "malformed"),
    ],
    ids=["bad-header", "no-name", "no-boundary", "too-many-headers"],
)
def test_malformed_multipart_is_a_bad_request(client, body: bytes, words: str) -> None:
    headers = {"content-type": "multipart/form-data; boundary=guard-test-boundary"}

    assert_failed(client.post("/analyze_video", content=body, headers=headers), 400, words)


# data: URLs through the service.


def test_image_as_data_url_gives_the_same_answer_as_upload(client, media_dir) -> None:
    photo = media_dir / "photo.jpg"
    url = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()

    by_data = client.post("/analyze_image", json={"image_url": url, "metadata": {"prompt": "What?"}})
    by_upload = upload(client, "/analyze_image", "image", photo, {"prompt": "What?"})

    assert by_data.status_code == 200, by_data.text
    assert by_data.json() == by_upload.json()


def test_data_url_over_its_cap_and_malformed_data_urls(client) -> None:
    big = "data:video/mp4;base64," + base64.b64encode(b"\0" * (256 * 1024 + 1)).decode()
    assert_failed(client.post("/analyze_video", json={"video_url": big}), 413, "data: URL")
    assert_failed(client.post("/analyze_video", json={"video_url": "data:;base64,%%%"}), 400, "data: URL")


# The busy answer.


@pytest.mark.parametrize("last_route", ["/analyze_video", "/v1/chat/completions"])
def test_busy_worker_answers_503_then_recovers(client, media_dir, recorder, last_route) -> None:
    # Requests wait on a download that the test holds open. LLAVA_MAX_BATCH_SIZE (4) may be
    # answered and LLAVA_MAX_PENDING_REQUESTS (2) may wait: one more must get 503 at once, while
    # the gate is still closed, instead of queueing. Both routes count against one limit.
    capacity = TEST_MAX_BATCH_SIZE + TEST_MAX_PENDING_REQUESTS
    responses: list = []
    video = f"{recorder.url}/gate"
    chat = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}}]}]}

    def slow_request(route: str) -> None:
        body = {"video_url": video} if route == "/analyze_video" else chat
        responses.append(client.post(route, json=body))

    routes = ["/analyze_video", "/v1/chat/completions"] * (capacity // 2) + [last_route]
    threads = [threading.Thread(target=slow_request, args=(route,)) for route in routes]
    for thread in threads[:capacity]:
        thread.start()
    deadline = time.monotonic() + 10
    while len(recorder.hits) < capacity and time.monotonic() < deadline:
        time.sleep(0.01)  # all of them are downloading at once
    threads[-1].start()
    try:
        while not responses and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(responses) == 1, "a request should have been refused while the others wait"
        if last_route == "/analyze_video":
            assert_failed(responses[0], 503, "busy")
        else:
            assert responses[0].status_code == 503
            assert responses[0].json()["error"]["code"] == "service_unavailable"
        assert int(responses[0].headers["retry-after"]) > 0
    finally:
        recorder.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    assert [r.status_code for r in responses[1:]] == [502] * capacity  # the gate answers 404
    ok = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"num_frames": 2})
    assert ok.status_code == 200, ok.text


def test_refused_requests_leave_no_files(client, media_dir) -> None:
    before = request_temp_dirs()
    body, headers = multipart([file_part("video", b"\0" * (MAX_UPLOAD + 1))])
    client.post("/analyze_video", content=body, headers=headers)
    client.post("/analyze_video", content=b"http://127.0.0.1:9/x", headers={"content-type": "application/json"})
    assert request_temp_dirs() == before


def test_chat_route_failures_have_openai_s_shape_and_the_native_status(client) -> None:
    big = "data:image/png;base64," + base64.b64encode(b"\0" * (256 * 1024 + 1)).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}
    response = client.post("/v1/chat/completions", json={"messages": [message]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large" and "data: URL" in response.json()["error"]["message"]
    bare_url = client.post("/v1/chat/completions", content=b'"http://127.0.0.1:9/x"')
    assert bare_url.status_code == 400 and bare_url.json()["error"]["type"] == "invalid_request_error"


def test_the_route_table_decides_which_routes_are_guarded(client) -> None:
    """Every route http_api.routes marks guarded refuses a body the guard does not take, in the
    route's failure shape; an unguarded POST route is left to its own handler."""
    from http_api.routes import ROUTES

    guarded = [route for route in ROUTES if route.guarded]
    assert {route.path for route in guarded} == {
        "/analyze_video",
        "/analyze_image",
        "/v1/chat/completions",
        "/v1/files",
        "/media",
        "/jobs/submit",
    }
    for route in guarded:
        response = client.post(route.path, content=b"x", headers={"content-type": "text/plain"})
        assert response.status_code == 415, (route.path, response.text)
        body = response.json()
        message = body["error"]["message"] if route.path.startswith("/v1/") else body["error"]
        assert "Content-Type" in message, route.path
    response = client.post("/jobs/ask", content=b"x", headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]
