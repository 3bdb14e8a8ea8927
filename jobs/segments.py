"""Which spans of a long video get their own caption, and how times are written for the model.

Segments tile the analysed span [start_time, end_time] from its start: each lasts
``segment_seconds`` (the last one what is left), and the next begins ``overlap_seconds`` before
the previous one ends, so there is never a gap. Times in prompts and answers are ``MM:SS`` below an
hour and ``HH:MM:SS`` from there, as people write them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.errors import SegmentPlanError
from jobs.limits import DEFAULT_SEGMENT_SECONDS

# A last piece shorter than this merges into the segment before (a caption of a blink helps nobody).
MIN_LAST_SEGMENT_SECONDS = 1.0


@dataclass(frozen=True)
class Segment:
    index: int
    start: float  # seconds from the start of the video
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def plan_segments(
    duration: float,
    *,
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS,
    overlap_seconds: float = 0.0,
    start_time: float | None = None,
    end_time: float | None = None,
    max_segments: int | None = None,
) -> list[Segment]:
    """The segments covering [start_time, end_time] of a ``duration``-second video, without gaps.

    Raises SegmentPlanError for non-positive or non-finite lengths, an overlap not shorter than a
    segment, a span outside the video, or more than ``max_segments`` segments."""
    for name, value in (("segment_seconds", segment_seconds), ("duration", duration)):
        if not math.isfinite(value) or value <= 0:
            raise SegmentPlanError(f"{name} must be a positive number of seconds, got {value}")
    if not math.isfinite(overlap_seconds) or not 0 <= overlap_seconds < segment_seconds:
        raise SegmentPlanError(
            f"overlap_seconds must be at least 0 and shorter than segment_seconds ({segment_seconds:g}), "
            f"got {overlap_seconds}"
        )
    start = 0.0 if start_time is None else float(start_time)
    end = duration if end_time is None else min(float(end_time), duration)
    if start < 0 or start >= duration:
        raise SegmentPlanError(f"start_time {start:g} s is outside the video ({duration:.3f} s long)")
    if end <= start:
        raise SegmentPlanError(f"end_time must be after start_time ({start:g} s)")
    step = segment_seconds - overlap_seconds
    count = max(1, math.ceil((end - start - overlap_seconds) / step - 1e-9))
    if count > 1 and end - (start + (count - 1) * step) < MIN_LAST_SEGMENT_SECONDS + overlap_seconds:
        count -= 1  # the last segment would be a sliver: the one before stretches to the end
    if max_segments is not None and count > max_segments:
        raise SegmentPlanError(
            f"{end - start:.0f} s in {segment_seconds:g} s segments is {count} segments, over the limit of "
            f"{max_segments}; use longer segments or a shorter span (start_time, end_time)"
        )
    segments = []
    for index in range(count):
        first = start + index * step
        last = end if index == count - 1 else min(end, first + segment_seconds)
        segments.append(Segment(index, first, last))
    return segments


def clock(seconds: float, *, hours: bool | None = None) -> str:
    """``MM:SS``, or ``HH:MM:SS`` when ``hours`` (default: when ``seconds`` reaches an hour)."""
    whole = int(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    if hours or (hours is None and h):
        return f"{h:02d}:{m:02d}:{s:02d}"
    return f"{m:02d}:{s:02d}"


def span(segment: Segment, *, hours: bool = False) -> str:
    """``[MM:SS-MM:SS]``: how a segment is named to the model and in answers."""
    return f"[{clock(segment.start, hours=hours)}-{clock(segment.end, hours=hours)}]"
