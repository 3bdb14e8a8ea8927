"""Fidelity against the original LLaVA-NeXT code: our pipeline reproduces its golden answers.

tests/data/golden/golden.json was written by tools/golden_reference.py, which runs LLaVA-NeXT's
own inference recipe (decord frames, SigLIP preprocessing, time instruction, qwen_1_5 template,
greedy generate from inputs_embeds) on tiny original-layout checkpoints and the committed media
next to it. Here the same checkpoints are rewritten (their fingerprint must match the recorded
one) and run through media.read_video / read_image and Engine, in float32 on CPU: prompt text,
token counts, first-step logits (1e-4) and greedy ids (up to the first step whose reference
top-1/top-2 gap is below 1e-3, where rounding may legitimately pick the other token) must agree.
They must also agree when every case of a checkpoint is in flight at once, twice, sharing the
engine's batch, and when a case is a follow-up that reuses the features and prompt KV cache of an
earlier question about the same media (or its features alone).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from conftest import running_service, service_env

from llava_custom.builder import load_pretrained_model
from llava_custom.checkpoint import read_checkpoint
from llava_custom.engine import (
    Answer,
    Conversation,
    Engine,
    EngineLimits,
    GenerationSettings,
    ImageInput,
    MediaRef,
    PreparedRequest,
    ReuseCache,
    Turn,
    VideoInput,
)
from llava_custom.modeling import ImageLayout
from llava_custom.prompting import (
    IMAGE_OPENING,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    image_prompt,
    pictures_prompt,
    video_opening,
    video_prompt,
)
from llava_custom.reuse import image_key, video_key
from media import read_image, read_video
from testing.served import free_port
from tools.golden_cases import CASES, GOLDEN_DIR, GOLDEN_FILE, REGENERATE, VARIANTS, checkpoint_fingerprint

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads(GOLDEN_FILE.read_text())
GOLDEN_CASES = {case["name"]: case for case in GOLDEN["cases"]}
LOGIT_TOLERANCE = 1e-4
# Below this top-1/top-2 gap the reference's choice is within float rounding of the runner-up.
DECISIVE_GAP = 1e-3
SERVED_CASE = "video-16"
# Asked first about a case's media, so that the case itself is a follow-up.
WARM_UP_QUESTION = "Is anything moving?"
COMPARE_TWO = "What is different between these two images?"


@dataclass
class OurRun:
    prompt: str
    answer: Answer
    first_logits: torch.Tensor


def trusted_ids(case: dict) -> list[int]:
    """The reference's greedy ids up to (and including) the first step whose choice was not decisive."""
    ids = case["greedy_ids"]
    for step, gap in enumerate(case["greedy_gaps"]):
        if gap < DECISIVE_GAP:
            return ids[: step + 1]
    return ids


@pytest.fixture(scope="module")
def golden_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant's checkpoint, rewritten as tools.golden_cases writes it, checked against its fingerprint."""
    from tools.golden_cases import write_checkpoint

    folder = tmp_path_factory.mktemp("golden")
    checkpoints = {}
    for name, recorded in GOLDEN["variants"].items():
        if recorded["mm_keys"] != VARIANTS[name]:
            pytest.fail(f"variant {name} changed: regenerate golden data with {REGENERATE}")
        checkpoint = write_checkpoint(folder / name, name)
        if checkpoint_fingerprint(checkpoint) != recorded["fingerprint"]:
            pytest.fail(f"tiny checkpoint {name} changed: regenerate golden data with {REGENERATE}")
        checkpoints[name] = checkpoint
    return checkpoints


@pytest.fixture(scope="module")
def our_runs(golden_checkpoints: dict[str, Path]) -> dict[str, OurRun]:
    """Every golden case through our pipeline, one model load per variant."""
    runs = {}
    for variant, checkpoint in golden_checkpoints.items():
        engine = Engine(load_pretrained_model(str(checkpoint), load_4bit=False, device="cpu"))
        assert engine.loaded.dtype == torch.float32
        try:
            for case in GOLDEN["cases"]:
                if case["variant"] == variant:
                    runs[case["name"]] = run_case(engine, case)
        finally:
            engine.close()
    return runs


