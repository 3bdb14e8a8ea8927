"""What a chat-completions endpoint needs from the engine, on the tiny checkpoint through the real
scheduler: conversations and text-only requests. As in test_engine.py, answers in a batch are
compared with answers alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from llava_custom.builder import LoadedModel, load_pretrained_model
from llava_custom.engine import Conversation, Engine, EngineLimits, GenerationSettings, ReuseCache, Turn
from llava_custom.streaming import TokenStream

TIMES = [0.0, 0.5]
LONG = GenerationSettings(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint) -> LoadedModel:
    return load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu")


@pytest.fixture(scope="module")
def engine(loaded) -> Iterator[Engine]:
    engine = Engine(loaded)
    yield engine
    engine.close()


@contextlib.contextmanager
def engine_with(loaded: LoadedModel, **limits) -> Iterator[Engine]:
    engine = Engine(loaded, EngineLimits(**limits))
    try:
        yield engine
    finally:
        engine.close()


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (len(TIMES), 384, 384, 3), dtype=np.uint8)


def ask_video(engine: Engine, seed: int, settings: GenerationSettings, question="What happens?") -> TokenStream:
    return engine.submit_video(frames(seed), 1.0, TIMES, question, settings)


def chat(*texts: str, system: str | None = None, media_turn: int = 0) -> Conversation:
    """Turns alternating user, assistant, user, ..."""
    roles = ("user", "assistant")
    return Conversation(tuple(Turn(roles[i % 2], text) for i, text in enumerate(texts)), system, media_turn)


# --- conversations and text-only requests -------------------------------------------------------


def test_a_one_turn_conversation_is_the_plain_question(engine):
    plain = engine.prepare_video(frames(1), 1.0, TIMES, "What happens?", LONG)
    conversation = engine.prepare_video(frames(1), 1.0, TIMES, chat("What happens?"), LONG)
    assert torch.equal(conversation.input_ids, plain.input_ids)
    picture = Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8))
    assert torch.equal(
        engine.prepare_image(picture, chat(""), LONG).input_ids, engine.prepare_image(picture, None, LONG).input_ids
    )


def test_conversations_and_text_requests_batched_equal_their_answers_alone(loaded):
    """Text-only, multi-turn video (media in the last turn) and plain video requests in one batch."""
    greedy = GenerationSettings(max_new_tokens=16)

    def submit_all(engine: Engine) -> list[TokenStream]:
        return [
            engine.submit_text(chat("Hello, who are you?"), greedy),
            ask_video(engine, 2, greedy, chat("Hi.", "Hello!", "What is in this clip?", media_turn=2)),
            engine.submit_text(chat("Hi.", "Hello!", "Tell me a story.", system="Be brief."), LONG),
            ask_video(engine, 2, greedy),
        ]

    with engine_with(loaded, max_batch_size=1) as engine:
        alone = [stream.result() for stream in submit_all(engine)]
    with engine_with(loaded, max_batch_size=4) as engine:
        together = [stream.result() for stream in submit_all(engine)]
        assert engine.scheduler.stats.largest_batch == 4
        assert engine.scheduler.stats.vision_encodings == 2  # the text requests have none
    assert [answer.token_ids for answer in together] == [answer.token_ids for answer in alone]
    text, _, story, video = alone
    assert text.visual_tokens == story.visual_tokens == 0
    assert video.visual_tokens > 0
    assert story.completion_tokens == 40


def test_text_requests_leave_the_reuse_caches_alone(loaded):
    with contextlib.closing(Engine(loaded, reuse=ReuseCache(2**26, 2**26))) as engine:
        for _ in range(2):
            engine.submit_text(chat("Hello"), GenerationSettings(max_new_tokens=4)).result()
        for cache in (engine.reuse.features, engine.reuse.prefixes):
            stats = cache.stats()
            assert (stats.hits, stats.misses, stats.entries) == (0, 0, 0)
