"""The HTTP API in-process: both endpoints, both input forms, the documented errors.

Requests go through BentoML's real ASGI app, the real media decoding and the tiny checkpoint's
real generation; nothing is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TEST_MAX_NEW_TOKENS, request_temp_dirs

from llava_custom.builder import load_pretrained_model
from llava_custom.engine import Engine, GenerationSettings, ImageInput, VideoInput
from media import read_image, read_video
from testing.mediafiles import write_image, write_video

VIDEO_KEYS = {"response", "video_info", "status", "error", "usage"}
IMAGE_KEYS = {"response", "status", "error", "usage"}
FAILED_KEYS = {"response", "status", "error"}
TOKENS_PER_FRAME = 14 * 15  # 27x27 patches pooled to 14x14, one newline per row (grid)


def upload(client, endpoint: str, field: str, path, metadata: dict | str | None = None):
    files = {field: (path.name, path.read_bytes())}
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        files["metadata"] = (None, text, "application/json")
    return client.post(endpoint, files=files)


def assert_failed(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == FAILED_KEYS
    assert body["status"] == "failed" and body["response"] == ""
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The same model the service serves, loaded directly, to check answers are the model's."""
    return Engine(load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu"))


def test_video_upload_answers_with_video_info(client, media_dir):
    response = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"prompt": "What happens?"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == VIDEO_KEYS
    assert body["status"] == "success" and body["error"] is None
    assert isinstance(body["response"], str)
    indices = np.linspace(0, 29, 16, dtype=int)
    info = body["video_info"]
    assert info["frame_count"] == 16
    assert info["video_duration"] == pytest.approx(3.0)
    assert info["frame_times"] == pytest.approx([i / 10 for i in indices])
    assert body["usage"]["visual_tokens"] == 16 * TOKENS_PER_FRAME
    assert 0 < body["usage"]["completion_tokens"] <= TEST_MAX_NEW_TOKENS


def test_video_answer_is_the_models_answer(client, media_dir, engine):
    """The service feeds the model the sampled frames and the LLaVA-Video prompt, nothing else."""
    clip = media_dir / "clip.webm"
    body = upload(client, "/analyze_video", "video", clip, {"prompt": "Describe it.", "num_frames": 8}).json()
    sampled = read_video(clip, 8, frame_size=engine.frame_size)
    expected = engine.submit_video(
        sampled.frames,
        sampled.info.video_duration,
        sampled.info.frame_times,
        "Describe it.",
        GenerationSettings(max_new_tokens=TEST_MAX_NEW_TOKENS),
    ).result()
    assert body["response"] == expected.text
    assert body["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "visual_tokens": expected.visual_tokens,
        "completion_tokens": expected.completion_tokens,
    }
    assert body["video_info"]["frame_count"] == 8
    assert body["video_info"]["video_duration"] == pytest.approx(24 / 8)


def test_image_answer_is_the_models_answer(client, media_dir, engine):
    image = media_dir / "wide.png"
    body = upload(client, "/analyze_image", "image", image, {"prompt": "What colour?"}).json()
    assert set(body) == IMAGE_KEYS and body["status"] == "success"
    expected = engine.submit_image(
        read_image(image, max_pixels=10**8), "What colour?", GenerationSettings(max_new_tokens=TEST_MAX_NEW_TOKENS)
    ).result()
    assert body["response"] == expected.text
    assert body["usage"]["visual_tokens"] == expected.visual_tokens > 729


def test_metadata_is_optional_and_default_prompt_applies(client, media_dir):
    without = upload(client, "/analyze_video", "video", media_dir / "clip.mp4")
    empty_prompt = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"prompt": ""})
    own_prompt = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"prompt": "Why?"})
    assert without.status_code == empty_prompt.status_code == own_prompt.status_code == 200
    assert without.json() == empty_prompt.json()
    assert without.json()["usage"]["prompt_tokens"] != own_prompt.json()["usage"]["prompt_tokens"]
    image = upload(client, "/analyze_image", "image", media_dir / "photo.jpg")
    assert image.status_code == 200 and image.json()["status"] == "success"