@contextlib.contextmanager
def prefill_logits(engine: Engine) -> Iterator[list[torch.Tensor]]:
    """The first-step logits of every prefill, in the order the engine runs them.

    The engine's runner calls the language model with ``inputs_embeds`` for prompt chunks and with
    ``input_ids`` for decode steps, and the model's head only after a prompt's last chunk and after
    each decode step, so the hooks can tell a prefill's logits from a step's.
    """
    logits: list[torch.Tensor] = []
    prefilling = [False]

    def note_pass(_module, _args, kwargs):
        prefilling[0] = kwargs.get("inputs_embeds") is not None

    def capture(_module, _args, output):
        if prefilling[0]:
            logits.append(output.reshape(-1, output.shape[-1])[-1].detach().clone())

    handles = [
        engine.model.model.language_model.register_forward_pre_hook(note_pass, with_kwargs=True),
        engine.model.lm_head.register_forward_hook(capture),
    ]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def prepare_case(
    engine: Engine,
    case: dict,
    question: str | None = None,
    reuse: bool = False,
    settings: GenerationSettings | None = None,
) -> tuple[str, PreparedRequest]:
    """The prompt our pipeline builds for ``case`` and the model inputs ready to submit.

    With ``reuse``, as the service does: media already seen is recalled instead of read again."""
    settings = settings or GenerationSettings(max_new_tokens=GOLDEN["max_new_tokens"])
    if case["modality"] == "multi":
        return prepare_pictures(engine, case, settings, question, reuse)
    question = question or case["question"]
    path = GOLDEN_DIR / case["media"]
    if case["modality"] == "video":
        key = video_key(case["media"], case["num_frames"])
        media = engine.recall(key) if reuse else None
        if media is None:
            video = read_video(path, case["num_frames"], frame_size=engine.frame_size)
            timing = (video.info.video_duration, video.info.frame_times)
            frames, media = video.frames, MediaRef(key, timing) if reuse else None
        else:
            frames, timing = None, media.info
        prompt = video_prompt(question, *timing)
        return prompt, engine.prepare_video(frames, *timing, question, settings, media)
    key = image_key(case["media"])
    media = engine.recall(key) if reuse else None
    image = None if media is not None else read_image(path, max_pixels=10**8)
    if reuse and media is None:
        media = MediaRef(key)
    return image_prompt(question), engine.prepare_image(image, question, settings, media)


def prepare_pictures(
    engine: Engine, case: dict, settings: GenerationSettings, question: str | None, reuse: bool
) -> tuple[str, PreparedRequest]:
    """A case of several pictures: each read (or recalled) on its own, images as padded tiles;
    ``question`` replaces the last turn's text."""
    pictures, openings = [], []
    for modality, name, num_frames in case["pictures"]:
        key = video_key(name, num_frames) if modality == "video" else image_key(name, padded=True)
        media = engine.recall(key) if reuse else None
        if modality == "video":
            if media is None:
                video = read_video(GOLDEN_DIR / name, num_frames, frame_size=engine.frame_size)
                timing = (video.info.video_duration, video.info.frame_times)
                frames, media = video.frames, MediaRef(key, timing) if reuse else None
            else:
                frames, timing = None, media.info
            pictures.append(VideoInput(frames, *timing, media))
            openings.append(video_opening(*timing))
        else:
            image = None if media is not None else read_image(GOLDEN_DIR / name, max_pixels=10**8)
            pictures.append(ImageInput(image, media if media is not None else MediaRef(key) if reuse else None))
            openings.append(IMAGE_OPENING)
    turns = [Turn(role, text, count) for role, text, count in case["turns"]]
    if question is not None:
        turns[-1] = Turn(turns[-1].role, question, turns[-1].pictures)
    conversation = Conversation(tuple(turns))
    return pictures_prompt(conversation, openings), engine.prepare(conversation, pictures, settings)


