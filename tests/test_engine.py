"""The engine's scheduler on the tiny checkpoint: continuous batching, streams, cancellation, limits.

Every test runs the real model through the real scheduler; answers of batched requests are
compared with the same requests answered alone, which is what a request would get on an idle
service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import numpy as np
import pytest
from conftest import engine_with
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_custom.engine import Engine, EngineLimits, GenerationSettings, PreparedRequest
from llava_custom.errors import EngineBusy, PromptTooLong, RequestCancelled, RequestTimeout
from llava_custom.streaming import IncrementalDetokenizer, TokenStream


def frames(seed: int, count: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 384, 384, 3), dtype=np.uint8)


def prepare_video(engine: Engine, seed: int, settings: GenerationSettings, count: int = 2) -> PreparedRequest:
    times = [i * 0.5 for i in range(count)]
    return engine.prepare_video(frames(seed, count), count * 0.5, times, f"What happens in clip {seed}?", settings)


def submit_video(engine: Engine, seed: int, settings: GenerationSettings, count: int = 2) -> TokenStream:
    return engine.submit(prepare_video(engine, seed, settings, count))


def submit_together(engine: Engine, prepared: list[PreparedRequest]) -> list[TokenStream]:
    """Queue requests prepared beforehand: preprocessing on the caller's thread between two
    submissions would let the scheduler finish the first before the last arrives on a slow machine."""
    return [engine.submit(request) for request in prepared]


def image(seed: int, size: tuple[int, int] = (500, 300)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def long_settings(tokens: int = 400) -> GenerationSettings:
    """A request that keeps generating (past the end of its answer) for ``tokens`` tokens."""
    return GenerationSettings(max_new_tokens=tokens, ignore_eos=True)


def wait_for_tokens(stream: TokenStream, count: int) -> list:
    """Read ``count`` deltas of a stream that is still generating."""
    deltas = []
    for delta in stream:
        deltas.append(delta)
        if len(deltas) == count:
            return deltas
    pytest.fail("the stream ended early")


# --- batching ---------------------------------------------------------------------------------


def test_batched_greedy_answers_equal_the_answers_alone(loaded):
    """Prompts of different lengths (2, 4, 8 frames, two images) share the batch."""
    greedy = GenerationSettings(max_new_tokens=24)

    def submit_all(engine: Engine) -> list[TokenStream]:
        return submit_together(
            engine,
            [
                prepare_video(engine, 1, greedy, count=2),
                prepare_video(engine, 2, greedy, count=4),
                prepare_video(engine, 3, greedy, count=8),
                engine.prepare_image(image(4), "What is this?", greedy),
                engine.prepare_image(image(5, (300, 900)), "And this?", greedy),
                prepare_video(engine, 6, GenerationSettings(max_new_tokens=7), count=2),
            ],
        )

    with engine_with(loaded, max_batch_size=1) as engine:
        alone = [stream.result() for stream in submit_all(engine)]
        assert engine.scheduler.stats.largest_batch == 1
    with engine_with(loaded, max_batch_size=8) as engine:
        together = [stream.result() for stream in submit_all(engine)]
        assert engine.scheduler.stats.largest_batch == 6
    for one, other in zip(alone, together, strict=True):
        assert other.token_ids == one.token_ids
        assert other.text == one.text
        assert (other.prompt_tokens, other.visual_tokens) == (one.prompt_tokens, one.visual_tokens)
    assert len({answer.prompt_tokens for answer in alone}) >= 5
    assert together[-1].completion_tokens <= 7


def test_a_late_request_joins_the_running_batch_and_finishes_first(loaded):
    with engine_with(loaded, max_batch_size=4) as engine:
        alone = submit_video(engine, 12, GenerationSettings(max_new_tokens=3), count=4).result()
        early = submit_video(engine, 11, long_settings(300))
        wait_for_tokens(early, 10)
        late = submit_video(engine, 12, GenerationSettings(max_new_tokens=3), count=4)
        answer = late.result()
        assert not early.done, "the late request had to wait for the long one"
        assert answer.token_ids == alone.token_ids
        assert early.result().completion_tokens == 300
        assert engine.scheduler.stats.largest_batch == 2
    with engine_with(loaded) as engine:  # the early one was not disturbed by the join either
        assert submit_video(engine, 11, long_settings(300)).result().token_ids == early.result().token_ids


def test_mixed_settings_apply_per_row(loaded):
    """Greedy and sampling rows, different lengths and stop ids, in one batch."""
    greedy = GenerationSettings(max_new_tokens=20, ignore_eos=True)
    with engine_with(loaded) as engine:
        reference = submit_video(engine, 21, greedy).result().token_ids
        stop_at = reference[5]
        streams = [
            submit_video(engine, 21, greedy),
            submit_video(engine, 21, dataclasses.replace(greedy, stop_token_ids=(stop_at,))),
            submit_video(engine, 21, GenerationSettings(max_new_tokens=20, temperature=1.5, seed=3, ignore_eos=True)),
            submit_video(engine, 21, GenerationSettings(max_new_tokens=4, ignore_eos=True)),
        ]
        full, stopped, sampled, short = (stream.result() for stream in streams)
    assert full.token_ids == reference
    first_stop = reference.index(stop_at)
    assert stopped.token_ids == reference[: first_stop + 1] and stopped.finish_reason == "stop"
    assert short.token_ids == reference[:4] and short.finish_reason == "length"
    assert sampled.token_ids != reference and sampled.completion_tokens == 20


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(loaded):
    seeded = GenerationSettings(max_new_tokens=32, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    with engine_with(loaded) as engine:
        alone = submit_video(engine, 31, seeded).result()
        again = submit_video(engine, 31, seeded).result()
        others = [submit_video(engine, 32 + i, long_settings(40)) for i in range(3)]
        wait_for_tokens(others[0], 3)
        in_batch = submit_video(engine, 31, seeded)
        other_seed = submit_video(engine, 31, dataclasses.replace(seeded, seed=4321))
        batched, different = in_batch.result(), other_seed.result()
        for stream in others:
            stream.result()
        assert engine.scheduler.stats.largest_batch >= 4
    assert again.token_ids == alone.token_ids
    assert batched.token_ids == alone.token_ids
    assert different.token_ids != alone.token_ids


# --- streams ----------------------------------------------------------------------------------


def test_stream_pieces_join_to_the_answer_sync_and_async(loaded):
    settings_ = GenerationSettings(max_new_tokens=48)
    with engine_with(loaded) as engine:
        stream = engine.submit_image(image(41), "Describe it.", settings_)
        deltas = list(stream)

        async def read_async() -> list:
            return [delta async for delta in engine.submit_image(image(41), "Describe it.", settings_)]

        async_deltas = asyncio.run(read_async())
    answer = deltas[-1].answer
    assert answer is not None and answer == stream.result()
    assert "".join(delta.text for delta in deltas) == answer.text
    assert tuple(t for delta in deltas for t in delta.token_ids) == answer.token_ids
    assert [delta.finish_reason for delta in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == answer.finish_reason in ("stop", "length")
    assert [(d.text, d.token_ids) for d in async_deltas] == [(d.text, d.token_ids) for d in deltas]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_detokenizer_pieces_join_to_the_decoded_answer(loaded, data):
    """Any ids, bytes of characters split across tokens included, whitespace at both ends."""
    tokenizer = loaded.processor.tokenizer
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    pieces.append(detokenizer.finish())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True).strip()


@pytest.mark.parametrize("text", ["  naïve café ", "日本語のテキスト", "emoji 😀👍🏽 end\n", "ℝ≠∅ and ∑"])
def test_multibyte_characters_arrive_whole(loaded, text):
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids), "some character spans several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.finish()]
    assert "".join(pieces) == text.strip()
    assert not any("\ufffd" in piece for piece in pieces)


# --- cancellation, time limits, queue limits --------------------------------------------------


def test_cancelling_a_request_frees_its_row_for_the_next_one(loaded):
    with engine_with(loaded, max_batch_size=1) as engine:
        first = submit_video(engine, 51, long_settings(2000))
        wait_for_tokens(first, 2)
        second = submit_video(engine, 52, GenerationSettings(max_new_tokens=4))
        time.sleep(0.3)
        assert not second.done, "the only row is taken: the second request waits"
        first.cancel()
        assert second.result().completion_tokens <= 4
        with pytest.raises(RequestCancelled):
            first.result()
        stats = engine.scheduler.stats
        assert stats.cancelled == 1 and stats.decode_steps < 2000
        assert engine.scheduler.running == 0


def test_a_cancelled_waiting_request_never_starts(loaded):
    with engine_with(loaded, max_batch_size=1) as engine:
        running = submit_video(engine, 53, long_settings(200))
        waiting = submit_video(engine, 54, long_settings(200))
        waiting.cancel()
        with pytest.raises(RequestCancelled):
            waiting.result()
        assert running.result().completion_tokens == 200
        assert engine.scheduler.stats.largest_batch == 1 and engine.scheduler.stats.completed == 1


def test_requests_past_their_time_limit_leave_running_or_waiting(loaded):
    with engine_with(loaded, max_batch_size=1, request_timeout=0.5) as engine:
        running = submit_video(engine, 55, long_settings(20000))
        waiting = submit_video(engine, 56, long_settings(10))
        started = time.monotonic()
        for stream in (running, waiting):
            with pytest.raises(RequestTimeout, match="LLAVA_REQUEST_TIMEOUT"):
                stream.result()
        assert time.monotonic() - started < 5
        assert engine.scheduler.stats.timed_out == 2 and engine.scheduler.running == 0


def test_past_the_batch_requests_wait_and_past_the_queue_they_are_refused(loaded):
    with engine_with(loaded, max_batch_size=2, max_waiting=1) as engine:
        streams = [submit_video(engine, 60 + i, long_settings(30)) for i in range(3)]
        with pytest.raises(EngineBusy, match="busy"):
            submit_video(engine, 63, long_settings(30))
        assert [stream.result().completion_tokens for stream in streams] == [30, 30, 30]
        assert engine.scheduler.stats.largest_batch == 2
        submit_video(engine, 64, GenerationSettings(max_new_tokens=2)).result()  # room again


def test_the_kv_budget_limits_the_batch_and_refuses_what_never_fits(loaded):
    probe = GenerationSettings(max_new_tokens=50, ignore_eos=True)
    with engine_with(loaded) as engine:
        final_length = submit_video(engine, 70, probe).result().prompt_tokens + 50
    with engine_with(loaded, kv_cache_tokens=2 * final_length + final_length // 2) as engine:
        streams = [submit_video(engine, 70 + i, probe) for i in range(4)]
        assert [stream.result().completion_tokens for stream in streams] == [50] * 4
        assert engine.scheduler.stats.largest_batch == 2
        with pytest.raises(PromptTooLong, match="LLAVA_KV_CACHE_TOKENS"):
            submit_video(engine, 75, GenerationSettings(max_new_tokens=2 * final_length))
    context = loaded.model.config.text_config.max_position_embeddings
    with engine_with(loaded, kv_cache_tokens=2 * context) as engine:
        with pytest.raises(PromptTooLong, match="model's context"):
            submit_video(engine, 76, GenerationSettings(max_new_tokens=context))


def test_rows_joining_and_leaving_never_change_another_rows_answer(loaded):
    """A long answer keeps decoding while rows of other lengths join, finish and are cancelled
    around it: its tokens are the ones it gets alone, and so are each short one's."""
    greedy = GenerationSettings(max_new_tokens=6)
    with engine_with(loaded) as engine:
        long_alone = submit_video(engine, 101, long_settings(200), count=8).result()
        shorts_alone = [submit_video(engine, 102 + i, greedy, count=2 + 2 * i).result() for i in range(3)]
    with engine_with(loaded) as engine:
        long = submit_video(engine, 101, long_settings(200), count=8)
        wait_for_tokens(long, 5)
        shorts = []
        for i in range(3):  # each joins, and leaves before the next one comes
            shorts.append(submit_video(engine, 102 + i, greedy, count=2 + 2 * i).result())
            cancelled = submit_video(engine, 110 + i, long_settings(300))
            wait_for_tokens(cancelled, 2)
            cancelled.cancel()
        assert long.result().token_ids == long_alone.token_ids
        assert [answer.token_ids for answer in shorts] == [answer.token_ids for answer in shorts_alone]
        pool = engine.scheduler.runner.pool
        assert pool.free_blocks == pool.num_blocks, "every row gave its blocks back"