def test_metadata_part_without_json_content_type(client, media_dir):
    files = {
        "video": ("clip.mp4", (media_dir / "clip.mp4").read_bytes()),
        "metadata": (None, json.dumps({"prompt": "What?", "num_frames": 4})),
    }
    response = client.post("/analyze_video", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["video_info"]["frame_count"] == 4


def test_video_url_gives_the_same_answer_as_upload(client, media_dir, file_server):
    metadata = {"prompt": "Please describe what is happening in this video"}
    by_url = client.post("/analyze_video", json={"video_url": f"{file_server}/clip.mp4", "metadata": metadata})
    by_upload = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", metadata)
    assert by_url.status_code == 200, by_url.text
    assert by_url.json() == by_upload.json()


def test_image_url(client, file_server):
    response = client.post("/analyze_image", json={"image_url": f"{file_server}/photo.jpg"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "success"


def test_num_frames_and_max_new_tokens_are_honoured(client, media_dir):
    body = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"num_frames": 5, "max_new_tokens": 2})
    assert body.status_code == 200, body.text
    body = body.json()
    assert body["video_info"]["frame_count"] == 5
    assert body["usage"]["visual_tokens"] == 5 * TOKENS_PER_FRAME
    assert 1 <= body["usage"]["completion_tokens"] <= 2


def test_missing_input(client):
    assert_failed(client.post("/analyze_video", json={"metadata": {"prompt": "x"}}), 400, "no video given")
    assert_failed(client.post("/analyze_image", json={}), 400, "no image given")


def test_both_inputs(client, media_dir, file_server):
    files = {
        "video": ("clip.mp4", (media_dir / "clip.mp4").read_bytes()),
        "video_url": (None, f"{file_server}/clip.mp4"),
    }
    assert_failed(client.post("/analyze_video", files=files), 400, "not both")


def test_bad_json_body(client):
    response = client.post("/analyze_video", content=b"{not json", headers={"content-type": "application/json"})
    assert_failed(response, 400, "JSON")


def test_bad_metadata(client, media_dir):
    clip = media_dir / "clip.mp4"
    assert_failed(upload(client, "/analyze_video", "video", clip, '{"prompt": "x"'), 400, "metadata is not valid JSON")
    assert_failed(upload(client, "/analyze_video", "video", clip, {"num_frames": 0}), 400, "num_frames")
    assert_failed(upload(client, "/analyze_video", "video", clip, {"num_frames": 65}), 400, "at most 64")
    assert_failed(upload(client, "/analyze_video", "video", clip, {"promt": "typo"}), 400, "promt")
    assert_failed(upload(client, "/analyze_video", "video", clip, {"max_new_tokens": 10**6}), 400, "max_new_tokens")
    assert_failed(upload(client, "/analyze_video", "video", clip, {"seed": -1}), 400, "seed")
    assert_failed(upload(client, "/analyze_video", "video", clip, {"ignore_eos": "maybe"}), 400, "ignore_eos")
    response = client.post("/analyze_image", json={"image_url": "http://127.0.0.1/x.png", "metadata": [1]})
    assert_failed(response, 400, "metadata must be a JSON object")


def test_wrong_field_types(client):
    assert_failed(client.post("/analyze_video", json={"video_url": 5}), 400, "video_url")
    assert_failed(client.post("/analyze_video", json={"video": "http://127.0.0.1/x.mp4"}), 400, "video")


def test_not_a_video(client, media_dir):
    assert_failed(upload(client, "/analyze_video", "video", media_dir / "notes.txt"), 415, "not a video")
    assert_failed(upload(client, "/analyze_video", "video", media_dir / "photo.jpg"), 415)
    assert_failed(upload(client, "/analyze_image", "image", media_dir / "clip.mp4"), 415, "not an image")


def test_damaged_video(client, media_dir):
    assert_failed(upload(client, "/analyze_video", "video", media_dir / "truncated.mp4"), 422)


def test_empty_upload(client):
    response = client.post("/analyze_video", files={"video": ("empty.mp4", b"")})
    assert_failed(response, 400, "empty")


def test_bad_urls(client, file_server):
    assert_failed(client.post("/analyze_video", json={"video_url": "ftp://127.0.0.1/clip.mp4"}), 400, "http")
    assert_failed(client.post("/analyze_video", json={"video_url": "not a url"}), 400)
    assert_failed(client.post("/analyze_video", json={"video_url": f"{file_server}/missing.mp4"}), 502, "404")


def test_unreachable_url(client):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert_failed(client.post("/analyze_image", json={"image_url": f"http://127.0.0.1:{port}/a.png"}), 502)


def test_no_request_directory_is_left_behind(client, media_dir, file_server):
    before = request_temp_dirs()
    upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"num_frames": 2})
    client.post("/analyze_video", json={"video_url": f"{file_server}/clip.mp4", "metadata": {"num_frames": 2}})
    client.post("/analyze_video", json={"video_url": f"{file_server}/notes.txt"})
    client.post("/analyze_video", json={"video_url": f"{file_server}/missing.mp4"})
    assert request_temp_dirs() == before


