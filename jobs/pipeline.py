"""A long video answered segment by segment: caption each segment, then answer from the captions.

The video is never decoded whole: each segment's frames are read on their own (``read_segment``,
the media package's bounded decoding of one time span) and captioned with the LLaVA-Video time
instruction for that segment. Captions go through the same engine as interactive requests, at
most ``in_flight`` at a time, so they batch with each other and with interactive requests but
never fill the engine's queue ahead of them; the job manager also marks them ``background``, so
waiting interactive requests start first. A segment that cannot be decoded is reported in its place and the job goes on.
The answer comes from a text-only prompt to the same model (:class:`CaptionAnswerer`, which also
answers the questions asked after the job): the captions with their times; when they do not fit
the context budget, groups of captions are summarised first (keeping their times), then the
summaries, until they fit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from jobs.segments import Segment, clock
from llava_custom.engine import Answer, Conversation, Engine, GenerationSettings, TokenStream, Turn
from llava_custom.errors import EngineBusy, RequestCancelled
from media import MediaError, SampledVideo

DEFAULT_CAPTION_PROMPT = (
    "Describe in detail and factually what happens in this part of the video: the people, objects "
    "and places, the actions and how they change over time, and any text shown. Do not guess what is "
    "not shown."
)
DEFAULT_QUESTION = "Summarise what happens in the whole video, in order."
# Room kept in the context for the prompt's own words around the captions.
PROMPT_MARGIN_TOKENS = 128
# (start, end, text): a caption or a summary of several, with the span it covers.
Note = tuple[float, float, str]
# How long to wait before offering a caption again when the engine's queue is full.
BUSY_RETRY_SECONDS = 0.2


@dataclass(frozen=True)
class SegmentCaption:
    segment: Segment
    caption: str | None  # None when the segment could not be decoded
    error: str | None = None
    frame_times: tuple[float, ...] = ()  # seconds from the start of the video of the frames seen


@dataclass
class Progress:
    """What the job has done so far; readable from any thread while it runs."""

    total: int
    decoded: int = 0
    captioned: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    captions: list[SegmentCaption] = field(default_factory=list)  # in segment order, as they finish

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def remaining(self) -> float | None:
        """Seconds left at the pace so far (the final answer not included); None before a caption."""
        if not self.captioned:
            return None
        return self.elapsed / self.captioned * (self.total - self.captioned)


@dataclass(frozen=True)
class JobResult:
    answer: str
    captions: list[SegmentCaption]
    prompt_tokens: int
    completion_tokens: int


class LongVideoJob:
    """One long-video job; :meth:`run` blocks (call it from a worker thread), :meth:`cancel` from any."""

    def __init__(
        self,
        engine: Engine,
        read_segment: Callable[[Segment], SampledVideo],
        segments: Sequence[Segment],
        *,
        settings: GenerationSettings,
        caption_prompt: str = DEFAULT_CAPTION_PROMPT,
        question: str | None = None,
        in_flight: int = 1,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.read_segment = read_segment
        self.segments = list(segments)
        self.settings = settings
        self.caption_prompt = caption_prompt
        self.question = question or DEFAULT_QUESTION
        self.in_flight = max(1, in_flight)
        self.on_progress = on_progress  # called from run()'s thread after each caption
        self.progress = Progress(total=len(self.segments))
        self._cancelled = threading.Event()
        self._streams: list[TokenStream] = []
        self._usage = [0, 0]  # prompt, completion tokens over every generation of the job
        self._answerer = CaptionAnswerer(engine, settings, on_generated=self._count)

    def cancel(self) -> None:
        """Stop at the next segment; captions (and the answer) being generated are cancelled too."""
        self._cancelled.set()
        self._answerer.cancel()
        for stream in list(self._streams):
            stream.cancel()

    def run(self) -> JobResult:
        """Caption every segment, then answer; raises RequestCancelled when cancelled."""
        pending: deque[tuple[Segment, tuple[float, ...], TokenStream]] = deque()
        captions: dict[int, SegmentCaption] = {}
        for segment in self.segments:
            self._check_cancelled()
            while len(pending) >= self.in_flight:
                self._collect(pending.popleft(), captions)
            try:
                sampled = self.read_segment(segment)
            except MediaError as error:
                captions[segment.index] = SegmentCaption(segment, None, str(error))
                self._finished(captions[segment.index])
                continue
            self.progress.decoded += 1
            pending.append((segment, tuple(sampled.info.frame_times), self._caption(segment, sampled)))
        while pending:
            self._collect(pending.popleft(), captions)
        ordered = [captions[segment.index] for segment in self.segments]
        answer = self._answerer.answer(ordered, self.question)
        return JobResult(answer, ordered, *self._usage)

    @property
    def usage(self) -> tuple[int, int]:
        """Prompt and completion tokens of every generation so far (captions, summaries, answer)."""
        return self._usage[0], self._usage[1]

    # --- captions ---------------------------------------------------------------------------

    def _caption(self, segment: Segment, sampled: SampledVideo) -> TokenStream:
        stream = submit_caption(
            self.engine, segment, sampled, self.caption_prompt, self.settings, self._check_cancelled
        )
        self._streams.append(stream)
        return stream

    def _collect(
        self, item: tuple[Segment, tuple[float, ...], TokenStream], captions: dict[int, SegmentCaption]
    ) -> None:
        segment, times, stream = item
        answer = stream.result()  # raises RequestCancelled when the job was cancelled
        self._streams.remove(stream)
        self._count(answer)
        captions[segment.index] = SegmentCaption(segment, answer.text, frame_times=times)
        self._finished(captions[segment.index])

    def _finished(self, caption: SegmentCaption) -> None:
        self.progress.captioned += 1
        self.progress.captions = sorted([*self.progress.captions, caption], key=lambda c: c.segment.index)
        if self.on_progress is not None:
            self.on_progress()

    def _count(self, answer: Answer) -> None:
        self._usage[0] += answer.prompt_tokens
        self._usage[1] += answer.completion_tokens
        self.progress.generated_tokens += answer.completion_tokens

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise RequestCancelled("the job was cancelled")


def submit_caption(
    engine: Engine,
    segment: Segment,
    sampled: SampledVideo,
    prompt: str,
    settings: GenerationSettings,
    check_cancelled: Callable[[], None] = lambda: None,
) -> TokenStream:
    """Segment ``segment``'s caption, queued in the engine; while the engine's queue is full it
    is offered again shortly (interactive requests first). ``check_cancelled`` raises to stop."""
    # The time instruction of the segment alone: its length, and frame times from its start.
    times = [t - segment.start for t in sampled.info.frame_times]
    while True:
        check_cancelled()
        try:
            return engine.submit_video(sampled.frames, segment.seconds, times, prompt, settings)
        except EngineBusy:
            time.sleep(BUSY_RETRY_SECONDS)


class CaptionAnswerer:
    """Questions answered from captions with the model's language side (text only, no second look
    at the video): a job's answer, and the questions asked after it. :meth:`answer` blocks (call it
    from a worker thread), :meth:`cancel` from any; ``on_generated`` sees every generation's answer."""

    def __init__(
        self, engine: Engine, settings: GenerationSettings, on_generated: Callable[[Answer], None] | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_generated = on_generated
        self._cancelled = threading.Event()
        self._streams: list[TokenStream] = []
        self._usage = [0, 0]  # prompt, completion tokens over every generation (summaries, answers)

    def cancel(self) -> None:
        self._cancelled.set()
        for stream in list(self._streams):
            stream.cancel()

    @property
    def usage(self) -> tuple[int, int]:
        """Prompt and completion tokens of every generation so far (summaries, answers)."""
        return self._usage[0], self._usage[1]

    def answer(self, captions: Sequence[SegmentCaption], question: str) -> str:
        """``question`` answered from ``captions`` (in segment order); raises RequestCancelled when cancelled."""
        notes = [(c.segment.start, c.segment.end, c.caption) for c in captions if c.caption]
        if not notes:
            return "No part of the video could be decoded, so there is nothing to answer from."
        hours = captions[-1].segment.end >= 3600  # times as HH:MM:SS throughout from an hour on
        budget = self._budget()
        while self._tokens(_lines(notes, hours)) > budget and len(notes) > 1:
            notes = self._summarised_groups(notes, budget, hours)
        return self._generate(_answer_prompt(_lines(notes, hours), question))

    def _summarised_groups(self, notes: list[Note], budget: int, hours: bool) -> list[Note]:
        """Each run of notes that fits half the budget, summarised into one note over its span."""
        groups: list[list[Note]] = [[]]
        for note in notes:
            if groups[-1] and self._tokens(_lines([*groups[-1], note], hours)) > budget // 2:
                groups.append([])
            groups[-1].append(note)
        question = "Summarise these parts briefly, citing their times."
        return [(g[0][0], g[-1][1], self._generate(_answer_prompt(_lines(g, hours), question))) for g in groups]

    def _generate(self, prompt: str) -> str:
        self._check_cancelled()
        conversation = Conversation((Turn("user", prompt),))
        while True:
            try:
                stream = self.engine.submit_text(conversation, self.settings)
                break
            except EngineBusy:
                time.sleep(BUSY_RETRY_SECONDS)
        self._streams.append(stream)
        answer = stream.result()
        self._streams.remove(stream)
        self._count(answer)
        return answer.text

    def _budget(self) -> int:
        limit = min(self.engine.context_length, self.engine.scheduler.limits.kv_cache_tokens)
        return limit - self.settings.max_new_tokens - PROMPT_MARGIN_TOKENS

    def _tokens(self, lines: Sequence[str]) -> int:
        return len(self.engine.tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"])

    def _count(self, answer: Answer) -> None:
        self._usage[0] += answer.prompt_tokens
        self._usage[1] += answer.completion_tokens
        if self.on_generated is not None:
            self.on_generated(answer)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise RequestCancelled("the job was cancelled")


def _lines(notes: Sequence[Note], hours: bool) -> list[str]:
    return [f"[{clock(start, hours=hours)}-{clock(end, hours=hours)}] {text}" for start, end, text in notes]


def _answer_prompt(lines: Sequence[str], question: str) -> str:
    return (
        "Below are descriptions of consecutive parts of one video, each with its time span.\n\n"
        + "\n".join(lines)
        + f"\n\n{question}\nCite the times of what you mention, as written above."
    )