def test_the_budget_admits_by_the_tokens_each_request_holds(loaded):
    """One long video beside seven short questions: the padded cache needed 8 x the longest row;
    the pool holds each row's own tokens, one partly filled block per row at most."""
    tokens = GenerationSettings(max_new_tokens=300, ignore_eos=True)

    def prepare(engine: Engine) -> list[PreparedRequest]:
        long = engine.prepare_video(frames(120, 16), 8.0, [i * 0.5 for i in range(16)], "What happens?", tokens)
        return [long] + [engine.prepare_video(frames(121 + i, 1), 0.5, [0.0], "Colour?", tokens) for i in range(7)]

    with engine_with(loaded) as engine:
        alone = [engine.submit(request).result() for request in prepare(engine)]
    finals = [answer.prompt_tokens + 300 for answer in alone]
    budget = sum(finals) + 8 * 16  # each request's last block may be partly filled
    assert budget < 8 * max(finals) / 2, "a padded batch could not hold this mix"
    with engine_with(loaded, kv_cache_tokens=budget) as engine:
        streams = [engine.submit(request) for request in prepare(engine)]
        wait_for_tokens(streams[-1], 5)
        scheduler = engine.scheduler
        held = scheduler.kv_tokens_held
        written = sum(request.kv.length for request in scheduler._batch.requests)
        assert len(scheduler._batch.requests) == 8
        assert written <= held < written + 8 * scheduler.runner.pool.block_size
        assert [stream.result().token_ids for stream in streams] == [answer.token_ids for answer in alone]
        assert scheduler.stats.largest_batch == 8