def test_service_keeps_answering_after_errors(client, media_dir):
    for junk in (b"", b"\x00" * 100, b"RIFF....AVI garbage"):
        response = client.post("/analyze_video", files={"video": ("junk.avi", junk)})
        assert 400 <= response.status_code < 500
    assert upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"num_frames": 2}).status_code == 200


def test_url_to_a_loopback_address_the_allow_list_does_not_name(client):
    # The tests allow 127.0.0.1 only; ::1 is refused before any connection is made.
    response = client.post("/analyze_video", json={"video_url": "http://[::1]:9/clip.mp4"})
    assert_failed(response, 400, "loopback", "LLAVA_URL_ALLOWLIST")


def test_every_media_error_has_its_documented_status():
    import media
    from http_api.errors import status_for

    assert status_for(media.RefusedAddress("x")) == 400
    assert status_for(media.InvalidSource("x")) == 400
    assert status_for(media.MediaTooLarge("x")) == 413
    assert status_for(media.UnsupportedMedia("x")) == 415
    assert status_for(media.DecodeTimeout("x")) == 422
    assert status_for(media.UndecodableMedia("x")) == 422
    assert status_for(media.UpstreamError("x")) == 502
    assert status_for(media.UpstreamTimeout("x")) == 504
    assert status_for(RuntimeError("x")) == 500


def test_engine_errors_have_their_documented_status():
    from http_api.errors import status_for
    from llava_custom import errors

    assert status_for(errors.InvalidPrompt("x")) == 400
    assert status_for(errors.PromptTooLong("x")) == 413
    assert status_for(errors.EngineBusy("x")) == 503
    assert status_for(errors.RequestTimeout("x")) == 503
    assert status_for(errors.EngineClosed("x")) == 503


def test_rotated_video_upload(client, tmp_path):
    from testing.mediafiles import write_video

    clip = write_video(tmp_path / "phone.mp4", frames=12, fps=6, size=(48, 64), rotation=(90, False, False))
    response = upload(client, "/analyze_video", "video", clip, {"num_frames": 4})
    assert response.status_code == 200, response.text
    assert response.json()["video_info"]["video_duration"] == pytest.approx(2.0)


def test_file_type_is_decided_by_decoding_not_by_name_or_content_type(client, media_dir):
    video = (media_dir / "clip.mp4").read_bytes()
    photo = (media_dir / "photo.jpg").read_bytes()

    as_image = client.post("/analyze_video", files={"video": ("holiday.jpg", video, "image/jpeg")})
    as_playlist = client.post("/analyze_image", files={"image": ("list.m3u8", photo, "application/x-mpegurl")})

    assert as_image.status_code == 200, as_image.text
    assert as_playlist.status_code == 200, as_playlist.text


@pytest.mark.parametrize("question", ["what is <image> here?", "and <video>?"])
def test_placeholder_in_the_question_is_refused(client, media_dir, question):
    response = upload(client, "/analyze_image", "image", media_dir / "photo.jpg", {"prompt": question})
    assert_failed(response, 400, "may not contain")
    response = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"prompt": question})
    assert_failed(response, 400, "may not contain")


