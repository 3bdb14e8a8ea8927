"""The web page at /ui in a real browser (Debian's chromium driven by Playwright), and the API's
``metadata.return_frames`` it relies on, against a served demo with an API key (conftest's
``keyed``): the page must load without the key and work once it is given.

The model has random weights, so answers are gibberish: the tests check structure, never text.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from conftest import TEST_API_KEY
from PIL import Image

from testing.mediafiles import frame_index_from_pixels

pytestmark = pytest.mark.served
CHROMIUM = "/usr/bin/chromium"
# Root in a container needs --no-sandbox; the rest keeps chromium from reaching out or updating.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
FRAME_SIZE = (384, 384)  # the tiny checkpoint's vision tower takes 384 x 384, as the real one
CLIP_FPS = 10  # conftest's clip.mp4: 30 frames at 10 fps
ANSWER_TIMEOUT_MS = 60_000


def post(base: str, endpoint: str, path: Path, field: str, metadata: dict) -> httpx.Response:
    files = {field: (path.name, path.read_bytes()), "metadata": (None, json.dumps(metadata), "application/json")}
    return httpx.post(f"{base}{endpoint}", files=files, headers=AUTH, timeout=120)


def jpeg(data_url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert data_url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))
    assert image.format == "JPEG"
    return image.convert("RGB")


def events(text: str) -> list[tuple[str, dict]]:
    """The server-sent events of a streamed answer, in order."""
    parsed = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        parsed.append((lines["event"], json.loads(lines["data"])))
    return parsed


# --- the API: metadata.return_frames ---


def test_return_frames_are_the_frames_the_model_saw_also_when_recalled(keyed, media_dir) -> None:
    metadata = {"num_frames": 5, "return_frames": True}
    first = post(keyed, "/analyze_video", media_dir / "clip.mp4", "video", metadata)
    assert first.status_code == 200, first.text
    body = first.json()
    frames = body["frames"]
    assert len(frames) == 5 == body["video_info"]["frame_count"]
    times = [frame["time"] for frame in frames]
    assert times == body["video_info"]["frame_times"] and times == sorted(set(times))
    for frame, seconds in zip(frames, times, strict=True):
        image = jpeg(frame["image"])
        assert image.size == FRAME_SIZE
        assert frame_index_from_pixels(np.asarray(image)) == round(seconds * CLIP_FPS)  # the right source frame
    # The same video again: its features are recalled from the cache, the frames still come.
    again = post(keyed, "/analyze_video", media_dir / "clip.mp4", "video", metadata).json()
    assert [frame["time"] for frame in again["frames"]] == times
    assert "frames" not in post(keyed, "/analyze_video", media_dir / "clip.mp4", "video", {"num_frames": 5}).json()


def test_return_frames_of_an_image_and_streamed(keyed, media_dir) -> None:
    image = post(keyed, "/analyze_image", media_dir / "wide.png", "image", {"return_frames": True}).json()
    [frame] = image["frames"]
    assert frame["time"] is None and jpeg(frame["image"]).size == (300, 100)  # upright, not enlarged
    metadata = {"num_frames": 3, "return_frames": True, "stream": True}
    streamed = post(keyed, "/analyze_video", media_dir / "clip.mp4", "video", metadata)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in events(streamed.text)]
    assert names[0] == "frames" and names[-1] == "answer" and set(names[1:-1]) <= {"delta"}
    first, last = events(streamed.text)[0][1], events(streamed.text)[-1][1]
    assert [frame["time"] for frame in first["frames"]] == last["video_info"]["frame_times"]
    assert "frames" not in last  # sent once, in the frames event


def test_the_page_needs_no_key_and_the_api_docs_moved(keyed) -> None:
    root = httpx.get(f"{keyed}/", timeout=30)
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    page = httpx.get(f"{keyed}/ui/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for name in ("app.js", "api.js", "jobs.js", "style.css"):
        assert httpx.get(f"{keyed}/ui/{name}", timeout=30).status_code == 200, name
    docs = httpx.get(f"{keyed}/docs", timeout=30)  # open: a browser following the page's link has no key
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    schema = httpx.get(f"{keyed}/docs.json", timeout=30).json()["components"]["schemas"]
    assert "return_frames" in schema["Metadata"]["properties"] and "frames" in schema["VideoAnswer"]["properties"]


# --- the page in a browser ---


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, base: str, key: str | None = TEST_API_KEY, width: int = 1280):
    """The page opened at / (which leads to /ui/), with the API key entered when given."""
    page = browser.new_context(viewport={"width": width, "height": 900}).new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    response = page.goto(f"{base}/")
    assert response is not None and response.ok and page.url == f"{base}/ui/"
    if key:
        page.get_by_text("API key", exact=True).click()
        page.get_by_label("Key").fill(key)
    return page


def ask_and_wait(page) -> None:
    page.get_by_role("button", name="Ask", exact=True).click()
    page.wait_for_function(
        "['Done.', 'Failed.'].includes(document.getElementById('status').textContent)", timeout=ANSWER_TIMEOUT_MS
    )


def frame_times(page) -> list[float]:
    return [float(t) for t in page.locator("#frames figcaption").evaluate_all("els => els.map(e => e.dataset.time)")]


def requests_made(page) -> list:
    """The requests the page makes from now on, in order (Playwright's Request objects)."""
    made: list = []
    page.on("request", lambda request: made.append(request))
    return made


def posts(made: list, path: str) -> list:
    return [request for request in made if request.method == "POST" and urlparse(request.url).path == path]


def is_json(request) -> bool:
    return request.headers.get("content-type", "").startswith("application/json")


def record_statuses(page) -> None:
    """Every text the status line shows from now on, into window.statuses (a status may last only
    until the next request answers)."""
    page.evaluate(
        """() => {
            window.statuses = [];
            new MutationObserver((changes) => {
                for (const change of changes) for (const node of change.addedNodes) statuses.push(node.textContent);
            }).observe(document.getElementById("status"), { childList: true });
        }"""
    )


def statuses(page) -> list[str]:
    return page.evaluate("window.statuses")


def fact(page, name: str) -> str:
    """The answer's fact ``name`` (the <dd> after its <dt>)."""
    return page.locator("#facts dt", has_text=name).locator("xpath=following-sibling::dd[1]").text_content()


def stored(base: str, media_id: str) -> httpx.Response:
    return httpx.get(f"{base}/media/{media_id}", headers=AUTH, timeout=30)


def assert_answered(page) -> None:
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    assert page.locator("#status").text_content() == "Done."
    assert page.locator("#answer").text_content().strip()
    assert page.locator("#facts").is_visible()


@pytest.mark.browser
def test_a_dropped_video_is_answered_with_its_frames(browser, keyed, media_dir) -> None:
    page = open_page(browser, keyed)
    clip = media_dir / "clip.mp4"
    # A real drop event carrying the file, as a browser makes it when a file is dragged in.
    transfer = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "video/mp4" }));
            return transfer;
        }""",
        [clip.name, base64.b64encode(clip.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert "clip.mp4" in page.locator("#file-name").text_content()
    # The name shows once: the browser's own file control (which would repeat it) is hidden.
    assert page.locator("#file").bounding_box()["width"] <= 1
    page.get_by_label("Question", exact=True).fill("What happens?")
    page.get_by_label("Frames", exact=True).fill("6")
    ask_and_wait(page)
    assert_answered(page)
    times = frame_times(page)
    assert len(times) == 6 and times == sorted(set(times))
    facts = page.locator("#facts").inner_text()
    assert "Video duration" in facts and "3.00 s" in facts and "Answer tokens" in facts
    assert "Speed" not in facts  # a few tokens (at most 6 here) make no rate worth showing
    for image in page.locator("#frames img").all():
        assert image.evaluate("img => img.complete && img.naturalWidth") == FRAME_SIZE[0]


@pytest.mark.browser
def test_a_pasted_url_and_an_image(browser, keyed, file_server, media_dir) -> None:
    page = open_page(browser, keyed, width=390)  # a phone's width
    page.get_by_label("or paste a URL").fill(f"{file_server}/clip.webm")
    page.get_by_label("Frames", exact=True).fill("3")
    ask_and_wait(page)
    assert_answered(page)
    assert len(frame_times(page)) == 3
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    page.locator("#file").set_input_files(media_dir / "photo.jpg")
    assert page.get_by_label("or paste a URL").input_value() == ""  # a file replaces the URL
    ask_and_wait(page)
    assert_answered(page)
    assert page.locator("#frames figcaption").all_text_contents() == ["the image"]
    assert "Video duration" not in page.locator("#facts").inner_text()


@pytest.mark.browser
def test_several_chosen_images_are_compared_and_a_video_takes_them_beside_it(browser, keyed, media_dir) -> None:
    """Two images chosen at once go to /analyze_image as two 'image' parts, in order: the page's
    answer is the API's for the same parts; with a video among them, the video endpoint."""
    names = ["photo.jpg", "wide.png"]
    metadata = {"prompt": "Compare them.", "max_new_tokens": 6}
    files = [("image", (name, (media_dir / name).read_bytes())) for name in names]
    expected = httpx.post(
        f"{keyed}/analyze_image",
        files=[*files, ("metadata", (None, json.dumps(metadata), "application/json"))],
        headers=AUTH,
        timeout=120,
    ).json()
    assert expected["status"] == "success", expected
    page = open_page(browser, keyed)
    page.locator("#file").set_input_files([media_dir / name for name in names])
    assert page.locator("#file-name").text_content().count("(") == 2  # both names, with their sizes
    page.get_by_label("Question", exact=True).fill("Compare them.")
    page.get_by_label("Max tokens", exact=True).first.fill("6")
    ask_and_wait(page)
    assert_answered(page)
    assert page.locator("#answer").text_content() == expected["response"]
    assert page.locator("#frames figcaption").all_text_contents() == ["image 1", "image 2"]
    page.locator("#file").set_input_files([media_dir / "clip.mp4", media_dir / "photo.jpg"])
    page.get_by_label("Frames", exact=True).fill("2")
    ask_and_wait(page)
    assert_answered(page)
    assert page.locator("#frames figcaption").all_text_contents()[-1] == "the image"
    assert "Video duration" in page.locator("#facts").inner_text()


