"""Reuse across requests about the same media, on the tiny checkpoint through the real scheduler.

Every reused answer is compared with the same request answered by an engine without caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from llava_custom.builder import LoadedModel
from llava_custom.engine import (
    Answer,
    Conversation,
    Engine,
    EngineLimits,
    GenerationSettings,
    MediaRef,
    ReuseCache,
    Turn,
)
from llava_custom.reuse import ByteLRU, image_key, video_key

GREEDY = GenerationSettings(max_new_tokens=16)
TIMES = [0.0, 0.5, 1.0, 1.5]
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def plain(loaded) -> Iterator[Engine]:
    """An engine without caches: what every answer must equal."""
    engine = Engine(loaded)
    yield engine
    engine.close()


@contextlib.contextmanager
def reusing(loaded: LoadedModel, features: int = 64 * MiB, prefixes: int = 64 * MiB, **limits) -> Iterator[Engine]:
    engine = Engine(loaded, EngineLimits(**limits), ReuseCache(features, prefixes))
    try:
        yield engine
    finally:
        engine.close()


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (len(TIMES), 384, 384, 3), dtype=np.uint8)


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (300, 500, 3), dtype=np.uint8))


def answer_video(
    engine: Engine, seed: int, question: str | Conversation, settings: GenerationSettings = GREEDY
) -> Answer:
    """Ask as the service does: recall by key, decode (here: make the frames) only on a miss."""
    key = video_key(f"video-{seed}", len(TIMES))
    recalled = engine.recall(key)
    pixels = None if recalled is not None else frames(seed)
    media = recalled or MediaRef(key, info={"seed": seed})
    return engine.submit_video(pixels, 2.0, TIMES, question, settings, media).result()


def ask_video(engine: Engine, seed: int, question: str, settings: GenerationSettings = GREEDY) -> tuple[int, ...]:
    return answer_video(engine, seed, question, settings).token_ids


def ask_image(engine: Engine, seed: int, question: str) -> tuple[int, ...]:
    key = image_key(f"image-{seed}")
    recalled = engine.recall(key)
    media = recalled or MediaRef(key)
    return engine.submit_image(None if recalled else image(seed), question, GREEDY, media).result().token_ids


def alone_video(
    plain: Engine, seed: int, question: str | Conversation, settings: GenerationSettings = GREEDY
) -> tuple[int, ...]:
    return plain.submit_video(frames(seed), 2.0, TIMES, question, settings).result().token_ids


QUESTIONS = ["What happens in this clip?", "What colour is the sky?", "Describe it in one word.", "What happens?"]


def test_follow_up_questions_reuse_features_and_prefix_with_identical_answers(loaded, plain):
    with reusing(loaded) as engine:
        stats = engine.scheduler.stats
        answers = []
        for number, question in enumerate(QUESTIONS):
            before = stats.prefill_tokens
            answers.append(ask_video(engine, 1, question))
            prefilled = stats.prefill_tokens - before
            if number == 0:
                first_prompt = prefilled
            else:
                # Only the question and the assistant header, never the system prompt or the frames.
                assert prefilled < 30, f"follow-up {number} prefilled {prefilled} tokens"
        assert stats.vision_encodings == 1
        assert first_prompt > 210 * len(TIMES)  # the whole prompt, visual tokens included
        reuse = engine.reuse
        assert (reuse.features.stats().hits, reuse.features.stats().misses) == (3, 1)
        assert (reuse.prefixes.stats().hits, reuse.prefixes.stats().misses) == (3, 1)
    assert answers == [alone_video(plain, 1, question) for question in QUESTIONS]


def test_a_conversation_extending_the_last_prefills_only_what_was_added(loaded, plain):
    """A chat client sends the whole conversation each time: the last prompt, the assistant's
    answer, a new question. The cached prompt covers all but the answer and the new turn."""
    conversations = [Conversation((Turn("user", QUESTIONS[0]),), system="You describe videos.")]
    with reusing(loaded) as engine:
        stats = engine.scheduler.stats
        answers = [answer_video(engine, 13, conversations[0])]
        for question in QUESTIONS[1:3]:
            turns = conversations[-1].turns + (Turn("assistant", answers[-1].text), Turn("user", question))
            conversations.append(Conversation(turns, conversations[-1].system))
            before = stats.prefill_tokens
            answers.append(answer_video(engine, 13, conversations[-1]))
            prefilled = stats.prefill_tokens - before
            added = f"{answers[-2].text}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            added_tokens = len(engine.tokenizer(added, add_special_tokens=False)["input_ids"])
            assert prefilled == added_tokens == answers[-1].prompt_tokens - answers[-2].prompt_tokens
            assert prefilled * 10 < answers[-1].prompt_tokens  # the frames and the earlier turns came from the cache
        assert stats.vision_encodings == 1
    assert all(answer.completion_tokens > 0 for answer in answers)
    assert [answer.token_ids for answer in answers] == [alone_video(plain, 13, c) for c in conversations]


def test_the_same_question_again_prefills_one_token(loaded, plain):
    with reusing(loaded) as engine:
        first = ask_video(engine, 2, QUESTIONS[0])
        before = engine.scheduler.stats.prefill_tokens
        again = ask_video(engine, 2, QUESTIONS[0])
        assert engine.scheduler.stats.prefill_tokens - before == 1
    assert first == again == alone_video(plain, 2, QUESTIONS[0])


def test_image_follow_ups_reuse_and_equal_answers_alone(loaded, plain):
    with reusing(loaded) as engine:
        answers = [ask_image(engine, 3, question) for question in QUESTIONS[:3]]
        assert engine.scheduler.stats.vision_encodings == 1
        assert engine.reuse.prefixes.stats().hits == 2
    assert answers == [plain.submit_image(image(3), q, GREEDY).result().token_ids for q in QUESTIONS[:3]]


def test_different_media_with_the_same_placeholders_never_share(loaded, plain):
    """Two videos of the same length have identical prompt token ids; only the key tells them apart."""
    with reusing(loaded) as engine:
        first = ask_video(engine, 4, QUESTIONS[0])
        second = ask_video(engine, 5, QUESTIONS[0])
        assert engine.scheduler.stats.vision_encodings == 2
        assert engine.reuse.prefixes.stats().hits == 0
    assert first == alone_video(plain, 4, QUESTIONS[0])
    assert second == alone_video(plain, 5, QUESTIONS[0])
    assert first != second  # random frames: the answers tell the videos apart, so a false hit would show


def test_a_frame_count_is_part_of_the_key(loaded):
    with reusing(loaded) as engine:
        ask_video(engine, 6, QUESTIONS[0])
        assert engine.recall(video_key("video-6", len(TIMES))) is not None
        assert engine.recall(video_key("video-6", len(TIMES) + 1)) is None


def test_caches_evict_the_least_recently_used_by_bytes(loaded, plain):
    """Each cache sized for one video's entry: a second video evicts the first, which then costs in full."""
    with reusing(loaded) as sizing:
        ask_video(sizing, 7, QUESTIONS[0])
        feature_bytes = sizing.reuse.features.stats().bytes
        prefix_bytes = sizing.reuse.prefixes.stats().bytes
    assert feature_bytes > 0 and prefix_bytes > 0
    with reusing(loaded, features=int(feature_bytes * 1.5), prefixes=int(prefix_bytes * 1.5)) as engine:
        stats = engine.scheduler.stats
        ask_video(engine, 7, QUESTIONS[0])
        ask_video(engine, 8, QUESTIONS[0])
        assert engine.reuse.features.stats().evictions == 1
        assert engine.reuse.prefixes.stats().evictions == 1
        assert engine.recall(video_key("video-7", len(TIMES))) is None
        before = stats.prefill_tokens
        again = ask_video(engine, 7, QUESTIONS[1])
        assert stats.prefill_tokens - before > 210 * len(TIMES)
        assert stats.vision_encodings == 3
        assert engine.reuse.features.stats().bytes <= int(feature_bytes * 1.5)
    assert again == alone_video(plain, 7, QUESTIONS[1])