# --- many clients at once -----------------------------------------------------------------------


def test_a_short_request_is_answered_while_a_long_one_generates(client, media_dir):
    """The long request holds a row of the batch; the short one takes another and does not wait."""
    long_metadata = {"num_frames": 2, "max_new_tokens": 1000, "ignore_eos": True}
    results: dict = {}
    long_request = threading.Thread(
        target=lambda: results.update(
            long=upload(client, "/analyze_video", "video", media_dir / "clip.mp4", long_metadata)
        )
    )
    long_request.start()
    time.sleep(0.5)  # it is generating by now
    short = upload(client, "/analyze_image", "image", media_dir / "photo.jpg", {"max_new_tokens": 2})
    assert short.status_code == 200, short.text
    assert long_request.is_alive(), "the short request should not have waited for the long one"
    long_request.join(timeout=120)
    assert results["long"].status_code == 200
    assert results["long"].json()["usage"]["completion_tokens"] == 1000


def test_concurrent_requests_get_the_answers_they_get_alone(client, media_dir):
    requests = [
        ("/analyze_video", "video", "clip.mp4", {"num_frames": 2, "max_new_tokens": 20, "prompt": "One?"}),
        ("/analyze_video", "video", "clip.webm", {"num_frames": 8, "max_new_tokens": 20, "prompt": "Two?"}),
        ("/analyze_image", "image", "photo.jpg", {"max_new_tokens": 20, "prompt": "Three?"}),
        ("/analyze_image", "image", "wide.png", {"max_new_tokens": 12, "prompt": "Four?"}),
    ]

    def send(request):
        endpoint, field, name, metadata = request
        return upload(client, endpoint, field, media_dir / name, metadata)

    alone = [send(request).json() for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = [response.json() for response in pool.map(send, requests)]
    assert all(body["status"] == "success" for body in alone)
    assert together == alone


def test_seed_makes_a_sampled_answer_reproducible(client, media_dir):
    photo = media_dir / "photo.jpg"
    metadata = {"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_new_tokens": 16, "ignore_eos": True}
    first, again = (upload(client, "/analyze_image", "image", photo, metadata).json() for _ in range(2))
    other = upload(client, "/analyze_image", "image", photo, {**metadata, "seed": 8}).json()
    assert first["usage"]["completion_tokens"] == 16
    assert first["response"] == again["response"] != other["response"]


def reuse_lines(records: list[logging.LogRecord], digest: str) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("reuse ") and digest in r.getMessage()]


@pytest.mark.parametrize("modality", ["video", "image"])
def test_follow_ups_by_upload_url_and_data_url_reuse_the_first_request(
    client, media_dir, file_server, engine, caplog, modality
):
    """The same bytes sent three ways are one medium: decoded and encoded once, then each follow-up
    prefills only its question; the answers are the model's answers without reuse."""
    name = f"follow-up.{'mp4' if modality == 'video' else 'png'}"
    path = media_dir / name  # new bytes of this test's own, so no earlier request has seen them
    if modality == "video":
        write_video(path, frames=12, fps=6, size=(80, 64))
    else:
        write_image(path, size=(90, 70), mode="RGB", fmt="PNG")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    questions = ["What is shown?", "What colour dominates?", "Is there text?"]
    data_url = f"data:{'video/mp4' if modality == 'video' else 'image/png'};base64,{base64.b64encode(data).decode()}"
    endpoint, url_field = f"/analyze_{modality}", f"{modality}_url"
    with caplog.at_level(logging.INFO, logger="llava_custom"):
        bodies = [
            upload(client, endpoint, modality, path, {"prompt": questions[0]}).json(),
            client.post(
                endpoint, json={url_field: f"{file_server}/{name}", "metadata": {"prompt": questions[1]}}
            ).json(),
            client.post(endpoint, json={url_field: data_url, "metadata": {"prompt": questions[2]}}).json(),
        ]
    lines = reuse_lines(caplog.records, digest)
    assert len(lines) == 3, lines
    assert "features computed, KV of 0 of" in lines[0]
    for line in lines[1:]:
        assert "features recalled" in line and "KV of 0 of" not in line, line
    generation = GenerationSettings(max_new_tokens=TEST_MAX_NEW_TOKENS)
    if modality == "video":
        sampled = read_video(path, 16, frame_size=engine.frame_size)
        timing = (sampled.info.video_duration, sampled.info.frame_times)
        expected = [engine.submit_video(sampled.frames, *timing, q, generation).result() for q in questions]
        assert all(body["video_info"] == bodies[0]["video_info"] for body in bodies)
    else:
        image = read_image(path, max_pixels=10**8)
        expected = [engine.submit_image(image, q, generation).result() for q in questions]
    assert [body["response"] for body in bodies] == [answer.text for answer in expected]
    assert [body["usage"]["prompt_tokens"] for body in bodies] == [answer.prompt_tokens for answer in expected]