def run_case(engine: Engine, case: dict) -> OurRun:
    prompt, prepared = prepare_case(engine, case)
    with prefill_logits(engine) as logits:
        answer = engine.submit(prepared).result()
    return OurRun(prompt, answer, logits[0])


@pytest.fixture(scope="module")
def reused_runs(golden_checkpoints: dict[str, Path]) -> dict[str, list[OurRun]]:
    """Every case as a follow-up to another question about its media: once reusing features and
    the prompt's KV cache, once (prefix cache off) reusing the features alone."""
    runs: dict[str, list[OurRun]] = {}
    for variant, checkpoint in golden_checkpoints.items():
        loaded = load_pretrained_model(str(checkpoint), load_4bit=False, device="cpu")
        for caches in (ReuseCache(2**30, 2**30), ReuseCache(2**30, 0)):
            engine = Engine(loaded, reuse=caches)
            try:
                for case in GOLDEN["cases"]:
                    if case["variant"] != variant:
                        continue
                    engine.submit(prepare_case(engine, case, WARM_UP_QUESTION, reuse=True)[1]).result()
                    prompt, prepared = prepare_case(engine, case, reuse=True)
                    assert prepared.items and all(item.media.features is not None for item in prepared.items)
                    tokens = engine.scheduler.stats.prefill_tokens
                    with prefill_logits(engine) as logits:
                        answer = engine.submit(prepared).result()
                    prefilled = engine.scheduler.stats.prefill_tokens - tokens
                    # With the prefix cache, only what follows the common prefix is prefilled.
                    assert (prefilled < answer.prompt_tokens - answer.visual_tokens) == caches.prefixes.enabled
                    runs.setdefault(case["name"], []).append(OurRun(prompt, answer, logits[0]))
            finally:
                engine.close()
    return runs


@pytest.fixture(scope="module")
def batched_runs(golden_checkpoints: dict[str, Path]) -> dict[str, list[OurRun]]:
    """Every case of each checkpoint submitted twice at once, all sharing one engine's batch.

    Prompts are prefilled whole here (the runs alone prefill in the default chunks), and every
    request goes on past the golden length (its first tokens are compared), so that every request
    has joined the batch before the first one finishes: a prefill takes one decode step per
    picture and one for its prompt.
    """
    runs: dict[str, list[OurRun]] = {}
    for variant, checkpoint in golden_checkpoints.items():
        cases = [case for case in GOLDEN["cases"] if case["variant"] == variant] * 2
        loaded = load_pretrained_model(str(checkpoint), load_4bit=False, device="cpu")
        limits = EngineLimits(max_batch_size=len(cases), kv_cache_tokens=131072, prefill_chunk_tokens=8192)
        engine = Engine(loaded, limits)
        longer = GenerationSettings(max_new_tokens=GOLDEN["max_new_tokens"] + 4 * len(cases), ignore_eos=True)
        try:
            prepared = [prepare_case(engine, case, settings=longer) for case in cases]
            with prefill_logits(engine) as logits:
                streams = [engine.submit(inputs) for _, inputs in prepared]
                answers = [stream.result() for stream in streams]
            # Prefills run one at a time in submission order, and all were decoded together.
            assert engine.scheduler.stats.largest_batch == len(cases)
        finally:
            engine.close()
        for case, (prompt, _), answer, first in zip(cases, prepared, answers, logits, strict=True):
            runs.setdefault(case["name"], []).append(OurRun(prompt, answer, first))
    return runs


