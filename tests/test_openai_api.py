"""The OpenAI-compatible API of a real `make demo`, driven by the `openai` SDK as users drive it.

Answers are compared with the native endpoints' for the same input (greedy decoding: the same
prompt must give the same tokens), streams with the non-streamed answer, errors with the SDK's
exception classes.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.served
QUESTION = "What is happening here?"


@pytest.fixture(scope="module")
def sdk(served: str) -> openai.OpenAI:
    # No retries: a 502 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{served}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(sdk: openai.OpenAI) -> str:
    return sdk.models.list().data[0].id


def data_url(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(*parts: dict, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def native(served: str, endpoint: str, body: dict) -> dict:
    answer = httpx.post(f"{served}/{endpoint}", json=body, timeout=120).json()
    assert answer["status"] == "success", answer
    return answer


def test_models_lists_the_served_model_under_a_stable_id(sdk: openai.OpenAI) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == ["tiny"]  # the demo checkpoint's folder name
    assert models[0].object == "model"


def test_image_url_gets_the_native_endpoints_answer(sdk, model, served, file_server) -> None:
    url = f"{file_server}/photo.jpg"
    chat = sdk.chat.completions.create(model=model, messages=[user(image_part(url))], max_tokens=8)
    metadata = {"prompt": QUESTION, "max_new_tokens": 8}
    expected = native(served, "analyze_image", {"image_url": url, "metadata": metadata})
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["response"]
    assert choice.finish_reason in ("stop", "length")
    assert chat.object == "chat.completion" and chat.model == model and chat.id.startswith("chatcmpl-")
    assert chat.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert chat.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.usage.model_extra["visual_tokens"] == expected["usage"]["visual_tokens"] > 0


def test_video_data_url_with_llava_extensions(sdk, model, served, media_dir) -> None:
    clip = media_dir / "clip.webm"
    chat = sdk.chat.completions.create(
        model=model,
        messages=[user(video_part(data_url(clip, "video/webm")))],
        max_completion_tokens=10,
        extra_body={"num_frames": 3},
    )
    with clip.open("rb") as file:
        expected = httpx.post(
            f"{served}/analyze_video",
            files={"video": (clip.name, file)},
            data={"metadata": json.dumps({"prompt": QUESTION, "num_frames": 3, "max_new_tokens": 10})},
            timeout=120,
        ).json()
    assert chat.choices[0].message.content == expected["response"]
    assert chat.usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_video_url_and_image_data_url(sdk, model, served, file_server, media_dir) -> None:
    by_url = sdk.chat.completions.create(
        model=model, messages=[user(video_part(f"{file_server}/clip.mp4"))], max_tokens=6
    )
    video = native(served, "analyze_video", {"video_url": f"{file_server}/clip.mp4", "metadata": {"prompt": QUESTION}})
    assert by_url.choices[0].message.content == video["response"]
    inline = sdk.chat.completions.create(
        model=model, messages=[user(image_part(data_url(media_dir / "wide.png", "image/png")))], max_tokens=6
    )
    image = native(served, "analyze_image", {"image_url": f"{file_server}/wide.png", "metadata": {"prompt": QUESTION}})
    assert inline.choices[0].message.content == image["response"]


def test_streamed_pieces_join_to_the_answer(sdk, model, file_server) -> None:
    messages = [user(video_part(f"{file_server}/clip.mp4"))]
    whole = sdk.chat.completions.create(model=model, messages=messages, max_tokens=24, extra_body={"ignore_eos": True})
    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=24,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in with_choices[1:])
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == ["length"] == [whole.choices[0].finish_reason]
    assert len(with_choices) > 3  # token by token, not one piece
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24 == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stream_without_usage_ends_with_the_finish_reason(served, model, file_server) -> None:
    body = {"model": model, "messages": [user(image_part(f"{file_server}/photo.jpg"))], "stream": True}
    with httpx.stream("POST", f"{served}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "usage" not in last


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        ([{"role": "user", "content": ["a bare string part"]}], {}, "messages.0.content.0"),
        ([{"role": "user", "content": [{"type": "audio", "audio": {}}]}], {}, "messages.0.content.0"),
        ([{"role": "assistant", "content": "hi"}], {}, "messages"),
        ([user()], {"n": 2}, "n"),
        ([user()], {"max_tokens": 10**6}, "max_tokens"),
        ([user()], {"temperature": 3}, "temperature"),
        ([user()], {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ([user()], {"num_frames": 10**6}, "num_frames"),
    ],
)
def test_bad_requests_raise_bad_request_error(sdk, model, messages, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=model, messages=messages, extra_body=extra)
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"]


def test_several_pictures_across_turns_are_answered_as_the_engine_lays_them_out(
    sdk, model, served_folder, file_server, media_dir
) -> None:
    """Two images in the first turn, a video in the third: the served answer is the one the engine
    gives for those pictures in that order (each image a padded tile), read from the same files."""
    from llava_custom.builder import load_pretrained_model
    from llava_custom.engine import Conversation, Engine, GenerationSettings, ImageInput, Turn, VideoInput
    from media import read_image, read_video

    messages = [
        user(image_part(f"{file_server}/photo.jpg"), image_part(f"{file_server}/wide.png"), text="Compare them."),
        {"role": "assistant", "content": "Two pictures."},
        user(video_part(f"{file_server}/clip.mp4"), text="And this clip?"),
    ]
    chat = sdk.chat.completions.create(model=model, messages=messages, max_tokens=8, extra_body={"num_frames": 2})
    swapped = [user(*reversed(messages[0]["content"][:2]), text="Compare them."), *messages[1:]]
    other = sdk.chat.completions.create(model=model, messages=swapped, max_tokens=8, extra_body={"num_frames": 2})

    engine = Engine(load_pretrained_model(str(served_folder / "tiny"), load_4bit=False, device="cpu"))
    try:
        video = read_video(media_dir / "clip.mp4", 2, frame_size=engine.frame_size)
        photo, wide = (read_image(media_dir / name, max_pixels=10**8) for name in ("photo.jpg", "wide.png"))
        clip = VideoInput(video.frames, video.info.video_duration, video.info.frame_times)
        turns = (
            Turn("user", "Compare them.", 2),
            Turn("assistant", "Two pictures."),
            Turn("user", "And this clip?", 1),
        )
        settings = GenerationSettings(max_new_tokens=8)
        expected = [
            engine.submit(engine.prepare(Conversation(turns), [ImageInput(a), ImageInput(b), clip], settings)).result()
            for a, b in ((photo, wide), (wide, photo))
        ]
        padded = engine.model.image_layout.padded_tokens
        frames = engine.model.video_layout.num_video_tokens(2)
    finally:
        engine.close()
    for answer, reference in zip((chat, other), expected, strict=True):
        assert answer.choices[0].message.content == reference.text
        assert answer.usage.prompt_tokens == reference.prompt_tokens
        assert answer.usage.model_extra["visual_tokens"] == reference.visual_tokens == 2 * padded + frames


@pytest.mark.parametrize(
    ("parts", "message", "status"),
    [
        (["video"] * 3, "3 videos in one request; at most 2 (LLAVA_MAX_VIDEOS_PER_REQUEST)", 400),
        (["image"] * 9, "9 images in one request; at most 8 (LLAVA_MAX_IMAGES_PER_REQUEST)", 400),
        (["image"] * 8 + ["video"] * 2, "the prompt is too long: 8 images and 2 videos take", 413),
    ],
)
def test_too_many_pictures_are_refused_before_anything_is_fetched(sdk, model, file_server, parts, message, status):
    """The URLs name no file (fetching one would be a 502): the limits are checked first."""
    missing = f"{file_server}/missing"
    content = [image_part(f"{missing}.jpg") if kind == "image" else video_part(f"{missing}.mp4") for kind in parts]
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(
            model=model, messages=[user(*content)], max_tokens=100, extra_body={"num_frames": 64}
        )
    assert raised.value.status_code == status
    assert message in raised.value.body["message"]


def test_unknown_model_is_not_found(sdk, file_server) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=[user(image_part(f"{file_server}/photo.jpg"))])


@pytest.mark.parametrize(
    ("part", "status", "exception"),
    [
        ("notes", 415, openai.APIStatusError),  # not a video
        ("truncated", 422, openai.UnprocessableEntityError),
        ("missing", 502, openai.InternalServerError),  # the URL's server answers 404
        ("refused", 400, openai.BadRequestError),  # an address the fetcher refuses
    ],
)
def test_media_errors_keep_the_native_status(sdk, model, media_dir, file_server, part, status, exception) -> None:
    url = {
        "notes": data_url(media_dir / "notes.txt", "video/mp4"),
        "truncated": f"{file_server}/truncated.mp4",
        "missing": f"{file_server}/missing.mp4",
        "refused": "http://169.254.169.254/latest/meta-data",
    }[part]
    with pytest.raises(exception) as raised:
        sdk.chat.completions.create(model=model, messages=[user(video_part(url))])
    assert raised.value.status_code == status
    assert set(raised.value.body) == {"message", "type", "param", "code"}


def test_the_chat_route_takes_json_only(served) -> None:
    response = httpx.post(f"{served}/v1/chat/completions", files={"video": ("a.mp4", b"x")}, timeout=30)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    broken = httpx.post(
        f"{served}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"


def test_a_follow_up_turn_reuses_the_conversation_so_far(sdk, model, served_folder, media_dir) -> None:
    """Multi-turn: the answer goes back as an assistant turn, a new user turn follows; the served
    process reuses the first turn's prompt KV (serve.log) and prefills the rest."""
    messages = [
        {"role": "system", "content": "You describe videos."},
        user(video_part(data_url(media_dir / "clip.webm", "video/webm"))),
    ]
    first = sdk.chat.completions.create(model=model, messages=messages, max_tokens=6, extra_body={"num_frames": 2})
    log = served_folder / "serve.log"
    lines_before = len(log.read_text().splitlines())
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what happens next?"},
    ]
    follow_up = sdk.chat.completions.create(model=model, messages=messages, max_tokens=6, extra_body={"num_frames": 2})
    again = sdk.chat.completions.create(model=model, messages=messages, max_tokens=6, extra_body={"num_frames": 2})
    assert follow_up.choices[0].message.content == again.choices[0].message.content
    assert follow_up.usage.prompt_tokens > first.usage.prompt_tokens + 6
    assert follow_up.usage.model_extra["visual_tokens"] == first.usage.model_extra["visual_tokens"]
    reuse = [line for line in log.read_text().splitlines()[lines_before:] if "features recalled" in line]
    reused = [int(n) for n in (line.split("KV of ")[1].split(" of ")[0] for line in reuse)]
    assert reused and reused[0] >= first.usage.prompt_tokens - 1, reuse