def test_different_bytes_are_never_reused(client, media_dir, caplog):
    """Two videos of the same length and frame count have the same prompt tokens; the key is their bytes."""
    first, second = media_dir / "same-shape-1.mp4", media_dir / "same-shape-2.mp4"
    write_video(first, frames=10, fps=5, size=(64, 48))
    write_video(second, frames=10, fps=5, size=(64, 48), codec="mpeg4")
    with caplog.at_level(logging.INFO, logger="llava_custom"):
        for path in (first, second):
            assert upload(client, "/analyze_video", "video", path, {"prompt": "Same?"}).status_code == 200
    for path in (first, second):
        (line,) = reuse_lines(caplog.records, hashlib.sha256(path.read_bytes()).hexdigest())
        assert "features computed, KV of 0 of" in line


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.mark.parametrize(
    ("endpoint", "field", "name"), [("/analyze_video", "video", "clip.mp4"), ("/analyze_image", "image", "photo.jpg")]
)
def test_streamed_answer_is_the_answer_token_by_token(client, media_dir, endpoint, field, name):
    metadata = {"prompt": "What is it?", "num_frames": 3, "max_new_tokens": 12, "ignore_eos": True}
    if field == "image":
        del metadata["num_frames"]
    whole = upload(client, endpoint, field, media_dir / name, metadata).json()
    response = upload(client, endpoint, field, media_dir / name, {**metadata, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [event for event, _ in events]
    assert names[-1] == "answer" and set(names[:-1]) == {"delta"} and len(names) > 3
    assert "".join(data["text"] for _, data in events[:-1]) == whole["response"]
    assert events[-1][1] == whole


def test_stream_failing_before_it_starts_gets_the_failure_status(client, media_dir):
    response = upload(client, "/analyze_video", "video", media_dir / "notes.txt", {"stream": True})
    assert_failed(response, 415, "not a video")


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"top_k": -1}, ("top_k",)),
        ({"stop": "x"}, ("stop",)),
        ({"stop": ["a", "b", "c", "d", "e"]}, ("stop",)),
        ({"stop": [""]}, ("stop",)),
        ({"stream": "maybe"}, ("stream",)),
    ],
)
def test_new_metadata_fields_are_validated(client, media_dir, metadata, words):
    assert_failed(upload(client, "/analyze_image", "image", media_dir / "photo.jpg", metadata), 400, *words)


def test_top_k_one_samples_the_greedy_answer(client, media_dir):
    metadata = {"prompt": "What is it?", "max_new_tokens": 10, "ignore_eos": True}
    greedy = upload(client, "/analyze_image", "image", media_dir / "photo.jpg", metadata).json()
    sampled = upload(
        client, "/analyze_image", "image", media_dir / "photo.jpg", {**metadata, "temperature": 1.5, "top_k": 1}
    ).json()
    assert sampled["response"] == greedy["response"]