def test_limits_that_could_never_serve_the_largest_request_are_refused_at_start(loaded):
    with engine_with(loaded, kv_cache_tokens=4096) as engine:
        engine.check_capacity(max_frames=16, max_new_tokens=512)  # 16 x 210 visual tokens + 512 fit
        with pytest.raises(ValueError, match="LLAVA_KV_CACHE_TOKENS=4096 cannot hold .* LLAVA_MAX_FRAMES=64"):
            engine.check_capacity(max_frames=64, max_new_tokens=512)
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineLimits(max_batch_size=0)


def test_a_prompt_is_prefilled_in_chunks_between_decode_steps(loaded):
    greedy = GenerationSettings(max_new_tokens=16)
    with engine_with(loaded) as engine:
        whole = submit_video(engine, 81, greedy, count=8).result()
        assert engine.scheduler.stats.prefill_chunks == 1  # the vision encoding; one chunk holds the prompt
    with engine_with(loaded, prefill_chunk_tokens=128) as engine:
        running = submit_video(engine, 82, long_settings(3000))
        wait_for_tokens(running, 1)
        steps_at_submit = engine.scheduler.stats.decode_steps
        chunked = submit_video(engine, 81, greedy, count=8)
        first = next(iter(chunked))
        steps_before_first = engine.scheduler.stats.decode_steps - steps_at_submit
        answer = chunked.result()
        running.cancel()
    chunks = -(-whole.prompt_tokens // 128)
    assert chunks > 10
    assert answer.token_ids == whole.token_ids
    assert first.token_ids == whole.token_ids[:1]
    # The running request took a decode step after every unit of the other's prefill (the
    # vision encoding and each chunk but the last, which gives the first token).
    assert steps_before_first >= chunks


def test_a_reader_whose_event_loop_closed_does_not_disturb_the_batch(loaded):
    """An async reader that gave up and whose loop is gone leaves a waiter behind; waking it when
    its request ends must not fail the requests still in the batch."""
    with engine_with(loaded) as engine:
        neighbour = submit_video(engine, 91, long_settings(120))
        abandoned = submit_video(engine, 92, long_settings(30))

        async def give_up() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(abandoned.result_async(), timeout=0.01)

        asyncio.run(give_up())  # closes its loop with the waiter still registered
        assert abandoned.result().completion_tokens == 30
        assert neighbour.result().completion_tokens == 120
        assert engine.scheduler.stats.failed == 0


def test_answers_say_where_their_time_went_and_tell_observers(loaded):
    with engine_with(loaded, max_batch_size=1) as engine:
        seen = []
        first = submit_video(engine, 1, GenerationSettings(max_new_tokens=6, ignore_eos=True))
        second = submit_video(engine, 2, GenerationSettings(max_new_tokens=3, ignore_eos=True))
        second.on_answer(seen.append)
        answers = [first.result(), second.result()]
        second.on_answer(seen.append)  # after the end: called at once
    assert seen == [answers[1], answers[1]]
    for answer in answers:
        timings = answer.timings
        assert timings is not None and min(timings.queued, timings.prefill, timings.generate) >= 0
        assert 0 < timings.vision <= timings.prefill  # new frames went through the vision tower
    # One row: the second waited for the first to finish.
    assert answers[1].timings.queued >= answers[0].timings.generate * 0.5


def test_requests_go_ahead_of_waiting_background_requests_and_keep_their_order(loaded) -> None:
    """A long-video job's captions (background) never make an interactive request wait behind them."""
    from llava_custom.prompting import Conversation, Turn

    finished: list[str] = []
    with engine_with(loaded, max_batch_size=1) as engine:

        def submit(name: str, background: bool, tokens: int = 4) -> None:
            settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True, background=background)
            stream = engine.submit_text(Conversation((Turn("user", f"Say {name}."),)), settings)
            stream.on_answer(lambda _: finished.append(name))

        submit("running", False, tokens=24)  # takes the only row; the rest wait
        submit("caption 1", True)
        submit("caption 2", True)
        submit("question 1", False)
        submit("question 2", False)
        submit("caption 3", True)
        deadline = time.monotonic() + 60
        while len(finished) < 6:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert finished == ["running", "question 1", "question 2", "caption 1", "caption 2", "caption 3"]


# --- the compiled decode step ------------------------------------------------------------------


def test_compiled_and_eager_decode_steps_give_the_same_answers(loaded):
    """LLAVA_COMPILE=on: the decode step under torch.compile (dynamic shapes), alone and batched,
    with rows joining and leaving, answers as the eager step does; compiled during warm-up."""
    greedy = GenerationSettings(max_new_tokens=12)

    def answers(engine: Engine) -> list[tuple[int, ...]]:
        engine.warm_up()
        alone = submit_video(engine, 131, greedy).result()
        streams = submit_together(engine, [prepare_video(engine, 131 + i, greedy, count=1 + i) for i in range(4)])
        return [alone.token_ids] + [stream.result().token_ids for stream in streams]

    with engine_with(loaded, compile="off") as engine:
        assert not engine.scheduler.runner.compiled
        eager = answers(engine)
    with engine_with(loaded, compile="on") as engine:
        compiled = answers(engine)
        assert engine.scheduler.runner.compiled, "the compiled step ran without falling back"
        assert engine.scheduler.stats.largest_batch == 4
    assert compiled == eager