def test_features_alone_skip_the_vision_tower(loaded, plain):
    """With the prefix cache off, a follow-up still skips decoding and encoding but prefills in full."""
    with reusing(loaded, prefixes=0) as engine:
        ask_video(engine, 9, QUESTIONS[0])
        before = engine.scheduler.stats.prefill_tokens
        answer = ask_video(engine, 9, QUESTIONS[1])
        assert engine.scheduler.stats.prefill_tokens - before > 210 * len(TIMES)
        assert engine.scheduler.stats.vision_encodings == 1
    assert answer == alone_video(plain, 9, QUESTIONS[1])


def test_disabled_caches_reuse_nothing(loaded):
    with reusing(loaded, features=0, prefixes=0) as engine:
        ask_video(engine, 10, QUESTIONS[0])
        ask_video(engine, 10, QUESTIONS[0])
        assert engine.scheduler.stats.vision_encodings == 2
        assert engine.reuse.features.stats() == engine.reuse.prefixes.stats()
        assert engine.reuse.features.stats().entries == 0


def test_reused_follow_ups_batched_together_equal_answers_alone(loaded, plain):
    """Follow-ups about one video, decoded in one batch, each with its own length and sampling."""
    sampled = GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    mixed = [GREEDY, sampled, GREEDY, GenerationSettings(max_new_tokens=5)]
    with reusing(loaded, max_batch_size=4) as engine:
        ask_video(engine, 11, QUESTIONS[0])
        key = video_key("video-11", len(TIMES))
        media = engine.recall(key)
        streams = [
            engine.submit_video(None, 2.0, TIMES, question, settings, media)
            for question, settings in zip(QUESTIONS, mixed, strict=True)
        ]
        answers = [stream.result().token_ids for stream in streams]
        assert engine.scheduler.stats.largest_batch >= 2
        assert engine.scheduler.stats.vision_encodings == 1
    expected = [alone_video(plain, 11, question, settings) for question, settings in zip(QUESTIONS, mixed, strict=True)]
    assert answers == expected