@pytest.mark.browser
def test_the_services_error_is_shown(browser, keyed, media_dir) -> None:
    # The page uploads the file to the media store first: the store's refusal is the one shown.
    expected = httpx.post(
        f"{keyed}/media", files={"file": ("notes.txt", (media_dir / "notes.txt").read_bytes())}, headers=AUTH
    )
    assert expected.status_code == 415
    page = open_page(browser, keyed)
    page.locator("#file").set_input_files(media_dir / "notes.txt")
    ask_and_wait(page)
    assert page.locator("#error").text_content() == f"notes.txt: {expected.json()['error']}"
    assert page.locator("#frames-box").is_hidden() and page.locator("#answer").text_content() == ""


QUESTION = "What happens?"


@pytest.mark.browser
def test_a_chosen_video_is_uploaded_once_and_follow_ups_send_its_id(browser, keyed, media_dir) -> None:
    """Two questions about the same chosen video: one POST /media, then both questions by id as
    JSON, with the API's answer for the file sent inline; other files are uploaded afresh."""
    clip = media_dir / "clip.mp4"
    metadata = {"prompt": QUESTION, "num_frames": 4, "max_new_tokens": 6}
    expected = post(keyed, "/analyze_video", clip, "video", metadata).json()
    assert expected["status"] == "success", expected
    page = open_page(browser, keyed)
    made = requests_made(page)
    record_statuses(page)
    page.locator("#file").set_input_files(clip)
    page.get_by_label("Question", exact=True).fill(QUESTION)
    page.get_by_label("Frames", exact=True).fill("4")
    page.get_by_label("Max tokens", exact=True).first.fill("6")
    with page.expect_response(lambda response: response.url == f"{keyed}/media") as uploaded:
        ask_and_wait(page)
    assert_answered(page)
    media_id = uploaded.value.json()["id"]
    assert page.locator("#answer").text_content() == expected["response"]
    assert fact(page, "Upload") == f"uploaded as {media_id}"
    assert "Uploading clip.mp4…" in statuses(page)
    record = stored(keyed, media_id).json()
    assert record["kind"] == "video" and record["filename"] == "clip.mp4" and record["bytes"] == clip.stat().st_size

    ask_and_wait(page)  # the same question again: by id, nothing uploaded
    assert_answered(page)
    assert page.locator("#answer").text_content() == expected["response"]
    assert fact(page, "Upload") == f"reusing the upload ({media_id})"
    assert f"Asking about the video, reusing the upload ({media_id})…" in statuses(page)
    assert len(posts(made, "/media")) == 1
    questions = posts(made, "/analyze_video")
    assert len(questions) == 2 and all(is_json(request) for request in questions)  # no multipart upload
    for request in questions:
        assert request.post_data_json["media_id"] == [media_id] and request.post_data_json["metadata"]["stream"]

    page.locator("#file").set_input_files(media_dir / "photo.jpg")  # another file: its own upload
    ask_and_wait(page)
    assert_answered(page)
    assert len(posts(made, "/media")) == 2
    [image_question] = posts(made, "/analyze_image")
    image_id = image_question.post_data_json["media_id"][0]
    assert image_id != media_id and fact(page, "Upload") == f"uploaded as {image_id}"