def test_golden_data_covers_the_required_cases():
    """Videos of 16 and 8 frames, every newline position and pool mode, two anyres image branches."""
    assert [case.name for case in CASES] == list(GOLDEN_CASES), f"cases changed: regenerate with {REGENERATE}"
    videos = [case for case in GOLDEN["cases"] if case["modality"] == "video"]
    assert {case["num_frames"] for case in videos} == {8, 16}
    keys = [GOLDEN["variants"][case["variant"]]["mm_keys"] for case in videos]
    assert {k["mm_newline_position"] for k in keys} == {"grid", "frame", "one_token", "no_token"}
    assert {k["mm_spatial_pool_mode"] for k in keys} == {"bilinear", "average", "max"}
    assert all(len(case["greedy_ids"]) == GOLDEN["max_new_tokens"] for case in GOLDEN["cases"])
    assert all(len(trusted_ids(case)) >= 8 for case in GOLDEN["cases"]), "too few decisive steps to compare"


def test_the_two_images_take_different_anyres_branches(golden_checkpoints):
    """Different tile grids; the wide one unpads rows, the tall one columns and is scaled down to ~9 tiles."""
    layout = ImageLayout.from_config(read_checkpoint(str(golden_checkpoints["grid-bilinear"])).config)
    branches = {}
    for name in ("image-wide", "image-tall"):
        width, height = GOLDEN_CASES[name]["image_size"]
        tiles = layout.tile_grid(height, width)
        (rows, cols), final = layout.feature_grid(height, width)
        kept = (rows[1] - rows[0], cols[1] - cols[0])
        padded = tuple(kept[i] < tiles[i] * layout.patches_per_side for i in range(2))
        branches[name] = (tiles, padded, final != kept)
    assert branches["image-wide"][0] != branches["image-tall"][0]
    assert branches["image-wide"][1:] == ((True, False), False)
    assert branches["image-tall"][1:] == ((False, True), True)


def runs_of(request: pytest.FixtureRequest, mode: str, name: str) -> list[OurRun]:
    if mode == "alone":
        return [request.getfixturevalue("our_runs")[name]]
    return request.getfixturevalue(f"{mode}_runs")[name]


MODES = pytest.mark.parametrize("mode", ["alone", "batched", "reused"])


@MODES
@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_prompt_and_token_counts(request, mode, name):
    for ours in runs_of(request, mode, name):
        check_prompt_and_counts(GOLDEN_CASES[name], ours)


def check_prompt_and_counts(case: dict, ours: OurRun) -> None:
    expected_prompt = case["prompt"]
    if case["modality"] == "video":  # the original marks a video with <image> too
        expected_prompt = expected_prompt.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    elif case["modality"] == "multi":  # a video's placeholder is the one its time instruction follows
        expected_prompt = expected_prompt.replace(f"{IMAGE_PLACEHOLDER}The video", f"{VIDEO_PLACEHOLDER}The video")
    assert ours.prompt == expected_prompt
    assert ours.answer.visual_tokens == case["visual_tokens"]
    assert ours.answer.prompt_tokens == case["prompt_tokens"]
    assert ours.answer.prompt_tokens - ours.answer.visual_tokens == case["text_tokens"]


@MODES
@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_first_step_logits(request, mode, name):
    """Top-5 of the original's first step, compared on its vocabulary (it trims the embedding to the tokenizer)."""
    for run in runs_of(request, mode, name):
        check_first_step_logits(GOLDEN_CASES[name], run.first_logits)


def check_first_step_logits(case: dict, first_logits: torch.Tensor) -> None:
    ours = first_logits[: case["vocabulary"]].double()
    reference = case["first_step_top5"]
    expected = torch.tensor(reference["values"], dtype=torch.float64)
    torch.testing.assert_close(ours[reference["ids"]], expected, rtol=0, atol=LOGIT_TOLERANCE)
    torch.testing.assert_close(torch.topk(ours, 5).values, expected, rtol=0, atol=LOGIT_TOLERANCE)
    lse = torch.logsumexp(ours, 0).item()
    assert lse == pytest.approx(case["first_step_logsumexp"], abs=LOGIT_TOLERANCE)