def test_vision_encoding_in_chunks_gives_the_same_features(loaded):
    inner = loaded.model.model
    pixels = loaded.processor.video_processor(videos=[frames(12)], return_tensors="pt")["pixel_values_videos"]
    with torch.inference_mode():
        whole = inner.get_video_features(pixels, return_dict=True).pooler_output
        for chunk in (1, 3):
            chunked = inner.get_video_features(pixels, frames_per_chunk=chunk, return_dict=True).pooler_output
            assert torch.equal(chunked, whole)


def test_recalled_media_needs_features(loaded):
    with reusing(loaded) as engine, pytest.raises(ValueError, match="recalled features"):
        engine.prepare_video(None, 2.0, TIMES, "?", GREEDY, MediaRef(video_key("x", 4)))


# --- the byte-bounded LRU itself -------------------------------------------------------------------


def test_byte_lru_keeps_the_recently_used_within_its_bytes():
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("c", "C", 40)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == ("A", "C")
    cache.put("a", "A2", 60)  # replacing frees the old entry's bytes first
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 100, 1)
    cache.put("huge", "H", 101)  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and cache.stats().entries == 2
    assert (cache.stats().hits, cache.stats().misses) == (3, 2)


def test_byte_lru_of_zero_bytes_is_off():
    cache: ByteLRU[str] = ByteLRU(0)
    cache.put("a", "A", 1)
    assert cache.get("a") is None
    assert cache.stats().misses == 0 and not cache.enabled
    with pytest.raises(ValueError):
        ByteLRU(-1)