@pytest.mark.browser
def test_a_job_submits_the_uploaded_video_by_file_id(browser, keyed, media_dir) -> None:
    page = open_page(browser, keyed)
    made = requests_made(page)
    record_statuses(page)
    page.get_by_label("Long video (job)").check()
    page.locator("#file").set_input_files(media_dir / "clip.mp4")
    page.get_by_label("Segment (s)").fill("1")
    page.get_by_label("Frames per segment").fill("2")
    for _ in range(2):  # the second job reuses the upload
        with page.expect_response("**/jobs/submit") as submitted:
            page.get_by_role("button", name="Start job").click()
        task_id = submitted.value.json()["task_id"]
        page.wait_for_function(
            "['Done.', 'Failed.'].includes(document.getElementById('status').textContent)", timeout=ANSWER_TIMEOUT_MS
        )
        assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
        result = httpx.get(f"{keyed}/jobs/get", params={"task_id": task_id}, headers=AUTH, timeout=30).json()
        assert len(result["segments"]) == 3 and page.locator("#segments li").count() == 3
        assert page.locator("#segments span").all_text_contents() == [s["caption"] for s in result["segments"]]
    [upload] = posts(made, "/media")
    media_id = upload.response().json()["id"]
    submits = posts(made, "/jobs/submit")
    assert len(submits) == 2 and all(is_json(request) for request in submits)
    assert [request.post_data_json["file_id"] for request in submits] == [media_id, media_id]
    assert submits[0].post_data_json["metadata"]["segment_seconds"] == 1
    assert f"Submitting the job, reusing the upload ({media_id})…" in statuses(page)
    # The same video in answer mode: still the one upload.
    page.get_by_role("radio", name="Video or image").check()
    page.locator("#submit").click()  # (the finished job's follow-up box has an Ask button too)
    page.wait_for_function("['Done.', 'Failed.'].includes(document.getElementById('status').textContent)")
    assert_answered(page)
    assert len(posts(made, "/media")) == 1 and fact(page, "Upload") == f"reusing the upload ({media_id})"


