"""What a chat-completions endpoint needs from the engine, on the tiny checkpoint through the real
scheduler: conversations and text-only requests, stop strings, top-k, log-probabilities and
token bytes. As in test_engine.py, answers in a batch are compared with answers alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import engine_with
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from llava_custom.engine import Answer, Conversation, Engine, GenerationSettings, ReuseCache, Turn
from llava_custom.sampling import TokenChooser
from llava_custom.streaming import IncrementalDetokenizer, TokenStream

TIMES = [0.0, 0.5]
LONG = GenerationSettings(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(loaded) -> Iterator[Engine]:
    engine = Engine(loaded)
    yield engine
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
        prepared = [  # all prepared before the first is queued, so that all four share the batch
            engine.prepare_text(chat("Hello, who are you?"), greedy),
            engine.prepare_video(
                frames(2), 1.0, TIMES, chat("Hi.", "Hello!", "What is in this clip?", media_turn=2), greedy
            ),
            engine.prepare_text(chat("Hi.", "Hello!", "Tell me a story.", system="Be brief."), LONG),
            engine.prepare_video(frames(2), 1.0, TIMES, "What happens?", greedy),
        ]
        return [engine.submit(request) for request in prepared]

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


# --- stop strings -------------------------------------------------------------------------------


def split_stop(engine: Engine, answer: Answer) -> tuple[str, int]:
    """A 4-character stop string whose first occurrence in ``answer`` spans a token boundary
    (two characters from one token, two from the next ones); and where it starts."""
    text = answer.text
    for count in range(1, len(answer.token_ids)):
        head = engine.tokenizer.decode(answer.token_ids[:count], skip_special_tokens=True).lstrip()
        boundary = len(head)
        stop = text[boundary - 2 : boundary + 2]
        if (
            boundary >= 2
            and text.startswith(head)
            and len(stop) == 4
            and "\ufffd" not in stop
            and text.find(stop) == boundary - 2
            and text[: boundary - 2].strip()
        ):
            return stop, boundary - 2
    pytest.fail("no stop string spanning two tokens found in the answer")


def test_a_stop_string_split_across_tokens_ends_the_answer_right_before_it(engine):
    reference = ask_video(engine, 3, LONG).result()
    stop, at = split_stop(engine, reference)
    stream = ask_video(engine, 3, dataclasses.replace(LONG, stop=("never in the text", stop)))
    deltas = list(stream)
    answer = deltas[-1].answer
    expected = reference.text[:at].rstrip()
    assert answer is not None and answer.text == expected and answer.finish_reason == "stop"
    # Every streamed piece is part of the answer: nothing shown was cut afterwards.
    assert "".join(delta.text for delta in deltas) == expected
    # Generation ended at the token that completed the stop string, and counted it.
    count = answer.completion_tokens
    assert answer.token_ids == reference.token_ids[:count] and count < reference.completion_tokens
    decode = engine.tokenizer.decode
    assert stop in decode(answer.token_ids) and stop not in decode(answer.token_ids[:-1])
    assert [delta.finish_reason for delta in deltas[:-1]] == [None] * (len(deltas) - 1)


def test_stop_strings_apply_per_row_in_a_batch(loaded):
    with engine_with(loaded) as engine:
        reference = ask_video(engine, 4, LONG).result()
        stop, at = split_stop(engine, reference)
        streams = [ask_video(engine, 4, dataclasses.replace(LONG, stop=(stop,))), ask_video(engine, 4, LONG)]
        stopped, full = (stream.result() for stream in streams)
    assert stopped.text == reference.text[:at].rstrip() and stopped.finish_reason == "stop"
    assert full == reference and full.finish_reason == "length"


def test_a_stop_string_that_never_comes_changes_nothing(engine):
    reference = ask_video(engine, 5, LONG).result()
    deltas = list(ask_video(engine, 5, dataclasses.replace(LONG, stop=("\x00never\x00",))))
    assert deltas[-1].answer == reference
    assert "".join(delta.text for delta in deltas) == reference.text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_detokenizer_with_stop_strings_streams_only_what_the_answer_keeps(loaded, data):
    """Any ids and stop strings (taken from the text, whitespace and split characters included):
    the pieces join to the answer, which ends right before the first stop string generated."""
    tokenizer = loaded.processor.tokenizer
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    starts = st.integers(0, max(0, len(decoded) - 1))
    from_text = st.tuples(starts, st.integers(1, 4)).map(lambda span: decoded[span[0] : span[0] + span[1]])
    stop_text = st.one_of(from_text, st.sampled_from([" ", "\n", "e", "the", "\n\n"])).filter(
        lambda stop: stop and "\ufffd" not in stop
    )
    stops = data.draw(st.lists(stop_text, min_size=1, max_size=3))
    detokenizer = IncrementalDetokenizer(tokenizer, stops)
    pieces, used = [], 0
    for token in ids:
        pieces.append(detokenizer.add(token))
        used += 1
        if detokenizer.stopped:
            break
    pieces.append(detokenizer.finish())
    answer = detokenizer.text
    assert "".join(pieces) == answer
    assert not any(stop in answer for stop in stops)
    text = tokenizer.decode(ids[:used], skip_special_tokens=True).lstrip()
    if detokenizer.stopped:
        before = tokenizer.decode(ids[: used - 1], skip_special_tokens=True).lstrip()
        assert not any(stop in before for stop in stops), "it should have stopped earlier"
        assert any(
            text.startswith(stop, cut) and text[:cut].rstrip() == answer
            for stop in stops
            for cut in range(len(answer), len(text))
        )
    else:
        assert answer == text.strip() and not any(stop in text for stop in stops)


# --- top-k --------------------------------------------------------------------------------------


def test_top_k_of_one_samples_the_greedy_answer(loaded):
    greedy = LONG
    sampled = dataclasses.replace(LONG, temperature=1.5, seed=7)
    with engine_with(loaded) as engine:
        choices = (greedy, dataclasses.replace(sampled, top_k=1), sampled)
        prepared = [engine.prepare_video(frames(6), 1.0, TIMES, "What happens?", s) for s in choices]
        streams = [engine.submit(request) for request in prepared]
        reference, top_one, free = (stream.result() for stream in streams)
        assert engine.scheduler.stats.largest_batch == 3
    assert top_one.token_ids == reference.token_ids
    assert free.token_ids != reference.token_ids


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (3, 0.7), (50, 0.9), (1000, 1.0)])
def test_top_k_and_top_p_follow_transformers_warpers(top_k, top_p):
    """The chooser's draw equals a draw from transformers' warpers in generate()'s order, same seed."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(top_k))
    chooser = TokenChooser([], 1.0, torch.device("cpu"))
    setting = GenerationSettings(temperature=0.7, top_k=top_k, top_p=top_p)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(top_k)])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for seed in range(20):
        ours, _ = chooser.choose(
            logits,
            torch.zeros_like(logits, dtype=torch.bool),
            [setting] * 4,
            [torch.Generator().manual_seed(seed + row) for row in range(4)],
        )
        for row in range(4):
            probabilities = warpers(None, logits[row : row + 1]).softmax(dim=-1)[0]
            theirs = torch.multinomial(probabilities, 1, generator=torch.Generator().manual_seed(seed + row))
            assert int(ours[row]) == int(theirs[0])


