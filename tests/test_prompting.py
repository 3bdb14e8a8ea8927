"""The prompt text and token layout the model sees, pinned to the original LLaVA-Video recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_custom import prompting
from llava_custom.builder import load_pretrained_model
from llava_custom.engine import Engine, GenerationSettings


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


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu"))


def test_video_placeholder_expands_to_the_models_visual_tokens(engine):
    """The one <video> marker becomes exactly as many positions as the model fills with features."""
    prompt = prompting.video_prompt("Q", 2.0, [0.0, 1.0])
    ids = engine._expand_placeholder(prompt, engine.model.config.video_token_index, 420)[0]
    video = ids == engine.model.config.video_token_index
    assert int(video.sum()) == 420
    run = torch.nonzero(video).flatten()
    assert int(run[-1] - run[0]) == 419  # one contiguous block where the marker was
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