@pytest.mark.browser
def test_a_file_the_store_no_longer_holds_is_uploaded_again(browser, keyed, media_dir) -> None:
    clip = media_dir / "clip.mp4"
    expected = post(keyed, "/analyze_video", clip, "video", {"prompt": QUESTION, "num_frames": 3}).json()
    page = open_page(browser, keyed)
    made = requests_made(page)
    record_statuses(page)
    page.locator("#file").set_input_files(clip)
    page.get_by_label("Question", exact=True).fill(QUESTION)
    page.get_by_label("Frames", exact=True).fill("3")
    ask_and_wait(page)
    assert_answered(page)
    first = posts(made, "/media")[0].response().json()["id"]
    # The store drops it (as when it expires or is evicted) between two questions.
    assert httpx.delete(f"{keyed}/media/{first}", headers=AUTH, timeout=30).status_code == 200
    ask_and_wait(page)
    assert_answered(page)
    assert page.locator("#answer").text_content() == expected["response"]
    uploads = posts(made, "/media")
    assert len(uploads) == 2
    again = uploads[1].response().json()["id"]
    assert again != first and fact(page, "Upload") == f"uploaded as {again}"
    questions = posts(made, "/analyze_video")
    assert [request.post_data_json["media_id"] for request in questions] == [[first], [first], [again]]
    assert [request.response().status for request in questions] == [200, 404, 200]  # retried once
    assert "The service no longer holds the upload: uploading again…" in statuses(page)
    assert stored(keyed, first).status_code == 404 and stored(keyed, again).status_code == 200