@MODES
@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_greedy_ids(request, mode, name):
    expected = trusted_ids(GOLDEN_CASES[name])
    runs = runs_of(request, mode, name)
    assert len(runs) == (1 if mode == "alone" else 2)  # batched: twice at once; reused: two cache set-ups
    for run in runs:
        assert list(run.answer.token_ids[: len(expected)]) == expected


# --- several pictures: what reuse may and may not carry over ---------------------------------


@pytest.fixture(scope="module")
def grid_model(golden_checkpoints: dict[str, Path]):
    return load_pretrained_model(str(golden_checkpoints["grid-bilinear"]), load_4bit=False, device="cpu")


def test_a_follow_up_that_adds_a_second_picture_gives_the_originals_answer(grid_model):
    """Asked about the wide image alone (tiled), then about it and a second picture: the image is
    now one padded tile, so neither its features nor the first prompt's KV may be reused."""
    engine = Engine(grid_model, reuse=ReuseCache(2**30, 2**30))
    try:
        engine.submit(prepare_case(engine, GOLDEN_CASES["image-wide"], reuse=True)[1]).result()
        encoded, prefilled = engine.scheduler.stats.vision_encodings, engine.scheduler.stats.prefill_tokens
        case = GOLDEN_CASES["two-turns"]
        prompt, prepared = prepare_case(engine, case, reuse=True)
        assert all(item.media.features is None for item in prepared.items)  # nothing recalled
        with prefill_logits(engine) as logits:
            answer = engine.submit(prepared).result()
        assert engine.scheduler.stats.vision_encodings - encoded == 2
        assert engine.scheduler.stats.prefill_tokens - prefilled == answer.prompt_tokens  # no KV reused
    finally:
        engine.close()
    run = OurRun(prompt, answer, logits[0])
    check_prompt_and_counts(case, run)
    check_first_step_logits(case, run.first_logits)
    assert list(answer.token_ids[: len(trusted_ids(case))]) == trusted_ids(case)


def test_a_follow_up_that_adds_a_third_picture_encodes_only_that_one(grid_model):
    """Two images, then a second turn adding a third: the first two are neither encoded nor
    prefilled again, and the answer is the one a fresh engine gives."""
    settings = GenerationSettings(max_new_tokens=12)
    paths = {name: GOLDEN_DIR / name for name in ("wide.png", "tall.png", "small.png")}
    images = {name: read_image(path, max_pixels=10**8) for name, path in paths.items()}

    def pictures(engine: Engine, names: list[str], recall: bool) -> list[ImageInput]:
        chosen = []
        for name in names:
            key = image_key(name, padded=True)
            media = engine.recall(key) if recall else None
            chosen.append(ImageInput(None, media) if media is not None else ImageInput(images[name], MediaRef(key)))
        return chosen

    first = Conversation((Turn("user", COMPARE_TWO, 2),))
    follow_up = Conversation(first.turns + (Turn("assistant", "Their shapes."), Turn("user", "And this one?", 1)))
    engine = Engine(grid_model, reuse=ReuseCache(2**30, 2**30))
    try:
        engine.submit(engine.prepare(first, pictures(engine, ["wide.png", "tall.png"], False), settings)).result()
        stats = engine.scheduler.stats
        encoded, prefilled = stats.vision_encodings, stats.prefill_tokens
        names = ["wide.png", "tall.png", "small.png"]
        reused = engine.submit(engine.prepare(follow_up, pictures(engine, names, True), settings)).result()
        assert stats.vision_encodings - encoded == 1
        # The common prefix (both images and the first turn) is not prefilled again.
        two_images = 2 * engine.model.image_layout.padded_tokens
        assert stats.prefill_tokens - prefilled < reused.prompt_tokens - two_images
    finally:
        engine.close()
    fresh = Engine(grid_model)
    try:
        alone = fresh.submit(fresh.prepare(follow_up, pictures(fresh, names, False), settings)).result()
    finally:
        fresh.close()
    assert reused.token_ids == alone.token_ids
    assert (reused.prompt_tokens, reused.visual_tokens) == (alone.prompt_tokens, alone.visual_tokens)
    assert reused.visual_tokens == 3 * engine.model.image_layout.padded_tokens