def test_openapi_page_documents_both_forms_metadata_and_errors(client):
    from http_api.schemas import Metadata

    spec = client.get("/docs.json").json()
    schemas = spec["components"]["schemas"]
    assert set(schemas["Metadata"]["properties"]) == set(Metadata.model_fields)
    for route, kind in (("/analyze_video", "video"), ("/analyze_image", "image")):
        operation = spec["paths"][route]["post"]
        forms = operation["requestBody"]["content"]
        assert set(forms["multipart/form-data"]["schema"]["properties"]) == {kind, "image", "metadata"}
        assert set(forms["application/json"]["schema"]["properties"]) == {f"{kind}_url", "image_url", "metadata"}
        assert forms["multipart/form-data"]["schema"]["properties"]["image"]["type"] == "array"
        statuses = operation["responses"]
        assert {"200", "400", "413", "415", "422", "500", "502", "503", "504"} <= set(statuses)
        assert statuses["415"]["content"]["application/json"]["schema"]["$ref"].endswith("/Failure")
    assert set(schemas["Failure"]["properties"]) == {"response", "status", "error"}
    assert "post" in spec["paths"]["/v1/chat/completions"] and "get" in spec["paths"]["/v1/models"]


def test_a_segment_of_the_video_at_a_rate(client, media_dir):
    """clip.mp4: 30 frames at 10 fps. frame_times stay relative to the whole video."""
    path = media_dir / "clip.mp4"
    whole = upload(client, "/analyze_video", "video", path, {"num_frames": 4}).json()
    segment = upload(
        client, "/analyze_video", "video", path, {"num_frames": 4, "start_time": 1.0, "end_time": 2.0}
    ).json()
    assert segment["status"] == "success", segment
    # The same bytes were seen before, with other frames: nothing of the first request is reused.
    assert segment["video_info"]["frame_times"] != whole["video_info"]["frame_times"]
    assert segment["video_info"]["frame_count"] == 4
    assert all(1.0 <= t <= 2.0 for t in segment["video_info"]["frame_times"])
    assert segment["video_info"]["video_duration"] == pytest.approx(3.0)
    rated = upload(client, "/analyze_video", "video", path, {"fps": 2}).json()
    assert rated["video_info"]["frame_count"] == 6  # 3 s at 2 fps, under the default 16
    assert (
        upload(client, "/analyze_video", "video", path, {"fps": 2, "num_frames": 3}).json()["video_info"]["frame_count"]
        == 3
    )


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"fps": 0}, ("fps",)),
        ({"start_time": -1}, ("start_time",)),
        ({"start_time": 2, "end_time": 1}, ("end_time must be after start_time",)),
        ({"start_time": 5}, ("start_time", "past the end")),
        ({"start_time": 1.01, "end_time": 1.09}, ("segment",)),
    ],
)
def test_bad_segments_and_rates_are_refused(client, media_dir, metadata, words):
    assert_failed(upload(client, "/analyze_video", "video", media_dir / "clip.mp4", metadata), 400, *words)


# --- what a new user hit (issue 26) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        {"num_frames": True},
        {"num_frames": "8"},
        {"max_new_tokens": "4"},
        {"temperature": "0.5"},
        {"fps": True},
        {"start_time": "1"},
        {"seed": False},
    ],
)
def test_booleans_and_numbers_in_strings_are_refused_for_numeric_fields(client, media_dir, metadata):
    (name,) = metadata
    assert_failed(upload(client, "/analyze_video", "video", media_dir / "clip.mp4", metadata), 400, name)
    response = client.post("/analyze_video", json={"video_url": "http://127.0.0.1:9/x.mp4", "metadata": metadata})
    assert_failed(response, 400, name)


def test_whole_numbers_are_still_numbers_for_float_fields(client, media_dir):
    metadata = {"num_frames": 4, "temperature": 0, "fps": 2, "start_time": 0, "end_time": 3}
    response = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", metadata)
    assert response.status_code == 200, response.text


def test_two_videos_are_refused_naming_the_part(client, media_dir):
    data = (media_dir / "clip.mp4").read_bytes()
    files = [("video", ("clip.mp4", data)), ("video", ("clip.mp4", data))]
    assert_failed(client.post("/analyze_video", files=files), 400, "'video' part is given twice")