def test_text_only_conversations_use_the_language_model_alone(sdk, model) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    chat = sdk.chat.completions.create(model=model, messages=messages, max_tokens=5)
    assert chat.usage.model_extra["visual_tokens"] == 0
    assert (
        chat.choices[0].message.content
        == sdk.chat.completions.create(model=model, messages=messages, max_tokens=5).choices[0].message.content
    )


def test_logprobs_describe_the_generated_tokens(sdk, model, file_server) -> None:
    request = {
        "model": model,
        "messages": [user(image_part(f"{file_server}/photo.jpg"))],
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 3,
        "extra_body": {"ignore_eos": True},
    }
    chat = sdk.chat.completions.create(**request)
    tokens = chat.choices[0].logprobs.content
    assert len(tokens) == chat.usage.completion_tokens == 8
    for token in tokens:
        assert len(token.top_logprobs) == 3
        assert token.logprob == token.top_logprobs[0].logprob <= 0  # greedy takes the most likely
        assert token.top_logprobs[0].token == token.token
    joined = b"".join(bytes(token.bytes) for token in tokens).decode("utf-8", "replace")
    assert joined.strip() == chat.choices[0].message.content
    streamed = [c for c in sdk.chat.completions.create(**request, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.token for c in streamed for t in c.choices[0].logprobs.content] == [t.token for t in tokens]


def test_seed_makes_a_sampled_answer_reproducible(sdk, model, file_server) -> None:
    def sample(seed: int) -> str:
        messages = [user(image_part(f"{file_server}/photo.jpg"))]
        answer = sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
        )
        return answer.choices[0].message.content

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_stop_ends_the_answer_before_the_stop_string(sdk, model, served, file_server) -> None:
    """On the chat route and the native one: cut right before the first stop string."""
    messages = [user(video_part(f"{file_server}/clip.mp4"))]
    extra = {"ignore_eos": True, "num_frames": 2}
    whole = sdk.chat.completions.create(model=model, messages=messages, max_tokens=16, extra_body=extra)
    text = whole.choices[0].message.content
    at = next(i for i in range(3, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalnum())
    stop = text[at : at + 2]
    expected = text[: text.index(stop)].strip()
    cut = sdk.chat.completions.create(model=model, messages=messages, max_tokens=16, stop=[stop], extra_body=extra)
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    metadata = {"prompt": QUESTION, "max_new_tokens": 16, "stop": [stop], **extra}
    assert (
        native(served, "analyze_video", {"video_url": f"{file_server}/clip.mp4", "metadata": metadata})["response"]
        == expected
    )


def test_closing_a_stream_stops_its_generation(sdk, model, served_folder, file_server) -> None:
    log = served_folder / "serve.log"
    before = log.read_text().count("request cancelled")
    stream = sdk.chat.completions.create(
        model=model,
        messages=[user(image_part(f"{file_server}/photo.jpg"))],
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for number, _ in enumerate(stream):
        if number == 3:
            break
    stream.close()
    deadline = time.monotonic() + 15
    while log.read_text().count("request cancelled") == before:
        assert time.monotonic() < deadline, "the service went on generating for a client that left"
        time.sleep(0.2)


def test_video_sampling_extensions_match_the_native_metadata(sdk, model, served, file_server) -> None:
    sampling = {"num_frames": 3, "fps": 1.5, "start_time": 0.5, "end_time": 2.5}
    url = f"{file_server}/clip.mp4"
    chat = sdk.chat.completions.create(model=model, messages=[user(video_part(url))], max_tokens=6, extra_body=sampling)
    expected = native(served, "analyze_video", {"video_url": url, "metadata": {"prompt": QUESTION, **sampling}})
    assert chat.choices[0].message.content == expected["response"]
    assert chat.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert expected["video_info"]["frame_count"] == 3
    with pytest.raises(openai.BadRequestError, match="end_time must be after start_time"):
        sdk.chat.completions.create(
            model=model, messages=[user(video_part(url))], extra_body={"start_time": 2, "end_time": 1}
        )
