"""What a request gets back from the engine: a stream of text pieces, then the whole answer.

The scheduler thread pushes items into a :class:`TokenStream`; the request's side reads them
with a plain ``for`` loop (a thread), ``async for`` (an event loop), or waits for the whole
:class:`Answer` with :meth:`TokenStream.result` / :meth:`TokenStream.result_async` (which wake only
once, at the end, not once per token). :class:`IncrementalDetokenizer` turns ids into pieces that
join to exactly the answer text, however characters are split across byte-level tokens, and ends
the answer at a stop string without ever streaming text that is cut afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# Byte-level BPE decodes an incomplete UTF-8 sequence to this replacement character.
_INCOMPLETE = "\ufffd"


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` most likely ids with theirs (most
    likely first), from the scores the chooser ranks: see sampling.TokenChooser.choose."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Timings:
    """Where a request's time went in the engine, in seconds (for metrics and logs)."""

    queued: float  # from submission until its prefill started
    vision: float  # vision tower and projector (0 when its features were recalled)
    prefill: float  # from the start of its prefill to its first token (vision included)
    generate: float  # from its first token to its last


@dataclass(frozen=True)
class Answer:
    """A finished generation."""

    text: str
    prompt_tokens: int
    visual_tokens: int
    token_ids: tuple[int, ...]  # every generated id: an end-of-turn or the last of a stop string too
    finish_reason: FinishReason = "stop"
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per generated id, when asked for
    # Not part of what the answer is: two equal answers may have taken different times.
    timings: Timings | None = field(default=None, compare=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Delta:
    """One decode step of one request: its new text (may be empty while a character is incomplete
    or the text might begin a stop string) and the id it generated, with its log-probability when
    asked for. The last delta carries the finish reason and the whole answer."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    answer: Answer | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per id in token_ids, when asked for


class _End:
    """Marks the end of a stream; ``error`` is raised to the reader instead of ending quietly."""

    def __init__(self, answer: Answer | None = None, error: BaseException | None = None) -> None:
        self.answer = answer
        self.error = error


class TokenStream:
    """Thread-safe stream of :class:`Delta` for one request; readable from threads and event loops."""

    def __init__(self) -> None:
        self._items: deque[Delta] = deque()
        self._end: _End | None = None
        self._condition = threading.Condition()
        self._item_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._end_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cancelled = threading.Event()
        self._on_answer: list[Callable[[Answer], None]] = []
        # time.monotonic() when queued and when the scheduler took it up (request logs).
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None

    # --- the scheduler's side ---------------------------------------------------------------

    def mark_started(self) -> None:
        """The scheduler took the request out of its queue (its prefill begins)."""
        self.started_at = time.monotonic()

    def push(self, delta: Delta) -> None:
        self._put(delta, None)

    def finish(self, last: Delta) -> None:
        """Push the last delta (which carries the answer) and end the stream."""
        self._put(last, _End(answer=last.answer))

    def fail(self, error: BaseException) -> None:
        self._put(None, _End(error=error))

    def _put(self, delta: Delta | None, end: _End | None) -> None:
        with self._condition:
            if self._end is not None:
                return
            if delta is not None:
                self._items.append(delta)
            if end is not None:
                self._end = end
            self._condition.notify_all()
            waiters, self._item_waiters = self._item_waiters, []
            if end is not None:
                waiters += self._end_waiters
                self._end_waiters = []
            callbacks = self._on_answer if end is not None and end.answer is not None else []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop has closed: its reader is gone; others must not suffer
                pass
        for callback in callbacks:
            _call(callback, end.answer)  # type: ignore[union-attr]

    def on_answer(self, callback: Callable[[Answer], None]) -> None:
        """Call ``callback`` with the whole answer when the stream finishes well (at once if it
        has), on the thread that finishes it; a failing callback is logged, never raised."""
        with self._condition:
            if self._end is None:
                self._on_answer.append(callback)
                return
            answer = self._end.answer
        if answer is not None:
            _call(callback, answer)

    # --- the request's side -----------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._end is not None

    @property
    def queue_seconds(self) -> float | None:
        """How long the request waited in the engine's queue (None while it still waits)."""
        return None if self.started_at is None else self.started_at - self.submitted_at

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (a no-op once it has finished)."""
        if self._end is None:
            self._cancelled.set()

    def __iter__(self) -> Iterator[Delta]:
        while True:
            with self._condition:
                while not self._items and self._end is None:
                    self._condition.wait()
                item = self._next_item()
            if item is None:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        while True:
            with self._condition:
                ready = bool(self._items) or self._end is not None
                if ready:
                    item = self._next_item()
                else:
                    future = loop.create_future()
                    self._item_waiters.append((loop, future))
            if not ready:
                await future
                continue
            if item is None:
                return
            yield item

    def result(self) -> Answer:
        """Wait for the end and return the whole answer (raises what the generation raised)."""
        with self._condition:
            while self._end is None:
                self._condition.wait()
        return self._final()

    async def result_async(self) -> Answer:
        """:meth:`result` for event loops; the loop is woken once, at the end."""
        loop = asyncio.get_running_loop()
        with self._condition:
            if self._end is None:
                future = loop.create_future()
                self._end_waiters.append((loop, future))
            else:
                future = None
        if future is not None:
            await future
        return self._final()

    def _next_item(self) -> Delta | None:
        """The next delta, or None at the end (raising the generation's error). Caller holds the lock."""
        if self._items:
            return self._items.popleft()
        self._final()
        return None

    def _final(self) -> Answer:
        assert self._end is not None
        if self._end.error is not None:
            raise self._end.error
        assert self._end.answer is not None
        return self._end.answer


def _call(callback: Callable[[Answer], None], answer: Answer) -> None:
    try:
        callback(answer)
    except Exception:  # an observer's fault must not fail the scheduler or other requests
        logger.exception("answer callback failed")


def _wake(future: asyncio.Future) -> None:
    if not future.done():  # the reader may have been cancelled meanwhile
        future.set_result(None)


class IncrementalDetokenizer:
    """Text pieces whose concatenation is ``tokenizer.decode(ids, skip_special_tokens=True).strip()``,
    or with ``stop`` strings, that text cut right before the first stop string it contains.

    Decodes a short window of recent ids (as vLLM's ``detokenize_incrementally``) and holds a piece
    back while it ends in an incomplete UTF-8 character; leading whitespace is dropped and trailing
    whitespace held until something follows it, because the final answer is stripped (as the
    original LLaVA code strips it). A tail that could be the start of a stop string is held too,
    until it turns out not to be, so nothing streamed is cut later. Stop strings are matched in the
    text without its leading whitespace, the text the answer is made of.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: text before it is final
        self._read_offset = 0  # ids up to here have been turned into text
        self._decoded = ""  # the whole characters decoded so far, leading whitespace dropped
        self.text = ""  # everything emitted so far: a prefix of _decoded
        self.stopped = False  # a stop string was generated: _decoded ends right before it

    def add(self, token_id: int) -> str:
        """Append one generated id; return the new visible text (often ''). Check ``stopped`` after."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        searched = len(self._decoded)
        piece = after[len(before) :]
        self._decoded += piece if self._decoded else piece.lstrip()
        cut = self._find_stop(searched)
        if cut is not None:
            self._decoded = self._decoded[:cut]
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._decoded) - self._stop_start_length())

    def finish(self) -> str:
        """The rest of the answer: held text and any final incomplete character. Afterwards
        ``text`` is the answer as the original code decodes it (cut at a stop string), whatever
        was streamed."""
        final = self._decoded.rstrip() if self.stopped else self._decode(self.ids).strip()
        if not final.startswith(self.text):  # not seen with byte-level BPE (tested); fidelity first
            logger.error("streamed text %r is not a prefix of the decoded answer %r", self.text, final)
            self.text = final
            return ""
        rest = final[len(self.text) :]
        self.text = final
        return rest

    def _release(self, end: int) -> str:
        """Emit ``_decoded`` up to ``end``, less trailing whitespace (the answer is stripped)."""
        while end > len(self.text) and self._decoded[end - 1].isspace():
            end -= 1
        piece = self._decoded[len(self.text) : end]
        self.text += piece
        return piece

    def _find_stop(self, searched: int) -> int | None:
        """Where the first stop string in ``_decoded`` starts; the first ``searched`` characters held none."""
        starts = [self._decoded.find(stop, max(0, searched - len(stop) + 1)) for stop in self.stop]
        found = [start for start in starts if start >= 0]
        return min(found) if found else None

    def _stop_start_length(self) -> int:
        """Length of the longest tail of ``_decoded`` that is the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self._decoded)), longest, -1):
                if self._decoded.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
