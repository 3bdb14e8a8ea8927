"""The prompt text and token layout the model sees, pinned to the original LLaVA-Video recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_custom import prompting
from llava_custom.builder import load_pretrained_model
from llava_custom.engine import Conversation, Engine, GenerationSettings, Turn
from llava_custom.errors import InvalidPrompt


def test_video_prompt_text_is_the_original_recipe():
    text = prompting.video_prompt("What is the man doing?", 10.5, [0.0, 3.5, 7.0, 10.43])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>The video lasts for 10.50 seconds, and 4 frames are uniformly sampled from it. "
        "These frames are located at 0.00s,3.50s,7.00s,10.43s.Please answer the following questions related to "
        "this video.\nWhat is the man doing?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_image_prompt_text():
    assert prompting.image_prompt("What colour is it?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("question", [None, ""])
def test_default_questions(question):
    assert prompting.DEFAULT_VIDEO_PROMPT in prompting.video_prompt(question, 1.0, [0.0])
    assert prompting.image_prompt(question).endswith(
        f"\n{prompting.DEFAULT_IMAGE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("question", ["What is the man doing?", "", None])
def test_a_one_turn_conversation_renders_as_the_plain_question(question):
    conversation = prompting.as_conversation(question)
    assert conversation == Conversation((Turn("user", question or ""),))
    times = [0.0, 3.5, 7.0]
    assert prompting.video_prompt(conversation, 10.5, times) == prompting.video_prompt(question, 10.5, times)
    assert prompting.image_prompt(conversation) == prompting.image_prompt(question)


def test_a_conversation_renders_as_qwen_1_5_with_each_message_appended():
    """What LLaVA-NeXT's conv_templates["qwen_1_5"] gives after append_message for every turn and
    (assistant, None) last: system, then each message between <|im_start|>role and <|im_end|>."""
    conversation = Conversation(
        (Turn("user", "What is he doing?"), Turn("assistant", "He is running."), Turn("user", "Why?")),
        system="Answer briefly.",
    )
    assert prompting.image_prompt(conversation) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is he doing?<|im_end|>\n"
        "<|im_start|>assistant\nHe is running.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    video = prompting.video_prompt(conversation, 2.0, [0.0, 1.0])
    assert video.startswith(
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<video>The video lasts for 2.00 seconds"
    )
    assert "related to this video.\nWhat is he doing?<|im_end|>\n<|im_start|>assistant\nHe is running." in video


def test_the_picture_goes_into_the_media_turn_and_an_empty_one_asks_the_default():
    turns = (Turn("user", "Hi."), Turn("assistant", "Hello."), Turn("user", ""))
    text = prompting.image_prompt(Conversation(turns, media_turn=2))
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{prompting.DEFAULT_IMAGE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_text_only_conversation_has_no_placeholder_and_no_default_question():
    turns = (Turn("user", "Hi."), Turn("assistant", ""), Turn("user", ""))
    assert prompting.text_prompt(Conversation(turns, system="Be terse.")) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )


UNANSWERABLE = {
    "no turns": Conversation(()),
    "ends with the assistant": Conversation((Turn("user", "Q"), Turn("assistant", "A"))),
    "media in an assistant turn": Conversation((Turn("user", "Q"), Turn("assistant", "A"), Turn("user", "Q")), None, 1),
    "media turn out of range": Conversation((Turn("user", "Q"),), media_turn=1),
    "unknown role": Conversation((Turn("system", "S"), Turn("user", "Q"))),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", list(UNANSWERABLE))
def test_unanswerable_conversations_are_refused(case):
    conversation = UNANSWERABLE[case]
    with pytest.raises(ValueError):
        prompting.image_prompt(conversation)
    with pytest.raises(ValueError):
        prompting.video_prompt(conversation, 1.0, [0.0])
    if case not in ("media in an assistant turn", "media turn out of range"):  # text-only has no media turn
        with pytest.raises(ValueError):
            prompting.text_prompt(conversation)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu"))


def test_video_placeholder_expands_to_the_models_visual_tokens(engine):
    """The one <video> marker becomes exactly as many positions as the model fills with features."""
    frames = np.zeros((2, 384, 384, 3), dtype=np.uint8)
    prepared = engine.prepare_video(frames, 2.0, [0.0, 1.0], "Q", GenerationSettings(max_new_tokens=2))
    ids = prepared.input_ids[0]
    video = ids == engine.model.config.video_token_index
    assert int(video.sum()) == prepared.visual_tokens == engine.model.video_layout.num_video_tokens(2) == 420
    run = torch.nonzero(video).flatten()
    assert int(run[-1] - run[0]) == 419  # one contiguous block where the marker was
    (item,) = prepared.items
    assert (item.start, item.end) == (int(run[0]), int(run[-1]) + 1)
    tokenizer = engine.tokenizer
    assert (
        tokenizer.decode(ids[: run[0]])
        == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert tokenizer.decode(ids[run[-1] + 1 :]).startswith("The video lasts for 2.00 seconds, and 2 frames")


def test_answer_depends_on_frames_and_question(engine):
    """Greedy decoding is deterministic, and the pictures and the question both reach the model."""
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8) for _ in range(3)]
    settings = GenerationSettings(max_new_tokens=6)

    def answer(frames, question):
        return engine.submit_video(frames, 2.0, [0.0, 1.0], question, settings).result().text

    assert answer(clips[0], "Q") == answer(clips[0], "Q")
    answers = {answer(frames, "Q") for frames in clips} | {answer(clips[0], q) for q in ("A?", "B?")}
    assert len(answers) > 1


@pytest.mark.parametrize("case", list(UNANSWERABLE))
def test_the_engine_refuses_unanswerable_conversations_as_invalid_prompts(engine, case):
    settings = GenerationSettings(max_new_tokens=2)
    frames = np.zeros((1, 384, 384, 3), dtype=np.uint8)
    with pytest.raises(InvalidPrompt):
        engine.prepare_video(frames, 1.0, [0.0], UNANSWERABLE[case], settings)


@pytest.mark.parametrize(
    "turns",
    [
        (Turn("user", "Look: <image>"),),
        (Turn("user", "Q"), Turn("assistant", "<video> here"), Turn("user", "Q")),
    ],
)
def test_a_placeholder_typed_into_any_turn_is_refused(engine, turns):
    settings = GenerationSettings(max_new_tokens=2)
    with pytest.raises(InvalidPrompt, match="may not contain"):
        engine.prepare_text(Conversation(turns), settings)
    with pytest.raises(InvalidPrompt, match="may not contain"):
        engine.prepare_video(np.zeros((1, 384, 384, 3), dtype=np.uint8), 1.0, [0.0], Conversation(turns), settings)


def test_a_text_only_prompt_is_its_tokens_alone(engine):
    conversation = Conversation((Turn("user", "Hello there"),))
    prepared = engine.prepare_text(conversation, GenerationSettings())
    expected = engine.tokenizer(prompting.text_prompt(conversation), add_special_tokens=False)["input_ids"]
    assert prepared.input_ids[0].tolist() == expected
    assert (prepared.modality, prepared.visual_tokens, prepared.pixel_inputs, prepared.media) == ("text", 0, {}, None)