# --- one case over HTTP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_server(golden_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bentoml serve` on the served case's checkpoint (its vision tower is in this session's HF cache)."""
    checkpoint = golden_checkpoints[GOLDEN_CASES[SERVED_CASE]["variant"]]
    port = free_port()
    log_path = tmp_path_factory.mktemp("golden-served") / "serve.log"
    command = [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]
    with running_service(command, os.environ | service_env(checkpoint), port, log_path) as base:
        yield base


@pytest.mark.served
def test_served_video_reports_the_originals_counts_and_answer(golden_server):
    case = GOLDEN_CASES[SERVED_CASE]
    metadata = {
        "prompt": case["question"],
        "num_frames": case["num_frames"],
        "max_new_tokens": GOLDEN["max_new_tokens"],
    }
    with (GOLDEN_DIR / case["media"]).open("rb") as video:
        response = httpx.post(
            f"{golden_server}/analyze_video",
            files={"video": (case["media"], video, "video/mp4")},
            data={"metadata": json.dumps(metadata)},
            timeout=120,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    usage = body["usage"]
    assert usage["prompt_tokens"] == case["prompt_tokens"]
    assert usage["visual_tokens"] == case["visual_tokens"]
    assert usage["completion_tokens"] == len(case["greedy_ids"])
    assert body["video_info"]["frame_count"] == case["num_frames"]
    assert trusted_ids(case) == case["greedy_ids"], "the served case needs decisive steps throughout"
    assert body["response"] == case["answer"]


@pytest.mark.served
def test_a_file_stored_with_the_sdk_and_asked_by_id_gives_the_originals_answer(golden_server):
    # Upload once (the openai SDK's files.create), then ask by id: natively the original's answer,
    # and a chat naming the file by a `file` part answers as the same chat with the video inline.
    import openai

    case = GOLDEN_CASES[SERVED_CASE]
    sdk = openai.OpenAI(base_url=f"{golden_server}/v1", api_key="not-needed", max_retries=0, timeout=120)
    with (GOLDEN_DIR / case["media"]).open("rb") as video:
        stored = sdk.files.create(file=video, purpose="vision")
    metadata = {
        "prompt": case["question"],
        "num_frames": case["num_frames"],
        "max_new_tokens": GOLDEN["max_new_tokens"],
    }
    body = httpx.post(
        f"{golden_server}/analyze_video", json={"media_id": stored.id, "metadata": metadata}, timeout=120
    ).json()
    assert body["response"] == case["answer"], body
    assert body["usage"]["prompt_tokens"] == case["prompt_tokens"]
    assert body["usage"]["visual_tokens"] == case["visual_tokens"]

    inline = f"data:video/mp4;base64,{base64.b64encode((GOLDEN_DIR / case['media']).read_bytes()).decode()}"
    model = sdk.models.list().data[0].id

    def chat(part: dict) -> object:
        return sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": case["question"]}]}],
            max_tokens=GOLDEN["max_new_tokens"],
            temperature=0,
            extra_body={"num_frames": case["num_frames"]},
        )

    by_file = chat({"type": "file", "file": {"file_id": stored.id}})
    by_data = chat({"type": "video_url", "video_url": {"url": inline}})
    assert by_file.choices[0].message.content == by_data.choices[0].message.content
    assert by_file.usage.prompt_tokens == by_data.usage.prompt_tokens > case["visual_tokens"]
    sdk.files.delete(stored.id)