def padded_answer(engine, question: str, pictures: list, tokens: int = 6):
    return engine.submit(engine.prepare(question, pictures, GenerationSettings(max_new_tokens=tokens))).result()


def test_several_images_are_answered_in_the_order_sent_by_upload_and_by_url(client, engine, media_dir, file_server):
    """Repeated 'image' parts, or a list of image_urls: the model's answer about those images in that
    order (each one padded tile), as the engine gives it for the same files."""
    names = ["photo.jpg", "wide.png"]
    metadata = {"prompt": "Compare them.", "max_new_tokens": 6}
    files = [("image", (name, (media_dir / name).read_bytes())) for name in names]
    files.append(("metadata", (None, json.dumps(metadata), "application/json")))
    uploaded = client.post("/analyze_image", files=files)
    assert uploaded.status_code == 200, uploaded.text
    urls = [f"{file_server}/{name}" for name in reversed(names)]
    by_url = client.post("/analyze_image", json={"image_url": urls, "metadata": metadata})
    assert by_url.status_code == 200, by_url.text
    images = [ImageInput(read_image(media_dir / name, max_pixels=10**8)) for name in names]
    for response, order in ((uploaded, images), (by_url, images[::-1])):
        expected = padded_answer(engine, "Compare them.", order)
        body = response.json()
        assert set(body) == IMAGE_KEYS | {"pictures"}
        assert body["pictures"] == [{"kind": "image", "visual_tokens": engine.model.image_layout.padded_tokens}] * 2
        assert body["response"] == expected.text
        assert body["usage"]["visual_tokens"] == expected.visual_tokens == 2 * engine.model.image_layout.padded_tokens
        assert body["usage"]["prompt_tokens"] == expected.prompt_tokens


