"""Property-based tests (hypothesis) of the in-process app: whatever the body, no 5xx.

Request bodies are random JSON, random multipart forms, random bytes and randomly damaged real
videos as uploads. Every answer is a success or the documented failure body with a 4xx status,
the service still answers a normal request afterwards, and no request leaves files behind.
URLs in generated bodies point at the loopback file server or are not URLs at all (no ':'),
so nothing is ever sent anywhere else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import request_temp_dirs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_service import upload

ENDPOINTS = {"/analyze_video": "video", "/analyze_image": "image"}
CLIENT_ERRORS = {400, 413, 415, 422}
# Bounded and reproducible: CI runs the same examples every time, in seconds.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

no_colon_text = st.text(st.characters(blacklist_characters=":", blacklist_categories=["Cs"]), max_size=40)
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | no_colon_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(no_colon_text, inner, max_size=4),
    max_leaves=12,
)
metadata_values = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": no_colon_text,
            "num_frames": st.integers(-3, 80),
            "max_new_tokens": st.integers(-3, 10),
            "temperature": st.floats(-1, 3, allow_nan=False),
            "top_p": st.floats(-1, 2, allow_nan=False),
        },
    ),
)


def loopback_urls(file_server: str) -> st.SearchStrategy[str]:
    names = ["clip.mp4", "clip.webm", "photo.jpg", "notes.txt", "truncated.mp4", "missing.mp4"]
    return st.sampled_from([f"{file_server}/{name}" for name in names] + ["data:,x", "data:;base64,%%"])


def assert_documented(response) -> None:
    """A success, or the failure body with a client-error status: never a 5xx."""
    assert response.status_code == 200 or response.status_code in CLIENT_ERRORS, response.text
    body = response.json()
    if response.status_code == 200:
        assert body["status"] == "success"
    else:
        assert set(body) == {"response", "status", "error"} and body["status"] == "failed"
        assert "Traceback" not in body["error"]


def request_files_left() -> set[str]:
    """Files in BentoML's per-request directories and our own request directories."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    leftovers = {str(p) for d in tmp.glob("bentoml-request-*") for p in d.iterdir()}
    return leftovers | request_temp_dirs()


@pytest.fixture(scope="module", autouse=True)
def the_service_survives(client, media_dir):
    """After all the fuzzing: a normal request still works and no request left files behind."""
    before = request_files_left()
    yield
    response = upload(client, "/analyze_video", "video", media_dir / "clip.mp4", {"num_frames": 2})
    assert response.status_code == 200, response.text
    assert request_files_left() <= before


@FUZZ
@given(data=st.data())
def test_json_bodies(client, file_server, data) -> None:
    endpoint = data.draw(st.sampled_from(list(ENDPOINTS)))
    kind = ENDPOINTS[endpoint]
    body = data.draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    f"{kind}_url": loopback_urls(file_server) | no_colon_text | json_values,
                    "metadata": metadata_values,
                    kind: no_colon_text,
                    "extra": json_values,
                },
            ),
        )
    )

    assert_documented(client.post(endpoint, json=body))


@FUZZ
@given(data=st.data())
def test_random_bytes_as_uploads(client, data) -> None:
    endpoint = data.draw(st.sampled_from(list(ENDPOINTS)))
    content = data.draw(st.binary(max_size=4096))
    filename = data.draw(st.sampled_from(["clip.mp4", "photo.jpg", "x", "a.m3u8", "../../etc/passwd"]))

    assert_documented(client.post(endpoint, files={ENDPOINTS[endpoint]: (filename, content)}))


@FUZZ
@given(data=st.data())
def test_damaged_real_videos_as_uploads(client, media_dir, data) -> None:
    original = (media_dir / data.draw(st.sampled_from(["clip.mp4", "clip.webm"]))).read_bytes()
    length = data.draw(st.just(len(original)) | st.integers(0, len(original)))  # whole files too
    damaged = bytearray(original[:length])
    for _ in range(data.draw(st.integers(0, 8))):
        if damaged:
            position = data.draw(st.integers(0, len(damaged) - 1))
            damaged[position] = data.draw(st.integers(0, 255))
    metadata = json.dumps({"num_frames": data.draw(st.integers(1, 8)), "max_new_tokens": 1})

    response = client.post("/analyze_video", files={"video": ("clip", bytes(damaged)), "metadata": (None, metadata)})

    assert_documented(response)


part_names = st.sampled_from(["video", "image", "metadata", "video_url", "image_url", "other"]) | no_colon_text


@FUZZ
@given(data=st.data())
def test_random_multipart_forms(client, data) -> None:
    endpoint = data.draw(st.sampled_from(list(ENDPOINTS)))
    parts = data.draw(
        st.lists(st.tuples(part_names, st.booleans(), st.binary(max_size=256) | no_colon_text), max_size=5)
    )
    files = [(name, ("f.bin", content) if as_file else (None, content)) for name, as_file, content in parts]

    response = client.post(endpoint, files=files or {"metadata": (None, "{}")})

    assert_documented(response)
    if any(name in ("video", "image") and not as_file for name, as_file, _ in parts):
        assert response.status_code == 400  # BentoML would download such a part itself


@FUZZ
@given(
    body=st.binary(max_size=512),
    content_type=st.sampled_from(
        ["application/json", "multipart/form-data; boundary=b", "multipart/form-data; boundary=", "text/plain", ""]
    ),
)
def test_raw_bodies_with_any_content_type(client, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}

    assert_documented(client.post("/analyze_image", content=body, headers=headers))