@pytest.mark.browser
def test_a_refused_file_is_named_and_no_question_is_sent(browser, keyed, media_dir, tmp_path) -> None:
    """A text file renamed .mp4 chosen after a photo: the store refuses it (the photo was stored),
    the error names that file alone, and the question is not asked."""
    fake = tmp_path / "holiday.mp4"
    fake.write_text("this is not a video\n" * 20)
    expected = httpx.post(f"{keyed}/media", files={"file": (fake.name, fake.read_bytes())}, headers=AUTH)
    assert expected.status_code == 415
    page = open_page(browser, keyed)
    made = requests_made(page)
    page.locator("#file").set_input_files([media_dir / "photo.jpg", fake])
    ask_and_wait(page)
    assert page.locator("#error").text_content() == f"holiday.mp4: {expected.json()['error']}"
    assert page.locator("#frames-box").is_hidden() and page.locator("#answer").text_content() == ""
    uploads = posts(made, "/media")
    assert [request.response().status for request in uploads] == [200, 415]  # in the order chosen
    assert not posts(made, "/analyze_video") and not posts(made, "/analyze_image")


@pytest.mark.browser
def test_the_page_asks_for_the_api_key_and_works_once_given(browser, keyed, media_dir) -> None:
    page = open_page(browser, keyed, key=None)
    page.locator("#file").set_input_files(media_dir / "photo.jpg")
    ask_and_wait(page)
    # The page's own sentence, not the API's header instructions run into it.
    assert page.locator("#error").text_content() == "This service needs an API key: enter it below and ask again."
    key = page.get_by_label("Key")
    assert key.is_visible() and key.evaluate("el => el === document.activeElement")
    key.fill(TEST_API_KEY)
    assert page.evaluate("sessionStorage.getItem('llava-api-key')") == TEST_API_KEY
    ask_and_wait(page)
    assert_answered(page)
    page.reload()  # kept for the tab's session
    assert page.get_by_label("Key").input_value() == TEST_API_KEY


