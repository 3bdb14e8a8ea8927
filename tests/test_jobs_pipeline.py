"""A long video segment by segment on the tiny model: captions in order, times inside their
segments, progress, summaries when the captions do not fit, cancel, damaged segments."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import engine_with

import media
from jobs.pipeline import LongVideoJob
from jobs.segments import Segment, plan_segments
from llava_custom.engine import Engine, EngineLimits, GenerationSettings
from llava_custom.errors import RequestCancelled
from testing.mediafiles import frame_index_from_pixels, write_video

FPS = 2
TOKENS = 12


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """20 s at 2 fps: frame i spells i, so every sampled frame tells where it came from."""
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames=20 * FPS, fps=FPS, size=(96, 72))


def job_for(
    engine: Engine,
    path: Path,
    segments: list[Segment],
    seen: list | None = None,
    tokens: int = TOKENS,
    in_flight: int = 1,
) -> LongVideoJob:
    def read_segment(segment: Segment) -> media.SampledVideo:
        sampled = media.read_video(path, 2, start_time=segment.start, end_time=segment.end)
        if seen is not None:
            seen.append((segment, sampled, job.progress.captioned))
        return sampled

    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    job = LongVideoJob(engine, read_segment, segments, settings=settings, question="What happens?", in_flight=in_flight)
    return job


@pytest.mark.parametrize("in_flight", [1, 2])
def test_every_segment_is_captioned_in_order_from_its_own_frames(loaded, long_video, in_flight) -> None:
    segments = plan_segments(20.0, segment_seconds=4, overlap_seconds=1)
    seen: list = []
    with engine_with(loaded, max_batch_size=2) as engine:
        job = job_for(engine, long_video, segments, seen, in_flight=in_flight)
        result = job.run()
    assert [c.segment for c in result.captions] == segments
    assert all(c.caption and c.error is None for c in result.captions)
    for segment, sampled, _ in seen:
        assert all(segment.start <= t <= segment.end for t in sampled.info.frame_times)
        indices = [frame_index_from_pixels(frame) for frame in sampled.frames]
        assert indices == sampled.frame_indices and all(i / FPS >= segment.start for i in indices)
    progress = [captioned for _, _, captioned in seen]
    assert progress == sorted(progress) and job.progress.captioned == job.progress.total == len(segments)
    assert result.answer
    # Exactly one caption per segment and one answer: everything fit the context.
    assert result.completion_tokens == TOKENS * (len(segments) + 1) == job.progress.generated_tokens


def test_captions_that_do_not_fit_are_summarised_in_groups_first(loaded, long_video) -> None:
    segments = plan_segments(20.0, segment_seconds=1)
    # Room for one 2-frame caption request, not for twenty 24-token captions at once.
    with engine_with(loaded, max_batch_size=2, kv_cache_tokens=660) as engine:
        result = job_for(engine, long_video, segments, tokens=24).run()
    assert len(result.captions) == 20 and result.answer
    assert result.completion_tokens > 24 * (len(segments) + 1)  # group summaries were generated


def test_a_cancelled_job_stops_early(loaded, long_video) -> None:
    segments = plan_segments(20.0, segment_seconds=2)
    engine = Engine(loaded, EngineLimits(max_batch_size=2))
    try:
        job = job_for(engine, long_video, segments)
        outcome: list = []

        def run() -> None:
            try:
                outcome.append(job.run())
            except RequestCancelled as error:
                outcome.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        while job.progress.captioned < 1:
            thread.join(0.01)
        job.cancel()
        thread.join(30)
    finally:
        engine.close()
    assert isinstance(outcome[0], RequestCancelled)
    assert job.progress.captioned < len(segments)


def test_segments_that_cannot_be_decoded_are_reported_and_the_job_completes(loaded, tmp_path) -> None:
    # Matroska keeps its index up front: cut short, its first part still plays.
    data = write_video(tmp_path / "long.mkv", frames=20 * FPS, fps=FPS, size=(96, 72)).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    segments = plan_segments(20.0, segment_seconds=4)
    with engine_with(loaded, max_batch_size=2) as engine:
        result = job_for(engine, cut, segments).run()
    failed = [c for c in result.captions if c.caption is None]
    assert failed and all(c.error for c in failed)
    assert result.captions[0].caption and result.answer
