"""Segment plans: no gaps, the asked overlap, caps, and times as people write them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.segments import SegmentPlanError, clock, plan_segments, span


def test_segments_tile_the_video_without_gaps() -> None:
    segments = plan_segments(95.0, segment_seconds=30)
    assert [(s.start, s.end) for s in segments] == [(0, 30), (30, 60), (60, 90), (90, 95)]
    assert [s.index for s in segments] == [0, 1, 2, 3]
    # A sliver at the end (under a second) joins the segment before instead.
    assert [(s.start, s.end) for s in plan_segments(90.5, segment_seconds=30)][-1] == (60, 90.5)


def test_overlap_and_span() -> None:
    segments = plan_segments(600.0, segment_seconds=60, overlap_seconds=10, start_time=100, end_time=300)
    assert segments[0].start == 100 and segments[-1].end == 300
    for before, after in zip(segments, segments[1:], strict=False):
        assert after.start == pytest.approx(before.end - 10)
    assert all(s.seconds <= 60 + 1 for s in segments)


@settings(deadline=None, max_examples=200)
@given(
    duration=st.floats(1, 7200),
    segment=st.floats(1, 600),
    overlap_share=st.floats(0, 0.9),
    start_share=st.floats(0, 0.99),
)
def test_any_plan_covers_its_span_with_the_overlap(duration, segment, overlap_share, start_share) -> None:
    overlap = segment * overlap_share
    start = duration * start_share
    try:
        segments = plan_segments(duration, segment_seconds=segment, overlap_seconds=overlap, start_time=start)
    except SegmentPlanError:
        assert duration - start <= 0 or start >= duration
        return
    assert segments[0].start == pytest.approx(start) and segments[-1].end == pytest.approx(duration)
    for before, after in zip(segments, segments[1:], strict=False):
        assert after.start <= before.end + 1e-9  # no gap
        assert before.end - after.start == pytest.approx(overlap, abs=1e-6)
    assert all(s.end > s.start for s in segments)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"segment_seconds": 0}, "segment_seconds"),
        ({"overlap_seconds": 30}, "overlap_seconds"),
        ({"overlap_seconds": -1}, "overlap_seconds"),
        ({"start_time": 120}, "outside"),
        ({"start_time": 50, "end_time": 40}, "after start_time"),
        ({"max_segments": 3}, "over the limit"),
    ],
)
def test_bad_plans_say_what_is_wrong(options, words) -> None:
    with pytest.raises(SegmentPlanError, match=words):
        plan_segments(100.0, **{"segment_seconds": 30, **options})


def test_times_are_written_as_people_write_them() -> None:
    assert clock(75.9) == "01:15" and clock(3725) == "01:02:05" and clock(5, hours=True) == "00:00:05"
    assert span(plan_segments(60.0, segment_seconds=30)[1]) == "[00:30-01:00]"