@pytest.mark.browser
def test_a_long_video_as_a_job_shows_progress_captions_on_a_timeline_and_takes_questions(
    browser, keyed, tmp_path
) -> None:
    from testing.mediafiles import write_minutes_video

    video = write_minutes_video(tmp_path / "two-minutes.mp4", 2, size=(64, 48))
    page = open_page(browser, keyed)
    page.get_by_label("Long video (job)").check()
    page.locator("#file").set_input_files(video)
    page.get_by_label("Segment (s)").fill("30")
    page.get_by_label("Frames per segment").fill("2")
    with page.expect_response("**/jobs/submit") as submitted:
        page.get_by_role("button", name="Start job").click()
    task_id = submitted.value.json()["task_id"]
    page.wait_for_function(
        "['Done.', 'Failed.'].includes(document.getElementById('status').textContent)", timeout=ANSWER_TIMEOUT_MS
    )
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    assert page.locator("#job-progress").evaluate("bar => [bar.value, bar.max]") == [4, 4]
    assert page.locator("label[for=job-progress]").inner_text() == "Progress 4 of 4 segments captioned"
    spans = page.locator("#segments time").all_text_contents()
    assert spans == ["00:00–00:30", "00:30–01:00", "01:00–01:30", "01:30–02:00"]
    captions = page.locator("#segments span").all_text_contents()
    result = httpx.get(f"{keyed}/jobs/get", params={"task_id": task_id}, headers=AUTH, timeout=30).json()
    assert captions == [segment["caption"] for segment in result["segments"]]
    assert page.locator("#answer").text_content() == result["answer"]
    page.get_by_label("Ask another question about this video").fill("What changes at one minute?")
    page.locator("#followup").get_by_role("button", name="Ask").click()
    page.wait_for_function(
        "[...document.querySelectorAll('#followup-answers p')].some(p => !p.textContent.endsWith('…'))"
    )
    answered = page.locator("#followup-answers p").first.text_content()
    assert answered.startswith("What changes at one minute? — ") and "failed" not in answered
    # Another job starts from an empty bar and timeline, not the finished job's.
    with page.expect_request("**/jobs/submit"):
        page.get_by_role("button", name="Start job").click()
    assert page.locator("#job-progress").evaluate("bar => bar.value") == 0
    assert page.locator("#segments li").count() == 0
    page.wait_for_function(
        "['Done.', 'Failed.'].includes(document.getElementById('status').textContent)", timeout=ANSWER_TIMEOUT_MS
    )
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


@pytest.mark.browser
def test_stop_cancels_a_running_job(browser, keyed, tmp_path) -> None:
    from testing.mediafiles import write_minutes_video

    video = write_minutes_video(tmp_path / "ten-minutes.mp4", 10, size=(64, 48))
    page = open_page(browser, keyed)
    page.get_by_label("Long video (job)").check()
    page.locator("#file").set_input_files(video)
    page.get_by_label("Segment (s)").fill("10")
    with page.expect_response("**/jobs/submit") as submitted:
        page.get_by_role("button", name="Start job").click()
    task_id = submitted.value.json()["task_id"]
    page.wait_for_function("document.getElementById('job-progress').value >= 1")
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Stopped')")
    progress = page.locator("#job-progress-text").text_content()
    assert progress.endswith("segments captioned, then stopped") and "left" not in progress, progress

    def status() -> dict:
        return httpx.get(f"{keyed}/jobs/status", params={"task_id": task_id}, headers=AUTH, timeout=30).json()

    deadline = time.monotonic() + 30
    while status()["ended_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ended = status()
    assert ended["status"] == "canceled" and ended["progress"]["segments_captioned"] < 60


@pytest.mark.browser
def test_long_unbroken_captions_wrap_on_a_phone(browser, keyed) -> None:
    """The job timeline as jobs.js builds it, with a caption of no spaces: the page stays 390 px."""
    page = open_page(browser, keyed, width=390)
    page.evaluate(
        """() => {
            document.getElementById("job").hidden = false;
            const item = document.createElement("li");
            const when = document.createElement("time");
            when.textContent = "00:00–00:30";
            const text = document.createElement("span");
            text.textContent = "x".repeat(400);
            item.append(when, text);
            document.getElementById("segments").replaceChildren(item);
            const answer = document.createElement("p");
            answer.textContent = "Why? — " + "y".repeat(400);
            document.getElementById("followup").hidden = false;
            document.getElementById("followup-answers").replaceChildren(answer);
        }"""
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