def test_images_beside_a_video_come_after_it(client, engine, media_dir):
    metadata = {"prompt": "Is the photo in the clip?", "num_frames": 2, "max_new_tokens": 6, "return_frames": True}
    files = [
        ("video", ("clip.mp4", (media_dir / "clip.mp4").read_bytes())),
        ("image", ("photo.jpg", (media_dir / "photo.jpg").read_bytes())),
        ("metadata", (None, json.dumps(metadata), "application/json")),
    ]
    response = client.post("/analyze_video", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    video = read_video(media_dir / "clip.mp4", 2, frame_size=engine.frame_size)
    pictures = [
        VideoInput(video.frames, video.info.video_duration, video.info.frame_times),
        ImageInput(read_image(media_dir / "photo.jpg", max_pixels=10**8)),
    ]
    expected = padded_answer(engine, "Is the photo in the clip?", pictures)
    assert body["response"] == expected.text
    assert body["usage"]["visual_tokens"] == expected.visual_tokens
    assert body["video_info"]["frame_times"] == video.info.frame_times
    assert [frame["time"] for frame in body["frames"]] == [*video.info.frame_times, None]
    clip, photo = body["pictures"]
    assert (clip["kind"], clip["visual_tokens"]) == ("video", engine.model.video_layout.num_video_tokens(2))
    assert clip["video_info"] == body["video_info"]
    assert photo == {"kind": "image", "visual_tokens": engine.model.image_layout.padded_tokens}
    assert clip["visual_tokens"] + photo["visual_tokens"] == body["usage"]["visual_tokens"]


def test_more_images_than_the_limit_are_refused_before_any_is_fetched(client, file_server):
    urls = [f"{file_server}/missing-{number}.jpg" for number in range(9)]  # fetching one: a 502
    refused = client.post("/analyze_image", json={"image_url": urls})
    assert_failed(refused, 400, "9 images in one request; at most 8 (LLAVA_MAX_IMAGES_PER_REQUEST)")


def test_mixing_image_files_and_urls_or_images_without_their_video_is_refused(client, media_dir, file_server):
    photo = ("image", ("photo.jpg", (media_dir / "photo.jpg").read_bytes()))
    mixed = client.post(
        "/analyze_image", files=[photo, photo, ("image_url", (None, json.dumps([f"{file_server}/wide.png"])))]
    )
    assert_failed(mixed, 400, "either as 'image' files or as 'image_url's, not both")
    assert_failed(client.post("/analyze_video", files=[photo]), 400, "no video given")


@pytest.mark.parametrize("part", ["file", "video_file", "images"])
def test_a_wrong_part_name_is_told_the_parts_the_route_takes(client, media_dir, part):
    response = client.post("/analyze_video", files={part: ("clip.mp4", (media_dir / "clip.mp4").read_bytes())})
    error = assert_failed(response, 400, f"'{part}' part", "'video' (a file)", "'video_url'", "'image' (a file)")
    assert "neither text nor JSON" not in error


@pytest.mark.parametrize(
    ("endpoint", "field", "right"),
    [
        ("/analyze_image", "url", "image_url"),
        ("/analyze_image", "video_url", "image_url"),
        ("/analyze_video", "url", "video_url"),
    ],
)
def test_a_url_in_the_wrong_field_is_told_the_right_one(client, endpoint, field, right):
    error = assert_failed(client.post(endpoint, json={field: "http://127.0.0.1:9/x"}), 400, field, f"'{right}'")
    assert "inside metadata" not in error


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_unknown_route_answers_json(client, method):
    response = client.request(method, "/analyze_videos")
    assert response.headers["content-type"] == "application/json"
    assert_failed(response, 404)
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"  # OpenAI's shape under /v1


def test_the_route_table_decides_which_lines_are_quiet(client, caplog):
    """Quiet routes of http_api.routes are logged at DEBUG, the others at INFO."""
    from http_api.routes import ROUTES

    # /metrics is quiet too, but in-process BentoML has no metrics directory to read (served: test_auth_metrics).
    quiet = [route.path for route in ROUTES if route.quiet and not route.prefix and route.path != "/metrics"]
    loud = ["/docs.json", "/analyze_videos", "/v1/models"]
    with caplog.at_level(logging.DEBUG, logger="llava_video_service.request"):
        for path in quiet + loud:
            client.get(path)
    levels = {}
    for record in caplog.records:
        if record.name == "llava_video_service.request" and record.getMessage().startswith("request "):
            levels[record.getMessage().split()[3]] = record.levelname
    assert {path: levels[path] for path in quiet} == dict.fromkeys(quiet, "DEBUG")
    assert {path: levels[path] for path in loud} == dict.fromkeys(loud, "INFO")


def test_status_by_class_hierarchy_and_by_kind():
    """The most specific mapped class decides, whatever the table's order; a job's recorded kind
    (the class name) gets the same status."""
    import media
    from http_api.errors import ERROR_STATUS, status_for, status_for_kind

    assert status_for(media.UpstreamTimeout("x")) == 504  # an UpstreamError (502) of its own
    assert status_for(media.DecodeTimeout("x")) == 422  # unmapped: its parent UndecodableMedia's
    reordered = dict(reversed(list(ERROR_STATUS.items())))
    ERROR_STATUS.clear()
    ERROR_STATUS.update(reordered)
    try:
        assert status_for(media.UpstreamTimeout("x")) == 504 and status_for(media.RefusedAddress("x")) == 400
    finally:
        ERROR_STATUS.clear()
        ERROR_STATUS.update(dict(reversed(list(reordered.items()))))
    assert status_for_kind("MediaTooLarge") == 413 and status_for_kind("UnsupportedMedia") == 415
    assert status_for_kind("DecodeTimeout") == 422 and status_for_kind("RefusedAddress") == 400
    assert status_for_kind("RuntimeError") == 500 and status_for_kind("nothing") == 500


def test_a_prompt_too_long_for_the_model_says_so_and_by_how_much(client, media_dir):
    """A question of half a megabyte: a 413 that names the prompt as the cause and how many tokens
    it is over, not a hint about frames."""
    question = "Describe every detail of this picture again and again. " * 9500  # about 525 KB
    response = upload(client, "/analyze_image", "image", media_dir / "photo.jpg", {"prompt": question})
    message = assert_failed(response, 413, "the prompt is too long", "more than")
    over = int(message.split(", ")[1].split(" more than")[0])
    assert over > 0
