"""Upload once, ask many: the media store through a served instance, driven by the openai SDK
(files.create, file parts, vLLM uuids) and by plain HTTP as curl sends it (/media, media_id,
file_id on /jobs/submit).

Answers by id are compared with the answers to the same bytes sent inline (greedy decoding on
the tiny checkpoint: the same prompt must give the same tokens).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from conftest import service_env
from PIL import Image

from testing.mediafiles import write_minutes_video
from testing.served import free_port, running_service

pytestmark = pytest.mark.served
TTL_SECONDS = 20
STORE_BYTES = 1_200_000
QUESTION = "What is happening here?"


class Store:
    """The served instance, its store's folder and an SDK client."""

    def __init__(self, base: str, folder: Path) -> None:
        self.base = base
        self.folder = folder
        self.sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=base, timeout=120)
        self.model = self.sdk.models.list().data[0].id

    def blobs(self) -> list[str]:
        return sorted(path.name for path in (self.folder / "blobs").iterdir())

    def incoming(self) -> list[str]:
        return sorted(path.name for path in (self.folder / "incoming").iterdir())

    def clear(self) -> None:
        for stored in self.sdk.files.list().data:
            self.sdk.files.delete(stored.id)

    def upload(self, path: Path, route: str = "/v1/files") -> httpx.Response:
        with path.open("rb") as file:
            return self.http.post(route, files={"file": (path.name, file)}, data={"purpose": "vision"})


@pytest.fixture(scope="module")
def store(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    folder = tmp_path_factory.mktemp("files-served")
    port = free_port()
    env = (
        os.environ
        | service_env(tiny_checkpoint)
        | {
            "LLAVA_MEDIA_DIR": str(folder / "media"),
            "LLAVA_MEDIA_STORE_BYTES": str(STORE_BYTES),
            "LLAVA_MEDIA_TTL_S": str(TTL_SECONDS),
            "LLAVA_JOB_DIR": str(folder / "jobs"),
            "LLAVA_MAX_NEW_TOKENS": "6",
        }
    )
    command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]
    with running_service(command, env, port, folder / "serve.log") as base:
        yield Store(base, folder / "media")