# --- log-probabilities --------------------------------------------------------------------------


@contextlib.contextmanager
def step_logits(engine: Engine) -> Iterator[list[torch.Tensor]]:
    """The logits the model's head gives at each step (last prefill chunk, then each decode step)."""
    logits: list[torch.Tensor] = []

    def capture(_module, _args, output):
        logits.append(output.reshape(-1, output.shape[-1])[-1].detach().clone())

    handle = engine.model.lm_head.register_forward_hook(capture)
    try:
        yield logits
    finally:
        handle.remove()


def test_logprobs_are_the_penalised_scores_log_softmax(engine, loaded):
    """Alone (one row), each step's logits give the reported numbers: never-generated ids masked,
    the repetition penalty on the ids generated before, no temperature or top-k/top-p."""
    asked = dataclasses.replace(LONG, max_new_tokens=12, temperature=1.3, top_k=20, top_p=0.9, seed=1, logprobs=5)
    with step_logits(engine) as logits:
        answer = ask_video(engine, 7, asked).result()
    assert answer.logprobs is not None and len(answer.logprobs) == answer.completion_tokens == len(logits)
    never = torch.tensor(engine._unused_token_ids())
    penalty = loaded.repetition_penalty
    assert penalty != 1.0
    for step, (reported, raw) in enumerate(zip(answer.logprobs, logits, strict=True)):
        scores = raw.float().index_fill(0, never, -float("inf"))
        earlier = torch.tensor(sorted(set(answer.token_ids[:step])), dtype=torch.long)
        penalised = scores[earlier]
        scores[earlier] = torch.where(penalised < 0, penalised * penalty, penalised / penalty)
        expected = scores.log_softmax(dim=-1)
        assert reported.token_id == answer.token_ids[step]
        assert reported.logprob == pytest.approx(float(expected[reported.token_id]), abs=1e-5)
        values, ids = expected.topk(5)
        assert [token for token, _ in reported.top] == ids.tolist()
        assert [value for _, value in reported.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_logprobs_change_no_token_and_come_per_delta(loaded):
    plain = [LONG, dataclasses.replace(LONG, temperature=1.0, top_k=30, top_p=0.95, seed=11)]
    with_logprobs = [dataclasses.replace(plain[0], logprobs=3), dataclasses.replace(plain[1], logprobs=0)]
    with engine_with(loaded) as engine:
        prepared = [engine.prepare_video(frames(8), 1.0, TIMES, "What happens?", s) for s in plain + with_logprobs]
        streams = [engine.submit(request) for request in prepared]
        deltas = [list(stream) for stream in streams]
        assert engine.scheduler.stats.largest_batch == 4
    answers = [stream_deltas[-1].answer for stream_deltas in deltas]
    assert [a.token_ids for a in answers[2:]] == [a.token_ids for a in answers[:2]]
    for stream_deltas, answer in zip(deltas[:2], answers[:2], strict=True):
        assert answer.logprobs is None and all(delta.logprobs == () for delta in stream_deltas)
    greedy, sampled = answers[2:]
    for stream_deltas, answer in zip(deltas[2:], answers[2:], strict=True):
        assert tuple(lp for delta in stream_deltas for lp in delta.logprobs) == answer.logprobs
        assert all(len(delta.logprobs) == len(delta.token_ids) == 1 for delta in stream_deltas)
        assert [lp.token_id for lp in answer.logprobs] == list(answer.token_ids)
        assert all(lp.logprob <= 0 for lp in answer.logprobs)
    for lp in greedy.logprobs:  # greedy takes the likeliest token: the first alternative
        assert len(lp.top) == 3 and lp.top[0] == (lp.token_id, lp.logprob)
        assert [value for _, value in lp.top] == sorted((value for _, value in lp.top), reverse=True)
    assert all(lp.top == () for lp in sampled.logprobs)


@pytest.mark.parametrize("bad", [{"logprobs": 21}, {"logprobs": -1}, {"top_k": -1}, {"stop": ("",)}])
def test_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationSettings(**bad)


# --- token text and bytes -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["naïve café", "日本語のテキスト", "emoji 😀👍🏽 end\n", "plain words"])
def test_token_bytes_join_to_the_text(engine, text):
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [engine.token_text(token) for token in ids]
    assert b"".join(raw for _, raw in pieces) == text.encode()
    for token, (piece, raw) in zip(ids, pieces, strict=True):
        assert piece == raw.decode("utf-8", errors="replace")
        if "\ufffd" not in piece:
            assert piece == engine.tokenizer.decode([token])


def test_a_token_holding_part_of_a_character_has_exact_bytes(engine):
    ids = engine.tokenizer("日", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the tiny tokenizer splits this character into byte tokens"
    piece, raw = engine.token_text(ids[0])
    assert raw == "日".encode()[: len(raw)] and piece == "\ufffd"


def test_special_tokens_give_their_own_text(engine):
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.token_text(end) == ("<|im_end|>", b"<|im_end|>")