def data_url(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def chat(store: Store, *parts: dict[str, Any]) -> Any:
    content = [*parts, {"type": "text", "text": QUESTION}]
    return store.sdk.chat.completions.create(model=store.model, messages=[{"role": "user", "content": content}])


def noise_png(path: Path, seed: int, side: int = 400) -> Path:
    """An image of random pixels: a PNG of about side * side * 3 bytes, that compression keeps."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_a_video_uploaded_with_the_sdk_answers_as_the_same_video_sent_inline(store, media_dir):
    clip = media_dir / "clip.mp4"
    with clip.open("rb") as file:
        stored = store.sdk.files.create(file=file, purpose="vision")
    assert stored.id.startswith("file-") and len(stored.id) == 37 and stored.object == "file"
    assert stored.bytes == clip.stat().st_size and stored.filename == "clip.mp4" and stored.purpose == "vision"
    assert stored.expires_at - stored.created_at == TTL_SECONDS
    assert store.sdk.files.retrieve(stored.id).id == stored.id
    assert stored.id in [each.id for each in store.sdk.files.list().data]
    assert store.http.get(f"/v1/files/{stored.id}/content").content == clip.read_bytes()

    by_id = chat(store, {"type": "file", "file": {"file_id": stored.id}})
    inline = chat(store, {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}})
    assert by_id.choices[0].message.content == inline.choices[0].message.content
    assert by_id.usage.prompt_tokens == inline.usage.prompt_tokens > 0
    # The second question by id is a follow-up: its features come from the reuse cache.
    hits = _features_hits(store)
    again = chat(store, {"type": "file", "file": {"file_id": stored.id}})
    assert again.choices[0].message.content == by_id.choices[0].message.content
    assert _features_hits(store) > hits


def _features_hits(store: Store) -> float:
    for line in store.http.get("/metrics").text.splitlines():
        if line.startswith('llava_cache_hits_total{cache="features"}'):
            return float(line.split()[-1])
    raise AssertionError("no features cache counter on /metrics")


def test_native_twin_and_media_id_on_the_native_routes(store, media_dir):
    clip, photo = media_dir / "clip.mp4", media_dir / "photo.jpg"
    video = store.upload(clip, "/media")
    image = store.upload(photo, "/media")
    assert video.status_code == image.status_code == 200, (video.text, image.text)
    assert video.json()["kind"] == "video" and image.json()["kind"] == "image"
    assert video.json().keys() == {
        "id",
        "object",
        "bytes",
        "created_at",
        "expires_at",
        "filename",
        "purpose",
        "status",
        "kind",
    }
    metadata = {"prompt": QUESTION}
    with clip.open("rb") as file:
        uploaded = store.http.post("/analyze_video", files={"video": file}, data={"metadata": json.dumps(metadata)})
    by_json = store.http.post("/analyze_video", json={"media_id": video.json()["id"], "metadata": metadata})
    by_form = store.http.post(
        "/analyze_video", data={"metadata": json.dumps(metadata | {"media_id": video.json()["id"]})}
    )
    assert uploaded.status_code == by_json.status_code == by_form.status_code == 200, (by_json.text, by_form.text)
    assert uploaded.json() == by_json.json() == by_form.json()

    with photo.open("rb") as file:
        two_uploaded = store.http.post(
            "/analyze_image",
            files=[("image", file), ("image", photo.open("rb"))],
            data={"metadata": json.dumps(metadata)},
        )
    two_by_id = store.http.post(
        "/analyze_image", json={"media_id": [image.json()["id"], image.json()["id"]], "metadata": metadata}
    )
    assert two_uploaded.status_code == two_by_id.status_code == 200, two_by_id.text
    assert two_uploaded.json() == two_by_id.json()

    # Images beside the video by id: a list, the video's first, as the same files uploaded.
    with clip.open("rb") as file, photo.open("rb") as beside:
        both_uploaded = store.http.post(
            "/analyze_video", files=[("video", file), ("image", beside)], data={"metadata": json.dumps(metadata)}
        )
    both_by_id = store.http.post(
        "/analyze_video", json={"media_id": [video.json()["id"], image.json()["id"]], "metadata": metadata}
    )
    assert both_uploaded.status_code == both_by_id.status_code == 200, both_by_id.text
    assert both_uploaded.json() == both_by_id.json() and len(both_by_id.json()["pictures"]) == 2

    # An image's id where the video goes gets what an uploaded image gets there.
    wrong = store.http.post("/analyze_video", json={"media_id": image.json()["id"]})
    with photo.open("rb") as file:
        wrong_upload = store.http.post("/analyze_video", files={"video": file})
    assert wrong.status_code == wrong_upload.status_code == 415
    assert "is an image, not a video" in wrong.json()["error"] and wrong.json()["status"] == "failed"
    both = store.http.post("/analyze_video", json={"media_id": video.json()["id"], "video_url": "http://127.0.0.1/x"})
    assert both.status_code == 400 and "not two of them" in both.json()["error"]

    assert store.http.delete(f"/media/{video.json()['id']}").json()["deleted"] is True
    gone = store.http.post("/analyze_video", json={"media_id": video.json()["id"]})
    assert gone.status_code == 404 and video.json()["id"] in gone.json()["error"]
    assert store.http.get(f"/media/{video.json()['id']}").status_code == 404


def test_a_uuid_sent_with_the_data_answers_later_without_it(store, media_dir):
    photo = media_dir / "wide.png"
    uuid = f"sku-{time.monotonic_ns()}"
    with_data = chat(store, {"type": "image_url", "image_url": {"url": data_url(photo, "image/png")}, "uuid": uuid})
    without = chat(store, {"type": "image_url", "image_url": None, "uuid": uuid})
    assert without.choices[0].message.content == with_data.choices[0].message.content
    assert without.usage.prompt_tokens == with_data.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError, match="never-sent"):
        chat(store, {"type": "image_url", "image_url": None, "uuid": "never-sent"})
    with pytest.raises(openai.NotFoundError):  # a uuid is per kind, as vLLM's
        chat(store, {"type": "video_url", "video_url": None, "uuid": uuid})


def test_a_deleted_file_is_a_404_everywhere(store, media_dir):
    with (media_dir / "photo.jpg").open("rb") as file:
        stored = store.sdk.files.create(file=file, purpose="vision")
    deleted = store.sdk.files.delete(stored.id)
    assert deleted.deleted and deleted.id == stored.id
    with pytest.raises(openai.NotFoundError, match=stored.id):
        store.sdk.files.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError, match=stored.id):
        chat(store, {"type": "file", "file": {"file_id": stored.id}})
    with pytest.raises(openai.NotFoundError):
        store.sdk.files.delete(stored.id)
    assert stored.id not in [each.id for each in store.sdk.files.list().data]


def test_damaged_or_unknown_files_are_refused_at_upload_and_nothing_is_kept(store, media_dir):
    store.clear()
    before = store.blobs()
    cases = {"truncated.mp4": 422, "notes.txt": 415}
    for name, status in cases.items():
        response = store.upload(media_dir / name)
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    native = store.upload(media_dir / "notes.txt", "/media")
    assert (
        native.status_code == 415
        and native.json()["status"] == "failed"
        and "neither an image" in native.json()["error"]
    )
    assert store.http.post("/v1/files", data={"purpose": "vision"}).status_code in (400, 415)
    bad_purpose = store.http.post(
        "/v1/files", files={"file": ("a.jpg", (media_dir / "photo.jpg").read_bytes())}, data={"purpose": "fine-tune"}
    )
    assert bad_purpose.status_code == 400 and "purpose" in bad_purpose.text
    assert store.blobs() == before and store.incoming() == [] and store.sdk.files.list().data == []


def test_an_upload_cut_off_midway_leaves_nothing(store, media_dir):
    store.clear()
    body = (media_dir / "clip.mp4").read_bytes()
    boundary = "cutoffboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    total = len(head) + len(body) + len(f"\r\n--{boundary}--\r\n")
    host, port = store.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {total}\r\n\r\n".encode()
            + head
            + body[: len(body) // 2]
        )
        time.sleep(0.5)
    time.sleep(1)
    assert store.incoming() == [] and store.blobs() == [] and store.sdk.files.list().data == []


def test_the_byte_bound_evicts_the_least_recently_used_and_a_file_over_it_is_a_413(store, tmp_path):
    store.clear()
    pngs = [noise_png(tmp_path / f"noise-{seed}.png", seed) for seed in range(3)]
    sizes = [path.stat().st_size for path in pngs]
    assert sum(sizes[:2]) <= STORE_BYTES < sum(sizes)
    first, second = (store.upload(path).json()["id"] for path in pngs[:2])
    chat(store, {"type": "file", "file": {"file_id": first}})  # the first is now the more recent
    third = store.upload(pngs[2]).json()["id"]
    held = {each.id for each in store.sdk.files.list().data}
    assert held == {first, third}
    assert len(store.blobs()) == 2
    huge = noise_png(tmp_path / "huge.png", 9, side=720)
    assert huge.stat().st_size > STORE_BYTES
    too_large = store.upload(huge)
    assert too_large.status_code == 413 and "LLAVA_MEDIA_STORE_BYTES" in too_large.text
    assert {each.id for each in store.sdk.files.list().data} == held and store.incoming() == []
    metrics = store.http.get("/metrics").text
    assert "llava_media_store_files 2.0" in metrics
    assert f"llava_media_store_bytes {float(sizes[0] + sizes[2])}" in metrics


def test_concurrent_uploads_of_the_same_bytes_store_one_copy(store, media_dir):
    store.clear()
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(store.upload(media_dir / "clip.webm"))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [200] * 6
    assert len({answer.json()["id"] for answer in answers}) == 6
    assert len(store.blobs()) == 1 and store.incoming() == []


def test_a_job_by_file_id_gives_the_captions_of_the_uploaded_video(store, tmp_path):
    store.clear()
    video = write_minutes_video(tmp_path / "minute.mp4", 1, size=(64, 48), noise=False)
    response = store.upload(video)
    assert response.status_code == 200, response.text
    stored = response.json()["id"]
    metadata = {"segment_seconds": 30, "frames_per_segment": 2}
    by_id = store.http.post("/jobs/submit", json={"file_id": stored, "metadata": metadata})
    with video.open("rb") as file:
        uploaded = store.http.post("/jobs/submit", files={"video": file}, data={"metadata": json.dumps(metadata)})
    assert by_id.status_code == uploaded.status_code == 202, by_id.text
    results = [_job_result(store, answer.json()["task_id"]) for answer in (by_id, uploaded)]
    assert results[0]["status"] == "success", results[0]
    assert results[0]["segments"] == results[1]["segments"] and results[0]["answer"] == results[1]["answer"]
    unknown = store.http.post("/jobs/submit", json={"file_id": "file-" + "0" * 32})
    assert unknown.status_code == 404 and "file-" + "0" * 32 in unknown.json()["error"]


def _job_result(store: Store, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while store.http.get("/jobs/status", params={"task_id": task_id}).json()["ended_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return store.http.get("/jobs/get", params={"task_id": task_id}).json()


def test_a_file_expires_after_its_ttl(store, media_dir):
    with (media_dir / "photo.jpg").open("rb") as file:
        stored = store.sdk.files.create(file=file, purpose="vision")
    time.sleep(max(0.0, stored.expires_at - time.time()) + 1)
    with pytest.raises(openai.NotFoundError, match="expired"):
        chat(store, {"type": "file", "file": {"file_id": stored.id}})
    assert stored.id not in [each.id for each in store.sdk.files.list().data]
